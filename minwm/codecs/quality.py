"""Reconstruction quality: PSNR and SSIM of videos in [-1, 1], and a side-by-side strip image."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per sample of videos [B, 3, T, H, W] in [-1, 1] (peak-to-peak 2, i.e. images in [0, 1])."""
    mse = ((x.float() - y.float()) / 2).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-g * g / (2 * sigma * sigma))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11) -> torch.Tensor:
    """Mean SSIM per sample (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03) over
    frames and channels, for videos [B, 3, T, H, W] in [-1, 1]. Windows are 'valid' (no padding); an
    image smaller than the window uses a window of its size."""
    B, C, T, H, W = x.shape
    size = min(window, H, W)
    g = _gaussian(size).to(torch.float64)
    k = (g[:, None] * g[None, :])[None, None].expand(C * T, 1, size, size)
    a = ((x.double() + 1) / 2).permute(0, 1, 2, 3, 4).reshape(B, C * T, H, W)
    b = ((y.double() + 1) / 2).permute(0, 1, 2, 3, 4).reshape(B, C * T, H, W)

    def filt(z):
        return F.conv2d(z, k, groups=C * T)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


def strip_image(original: torch.Tensor, recon: torch.Tensor, max_frames: int = 9, gain: float = 4.0) -> np.ndarray:
    """uint8 [3H, T'W, 3] image for one video [3, T, H, W] in [-1, 1]: rows are the original, the
    reconstruction and |difference| x gain (so small errors are visible)."""
    T = original.shape[1]
    idx = np.linspace(0, T - 1, min(T, max_frames)).round().astype(int)

    def row(v: torch.Tensor) -> np.ndarray:
        v = v[:, idx].permute(2, 1, 3, 0).reshape(v.shape[2], -1, 3)  # [H, T'W, 3]
        return v.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()

    a, b = (original + 1) / 2, (recon + 1) / 2
    return np.concatenate([row(a), row(b), row(((a - b).abs() * gain))], 0)
