"""Flow-matching schedule (Wan2.1 convention): shifted timestep grids, the warped few-step list, loss weights.

Notation (RECIPE.md §1): t in [0, 1000] is what the network receives, sigma = t / 1000,
x_t = (1 - sigma) x0 + sigma eps.

Every grid here is float64 on the CPU. Timesteps must never be cast to bf16 (its spacing near 1000 is 4,
so distinct training timesteps would collapse): `timesteps_for` converts to float32 at least.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from minwm.errors import MinwmError

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(u: torch.Tensor | float, shift: float) -> torch.Tensor:
    """shift_s(u) = s u / (1 + (s - 1) u): pushes sigmas towards 1 (more steps at high noise) for s > 1."""
    if shift <= 0:
        raise MinwmError(f"shift: expected a positive number, got {shift}")
    u = torch.as_tensor(u, dtype=torch.float64)
    return shift * u / (1 + (shift - 1) * u)


def sigma_grid(num_steps: int, shift: float) -> torch.Tensor:
    """sigma_i = shift_s(1 - i/N), i = 0..N-1, descending from 1; float64 [N]. The endpoint 0 is not included."""
    if num_steps < 1:
        raise MinwmError(f"num_steps: expected >= 1, got {num_steps}")
    u = 1.0 - torch.arange(num_steps, dtype=torch.float64) / num_steps
    return shift_sigma(u, shift)


def timestep_grid(num_steps: int, shift: float) -> torch.Tensor:
    """t_i = 1000 sigma_i; float64 [N]. With N = 1000, s = 5 it spans [4.98, 1000]."""
    return NUM_TRAIN_TIMESTEPS * sigma_grid(num_steps, shift)


def sampling_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The grid with its endpoint: float64 [N + 1], sigma_N = 0 (what an N-step sampler walks through)."""
    return torch.cat([sigma_grid(num_steps, shift), torch.zeros(1, dtype=torch.float64)])


def warp_timesteps(steps: Sequence[float], shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Few-step list warped onto the shifted training grid: entry k -> cat(grid, 0)[1000 - k].

    [1000, 750, 500, 250] with shift 5 -> [1000, 937.5, 833.33, 625.0] (float64). Entries must be integers in
    [0, num_train_timesteps] because they index the grid.
    """
    table = NUM_TRAIN_TIMESTEPS * sampling_sigmas(num_train_timesteps, shift)
    out = []
    for k in steps:
        if float(k) != int(k) or not 0 <= int(k) <= num_train_timesteps:
            raise MinwmError(f"timesteps: expected integers in [0, {num_train_timesteps}], got {k!r}")
        out.append(table[num_train_timesteps - int(k)])
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def grid_indices(timesteps: Sequence[float] | torch.Tensor, grid: torch.Tensor, tol: float = 1e-6) -> list[int]:
    """Where each timestep sits on a timestep grid (e.g. the warped student steps on the teacher's 48-step
    Euler grid: [1000, 937.5, 833.3, 625] -> [0, 12, 24, 36]). A timestep off the grid is an error."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    out = []
    for t in torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).tolist():
        i = int((grid - t).abs().argmin())
        if abs(float(grid[i]) - t) > tol * max(1.0, abs(t)):
            raise MinwmError(f"timestep {t:g} is not on the grid (nearest {float(grid[i]):g})")
        out.append(i)
    return out


def loss_weight_table(timesteps: torch.Tensor) -> torch.Tensor:
    """Wan's bell weight over a training grid: y = exp(-2((t - 500)/1000)^2), w = y - min y, mean(w) = 1.

    On the N = 1000, shift-5 grid: w(1000) = 0 and the maximum is about 2.08 at t = 500.
    """
    t = torch.as_tensor(timesteps, dtype=torch.float64)
    y = torch.exp(-2.0 * ((t - 500.0) / 1000.0) ** 2)
    w = y - y.min()
    total = w.sum()
    if total <= 0:
        raise MinwmError("loss weights: the timestep grid needs at least two distinct timesteps")
    return w * (len(w) / total)


def shift_timesteps(t: torch.Tensor | float, shift: float) -> torch.Tensor:
    """Apply the shift to raw timesteps in [0, 1000] (float64): 1000 shift_s(t / 1000)."""
    return NUM_TRAIN_TIMESTEPS * shift_sigma(torch.as_tensor(t, dtype=torch.float64) / NUM_TRAIN_TIMESTEPS, shift)


def dmd_timesteps(t_int: torch.Tensor, shift: float, t_min: float = 20.0, t_max: float = 980.0) -> torch.Tensor:
    """DMD score timesteps: raw t_int ~ U{0..999}, shifted, clamped to [t_min, t_max] (float64)."""
    return shift_timesteps(t_int, shift).clamp(t_min, t_max)


def timesteps_for(t: torch.Tensor | float | Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Timesteps as a tensor on `like`'s device in float32 (or float64 if `like` is float64), never bf16/fp16."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.as_tensor(t, dtype=torch.float64).to(device=like.device, dtype=dtype)


@dataclass
class FlowSchedule:
    """The training grid (N timesteps with shift) with its loss weights; index draws are uniform over it."""

    num_steps: int = NUM_TRAIN_TIMESTEPS
    shift: float = 5.0
    sigmas: torch.Tensor = field(init=False, repr=False)
    timesteps: torch.Tensor = field(init=False, repr=False)
    weights: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self.sigmas = sigma_grid(self.num_steps, self.shift)
        self.timesteps = NUM_TRAIN_TIMESTEPS * self.sigmas
        self.weights = loss_weight_table(self.timesteps) if self.num_steps > 1 else torch.ones(1, dtype=torch.float64)

    def sample_indices(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n grid indices, uniform over 0..N-1 (int64, CPU)."""
        return torch.randint(0, self.num_steps, (n,), generator=generator)

    def at(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sigma, t, weight) at grid indices, float64 on the CPU."""
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        return self.sigmas[index], self.timesteps[index], self.weights[index]
