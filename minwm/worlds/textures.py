"""Analytically filtered procedural patterns (torch, elementwise).

Each pattern is evaluated at a ray hit with the width `w` (scene units) that the pixel covers on the
surface there. A square wave of frequency f box-filtered over w ramps linearly across its edges over
a width w, and once a period shrinks to about a pixel nothing of it can be represented, so the
pattern fades to its mean. That keeps textures free of aliasing/moire at 64x64 without
supersampling, which is what makes the toy codec's job (>= 25 dB) reasonable.
"""

from __future__ import annotations

import math

import torch

TWO_PI = 2 * math.pi


def fade(fw: torch.Tensor) -> torch.Tensor:
    """Contrast left for a pattern whose period covers 1/fw pixels: 1 up to 0.4 cycles per pixel,
    0 from 0.7 on (smoothstep in between). Tuned against 4x4-supersampled renders (the ramp in
    `square` already removes most of the energy above Nyquist)."""
    x = ((fw - 0.4) / 0.3).clamp(0, 1)
    return 1 - x * x * (3 - 2 * x)


def square(u: torch.Tensor, f: torch.Tensor | float, w: torch.Tensor) -> torch.Tensor:
    """Filtered square wave sign(sin(2 pi f u)) in [-1, 1]."""
    fw = f * w
    s = torch.sin(TWO_PI * f * u)
    # Near a zero crossing sin ~ 2 pi f du, and the filtered edge ramps over du in [-w/2, w/2].
    return (s / (math.pi * fw).clamp_min(1e-4)).clamp(-1, 1) * fade(fw)


def sine(u: torch.Tensor, f: torch.Tensor | float, w: torch.Tensor, phase: float = 0.0) -> torch.Tensor:
    """Filtered sinusoid (already band-limited; only the fade applies)."""
    return torch.sin(TWO_PI * f * u + phase) * fade(f * w)


def checker(u: torch.Tensor, v: torch.Tensor, fu, fv, w: torch.Tensor) -> torch.Tensor:
    return square(u, fu, w) * square(v, fv, w)
