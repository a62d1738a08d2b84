"""Pure flow-matching math, targets and losses shared by all stages (RECIPE.md §1-5).

Latents are [B, C, F, H, W] (the diffusers Wan layout) unless `frame_dim` says otherwise. A per-sample
quantity (sigma, weight) is [B]; a per-frame one is [B, F] and is laid along `frame_dim`. All sigma
arithmetic runs in at least float32 (float64 where the reference does), whatever dtype the latents have.
"""

from __future__ import annotations

import torch

from minwm.errors import MinwmError

FRAME_DIM = 2  # [B, C, F, H, W]


def expand_to(v: torch.Tensor | float, x: torch.Tensor, frame_dim: int = FRAME_DIM) -> torch.Tensor:
    """Broadcast a scalar, per-sample [B] or per-frame [B, F] quantity against x; float32 or float64."""
    dtype = torch.float64 if (isinstance(v, torch.Tensor) and v.dtype == torch.float64) or x.dtype == torch.float64 \
        else torch.float32
    v = torch.as_tensor(v).to(device=x.device, dtype=dtype)
    if v.ndim == 0:
        return v
    shape = [1] * x.ndim
    if v.ndim == 1:
        if v.shape[0] != x.shape[0]:
            raise MinwmError(f"per-sample values: expected {x.shape[0]} entries, got {v.shape[0]}")
        shape[0] = v.shape[0]
    elif v.ndim == 2:
        if v.shape[0] != x.shape[0] or v.shape[1] != x.shape[frame_dim]:
            raise MinwmError(f"per-frame values: expected [{x.shape[0]}, {x.shape[frame_dim]}], got {list(v.shape)}")
        shape[0], shape[frame_dim] = v.shape
    else:
        raise MinwmError(f"expected a scalar, [B] or [B, F] tensor, got shape {list(v.shape)}")
    return v.reshape(shape)


# ---- flow matching ---------------------------------------------------------------------------------------

def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma, frame_dim: int = FRAME_DIM) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps, computed in >= float32 and returned in x0's dtype."""
    s = expand_to(sigma, x0, frame_dim)
    return ((1 - s) * x0.to(s.dtype) + s * eps.to(s.dtype)).to(x0.dtype)


def flow_matching_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The velocity the network regresses: v = eps - x0 (= d x_t / d sigma)."""
    return eps - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma, frame_dim: int = FRAME_DIM) -> torch.Tensor:
    """x0 = x_t - sigma v (float64 arithmetic, returned in x_t's dtype)."""
    s = expand_to(torch.as_tensor(sigma, dtype=torch.float64), x_t, frame_dim).double()
    return (x_t.double() - s * v.double()).to(x_t.dtype)


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, sigma, frame_dim: int = FRAME_DIM) -> torch.Tensor:
    """v = (x_t - x0) / sigma, in float64 like the reference (sigma must be > 0)."""
    s = expand_to(torch.as_tensor(sigma, dtype=torch.float64), x_t, frame_dim).double()
    return ((x_t.double() - x0.double()) / s).to(x_t.dtype)


def weighted_flow_matching_loss(v_pred: torch.Tensor, target: torch.Tensor, weight=None,
                                frame_dim: int = FRAME_DIM) -> torch.Tensor:
    """mean over samples and frames of w(t) * (per-frame mean of (v_pred - target)^2), in float32.

    `weight` is None (all 1), per-sample [B] or per-frame [B, F]; the mean over (C, H, W) is taken per frame
    first so a frame's weight does not depend on its size.
    """
    err = (v_pred.float() - target.float()) ** 2
    dims = [d for d in range(1, err.ndim) if d != frame_dim]
    per_frame = err.mean(dim=dims)  # [B, F]
    if weight is None:
        return per_frame.mean()
    w = torch.as_tensor(weight).to(device=per_frame.device, dtype=torch.float32)
    if w.ndim == 1:
        w = w[:, None]
    return (w * per_frame).mean()


