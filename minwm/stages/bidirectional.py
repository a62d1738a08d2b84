"""Phase 1: camera-controllable fine-tuning of the bidirectional model (flow matching, full attention).

Per sample one grid index i ~ U{0..N-1} on the shifted training grid (N = 1000, shift 5: t in [4.98, 1000]),
the same t for every latent frame; x_t = (1 - sigma) x0 + sigma eps; the network sees the camera of every
frame (relative to the clip's first frame) and the caption (replaced by the negative prompt with probability
text_dropout, so a model trained from scratch also learns the unconditional branch CFG needs); the loss is the
per-frame mean of w(t) (v - (eps - x0))^2 with Wan's bell weight w (RECIPE.md §1). With stages.ti2v latent
frame 0 is the image condition: held clean at t = 0 and left out of the loss.

The model starts from `model.pretrained` (a diffusers checkpoint; the camera branch is zero-initialised, so
step 0 is the pretrained model) or, for the toy, from a seeded random init.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from minwm.diffusion.losses import add_noise, flow_matching_target, weighted_flow_matching_loss
from minwm.diffusion.schedule import FlowSchedule
from minwm.stages import common

NAME = "bidirectional"
INPUTS: dict[str, str] = {}
TRAIN_DEFAULTS: dict[str, Any] = {}


@dataclass
class Params:
    # Training grid: N timesteps shifted by `shift` (Wan2.1: 1000 and 5).
    shift: float = 5.0
    num_train_timesteps: int = 1000
    # Wan's bell-shaped loss weight over t (false: uniform).
    loss_weighting: bool = True
    # Probability of training a sample on the negative prompt (inference.negative_prompt) instead of its
    # caption: 0 for a pretrained model that already has its unconditional branch; the toy needs it for CFG.
    text_dropout: float = 0.0

    def __post_init__(self):
        if self.shift <= 0:
            raise ValueError(f"shift: expected > 0, got {self.shift}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps: expected >= 2, got {self.num_train_timesteps}")
        if not 0.0 <= self.text_dropout < 1.0:
            raise ValueError(f"text_dropout: expected a probability in [0, 1), got {self.text_dropout}")


def frame_timestep_indices(index: torch.Tensor, frames: int) -> torch.Tensor:
    """Grid indices per block [B, n_blocks] -> per latent frame [B, frames]: constant within each block of
    frames // n_blocks consecutive frames (n_blocks = 1: one index for the whole clip)."""
    B, nb = index.shape
    if nb < 1 or frames % nb:
        raise ValueError(f"{frames} frames cannot be split into {nb} equal blocks")
    return index.repeat_interleave(frames // nb, dim=1)


def flow_matching_loss(model: Any, cond: common.Conditioner, mb: Any, schedule: FlowSchedule, *, mode: str,
                       blocks: int = 1, weighting: bool = True) -> dict[str, torch.Tensor]:
    """The flow-matching loss of one micro-batch, with `blocks` independent timesteps per clip (1: bidirectional;
    F / chunk: teacher forcing). Noise and timesteps come from the micro-batch (exact on resume)."""
    x0 = mb.data["latents"]
    B, C, F, h, w = x0.shape
    eps = mb.randn(C, F, h, w, salt="noise", device=x0.device, dtype=x0.dtype)
    idx = frame_timestep_indices(mb.randint(schedule.num_steps, blocks, salt="t"), F)   # [B, F]
    sigma, t, weight = schedule.at(idx)                                                  # float64 [B, F]
    n_clean = cond.clean_frames(F)
    sigma, t = sigma.clone(), t.clone()
    sigma[:, :n_clean], t[:, :n_clean] = 0.0, 0.0
    x_t = add_noise(x0, eps, sigma)
    kw: dict[str, Any] = {"mode": mode, **cond.extra(x0)}
    if mode == "teacher_forcing":
        kw["clean_latents"] = x0
    cams = cond.cameras(mb) if model.cfg.camera.kind != "none" else None
    v = model(x_t, t.to(device=x0.device, dtype=torch.float32), cond.text(mb), cams, **kw)
    target = flow_matching_target(x0, eps)
    w = weight if weighting else torch.ones_like(weight)
    loss = weighted_flow_matching_loss(v[:, :, n_clean:], target[:, :, n_clean:], w[:, n_clean:].float())
    return {"loss": loss}


def run(cfg: Any, out_dir: str | Path, *, init: Optional[dict[str, str]] = None, resume: bool = False,
        max_steps: Optional[int] = None) -> Path:
    ctx = common.prepare(NAME, cfg, out_dir, init, resume, max_steps)
    p: Params = ctx.params
    data = common.latent_dataset(ctx)
    model = common.build_model(ctx, "init")
    common.check_data(data, model, ctx)
    cond = common.Conditioner(ctx, model, data, text_dropout=p.text_dropout)
    schedule = FlowSchedule(p.num_train_timesteps, p.shift)
    model = common.shard(ctx, model)
    trainer = common.make_trainer(ctx, data)
    trainer.add("model", model, trainer.adamw(model.parameters()))

    def loss_fn(mb):
        return flow_matching_loss(model, cond, mb, schedule, mode="bidirectional", weighting=p.loss_weighting)

    trainer.fit(lambda tr, mbs, step: tr.accumulate("model", mbs, loss_fn), resume=ctx.resume)
    return common.write_output(ctx, trainer, "model")
