"""Chunk samplers over a backbone (every one runs under torch.inference_mode by its caller).

- `fewstep_chunk`: the few-step student, with the ONE sampler shared with training rollouts
  (diffusion.samplers.consistency_sample: predict x0, re-noise to the next t with fresh noise), then one more
  pass at t = 0 on the result with commit=True writes the chunk's clean keys/values (K + 1 passes per chunk).
- `multistep_chunk`: the multi-step autoregressive baseline (UniPC or Euler, N steps, CFG
  v = v_u + g (v_c - v_u)), conditional and unconditional branches with separate KV caches, then the same
  clean refresh of both caches.
- `bidirectional_sample`: the multi-step bidirectional baseline over the whole clip with CFG.

`Conditioning` bundles what every pass of one chunk shares: prepared text, cameras, an optional clean
first-frame latent (TI2V). A frame marked clean is held at its latent with t = 0 in every pass, so the image
frame is "prefilled" inside the first chunk (the chunk layout stays chunk_frames long).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from minwm.diffusion.losses import cfg_from_uncond, x0_from_velocity
from minwm.diffusion.samplers import NoiseFn, consistency_sample, euler_sample, euler_sigmas, unipc_sample
from minwm.diffusion.schedule import NUM_TRAIN_TIMESTEPS
from minwm.errors import MinwmError

SAMPLERS = ("unipc", "euler")


@dataclass
class Conditioning:
    text: Any                                               # prepared text (backbone.encode_text output or dict)
    cameras: Optional[tuple[torch.Tensor, torch.Tensor]]    # (w2c [B, F, 4, 4], intrinsics [B, F, 4]) or None
    clean_first: Optional[torch.Tensor] = None              # [B, C, 1, H, W]: frame 0 is this latent, t = 0
    image_latents: Optional[torch.Tensor] = None            # passed to adapters with image condition channels


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure compute, not kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall time (after a GPU sync) and process CPU time of consecutive phases: timings[name + "_s"],
    timings[name + "_cpu_s"]. CPU time sums this process's threads, so other processes queueing for shared
    cores do not add to it (cache and frequency effects of the load still do)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.timings: dict[str, float] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        sync(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        self.timings[f"{name}_s"] = wall - self._wall
        self.timings[f"{name}_cpu_s"] = cpu - self._cpu
        self._wall, self._cpu = wall, cpu


def _clamp(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
    if cond.clean_first is None:
        return x, t
    x = x.clone()
    x[:, :, :1] = cond.clean_first.to(x.dtype)
    t = t.clone()
    t[:, 0] = 0.0
    return x, t


def velocity(backbone, x: torch.Tensor, t: float | torch.Tensor, cond: Conditioning,
             **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One backbone pass; t a float (every frame) or [B, F]. Returns (v, the input x and per-frame t actually
    used -- a clean first frame is held at its latent with t = 0)."""
    B, _, F = x.shape[:3]
    tt = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    tt = tt.expand(B, F) if tt.ndim == 0 else tt
    x, tt = _clamp(x, tt, cond)
    extra = {"image_latents": cond.image_latents} if cond.image_latents is not None else {}
    return backbone(x, tt, cond.text, cond.cameras, **kw, **extra), x, tt


def predict_x0(backbone, x: torch.Tensor, t: float, cond: Conditioning, **kw) -> torch.Tensor:
    v, x, tt = velocity(backbone, x, t, cond, **kw)
    x0 = x0_from_velocity(x, v.to(x.dtype), tt.double() / NUM_TRAIN_TIMESTEPS)
    if cond.clean_first is not None:
        x0[:, :, :1] = cond.clean_first.to(x0.dtype)
    return x0


def refresh(backbone, x0: torch.Tensor, cond: Conditioning, cache) -> None:
    """The clean t = 0 pass over a finished chunk: writes its keys/values into the cache."""
    velocity(backbone, x0, 0.0, cond, mode="streaming", cache=cache, commit=True, output=False)


