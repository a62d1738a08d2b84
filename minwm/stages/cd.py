"""Stage 2b: causal consistency distillation (RECIPE.md §4).

Three networks, all teacher-forced on the ground-truth prefix (mode "teacher_forcing", clean_latents = the
ground truth) and all given the clip's cameras:
- student theta (trained; init: the Stage-1 AR model),
- target theta- = EMA of the student, decay 0.99 after every optimiser step: the trainer's EMA of module
  "student" (train.ema_decay, a TRAIN_DEFAULT here), so it is part of every checkpoint and of exact resume,
- teacher phi (the frozen Stage-1 AR model).

Per sample (all randomness from the micro-batch's per-sample streams): i ~ U{0..N-2} on the N-step shift grid
(reference N = 48, shift 5), t = t_i, t' = t_{i+1}, the same t for every frame; x_t = (1 - sigma_t) x0 + sigma_t eps.
Teacher step without grad: v = v_u + g (v_c - v_u) (g = 3, u = the negative prompt), x_t' = x_t - (sigma_t -
sigma_t') v. Loss: MSE(x0 of the student at (x_t, t), x0 of the target at (x_t', t')) with no gradient through the
target; w(t) = 1. With stages.ti2v latent frame 0 stays clean at t = 0 and out of the loss.

Output: model.safetensors = the student (the target is its slow average; both are in the checkpoints).
The student samples with the few-step consistency sampler over inference.timesteps(), chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from minwm.diffusion.losses import add_noise, cfg_from_uncond, euler_step, mse_loss, x0_from_velocity
from minwm.diffusion.schedule import NUM_TRAIN_TIMESTEPS, sigma_grid
from minwm.errors import MinwmError
from minwm.stages import common

NAME = "cd"
INPUTS: dict[str, str] = {"init": "ar", "teacher": "ar"}
# The target network's EMA (reference 0.99 every step, from the first step).
TRAIN_DEFAULTS: dict[str, Any] = {"ema_decay": 0.99, "ema_start": 0}


@dataclass
class Params:
    # The CD grid: N steps on shift_s(1 - i/N) (reference 48; the minWM camera line 50), shift 5.
    grid_steps: int = 48
    shift: float = 5.0
    # Teacher CFG on v over text: v_u + g (v_c - v_u) with the negative prompt (1: conditional only).
    guidance: float = 3.0

    def __post_init__(self):
        if self.grid_steps < 2:
            raise ValueError(f"grid_steps: expected >= 2, got {self.grid_steps}")
        if self.shift <= 0:
            raise ValueError(f"shift: expected > 0, got {self.shift}")


# ---- pure parts -------------------------------------------------------------------------------------------

def frame_sigmas(index: torch.Tensor, sigmas: torch.Tensor, frames: int, n_clean: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_t, sigma_t') per frame [B, F] float64 for per-sample grid indices [B]: sigmas[i], sigmas[i + 1],
    the same for every frame except the first n_clean (clean condition frames: 0)."""
    index = torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()
    if len(index) and (int(index.min()) < 0 or int(index.max()) + 1 >= len(sigmas)):
        raise MinwmError(f"cd index out of range for a grid of {len(sigmas)} steps")
    s_t = sigmas[index][:, None].repeat(1, frames)
    s_n = sigmas[index + 1][:, None].repeat(1, frames)
    s_t[:, :n_clean] = 0.0
    s_n[:, :n_clean] = 0.0
    return s_t, s_n


@torch.no_grad()
def cd_target(x_t: torch.Tensor, sigma_t: torch.Tensor, sigma_next: torch.Tensor, *,
              teacher_cond: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              teacher_uncond: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
              target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], guidance: float) -> torch.Tensor:
    """The consistency target: one CFG Euler step of the teacher, then the target network's x0 there.

    v = v_u + g (v_c - v_u) (teacher_uncond None or g = 1: v_c); x_t' = x_t - (sigma_t - sigma_t') v;
    returns x0 = x_t' - sigma_t' target(x_t', sigma_t'). Callables take (x, sigma [B, F]) and return a velocity."""
    v = teacher_cond(x_t, sigma_t)
    if teacher_uncond is not None and guidance != 1.0:
        v = cfg_from_uncond(cond=v, uncond=teacher_uncond(x_t, sigma_t), scale=guidance)
    x_next = euler_step(x_t, v.to(x_t.dtype), sigma_t, sigma_next)
    return x0_from_velocity(x_next, target(x_next, sigma_next).to(x_t.dtype), sigma_next)


