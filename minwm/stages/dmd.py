"""Stage 3: asymmetric DMD with self-rollout (Causal Forcing Stage 3; RECIPE.md §5, DESIGN.md §3).

Three networks, all camera-conditioned on the clip's (relative) cameras:
- generator G: the few-step causal student (init: the Stage-2 `cd` or `ode` output), trained, EMA'd;
- real score: the frozen camera bidirectional model (the Phase-1 output), CFG over text on x0:
  x0_real = x0_c + g (x0_c - x0_u), g = 3 (`cfg_from_cond`; the unconditional text is the negative prompt);
- fake score (critic): a trainable copy of the same bidirectional model, conditional only.

One iteration (`step`):
- generator (every `generator_every`-th step, from step 0): exit index s ~ U{0..K-1} from the trainer's step
  generator (the same on every rank and after resume); a self-rollout of G from noise, block by block with a
  KV cache, gradient only through each block's exit step (stages/rollout.py); score timestep t_int ~ U{0..999}
  per sample, shifted by `shift`, clamped to [t_min, t_max], the same for all frames; x_t = (1 - sigma) x +
  sigma eps; g = (x0_fake - x0_real) / mean|x - x0_real| per sample (float64); L_G = 0.5 mean((x - sg(x - g))^2).
- critic (every step): a fresh no-grad rollout with its own exit index, re-noised at a fresh score timestep;
  flow-matching loss of the fake score, target eps - x (unweighted, as the reference's critic).
The generator runs first on its steps (it reads the critic before this step's critic update, as the reference).

The rollout uses the inference section's few-step list (`inference.timesteps()`: [1000, 750, 500, 250] warped
with shift 5 -> [1000, 937.5, 833.3, 625.0]) and its KV-cache window, so training rollouts and inference run
the same sampler on the same cache (RECIPE.md §8). All noise comes from the micro-batch's per-sample streams.
Image-to-video (stages.ti2v): latent frame 0 is the clip's own latent, held clean at t = 0 in the rollout and in
both scores, and left out of both losses.

Output: model.safetensors = the generator's EMA weights when train.ema_decay is set (reference 0.99 from step
200), else its weights; config.yaml; metrics.json (history: generator/loss on generator steps, critic/loss
every step; generator/real_gap = mean |x - x0_real|, how far the real score moves the rollout; generator/x_std,
the rollout's std, a cheap collapse / blow-up signal).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from minwm.diffusion.losses import (add_noise, cfg_from_cond, critic_flow_matching_loss, dmd_generator_loss,
                                    dmd_gradient, x0_from_velocity)
from minwm.diffusion.schedule import NUM_TRAIN_TIMESTEPS, dmd_timesteps
from minwm.diffusion.self_rollout import sample_exit_index
from minwm.stages import common
from minwm.stages.rollout import generator_rollout

INPUTS = {"init": "cd|ode", "real": "bidirectional", "fake": "bidirectional"}

# Reference (Self Forcing / Causal Forcing): generator lr 2e-6 (the train default), betas (0, 0.999), wd 0.01,
# clip 10 (train defaults too); generator EMA 0.99 from step 200.
TRAIN_DEFAULTS = {"ema_decay": 0.99, "ema_start": 200}


@dataclass
class Params:
    # Shift of the score timesteps: t = 1000 shift_s(t_int / 1000), t_int ~ U{0..999}, clamped to [t_min, t_max].
    shift: float = 5.0
    t_min: float = 20.0
    t_max: float = 980.0
    # Real-score CFG over text on x0: x0_c + g (x0_c - x0_u). The fake score's (0: conditional only).
    real_guidance: float = 3.0
    fake_guidance: float = 0.0
    # The critic steps every iteration, the generator on every N-th (steps 0, N, 2N, ...).
    generator_every: int = 5
    # The critic's AdamW learning rate (the generator's is train.lr).
    critic_lr: float = 4e-7

    def __post_init__(self):
        if self.shift <= 0:
            raise ValueError(f"shift: expected > 0, got {self.shift}")
        if not 0 <= self.t_min < self.t_max <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"t_min, t_max: expected 0 <= t_min < t_max <= 1000, got {self.t_min}, {self.t_max}")
        if self.generator_every < 1:
            raise ValueError(f"generator_every: expected >= 1, got {self.generator_every}")
        if self.critic_lr <= 0:
            raise ValueError(f"critic_lr: expected > 0, got {self.critic_lr}")


def noise_stream(mb, salt: str, device):
    """noise_fn(ref) for the rollout's re-noising: each call draws the next per-sample stream of `mb`
    (salt/0, salt/1, ...), so the draws depend only on (seed, data position, call order), never on the
    global RNG, the world size or a resume."""
    counter = itertools.count()

    def noise(ref: torch.Tensor) -> torch.Tensor:
        return mb.randn(*ref.shape[1:], salt=f"{salt}/{next(counter)}", device=device).to(ref.dtype)
    return noise


class DMD:
    """The three networks and DMD's two losses over one micro-batch. `cond` supplies text / negative text /
    cameras per micro-batch (common.Conditioner); `timesteps` is the student's few-step list."""

    def __init__(self, generator, real, fake, params: Params, timesteps: list[float], cond,
                 cache_kw: Optional[dict] = None):
        self.generator, self.real, self.fake = generator, real, fake
        self.p = params
        self.timesteps = [float(t) for t in timesteps]
        self.cond = cond
        self.cache_kw = dict(cache_kw or {})

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def _cameras(self, mb):
        return self.cond.cameras(mb) if self.generator.cfg.camera.kind != "none" else None

    def rollout(self, mb, exit_index: int, salt: str) -> torch.Tensor:
        """The generator's self-rollout for this micro-batch's texts and cameras (grad as the caller's mode).
        Image-to-video (stages.ti2v): latent frame 0 is the clip's own, held clean."""
        lat = mb.data["latents"]
        dev = lat.device
        B, _, F, H, W = lat.shape
        noise = mb.randn(*lat.shape[1:], salt=f"{salt}/init", device=dev).to(lat.dtype)
        cache = self.generator.new_cache(B, H, W, **self.cache_kw)
        clean_first = lat[:, :, :1] if self.cond.clean_frames(F) else None
        return generator_rollout(self.generator, noise, self.timesteps, exit_index, self.cond.text(mb),
                                 self._cameras(mb), noise_stream(mb, f"{salt}/renoise", dev), cache=cache,
                                 clean_first=clean_first, extra=self.cond.extra(lat))

    def score_noise(self, mb, x: torch.Tensor, salt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t [B, F] float64, eps): x re-noised at a DMD score timestep, the same t for all frames (but
        0 for the clean condition frame of image-to-video)."""
        B, _, F = x.shape[:3]
        t = dmd_timesteps(mb.randint(NUM_TRAIN_TIMESTEPS, salt=f"{salt}/t"), self.p.shift, self.p.t_min, self.p.t_max)
        t = t[:, None].repeat(1, F)
        t[:, :self.cond.clean_frames(F)] = 0.0
        eps = mb.randn(*x.shape[1:], salt=f"{salt}/eps", device=x.device).to(x.dtype)
        return add_noise(x.detach(), eps, t / NUM_TRAIN_TIMESTEPS), t, eps

    def _x0(self, model, x_t, t, text, mb, cameras=None) -> torch.Tensor:
        cameras = self._cameras(mb) if cameras is None else cameras
        v = model(x_t, t.to(x_t.device), text, cameras, mode="bidirectional",
                  **self.cond.extra(mb.data["latents"]))
        return x0_from_velocity(x_t, v.to(x_t.dtype), t / NUM_TRAIN_TIMESTEPS)

    def _guided_x0(self, model, x_t, t, mb, guidance: float) -> torch.Tensor:
        x0_c = self._x0(model, x_t, t, self.cond.text(mb), mb)
        if guidance == 0:
            return x0_c
        x0_u = self._x0(model, x_t, t, self.cond.negative(x_t.shape[0], x_t.device), mb,
                       self.cond.uncond_cameras(self._cameras(mb)))
        return cfg_from_cond(cond=x0_c, uncond=x0_u, scale=guidance)

    def generator_loss(self, mb, exit_index: int) -> dict[str, torch.Tensor]:
        x = self.rollout(mb, exit_index, "generator")
        n = self.cond.clean_frames(x.shape[2])  # a clean condition frame is outside the loss
        with torch.no_grad():
            x_t, t, _ = self.score_noise(mb, x, "generator")
            x0_real = self._guided_x0(self.real, x_t, t, mb, self.p.real_guidance)[:, :, n:]
            x0_fake = self._guided_x0(self.fake, x_t, t, mb, self.p.fake_guidance)[:, :, n:]
        x = x[:, :, n:]
        with torch.no_grad():
            g = dmd_gradient(x, x0_fake, x0_real)
            gap = (x.detach().double() - x0_real.double()).abs().mean()  # g's normaliser, averaged
        return {"loss": dmd_generator_loss(x, g), "g_abs": g.abs().mean(), "real_gap": gap,
                "x_std": x.detach().float().std()}

    def critic_loss(self, mb, exit_index: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            x = self.rollout(mb, exit_index, "critic")
            x_t, t, eps = self.score_noise(mb, x, "critic")
        n = self.cond.clean_frames(x.shape[2])
        v = self.fake(x_t, t.to(x_t.device), self.cond.text(mb), self._cameras(mb), mode="bidirectional",
                      **self.cond.extra(mb.data["latents"]))
        return {"loss": critic_flow_matching_loss(v[:, :, n:], x[:, :, n:], eps[:, :, n:])}

    def step(self, trainer, micro_batches, step: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if step % self.p.generator_every == 0:
            s = sample_exit_index(self.num_steps, trainer.step_generator(step, "dmd/generator_exit"))
            out |= trainer.accumulate("generator", micro_batches, lambda mb: self.generator_loss(mb, s))
            out["generator/exit_index"] = float(s)
        s = sample_exit_index(self.num_steps, trainer.step_generator(step, "dmd/critic_exit"))
        out |= trainer.accumulate("critic", micro_batches, lambda mb: self.critic_loss(mb, s))
        return out


def cache_settings(cfg) -> dict[str, Any]:
    """The rollout's KV-cache window / sinks: the inference section's overrides of the model's, as at inference."""
    inf = cfg["inference"]
    kw: dict[str, Any] = {}
    if inf.window_frames is not None:
        kw["window_frames"] = inf.window_frames
    if inf.sink_frames is not None:
        kw["sink_frames"] = inf.sink_frames
    return kw


