"""Deterministic data order: the sample at stream position p is perm(seed, p // N)[p % N].

Step s of a run consumes positions [s B, (s + 1) B) of that stream (B = global batch), split into
world_size x grad_accum equal micro-batches; rank r takes micro-batches r*A .. r*A + A - 1. So the data
position is a pure function of (seed, step, batch size): resume starts at the checkpoint's step without
replaying the loader, and 1 process with A micro-batches sees the same global batch as 2 processes with A/2.

Per-sample randomness (noise, timesteps) should come from `MicroBatch.randn / rand / randint`, which seed a
generator from (seed, position, salt): results then do not depend on the world size, the micro-batch split,
or where a run was resumed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from minwm.errors import MinwmError


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings (stable across runs and machines)."""
    h = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed("perm", seed, epoch)))


@dataclass
class MicroBatch:
    """One micro-batch for this rank: collated `data`, dataset `indices` and global stream `positions`."""

    data: Any
    indices: torch.Tensor
    positions: torch.Tensor
    step: int
    seed: int

    def __len__(self) -> int:
        return len(self.positions)

    def _gens(self, salt: str | int, device) -> list[torch.Generator]:
        dev = torch.device(device)
        return [torch.Generator(device=dev).manual_seed(mix_seed(self.seed, int(p), salt)) for p in self.positions]

    def randn(self, *shape: int, salt: str | int = "noise", device=None, dtype=torch.float32) -> torch.Tensor:
        """[b, *shape] standard normal; row i depends only on (seed, positions[i], salt)."""
        device = device or "cpu"
        return torch.stack([torch.randn(shape, generator=g, device=device, dtype=dtype)
                            for g in self._gens(salt, device)])

    def rand(self, *shape: int, salt: str | int = "rand", dtype=torch.float64) -> torch.Tensor:
        """[b, *shape] uniform in [0, 1) on the CPU; row i depends only on (seed, positions[i], salt)."""
        return torch.stack([torch.rand(shape, generator=g, dtype=dtype) for g in self._gens(salt, "cpu")])

    def randint(self, high: int, *shape: int, salt: str | int = "randint") -> torch.Tensor:
        """[b, *shape] integers uniform in [0, high) (CPU int64), e.g. a grid index per sample or per block."""
        return torch.stack([torch.randint(0, high, shape, generator=g) for g in self._gens(salt, "cpu")])


class _Positions(Dataset):
    """Maps a stream position to (position, dataset index, item)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.n = dataset, seed, len(dataset)
        self._perm_epoch, self._perm = -1, None

    def __len__(self):
        return self.n

    def __getitem__(self, position: int):
        epoch, offset = divmod(int(position), self.n)
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = epoch_permutation(self.n, self.seed, epoch), epoch
        index = int(self._perm[offset])
        return position, index, self.dataset[index]


class StepBatchSampler(Sampler):
    """Yields this rank's micro-batches of stream positions for steps start_step .. max_steps - 1."""

    def __init__(self, batch_size: int, grad_accum: int, rank: int, world_size: int, start_step: int, max_steps: int):
        per = world_size * grad_accum
        if batch_size % per:
            raise MinwmError(f"train.batch_size: {batch_size} is not divisible by grad_accum ({grad_accum}) x "
                             f"world size ({world_size})")
        self.B, self.A, self.rank, self.micro = batch_size, grad_accum, rank, batch_size // per
        self.start_step, self.max_steps = start_step, max_steps

    def __len__(self):
        return max(0, self.max_steps - self.start_step) * self.A

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.max_steps):
            base = step * self.B + self.rank * self.A * self.micro
            for j in range(self.A):
                start = base + j * self.micro
                yield list(range(start, start + self.micro))


def _collate(inner: Callable | None):
    inner = inner or default_collate

    def collate(items):
        positions = torch.tensor([it[0] for it in items], dtype=torch.long)
        indices = torch.tensor([it[1] for it in items], dtype=torch.long)
        return positions, indices, inner([it[2] for it in items])
    return collate


def step_loader(dataset, seed: int, batch_size: int, grad_accum: int, rank: int, world_size: int,
                start_step: int, max_steps: int, collate_fn: Callable | None = None, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader yielding (positions, indices, collated data) micro-batches in the deterministic order."""
    if len(dataset) == 0:
        raise MinwmError("training data: the dataset is empty")
    sampler = StepBatchSampler(batch_size, grad_accum, rank, world_size, start_step, max_steps)
    # An explicit generator: otherwise creating the iterator draws worker seeds from the global torch RNG,
    # and a resumed run (iterator created at the resume step) would continue a different global RNG stream.
    gen = torch.Generator().manual_seed(mix_seed("loader", seed, start_step))
    return DataLoader(_Positions(dataset, seed), batch_sampler=sampler, collate_fn=_collate(collate_fn),
                      num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False, generator=gen)


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