def cd_loss(student_x0: torch.Tensor, target_x0: torch.Tensor, n_clean: int = 0) -> torch.Tensor:
    """MSE between the student's x0 at (x_t, t) and the (detached) target x0, over the noisy frames."""
    return mse_loss(student_x0[:, :, n_clean:], target_x0.detach()[:, :, n_clean:])


# ---- the stage --------------------------------------------------------------------------------------------

class CD:
    """Student, EMA target and frozen teacher over one micro-batch."""

    def __init__(self, student: Any, target: Any, teacher: Any, params: Params, cond: common.Conditioner):
        self.student, self.target, self.teacher = student, target, teacher
        self.p = params
        self.cond = cond
        self.sigmas = sigma_grid(params.grid_steps, params.shift)

    def _velocity(self, model: Any, text: Any, cams: Any, clean: torch.Tensor, extra: dict):
        def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            t = (sigma * NUM_TRAIN_TIMESTEPS).to(device=x.device, dtype=torch.float32)
            return model(x, t, text, cams, mode="teacher_forcing", clean_latents=clean, **extra)
        return fn

    def loss(self, mb: Any) -> dict[str, torch.Tensor]:
        x0 = mb.data["latents"]
        B, C, F, h, w = x0.shape
        n_clean = self.cond.clean_frames(F)
        eps = mb.randn(C, F, h, w, salt="cd/eps", device=x0.device, dtype=x0.dtype)
        index = mb.randint(self.p.grid_steps - 1, salt="cd/index").reshape(-1)   # i ~ U{0..N-2}
        s_t, s_n = frame_sigmas(index, self.sigmas, F, n_clean)
        x_t = add_noise(x0, eps, s_t)   # sigma 0 keeps the clean frames at the ground truth
        text = self.cond.text(mb)
        cams = self.cond.cameras(mb) if self.student.cfg.camera.kind != "none" else None
        extra = self.cond.extra(x0)
        neg = self.cond.negative(B, x0.device) if self.p.guidance != 1.0 else None
        target = cd_target(
            x_t, s_t, s_n,
            teacher_cond=self._velocity(self.teacher, text, cams, x0, extra),
            teacher_uncond=(self._velocity(self.teacher, neg, self.cond.uncond_cameras(cams), x0, extra)
                            if neg is not None else None),
            target=self._velocity(self.target, text, cams, x0, extra), guidance=self.p.guidance)
        v = self._velocity(self.student, text, cams, x0, extra)(x_t, s_t)
        pred = x0_from_velocity(x_t, v.to(x_t.dtype), s_t)
        return {"loss": cd_loss(pred, target, n_clean), "t": (s_t[:, -1] * NUM_TRAIN_TIMESTEPS).mean()}


def run(cfg: Any, out_dir: str | Path, *, init: Optional[dict[str, str]] = None, resume: bool = False,
        max_steps: Optional[int] = None) -> Path:
    ctx = common.prepare(NAME, cfg, out_dir, init, resume, max_steps)
    p: Params = ctx.params
    if ctx.train.ema_decay is None:
        raise MinwmError(f"{ctx.where}: stages.cd.train.ema_decay: the CD target is the student's EMA; set a decay "
                         f"(reference 0.99)")
    data = common.latent_dataset(ctx)
    student = common.build_model(ctx, "init")
    teacher = common.build_model(ctx, "teacher", trainable=False)
    common.check_data(data, student, ctx, chunked=True)
    cond = common.Conditioner(ctx, student, data, need_negative=p.guidance != 1.0)
    trainer = common.make_trainer(ctx, data)
    trainer.add("student", student, trainer.adamw(student.parameters()), ema=True)
    cd = CD(student, trainer.emas["student"].module, teacher, p, cond)
    trainer.fit(lambda tr, mbs, step: tr.accumulate("student", mbs, cd.loss), resume=ctx.resume)
    return common.write_output(ctx, trainer, "student",
                               extra_metrics={"student_timesteps": cfg["inference"].timesteps(),
                                              "grid_steps": p.grid_steps, "target": "ema"})