def critic_flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, weight=None,
                              frame_dim: int = FRAME_DIM) -> torch.Tensor:
    """The fake score's loss in DMD: flow matching on re-noised generator samples x0 (no grad into x0)."""
    return weighted_flow_matching_loss(v_pred, flow_matching_target(x0.detach(), eps), weight, frame_dim)


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain mean squared error in float32 (ODE regression: x0_hat vs ODE endpoint; CD: student vs target)."""
    return ((pred.float() - target.float()) ** 2).mean()


# ---- classifier-free guidance: two forms, named so they cannot be mixed up ----------------------------------

def cfg_from_uncond(*, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale (cond - uncond). Teacher sampling: scale 1 is the conditional prediction.

    (Used on v by the ODE teacher, CFG 6, and the CD teacher, CFG 3.)
    """
    return uncond + scale * (cond - uncond)


def cfg_from_cond(*, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """cond + scale (cond - uncond). Scale 0 is the conditional prediction; equals cfg_from_uncond(scale + 1).

    (Used on x0 by DMD's real score, scale 3.)
    """
    return cond + scale * (cond - uncond)


# ---- causal consistency distillation ----------------------------------------------------------------------

def cd_indices(n: int, num_steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Grid indices i ~ U{0..N-2} for CD pairs (t = t_i, t' = t_{i+1}, so t' > 0)."""
    if num_steps < 2:
        raise MinwmError(f"cd grid: expected at least 2 steps, got {num_steps}")
    return torch.randint(0, num_steps - 1, (n,), generator=generator)


def cd_pair(x0: torch.Tensor, eps: torch.Tensor, sigmas: torch.Tensor, index: torch.Tensor,
            frame_dim: int = FRAME_DIM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, sigma_t, sigma_next) for a CD pair: x_t = noise(x0, eps, sigma_i), sigma_next = sigma_{i+1}.

    `sigmas` is the descending float64 grid (schedule.sigma_grid); `index` is per sample [B] (the same t for
    every frame of a sample). sigma_t and sigma_next come back as float64 [B].
    """
    index = torch.as_tensor(index, dtype=torch.long).cpu()
    if int(index.max()) + 1 >= len(sigmas) or int(index.min()) < 0:
        raise MinwmError(f"cd index out of range for a grid of {len(sigmas)} steps")
    s_t, s_next = sigmas[index], sigmas[index + 1]
    return add_noise(x0, eps, s_t, frame_dim), s_t, s_next


def euler_step(x_t: torch.Tensor, v: torch.Tensor, sigma_t, sigma_next, frame_dim: int = FRAME_DIM) -> torch.Tensor:
    """One flow ODE Euler step: x_t' = x_t - (sigma_t - sigma_t') v (float64 arithmetic, x_t's dtype)."""
    ds = torch.as_tensor(sigma_t, dtype=torch.float64) - torch.as_tensor(sigma_next, dtype=torch.float64)
    d = expand_to(ds, x_t, frame_dim).double()
    return (x_t.double() - d * v.double()).to(x_t.dtype)


# ---- DMD ----------------------------------------------------------------------------------------------

def dmd_gradient(x: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """Normalised DMD gradient, float64, no grad: g = (x0_fake - x0_real) / mean_{C,F,H,W} |x - x0_real|.

    The mean is per sample over every non-batch dim; nan_to_num guards a zero denominator.
    """
    with torch.no_grad():
        x64, fake, real = x.detach().double(), x0_fake.detach().double(), x0_real.detach().double()
        denom = (x64 - real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        return torch.nan_to_num((fake - real) / denom)


def dmd_generator_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """L = 0.5 mean((x - stopgrad(x - g))^2) in float64; dL/dx = g / x.numel() (cast back to x's dtype)."""
    x64 = x.double()
    target = (x64 - grad.double()).detach()
    return 0.5 * ((x64 - target) ** 2).mean()
