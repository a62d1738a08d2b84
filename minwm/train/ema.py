"""Exponential moving average of a module's weights, kept as a full module (the CD target theta- runs forward).

The EMA module is part of every checkpoint (an EMA target missing from the checkpoint is a known porting bug:
resume would restart the target from the student). With FSDP2, build the EMA from the unsharded model and then
shard both (`distributed.shard_model`); a sharded module cannot be deep-copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from minwm.errors import MinwmError


class EMA:
    """ema <- decay * ema + (1 - decay) * param at every update from `start_step` on; a plain copy before it."""

    def __init__(self, model: nn.Module, decay: float, start_step: int = 0):
        if not 0.0 <= decay < 1.0:
            raise MinwmError(f"ema_decay: expected a number in [0, 1), got {decay}")
        if any(type(p).__name__ == "DTensor" for p in model.parameters()):
            raise MinwmError("EMA: build it before sharding the model (FSDP2 modules cannot be copied), "
                             "then shard both")
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.num_updates = 0
        self.module = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend `model`'s current weights in; `step` is the trainer's 0-based step index."""
        ema_params = list(self.module.parameters())
        params = list(model.parameters())
        if len(ema_params) != len(params):
            raise MinwmError("EMA: the model's parameters do not match the EMA copy")
        if step < self.start_step:
            for e, p in zip(ema_params, params):
                e.copy_(p.detach())
        else:
            for e, p in zip(ema_params, params):
                # lerp in the EMA's dtype: e + (1 - decay) (p - e)
                e.lerp_(p.detach().to(e.dtype), 1.0 - self.decay)
        # Buffers (e.g. running statistics) are copied, not averaged.
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
        self.num_updates += 1

    def meta(self) -> dict:
        return {"decay": self.decay, "start_step": self.start_step, "num_updates": self.num_updates}

    def load_meta(self, meta: dict) -> None:
        self.num_updates = int(meta.get("num_updates", 0))
