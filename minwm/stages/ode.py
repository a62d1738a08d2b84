"""Stage 2a: causal ODE regression onto the AR teacher's trajectories (RECIPE.md §3).

The student starts from the Stage-1 AR model. Per sample one k in {0..K-1} (the same for every frame, drawn from
the micro-batch's per-sample stream, so exact on resume); the input is the stored state x_{t_k} of the teacher's
ODE trajectory, teacher-forced on the ground-truth prefix (mode "teacher_forcing", clean_latents = the ground
truth, as the teacher was), at t_k for every frame; the loss is MSE(x0_hat, ODE endpoint) with
x0_hat = x_{t_k} - sigma_k v. The camera and the caption go to the student as to the teacher. With stages.ti2v,
latent frame 0 stays clean at t = 0 and out of the loss.

The timesteps are those the data was made with; they must equal the inference section's (the student samples with
the few-step consistency sampler over exactly these, chunk by chunk with the KV cache).
Reference optimiser: AdamW lr 2e-6, betas (0.9, 0.999) (TRAIN_DEFAULTS), >= 1K steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from minwm.diffusion.losses import x0_from_velocity
from minwm.diffusion.schedule import NUM_TRAIN_TIMESTEPS
from minwm.errors import MinwmError
from minwm.stages import common
from minwm.stages.ode_data import ODETrajectories

NAME = "ode"
INPUTS: dict[str, str] = {"init": "ar", "data": "ode-data"}
TRAIN_DEFAULTS: dict[str, Any] = {"betas": [0.9, 0.999]}


@dataclass
class Params:
    """No settings of its own: the timesteps come with the data, the optimiser from `stages.ode.train`."""


def regression_inputs(states: torch.Tensor, k: torch.Tensor, timesteps: Sequence[float], frames: int,
                      n_clean: int = 0, clean: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [B, C, F, h, w], sigma [B, F] float64): state k[b] of each sample's stored trajectory
    states [B, K, C, F, h, w], at sigma = t_k / 1000 for every frame; the first n_clean frames are the clean
    `clean` frames at sigma 0 (TI2V)."""
    B = states.shape[0]
    k = torch.as_tensor(k, dtype=torch.long).reshape(B)
    x = states[torch.arange(B, device=states.device), k.to(states.device)]
    sigma = (torch.as_tensor([float(t) for t in timesteps], dtype=torch.float64)[k.cpu()] / NUM_TRAIN_TIMESTEPS)
    sigma = sigma[:, None].repeat(1, frames)
    if n_clean:
        x = x.clone()
        x[:, :, :n_clean] = clean[:, :, :n_clean]
        sigma[:, :n_clean] = 0.0
    return x, sigma


def ode_loss(model: Any, cond: common.Conditioner, mb: Any, timesteps: Sequence[float]) -> dict[str, torch.Tensor]:
    """MSE(x0_hat, endpoint) of one micro-batch (x0_hat from the student at the sample's k-th state)."""
    d = mb.data
    x0, states, end = d["latents"], d["states"], d["endpoint"]
    F = x0.shape[2]
    n_clean = cond.clean_frames(F)
    k = mb.randint(len(timesteps), salt="ode/k").reshape(-1)
    x, sigma = regression_inputs(states, k, timesteps, F, n_clean, x0)
    cams = cond.cameras(mb) if model.cfg.camera.kind != "none" else None
    t = (sigma * NUM_TRAIN_TIMESTEPS).to(device=x.device, dtype=torch.float32)
    v = model(x, t, cond.text(mb), cams, mode="teacher_forcing", clean_latents=x0, **cond.extra(x0))
    x0_hat = x0_from_velocity(x, v.to(x.dtype), sigma)
    err = (x0_hat[:, :, n_clean:].float() - end[:, :, n_clean:].float()) ** 2
    return {"loss": err.mean(), "k": k.double().mean()}


def run(cfg: Any, out_dir: str | Path, *, init: Optional[dict[str, str]] = None, resume: bool = False,
        max_steps: Optional[int] = None) -> Path:
    ctx = common.prepare(NAME, cfg, out_dir, init, resume, max_steps)
    clips = common.latent_dataset(ctx)
    data = ODETrajectories(ctx.inputs["data"], clips)
    want = cfg["inference"].timesteps()
    if len(want) != len(data.timesteps) or any(abs(a - b) > 1e-6 for a, b in zip(want, data.timesteps)):
        raise MinwmError(f"{ctx.inputs['data']}: ODE data made for student timesteps "
                         f"{[round(t, 3) for t in data.timesteps]}, but inference.timesteps() of {ctx.where} gives "
                         f"{[round(t, 3) for t in want]} (the student must train on the steps it samples with)")
    model = common.build_model(ctx, "init")
    common.check_data(clips, model, ctx, chunked=True)
    cond = common.Conditioner(ctx, model, clips)
    trainer = common.make_trainer(ctx, data)
    trainer.add("model", model, trainer.adamw(model.parameters()))

    def loss_fn(mb):
        return ode_loss(model, cond, mb, data.timesteps)

    trainer.fit(lambda tr, mbs, step: tr.accumulate("model", mbs, loss_fn), resume=ctx.resume)
    return common.write_output(ctx, trainer, "model", extra_metrics={"student_timesteps": data.timesteps})
