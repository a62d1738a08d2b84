"""Self-rollout of a streaming backbone (Self Forcing / Causal Forcing Stage 3), at model level.

`diffusion.self_rollout.self_rollout` is the pure control flow (which step runs with grad, re-noising, the
clean refresh); this module supplies its generator callable over a real backbone: block b of the clip is
one chunk of `chunk_frames` latent frames, denoised in "streaming" mode against a fresh KV cache, with the
chunk's own cameras; the t = 0 refresh call runs with commit=True and writes the chunk's clean keys/values.

Why no gradient reaches the cache: the cache stores detached keys/values (models/kv_cache.py), the refresh
runs under no_grad anyway, and every step before the exit step runs under no_grad. The generator therefore
gets gradient only through the exit-step call of each block, and through nothing it attended to in the cache.
The text's cross-attention keys/values (Wan's `encode_text`) are computed once per rollout under the caller's
grad mode, so the exit steps also train the text projections, exactly as a per-call text encoding would.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from minwm.diffusion.losses import x0_from_velocity
from minwm.diffusion.samplers import NoiseFn
from minwm.diffusion.schedule import NUM_TRAIN_TIMESTEPS
from minwm.diffusion.self_rollout import self_rollout
from minwm.errors import MinwmError

Cameras = Optional[tuple[torch.Tensor, torch.Tensor]]


def split_blocks(latents: torch.Tensor, chunk_frames: int) -> list[torch.Tensor]:
    """[B, C, F, H, W] -> F / chunk_frames blocks [B, C, chunk, H, W] (F must be a multiple of the chunk)."""
    F = latents.shape[2]
    if F % chunk_frames or F == 0:
        raise MinwmError(f"self-rollout: {F} latent frames is not a positive multiple of "
                         f"model.chunk_frames={chunk_frames}")
    return list(latents.split(chunk_frames, dim=2))


def block_cameras(cameras: Cameras, block: int, chunk_frames: int) -> Cameras:
    """The (w2c, intrinsics) of block `block`'s frames."""
    if cameras is None:
        return None
    sl = slice(block * chunk_frames, (block + 1) * chunk_frames)
    return cameras[0][:, sl], cameras[1][:, sl]


def prepare_text(backbone, text: Any) -> Any:
    """Per-rollout text: Wan's per-block cross-attention K/V computed once (under the caller's grad mode);
    adapters without `encode_text` take the raw dict on every call."""
    encode = getattr(backbone, "encode_text", None)
    return encode(text) if encode is not None else text


def streaming_generator(backbone, cache, text: Any, cameras: Cameras, clean_first: Optional[torch.Tensor] = None,
                        extra: Optional[dict] = None):
    """generator(x, t, block) -> x0_hat for `self_rollout`: one streaming pass of `backbone` over block
    `block` (its cameras), x0 = x_t - sigma v; a call at t = 0 commits the block's keys/values to `cache`.

    clean_first [B, C, 1, H, W] (image-to-video): latent frame 0 is held at this latent with t = 0 in every pass
    of block 0 and is its own x0 (no gradient); `extra` (e.g. image_latents) goes to every call."""
    chunk = int(backbone.cfg.chunk_frames)
    extra = dict(extra or {})

    def generator(x: torch.Tensor, t: float, block: int) -> torch.Tensor:
        commit = float(t) == 0.0
        cams = block_cameras(cameras, block, chunk)
        hold = clean_first is not None and block == 0
        tt: Any = float(t)
        if hold:
            x = torch.cat([clean_first.to(x.dtype), x[:, :, 1:]], 2)
            tt = torch.full((x.shape[0], x.shape[2]), float(t), dtype=torch.float64, device=x.device)
            tt[:, 0] = 0.0
        v = backbone(x, tt, text, cams, mode="streaming", cache=cache, commit=commit, output=not commit, **extra)
        if commit:
            return x  # the refresh only writes the cache; at sigma = 0 the clean input is its own x0
        sigma = tt / NUM_TRAIN_TIMESTEPS if hold else float(t) / NUM_TRAIN_TIMESTEPS
        x0 = x0_from_velocity(x, v.to(x.dtype), sigma)
        return torch.cat([x[:, :, :1], x0[:, :, 1:]], 2) if hold else x0

    return generator


def generator_rollout(backbone, noise: torch.Tensor, timesteps: Sequence[float], exit_index: int,
                      text: Any, cameras: Cameras, noise_fn: NoiseFn, cache=None,
                      clean_first: Optional[torch.Tensor] = None, extra: Optional[dict] = None) -> torch.Tensor:
    """Self-rollout of `backbone` from `noise` [B, C, F, H, W]: the generated clip [B, C, F, H, W].

    Every block uses exit step `exit_index` of `timesteps` (the warped few-step list); the output carries
    gradient from the exit-step calls only when grad is enabled by the caller (run it under no_grad for the
    critic). `noise_fn(ref)` supplies the fresh re-noising noise. `cache`: a fresh `backbone.new_cache(...)`
    by default (the model's window and sink frames, as at inference). clean_first / extra: image-to-video,
    see `streaming_generator` (frame 0 of the result is then clean_first).
    """
    B, _, _, H, W = noise.shape
    blocks = split_blocks(noise, int(backbone.cfg.chunk_frames))
    if cache is None:
        cache = backbone.new_cache(B, H, W)
    gen = streaming_generator(backbone, cache, prepare_text(backbone, text), cameras, clean_first, extra)
    outs = self_rollout(gen, blocks, timesteps, exit_index, noise_fn=noise_fn)
    return torch.cat(outs, dim=2)
