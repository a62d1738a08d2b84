"""Self-rollout (Self Forcing): the generator rolls out block by block on its own outputs (RECIPE.md §5).

The control flow is a pure function over a generator callable so its gradient path can be tested with a toy:

    generator(x, t, block) -> x0_hat

`generator` owns the KV cache: a call at t > 0 denoises block `block` attending to the cache of earlier
blocks; a call at t = 0 on the block's clean output writes its clean keys/values into the cache. For each
block, steps k < s run without grad (x0_hat, then re-noise to t_{k+1} with fresh noise), step k = s runs
with grad and its x0_hat is the block output, then a no-grad t = 0 pass refreshes the cache. So gradients
flow only through the exit step of each block, never through the cache or earlier steps.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from minwm.diffusion.samplers import NoiseFn, default_noise_fn, renoise
from minwm.errors import MinwmError

Generator = Callable[[torch.Tensor, float, int], torch.Tensor]


def sample_exit_index(num_steps: int, generator: torch.Generator | None = None) -> int:
    """s ~ U{0..K-1}. Draw it from a generator seeded identically on every rank (Trainer.step_generator)
    so all ranks run the same number of generator passes."""
    return int(torch.randint(0, num_steps, (1,), generator=generator))


def self_rollout(generator: Generator, noise_blocks: Sequence[torch.Tensor], timesteps: Sequence[float],
                 exit_index: int | Sequence[int], noise_fn: NoiseFn | None = None,
                 rng: torch.Generator | None = None, refresh_last: bool = False) -> list[torch.Tensor]:
    """Roll out len(noise_blocks) blocks; returns each block's x0_hat (with grad only from its exit step).

    exit_index: one s for every block (the recipe), or one per block. Fresh re-noising noise comes from
    `noise_fn(x0_hat)` or torch.randn with `rng`. Grad is used at the exit step only if grad is enabled
    when this is called, so running it under torch.no_grad() gives the critic's no-grad rollout. The last
    block's cache refresh is skipped unless `refresh_last` (no later block reads it).
    """
    ts = [float(t) for t in timesteps]
    n_blocks = len(noise_blocks)
    exits = [int(exit_index)] * n_blocks if isinstance(exit_index, int) else [int(s) for s in exit_index]
    if len(exits) != n_blocks:
        raise MinwmError(f"self_rollout: expected {n_blocks} exit indices, got {len(exits)}")
    for s in exits:
        if not 0 <= s < len(ts):
            raise MinwmError(f"self_rollout: exit index {s} outside 0..{len(ts) - 1}")
    noise_fn = noise_fn or default_noise_fn(rng)
    grad = torch.is_grad_enabled()
    outputs: list[torch.Tensor] = []
    for b, (x, s) in enumerate(zip(noise_blocks, exits)):
        with torch.no_grad():
            for k in range(s):
                x = renoise(generator(x, ts[k], b), ts[k + 1], noise_fn(x))
        with torch.set_grad_enabled(grad):
            x0 = generator(x, ts[s], b)
        outputs.append(x0)
        if b + 1 < n_blocks or refresh_last:
            with torch.no_grad():
                generator(x0.detach(), 0.0, b)
    return outputs
