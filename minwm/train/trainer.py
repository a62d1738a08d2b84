"""One training loop for every stage.

A stage registers its trainable modules (each with its own optimiser and optional EMA) and supplies one
callable per optimiser step:

    step_fn(trainer, micro_batches: list[MicroBatch], step: int) -> dict[str, float | Tensor]

Inside it the stage calls `trainer.accumulate(name, micro_batches, loss_fn)` once per optimiser it wants to
step this iteration. `accumulate` runs loss_fn on every micro-batch under autocast, back-propagates
loss / n_micro, all-reduces the reported values, stops on a non-finite value before touching the weights,
clips, steps the optimiser, updates that module's EMA and returns {"<name>/<key>": value, "<name>/grad_norm"}.
So a flow-matching stage is

    trainer.add("model", model, trainer.adamw(model.parameters()))
    trainer.fit(lambda tr, mbs, i: tr.accumulate("model", mbs, loss_fn), resume=resume)
    trainer.write_output("model", config)

and DMD (critic every step, generator every 5th) is

    def step(tr, mbs, i):
        out = tr.accumulate("critic", mbs, critic_loss)
        if i % 5 == 0:
            out |= tr.accumulate("generator", mbs, generator_loss)
        return out

loss_fn(mb) returns the scalar loss tensor or a dict of scalars whose "loss" entry is back-propagated (the
others are only reported). Frozen networks (teachers, the real score) are not registered: they are inputs, not state.

Everything needed for exact resume is checkpointed (modules, optimisers, EMA copies, all RNG states, the
step, hence the data position, and the metrics history); `fit(resume=True)` continues bit-exactly on the CPU.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from minwm.errors import MinwmError
from minwm.train import checkpoint as C
from minwm.train import distributed as D
from minwm.train.data import MicroBatch, mix_seed, step_loader, to_device
from minwm.train.ema import EMA
from minwm.train.logging import RunLogger, plot_curves


@dataclass
class TrainConfig:
    lr: float = 2e-6
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    # Max global gradient norm per optimiser step; 0 disables clipping (the norm is still checked for inf/nan).
    grad_clip: float = 10.0
    # Global effective batch per optimiser step, over all ranks and micro-batches (camera control needs
    # 8-16). Each rank runs grad_accum micro-batches of batch_size / (world_size * grad_accum) samples.
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 2000
    lr_warmup_steps: int = 0
    # After the linear warm-up: "constant", or "cosine" from lr down to lr * lr_min_ratio at max_steps. The
    # schedule follows max_steps: resuming with a larger --max-steps raises the lr again from where it was.
    lr_decay: str = "constant"
    lr_min_ratio: float = 0.0
    ckpt_every: int = 250
    keep_checkpoints: int = 3
    log_every: int = 10
    # EMA used by trainer.add(..., ema=True); null: none.
    ema_decay: Optional[float] = None
    ema_start: int = 0
    seed: int = 0
    # "auto": bf16 autocast on CUDA with bf16 support, float32 elsewhere; "bf16" or "no" to force.
    mixed_precision: str = "auto"
    num_workers: int = 0
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    plot: bool = True

    def __post_init__(self):
        checks = [
            (self.lr > 0, f"lr: expected > 0, got {self.lr}"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas: expected two numbers in [0, 1), got {self.betas}"),
            (self.weight_decay >= 0, f"weight_decay: expected >= 0, got {self.weight_decay}"),
            (self.grad_clip >= 0, f"grad_clip: expected >= 0, got {self.grad_clip}"),
            (self.batch_size >= 1, f"batch_size: expected >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum: expected >= 1, got {self.grad_accum}"),
            (self.batch_size % self.grad_accum == 0,
             f"batch_size: {self.batch_size} is not divisible by grad_accum {self.grad_accum}"),
            (self.max_steps >= 0, f"max_steps: expected >= 0, got {self.max_steps}"),
            (self.lr_decay in ("constant", "cosine"),
             f"lr_decay: expected constant or cosine, got {self.lr_decay!r}"),
            (0 <= self.lr_min_ratio <= 1, f"lr_min_ratio: expected [0, 1], got {self.lr_min_ratio}"),
            (self.ckpt_every >= 1, f"ckpt_every: expected >= 1, got {self.ckpt_every}"),
            (self.log_every >= 1, f"log_every: expected >= 1, got {self.log_every}"),
            (self.ema_decay is None or 0 <= self.ema_decay < 1, f"ema_decay: expected [0, 1), got {self.ema_decay}"),
            (self.mixed_precision in ("auto", "bf16", "no"),
             f"mixed_precision: expected auto, bf16 or no, got {self.mixed_precision!r}"),
            (self.num_workers >= 0, f"num_workers: expected >= 0, got {self.num_workers}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


def lr_factor(step: int, max_steps: int, warmup: int, decay: str = "constant", min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at optimiser step `step` (0-based): linear warm-up over `warmup` steps, then
    1 ("constant") or a cosine from 1 at the end of warm-up to `min_ratio` at `max_steps` ("cosine").
    A pure function of the step, so a resumed run continues the same schedule."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or max_steps <= warmup:
        return 1.0
    p = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


class NonFiniteError(MinwmError):
    """A loss or gradient norm became nan/inf; training stopped before the weights were changed."""


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed torch (CPU and CUDA), numpy and python `random` for this rank (e.g. before building a model)."""
    s = mix_seed("global", seed, rank)
    torch.manual_seed(s)
    np.random.seed(s % (2 ** 32))
    random.seed(s)


