"""Per-frame adaLN modulation shared by both adapters: every latent frame has its own timestep, so its tokens get
their own scale / shift / gate. Tokens are laid out frame-major ([B, frames*tokens_per_frame, D])."""

from __future__ import annotations

import torch


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x [B, S, D] * (1 + scale) + shift, with scale/shift [B, nf, D] per frame (S a multiple of nf)."""
    B, S, D = x.shape
    nf = scale.shape[1]
    return (x.view(B, nf, S // nf, D) * (1 + scale[:, :, None]) + shift[:, :, None]).view(B, S, D)


def gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x [B, S, D] * g, with g [B, nf, D] per frame."""
    B, S, D = x.shape
    nf = g.shape[1]
    return (x.view(B, nf, S // nf, D) * g[:, :, None]).view(B, S, D)
