"""Samplers over a model callable: Euler and UniPC for multi-step teachers, the few-step consistency sampler.

Callables receive `(x, t)` with t a Python float in [0, 1000] (the stage turns it into a per-sample /
per-frame float32 tensor for its network; keeping it a float here avoids any low-precision timestep):
  velocity_fn(x, t) -> v   (flow prediction, CFG already applied by the caller if wanted)
  x0_fn(x, t) -> x0_hat    (a few-step generator's clean prediction)

The consistency sampler is the one sampler for few-step students, in training rollouts and at inference
(RECIPE.md §8: sampling a re-noising student with Euler is a known pitfall).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from minwm.diffusion.losses import add_noise, euler_step
from minwm.diffusion.schedule import NUM_TRAIN_TIMESTEPS, sampling_sigmas
from minwm.errors import MinwmError

NoiseFn = Callable[[torch.Tensor], torch.Tensor]


def default_noise_fn(generator: torch.Generator | None = None) -> NoiseFn:
    """Fresh standard normal noise shaped like its argument, drawn from `generator` (on its device)."""
    def noise(ref: torch.Tensor) -> torch.Tensor:
        return torch.randn(ref.shape, generator=generator, device=ref.device, dtype=ref.dtype)
    return noise


def euler_sample(velocity_fn: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor,
                 sigmas: torch.Tensor, callback: Callable[[int, float, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Integrate the flow ODE from `noise` at sigmas[0] down to sigmas[-1] (usually 0) with Euler steps.

    `sigmas` is descending float64 [N + 1] (schedule.sampling_sigmas). `callback(i, t_i, x_i)` sees each state
    before its step (the ODE-data stage stores the states at the student timesteps this way).
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise MinwmError("euler_sample: expected at least two sigmas (start and end)")
    x = noise
    for i in range(len(sigmas) - 1):
        t = float(sigmas[i]) * NUM_TRAIN_TIMESTEPS
        if callback is not None:
            callback(i, t, x)
        x = euler_step(x, velocity_fn(x, t), sigmas[i], sigmas[i + 1])
    return x


def unipc_sample(velocity_fn: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor,
                 num_steps: int = 50, shift: float = 5.0, solver_order: int = 2) -> torch.Tensor:
    """UniPC multistep on the shifted flow grid (diffusers UniPCMultistepScheduler, flow prediction).

    diffusers builds sigmas = shift_s(linspace(1, 1/1000, N + 1)[:-1]) then 0 (Wan's own sampler grid) and
    supports flow matching via use_flow_sigmas / flow_prediction. Its `timesteps` are int64 (truncated), so
    the model is called with the exact float t = 1000 sigma instead; the step index is tracked explicitly.
    """
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type="flow_prediction",
                                    use_flow_sigmas=True, flow_shift=shift, solver_order=solver_order,
                                    final_sigmas_type="zero")
    sched.set_timesteps(num_steps, device=noise.device)
    sched.set_begin_index(0)
    x = noise
    for i in range(num_steps):
        t = float(sched.sigmas[i]) * NUM_TRAIN_TIMESTEPS
        v = velocity_fn(x, t)
        x = sched.step(v, sched.timesteps[i], x, return_dict=False)[0]
    return x


def renoise(x0: torch.Tensor, t_next: float, noise: torch.Tensor) -> torch.Tensor:
    """Re-noise a clean prediction to timestep t_next: (1 - sigma) x0 + sigma eps with fresh eps."""
    return add_noise(x0, noise, t_next / NUM_TRAIN_TIMESTEPS)


def consistency_sample(x0_fn: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor,
                       timesteps: Sequence[float], noise_fn: NoiseFn | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Few-step sampling: x0_hat = G(x, t_k); re-noise to t_{k+1} with fresh noise; return the last x0_hat.

    `timesteps` is the (warped) descending list, e.g. [1000, 937.5, 833.3, 625.0]. Fresh noise comes from
    `noise_fn(x0_hat)` or, if None, from torch.randn with `generator`.
    """
    ts = [float(t) for t in timesteps]
    if not ts:
        raise MinwmError("consistency_sample: expected at least one timestep")
    noise_fn = noise_fn or default_noise_fn(generator)
    x = noise
    x0 = noise
    for k, t in enumerate(ts):
        x0 = x0_fn(x, t)
        if k + 1 < len(ts):
            x = renoise(x0, ts[k + 1], noise_fn(x0))
    return x0


def euler_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The N-step Euler grid of the teacher (shift_s(1 - i/N) then 0), float64 [N + 1]."""
    return sampling_sigmas(num_steps, shift)