def resolve_precision(mode: str, device: torch.device) -> str:
    if mode == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return mode


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, dataset, *, collate_fn: Callable | None = None,
                 info: D.DistInfo | None = None, desc: str = "train", run_config: dict | None = None):
        """dataset: map-style (len, [i]); items are collated with `collate_fn` (default_collate)."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dataset, self.collate_fn = dataset, collate_fn
        self.info = info or D.current()
        self.device = self.info.device
        self.desc = desc
        self.run_config = run_config
        self.precision = resolve_precision(cfg.mixed_precision, self.device)
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.emas: dict[str, EMA] = {}
        self.generators: dict[str, torch.Generator] = {}
        self.history: list[dict] = []
        self.step = 0  # completed optimiser steps
        self.current_step: int | None = None  # 0-based index of the step being run
        self.last_checkpoint: Path | None = None
        self._base_lr: dict[str, list[float]] = {}
        self._elapsed = 0.0
        if cfg.batch_size % (self.info.world_size * cfg.grad_accum):
            raise MinwmError(f"train.batch_size: {cfg.batch_size} is not divisible by grad_accum "
                             f"({cfg.grad_accum}) x world size ({self.info.world_size})")

    # ---- set-up ---------------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @property
    def micro_batch_size(self) -> int:
        return self.cfg.batch_size // (self.info.world_size * self.cfg.grad_accum)

    def adamw(self, params: Iterable, lr: float | None = None, betas: Iterable[float] | None = None,
              weight_decay: float | None = None) -> torch.optim.AdamW:
        """AdamW with this config's hyper-parameters unless overridden (e.g. DMD's critic lr)."""
        return torch.optim.AdamW(params, lr=self.cfg.lr if lr is None else lr,
                                 betas=tuple(self.cfg.betas if betas is None else betas), eps=self.cfg.eps,
                                 weight_decay=self.cfg.weight_decay if weight_decay is None else weight_decay)

    def add(self, name: str, module: nn.Module, optimizer: torch.optim.Optimizer | None = None,
            ema: EMA | bool | None = None) -> None:
        """Register a module whose weights (and optimiser / EMA) are trained and checkpointed under `name`.

        ema=True builds EMA(module, cfg.ema_decay, cfg.ema_start); pass an EMA instance instead when the
        module is sharded (build it before `shard_model`). Modules without an optimiser are checkpointed but
        never stepped.
        """
        if name in self.modules or "/" in name or not name:
            raise MinwmError(f"trainer: bad or duplicate module name {name!r}")
        self.modules[name] = module
        if optimizer is not None:
            self.optimizers[name] = optimizer
            self._base_lr[name] = [g["lr"] for g in optimizer.param_groups]
        if ema is True:
            if self.cfg.ema_decay is None:
                raise MinwmError("train.ema_decay: the stage needs an EMA; set a decay (e.g. 0.99)")
            ema = EMA(module, self.cfg.ema_decay, self.cfg.ema_start)
        if isinstance(ema, EMA):
            self.emas[name] = ema

    def register_generator(self, name: str, gen: torch.Generator) -> None:
        """A torch.Generator the stage draws from; its state is checkpointed and restored on resume."""
        self.generators[name] = gen

    def step_generator(self, step: int, salt: str | int = "step") -> torch.Generator:
        """A CPU generator seeded from (seed, step, salt): identical on every rank and after resume
        (e.g. DMD's exit index)."""
        return torch.Generator().manual_seed(mix_seed(self.cfg.seed, "step", step, salt))

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- the per-step helpers -------------------------------------------------------------------------

    def accumulate(self, name: str, micro_batches: list[MicroBatch],
                   loss_fn: Callable[[MicroBatch], torch.Tensor | dict[str, torch.Tensor]]) -> dict[str, float]:
        """Gradient accumulation over micro-batches, then one guarded optimiser step for `name`."""
        module, opt = self.modules[name], self.optimizers.get(name)
        if opt is None:
            raise MinwmError(f"trainer: module {name!r} has no optimiser")
        opt.zero_grad(set_to_none=True)  # drop grads leaked into it by another module's loss
        n = len(micro_batches)
        sync = getattr(module, "set_requires_gradient_sync", None)  # FSDP2: reduce-scatter once, at the end
        sums: dict[str, torch.Tensor] = {}
        for i, mb in enumerate(micro_batches):
            if sync is not None:
                sync(i == n - 1)
            with self.autocast():
                out = loss_fn(mb)
            out = {"loss": out} if isinstance(out, torch.Tensor) else dict(out)
            if "loss" not in out:
                raise MinwmError(f"trainer: loss_fn for {name!r} returned no 'loss' entry")
            (out["loss"] / n).backward()
            for k, v in out.items():
                v = torch.as_tensor(v).detach().to(torch.float64).cpu()
                sums[k] = sums[k] + v if k in sums else v
        if sync is not None:
            sync(True)
        values = self.reduce({f"{name}/{k}": v / n for k, v in sums.items()})
        self.check_finite(values)
        values[f"{name}/grad_norm"] = self.optimizer_step(name)
        return values

    def optimizer_step(self, name: str) -> float:
        """Clip, check the gradient norm, step, zero the grads, update the EMA; returns the pre-clip norm."""
        module, opt = self.modules[name], self.optimizers[name]
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        norm = float(norm)
        if not math.isfinite(norm):
            opt.zero_grad(set_to_none=True)
            self._stop(f"gradient norm of '{name}'", norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if name in self.emas:
            self.emas[name].update(module, self.current_step if self.current_step is not None else self.step)
        return norm

    def reduce(self, values: dict[str, Any]) -> dict[str, float]:
        """Mean over ranks of scalar values (all ranks must pass the same keys); floats back."""
        if not values:
            return {}
        keys = sorted(values)
        t = torch.stack([torch.as_tensor(values[k]).detach().to(torch.float64).cpu().reshape(()) for k in keys])
        t = D.all_reduce_mean(t)
        return {k: float(v) for k, v in zip(keys, t.tolist())}

    def check_finite(self, values: dict[str, float], before_update: bool = True) -> None:
        for k, v in values.items():
            if not math.isfinite(v):
                self._stop(f"'{k}'", v, before_update)

    def _stop(self, what: str, value: float, before_update: bool = True) -> None:
        step = (self.current_step if self.current_step is not None else self.step) + 1
        last = str(self.last_checkpoint) if self.last_checkpoint else "none written yet"
        when = "before the weights changed" if before_update else "(this step is not checkpointed)"
        raise NonFiniteError(f"step {step}: {what} is {value}; training stopped {when}; last good checkpoint: {last}")

    # ---- the loop --------------------------------------------------------------------------------------

    def fit(self, step_fn: Callable[["Trainer", list[MicroBatch], int], dict], resume: bool | str | Path = False
            ) -> list[dict]:
        """Run steps until cfg.max_steps; resume=True continues from DIR's latest checkpoint (or starts fresh
        if there is none), a path names a checkpoint (or run) directory. Returns the metrics history."""
        if not self.optimizers:
            raise MinwmError("trainer: no module with an optimiser was registered")
        cfg = self.cfg
        start = self._start(resume)
        logger = RunLogger(self.run_dir, enabled=self.is_main, log_every=cfg.log_every, tensorboard=cfg.tensorboard,
                           wandb_project=cfg.wandb_project, run_config=self.run_config)
        bar = tqdm(total=cfg.max_steps, initial=start, desc=self.desc, disable=not self.is_main,
                   dynamic_ncols=True, mininterval=1.0)
        try:
            if start < cfg.max_steps:
                loader = step_loader(self.dataset, cfg.seed, cfg.batch_size, cfg.grad_accum, self.info.rank,
                                     self.info.world_size, start, cfg.max_steps, self.collate_fn, cfg.num_workers,
                                     pin_memory=self.device.type == "cuda")
                batches = iter(loader)
                t_run = time.monotonic() - self._elapsed
                for step in range(start, cfg.max_steps):
                    self.current_step = step
                    mbs = [self._micro(next(batches), step) for _ in range(cfg.grad_accum)]
                    self._apply_lr(step)
                    t0 = time.monotonic()
                    values = self.reduce(step_fn(self, mbs, step) or {})
                    self.check_finite(values, before_update=False)
                    now = time.monotonic()
                    self._elapsed = now - t_run
                    rec = {"step": step + 1, **values, "step_time": round(now - t0, 6), "time": round(self._elapsed, 3)}
                    self.history.append(rec)
                    self.step = step + 1
                    logger.log(rec, force=self.step == cfg.max_steps)
                    bar.update(1)
                    if self.is_main:
                        bar.set_postfix({k.split("/")[-1] if k.endswith("/loss") else k: f"{v:.4g}"
                                         for k, v in values.items() if k.endswith("loss")}, refresh=False)
                    if self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps:
                        self.save_checkpoint()
        finally:
            self.current_step = None
            bar.close()
            logger.close()
        if cfg.plot and self.is_main and self.history:
            plot_curves(self.history, self.run_dir / "train_curves.png")
        return self.history

    def _micro(self, batch, step: int) -> MicroBatch:
        positions, indices, data = batch
        return MicroBatch(to_device(data, self.device), indices, positions, step, self.cfg.seed)

    def _apply_lr(self, step: int) -> None:
        c = self.cfg
        factor = lr_factor(step, c.max_steps, c.lr_warmup_steps, c.lr_decay, c.lr_min_ratio)
        for name, opt in self.optimizers.items():
            for g, base in zip(opt.param_groups, self._base_lr[name]):
                g["lr"] = base * factor

    # ---- checkpoints -----------------------------------------------------------------------------------

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        state: dict[str, dict] = {"modules": {}, "optimizers": {}, "ema": {}}
        for name, module in self.modules.items():
            if name in self.optimizers:
                msd, osd = get_state_dict(module, self.optimizers[name])
                state["optimizers"][name] = osd
            else:
                msd = get_model_state_dict(module)
            state["modules"][name] = msd
        for name, ema in self.emas.items():
            state["ema"][name] = get_model_state_dict(ema.module)
        return state

    def _meta(self) -> dict:
        cfg, n = self.cfg, len(self.dataset)
        return {"step": self.step, "samples_seen": self.step * cfg.batch_size,
                "epoch": self.step * cfg.batch_size // n, "dataset_size": n, "batch_size": cfg.batch_size,
                "grad_accum": cfg.grad_accum, "world_size": self.info.world_size, "seed": cfg.seed,
                "modules": sorted(self.modules), "ema": {k: e.meta() for k, e in self.emas.items()},
                "elapsed": self._elapsed, "history": self.history}

    def save_checkpoint(self) -> Path:
        """Write DIR/checkpoints/step_NNNNNN (collective: every rank calls it)."""
        path = C.save_checkpoint(self.run_dir, self.step, self._state(), self._meta(), C.capture_rng(self.generators),
                                 self.cfg.keep_checkpoints, self.info)
        self.last_checkpoint = path
        return path

    def _start(self, resume: bool | str | Path) -> int:
        if self.is_main:
            C.remove_stale_temporaries(self.run_dir)
        D.barrier()
        latest = C.latest_checkpoint(self.run_dir)
        if resume is False or resume is None:
            if latest is not None:
                raise MinwmError(f"{self.run_dir}: already holds checkpoints (latest {latest.name}); resume with "
                                 f"--resume or choose a new output directory")
            seed_everything(self.cfg.seed, self.info.rank)
            return 0
        path = latest if resume is True else Path(resume)
        if path is not None and not C.is_complete(path):
            path = C.latest_checkpoint(path)
            if path is None:
                raise MinwmError(f"{resume}: no complete checkpoint there")
        if path is None:
            if self.is_main:
                tqdm.write(f"{self.run_dir}: no checkpoint to resume from; starting at step 0")
            seed_everything(self.cfg.seed, self.info.rank)
            return 0
        self._load(path)
        return self.step

    def _load(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        meta = C.read_meta(path)
        cfg = self.cfg
        for key, now in (("batch_size", cfg.batch_size), ("seed", cfg.seed), ("dataset_size", len(self.dataset))):
            if meta.get(key) != now:
                raise MinwmError(f"{path}: {key} was {meta.get(key)} and is now {now}; the data position cannot be "
                                 f"restored (keep it, or start a new run initialised from this one)")
        missing = sorted(set(meta.get("modules", [])) ^ set(self.modules))
        if missing:
            raise MinwmError(f"{path}: checkpoint modules {meta.get('modules')} do not match the stage's "
                             f"{sorted(self.modules)}")
        state = self._state()
        for name in self.emas:
            if name not in meta.get("ema", {}):
                raise MinwmError(f"{path}: no EMA weights for {name!r} in this checkpoint")
        C.load_state(path, state)
        for name, module in self.modules.items():
            if name in self.optimizers:
                set_state_dict(module, self.optimizers[name], model_state_dict=state["modules"][name],
                               optim_state_dict=state["optimizers"][name])
            else:
                set_model_state_dict(module, state["modules"][name])
        for name, ema in self.emas.items():
            set_model_state_dict(ema.module, state["ema"][name])
            ema.load_meta(meta["ema"][name])
        self.step = int(meta["step"])
        self.history = list(meta.get("history", []))[: self.step]
        self._elapsed = float(meta.get("elapsed", 0.0))
        self.last_checkpoint = path
        rng = C.load_rng(path, self.info.rank) if meta.get("world_size") == self.info.world_size else None
        if rng is not None:
            C.restore_rng(rng, self.generators)
        else:
            seed_everything(mix_seed(self.cfg.seed, "resume", self.step), self.info.rank)
            if self.is_main:
                tqdm.write(f"{path}: written by {meta.get('world_size')} processes, resumed with "
                           f"{self.info.world_size}: global RNG streams restart (per-sample noise is unaffected)")
        if self.is_main:
            tqdm.write(f"resumed from {path} (step {self.step})")

    # ---- outputs ---------------------------------------------------------------------------------------

    def full_state_dict(self, name: str, ema: bool = False) -> dict[str, torch.Tensor]:
        """The full (unsharded, CPU) weights of module `name` or its EMA. Collective under FSDP2: every rank
        calls it, rank 0 receives the weights, the others an empty dict."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        module = self.emas[name].module if ema else self.modules[name]
        if D.is_sharded(module):
            return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def write_output(self, name: str, config: Any, use_ema: bool = False, extra_metrics: dict | None = None) -> None:
        """The stage output in DIR: model.safetensors (module `name`, or its EMA), config.yaml, metrics.json.
        Collective; rank 0 writes."""
        sd = self.full_state_dict(name, ema=use_ema)
        if self.is_main:
            metrics = {"steps": self.step, "history": self.history, **(extra_metrics or {})}
            C.write_stage_output(self.run_dir, sd, config, metrics)
        D.barrier()
