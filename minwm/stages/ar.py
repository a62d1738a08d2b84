"""Stage 1: teacher-forcing autoregressive diffusion (RECIPE.md §2).

Initialised from the camera bidirectional model. Each clip of F latent frames is split into blocks of
model.chunk_frames; every block draws its own grid index (t constant within a block, independent across blocks),
the noisy copy is x_t = (1 - sigma) x0 + sigma eps per frame, and the backbone runs in teacher-forcing mode on
[clean ground truth | noisy] (the clean copy at t = 0, no noise augmentation, both copies at the same RoPE
positions and cameras, under the block-causal mask; only the noisy half reaches the output head). Loss: the
per-frame mean of w(t) (v - (eps - x0))^2 over the noisy half. Reference optimiser: AdamW lr 2e-6, betas
(0, 0.999), wd 0.01, clip 10 -- the global `train` defaults.

`generate` samples the resulting model the way it will be used: chunk by chunk in streaming mode with the KV
cache, a multi-step Euler integration per chunk (optionally with CFG), then a t = 0 pass that commits the clean
chunk's keys/values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from minwm.diffusion.schedule import FlowSchedule
from minwm.errors import MinwmError
from minwm.stages import bidirectional, common
from minwm.stages.bidirectional import flow_matching_loss

NAME = "ar"
INPUTS: dict[str, str] = {"init": "bidirectional"}
TRAIN_DEFAULTS: dict[str, Any] = {}


@dataclass
class Params(bidirectional.Params):
    """The same flow-matching settings as Phase 1 (shift, grid, loss weight, CFG dropout to the negative prompt,
    which keeps the toy's unconditional branch alive for the CFG teachers of Stage 2), now per block."""


def run(cfg: Any, out_dir: str | Path, *, init: Optional[dict[str, str]] = None, resume: bool = False,
        max_steps: Optional[int] = None) -> Path:
    ctx = common.prepare(NAME, cfg, out_dir, init, resume, max_steps)
    p: Params = ctx.params
    data = common.latent_dataset(ctx)
    model = common.build_model(ctx, "init")
    common.check_data(data, model, ctx, chunked=True)
    cond = common.Conditioner(ctx, model, data, text_dropout=p.text_dropout)
    schedule = FlowSchedule(p.num_train_timesteps, p.shift)
    frames = data[0]["latents"].shape[1]
    blocks = frames // model.cfg.chunk_frames
    model = common.shard(ctx, model)
    trainer = common.make_trainer(ctx, data)
    trainer.add("model", model, trainer.adamw(model.parameters()))

    def loss_fn(mb):
        return flow_matching_loss(model, cond, mb, schedule, mode="teacher_forcing", blocks=blocks,
                                  weighting=p.loss_weighting)

    trainer.fit(lambda tr, mbs, step: tr.accumulate("model", mbs, loss_fn), resume=ctx.resume)
    return common.write_output(ctx, trainer, "model")


@torch.no_grad()
def generate(model: Any, text: Any, cameras: Optional[tuple[torch.Tensor, torch.Tensor]], noise: torch.Tensor, *,
             steps: int = 48, shift: float = 5.0, guidance: float = 1.0, negative_text: Any = None,
             negative_cameras: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
             clean_first: Optional[torch.Tensor] = None, image_latents: Optional[torch.Tensor] = None,
             window_frames: Optional[int] = -1) -> torch.Tensor:
    """Autoregressive sampling of a teacher-forcing-trained model: for each chunk of noise [B, C, F, h, w]
    (F a multiple of chunk_frames), `steps` Euler steps on the shift grid in streaming mode over the KV cache,
    then one t = 0 pass with commit=True (inference.sampling.multistep_chunk, what WorldModel runs). guidance != 1
    applies v_u + g (v_c - v_u) with `negative_text` and `negative_cameras` (default: `cameras`), the two branches
    on separate KV caches. clean_first [B, C, 1, h, w] holds latent frame 0 clean (TI2V).
    Returns the clean latents [B, C, F, h, w]."""
    from minwm.inference.sampling import Conditioning, multistep_chunk

    B, C, F, h, w = noise.shape
    c = model.cfg.chunk_frames
    if F % c:
        raise MinwmError(f"generate: {F} latent frames is not a multiple of chunk_frames={c}")
    use_u = guidance != 1.0
    if use_u and negative_text is None:
        raise MinwmError("generate: guidance != 1 needs negative_text")
    neg_cams = cameras if negative_cameras is None else negative_cameras
    caches = (model.new_cache(B, h, w, window_frames=window_frames),
              model.new_cache(B, h, w, window_frames=window_frames) if use_u else None)

    def chunk(cams, k):
        return None if cams is None else (cams[0][:, k * c:(k + 1) * c], cams[1][:, k * c:(k + 1) * c])

    out = []
    for k in range(F // c):
        hold = clean_first if k == 0 else None
        cond = Conditioning(text, chunk(cameras, k), hold, image_latents)
        cond_u = Conditioning(negative_text, chunk(neg_cams, k), hold, image_latents) if use_u else None
        x0, _ = multistep_chunk(model, noise[:, :, k * c:(k + 1) * c], cond, cond_u, caches, steps, shift, guidance,
                                "euler")
        out.append(x0)
    return torch.cat(out, dim=2)