def run(cfg, out_dir, *, init: Optional[dict[str, str]] = None, resume: bool = False,
        max_steps: Optional[int] = None) -> Path:
    ctx = common.prepare("dmd", cfg, out_dir, init, resume, max_steps)
    p = ctx.params
    timesteps = cfg["inference"].timesteps()
    data = common.latent_dataset(ctx)
    generator = common.build_model(ctx, "init")
    real = common.build_model(ctx, "real", trainable=False)
    fake = common.build_model(ctx, "fake")
    common.check_data(data, generator, ctx, chunked=True)
    trainer = common.make_trainer(ctx, data)
    trainer.add("generator", generator, trainer.adamw(generator.parameters()), ema=ctx.train.ema_decay is not None)
    trainer.add("critic", fake, trainer.adamw(fake.parameters(), lr=p.critic_lr))
    cond = common.Conditioner(ctx, generator, data, need_negative=p.real_guidance != 0 or p.fake_guidance != 0)
    dmd = DMD(generator, real, fake, p, timesteps, cond, cache_settings(cfg))
    trainer.fit(dmd.step, resume=ctx.resume)
    return common.write_output(ctx, trainer, "generator", use_ema=ctx.train.ema_decay is not None,
                               extra_metrics={"student_timesteps": timesteps})
