"""Multi-process training: process group from torchrun's environment, FSDP2 sharding, small collectives.

Launch with `torchrun --nproc_per_node N ...`; a plain `python ...` run is world size 1 and never touches
torch.distributed. CPU runs use gloo (FSDP2 works there: reduce-scatter and all-gather over gloo), CUDA runs
use nccl with one GPU per local rank. Data sharding lives in minwm.train.data (positions split by rank).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from minwm.errors import MinwmError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the process group described by torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    Without them (or with WORLD_SIZE=1) this is a single-process run and no group is created.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device) if device is not None else default_device()
    if world <= 1:
        return DistInfo(0, 1, 0, dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend=backend)
        except Exception as e:  # noqa: BLE001 - report the launcher problem in one line
            raise MinwmError(f"distributed init ({backend}, rank {rank}/{world}) failed: {e}") from None
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev)


def current() -> DistInfo:
    """The DistInfo of an already initialised group (or the single-process default)."""
    if dist.is_available() and dist.is_initialized():
        dev = default_device()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev)
    return DistInfo(0, 1, 0, default_device())


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (identity in a single process). Runs in float64 on the CPU for gloo,
    on the tensor's device otherwise."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    backend = dist.get_backend()
    t = values.detach().to(torch.float64)
    t = t.cpu() if backend == "gloo" else t
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).to(values.device)


def _blocks(model: nn.Module, block_names: Iterable[str] | None) -> list[nn.Module]:
    if block_names is not None:
        return [model.get_submodule(n) for n in block_names]
    # Default: the children of the outermost ModuleLists (the transformer blocks of Wan / HunyuanVideo,
    # `blocks` or `transformer_blocks`). ModuleLists inside a block (e.g. diffusers' attention `to_out`) are
    # skipped: a unit must not be sharded after its parent. A model without one is sharded as one unit.
    out, chosen = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and not any(name.startswith(c + ".") for c in chosen):
            chosen.append(name)
            out.extend(mod)
    return out


def shard_model(model: nn.Module, block_names: Iterable[str] | None = None, mixed_precision: str = "no",
                reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: `fully_shard` each block (so only one block's full weights are live at a time), then the root.

    Call it after building any EMA copy (sharded modules cannot be deep-copied) and before creating the
    optimizer (the optimizer must hold the sharded DTensor parameters). Needs an initialised process group.
    mixed_precision "bf16" keeps float32 master weights and runs compute in bf16 (FSDP's own policy).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise MinwmError("shard_model: no process group (launch with torchrun and call init_distributed first)")
    kw = {"reshard_after_forward": reshard_after_forward}
    if mixed_precision == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = _blocks(model, block_names)
    seen = set()
    for blk in blocks:
        if id(blk) in seen:
            continue
        seen.add(id(blk))
        fully_shard(blk, **kw)
    fully_shard(model, **kw)
    return model


def is_sharded(module: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in module.parameters())
