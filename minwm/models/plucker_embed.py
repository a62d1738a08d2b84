"""Plücker camera injection: per-pixel Plücker rays at latent resolution, patchified like the latents,
so a zero-initialised Linear can add them to the patch tokens."""

from __future__ import annotations

import torch

from minwm.cameras.camera import Cameras
from minwm.cameras.plucker import plucker_rays

PLUCKER_CHANNELS = 6


def plucker_tokens(w2c: torch.Tensor, intrinsics: torch.Tensor, height: int, width: int,
                   patch_size: tuple[int, int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w2c [B, F, 4, 4], intrinsics [B, F, 4] (normalised) -> [B, F*h*w, 6*p_h*p_w] tokens, frame-major
    and row-major within a frame like the patch embedding's, for a latent of height x width (p_t == 1).

    Rays are computed in float64 on the CPU (a latent-sized map, negligible next to the transformer) in the
    world frame the cameras are given in; the data pipeline makes trajectories relative to their first
    frame, and the model must not re-anchor them per call (a streamed chunk shares the trajectory's frame)."""
    p_t, p_h, p_w = patch_size
    B, F = w2c.shape[:2]
    maps = torch.stack([plucker_rays(Cameras(w2c[b].detach().cpu(), intrinsics[b].detach().cpu()),
                                     height, width, torch.float64) for b in range(B)])  # [B, F, 6, H, W]
    h, w = height // p_h, width // p_w
    x = maps.reshape(B, F, PLUCKER_CHANNELS, h, p_h, w, p_w).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(B, F * h * w, PLUCKER_CHANNELS * p_h * p_w).to(device=w2c.device, dtype=dtype)
