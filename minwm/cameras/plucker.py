"""Plücker ray maps: per pixel, the ray through its centre as (moment o x d, unit direction d) in world
coordinates. Resolution-free because the intrinsics are normalised."""

from __future__ import annotations

import torch

from minwm.cameras.camera import Cameras


def ray_directions(cams: Cameras, height: int, width: int) -> torch.Tensor:
    """Unit world-space ray directions [F, H, W, 3] through pixel centres (u + 0.5, v + 0.5)."""
    K = cams.K_pixels(height, width)                                    # [F, 3, 3]
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                          torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], -1)                   # [H, W, 3]
    # Camera-frame direction K^-1 [u, v, 1] (OpenCV: +z forward), then rotate into the world by c2w's R.
    d_cam = pix.reshape(1, -1, 3) @ torch.linalg.inv(K).transpose(-1, -2)   # [F, HW, 3]
    R_c2w = cams.c2w[:, :3, :3]
    d = d_cam @ R_c2w.transpose(-1, -2)
    d = d / d.norm(dim=-1, keepdim=True)
    return d.reshape(len(cams), height, width, 3)


def plucker_rays(cams: Cameras, height: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plücker map [F, 6, H, W]: channels 0-2 the moment o x d, channels 3-5 the direction d.

    Computed in float64 and cast at the end. The world frame is that of `cams`; callers usually pass
    `cams.relative_to_first()` so the map does not depend on where the scene's world origin was."""
    if height < 1 or width < 1:
        raise ValueError(f"plucker_rays: size {height}x{width} must be positive")
    d = ray_directions(cams, height, width)                             # [F, H, W, 3]
    o = cams.positions[:, None, None, :].expand_as(d)
    m = torch.linalg.cross(o, d, dim=-1)
    return torch.cat([m, d], -1).permute(0, 3, 1, 2).to(dtype).contiguous()