def fewstep_chunk(backbone, noise: torch.Tensor, timesteps: Sequence[float], cond: Conditioning, cache,
                  noise_fn: NoiseFn, commit: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """One streamed chunk of the few-step student: (clean latents [B, C, F, H, W], timings)."""

    def x0_fn(x: torch.Tensor, t: float) -> torch.Tensor:
        return predict_x0(backbone, x, t, cond, mode="streaming", cache=cache)

    clock = Clock(noise.device)
    x0 = consistency_sample(x0_fn, noise, timesteps, noise_fn=noise_fn)
    clock.lap("denoise")
    if commit:
        refresh(backbone, x0, cond, cache)
    clock.lap("refresh")
    return x0, clock.timings


def _guided(backbone, cond_c: Conditioning, cond_u: Optional[Conditioning], guidance: float,
            caches: Optional[tuple[Any, Any]] = None, **kw) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """velocity_fn(x, t) with CFG over text: v_u + g (v_c - v_u); g = 1 or no uncond branch -> conditional only.
    In streaming, the conditional and unconditional branches read their own caches (caches = (c, u))."""
    use_u = cond_u is not None and guidance != 1.0
    kw_c = dict(kw, cache=caches[0]) if caches else kw
    kw_u = dict(kw, cache=caches[1]) if caches else kw

    def fn(x: torch.Tensor, t: float) -> torch.Tensor:
        out, _, _ = velocity(backbone, x, t, cond_c, **kw_c)
        if use_u:
            v_u, _, _ = velocity(backbone, x, t, cond_u, **kw_u)
            out = cfg_from_uncond(cond=out, uncond=v_u, scale=guidance)
        if cond_c.clean_first is not None:  # the clean frame does not move
            out = out.clone()
            out[:, :, :1] = 0
        return out
    return fn


def integrate(velocity_fn, noise: torch.Tensor, steps: int, shift: float, sampler: str) -> torch.Tensor:
    if sampler == "unipc":
        return unipc_sample(velocity_fn, noise, num_steps=steps, shift=shift)
    if sampler == "euler":
        return euler_sample(velocity_fn, noise, euler_sigmas(steps, shift))
    raise MinwmError(f"inference.sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")


def multistep_chunk(backbone, noise: torch.Tensor, cond_c: Conditioning, cond_u: Optional[Conditioning],
                    caches: tuple[Any, Any], steps: int, shift: float, guidance: float, sampler: str,
                    commit: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """One streamed chunk of the multi-step AR baseline with CFG: (clean latents, timings)."""
    fn = _guided(backbone, cond_c, cond_u, guidance, mode="streaming", caches=caches)
    clock = Clock(noise.device)
    x0 = integrate(fn, noise, steps, shift, sampler)
    if cond_c.clean_first is not None:
        x0 = x0.clone()
        x0[:, :, :1] = cond_c.clean_first.to(x0.dtype)
    clock.lap("denoise")
    if commit:
        refresh(backbone, x0, cond_c, caches[0])
        if cond_u is not None and guidance != 1.0:
            refresh(backbone, x0, cond_u, caches[1])
    clock.lap("refresh")
    return x0, clock.timings


def bidirectional_sample(backbone, noise: torch.Tensor, cond_c: Conditioning, cond_u: Optional[Conditioning],
                         steps: int, shift: float, guidance: float, sampler: str) -> torch.Tensor:
    """The whole clip at once (every frame attends to every frame), N steps with CFG."""
    x0 = integrate(_guided(backbone, cond_c, cond_u, guidance, mode="bidirectional"), noise, steps, shift, sampler)
    if cond_c.clean_first is not None:   # the integrator never moved frame 0: it is the condition itself
        x0 = x0.clone()
        x0[:, :, :1] = cond_c.clean_first.to(x0.dtype)
    return x0
