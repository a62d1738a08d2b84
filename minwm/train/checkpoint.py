"""Atomic training checkpoints for exact resume, and the stage output files.

Layout of a run directory:
    DIR/checkpoints/step_000040/state/      torch.distributed.checkpoint (DCP): modules, optimisers, EMA
    DIR/checkpoints/step_000040/rng/rank_00000.pt   RNG states of each rank
    DIR/checkpoints/step_000040/trainer_state.json  step, data position, metrics history, ...
    DIR/checkpoints/latest                  text file naming the newest complete step directory
    DIR/model.safetensors, DIR/config.yaml, DIR/metrics.json   (final stage output, `write_stage_output`)

A checkpoint is written to checkpoints/.step_000040.tmp and renamed when complete, then `latest` is replaced
atomically, so a kill at any moment leaves the previous checkpoint intact. DCP is used in single-process runs
too (one format): it stores each rank's shards and reshards on load, so a checkpoint written by N processes
loads into M processes, including a plain single-process run.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from minwm.errors import MinwmError
from minwm.io import atomic_path, write_json, write_text
from minwm.train import distributed as D

STEP_RE = re.compile(r"^step_(\d{6,})$")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def is_complete(path: Path) -> bool:
    return (path / "trainer_state.json").is_file() and (path / "state").is_dir()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The directory `latest` points to; if the pointer is missing or dangling (a kill between the rename and
    the pointer write), the newest complete step directory."""
    root = checkpoints_dir(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if STEP_RE.match(target.name) and is_complete(target):
            newer = [p for p in list_checkpoints(run_dir) if _step_of(p) > _step_of(target)]
            return newer[-1] if newer else target
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _step_of(path: Path) -> int:
    m = STEP_RE.match(path.name)
    return int(m.group(1)) if m else -1


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete half-written checkpoints left by a killed run (rank 0 only); returns what was removed."""
    root = checkpoints_dir(run_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step_") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


# ---- RNG ---------------------------------------------------------------------------------------------------

def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict:
    """All global RNG states (torch CPU, CUDA, numpy, python) and named torch.Generators, torch.load-safe."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (generators or {}).items():
        if k in state.get("generators", {}):
            g.set_state(state["generators"][k])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---- save / load -------------------------------------------------------------------------------------------

def save_checkpoint(run_dir: str | Path, step: int, state: dict, meta: dict, rng: dict, keep: int,
                    info: D.DistInfo) -> Path:
    """Write checkpoint `step` (a collective: every rank calls it). Returns the final directory.

    state: DCP state dict (nested dicts of tensors / DTensors); meta: JSON-able trainer state (rank 0's is
    written); rng: this rank's RNG states. Keeps the newest `keep` checkpoints (keep <= 0: all).
    """
    import torch.distributed.checkpoint as dcp

    root = checkpoints_dir(run_dir)
    final = root / step_name(step)
    tmp = root / f".{step_name(step)}.tmp"  # same name on every rank (no random suffix)
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    D.barrier()
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(tmp / "state"), no_dist=not _dist_on())
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng, tmp / "rng" / f"rank_{info.rank:05d}.pt")
    D.barrier()
    if info.is_main:
        write_json(tmp / "trainer_state.json", meta)
        if final.exists():  # an older copy of the same step (a run resumed from an earlier checkpoint)
            shutil.rmtree(final)
        tmp.replace(final)
        write_text(root / "latest", final.name + "\n")
        if keep > 0:
            for old in list_checkpoints(run_dir)[:-keep]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


@contextlib.contextmanager
def _quiet_single_process():
    # DCP warns on every single-process save/load that it "assumes" one process; that is our intent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise MinwmError(f"{path / 'trainer_state.json'}: unreadable checkpoint state ({e})") from None


def load_state(path: Path, state: dict) -> None:
    """Fill `state` (a DCP state dict with the right structure) in place from checkpoint `path`."""
    import torch.distributed.checkpoint as dcp

    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path / "state"), no_dist=not _dist_on())
    except Exception as e:  # noqa: BLE001 - DCP raises many types; name the checkpoint in one line
        raise MinwmError(f"{path}: cannot load checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None


def load_rng(path: Path, rank: int) -> dict | None:
    f = path / "rng" / f"rank_{rank:05d}.pt"
    return torch.load(f, weights_only=True) if f.is_file() else None


# ---- stage output ------------------------------------------------------------------------------------------

def write_stage_output(out_dir: str | Path, state_dict: dict[str, torch.Tensor], config: Any, metrics: Any) -> None:
    """Write DIR/model.safetensors, DIR/config.yaml and DIR/metrics.json, each atomically; metrics.json is
    written last, so its presence means the output is complete.

    config: a minwm Config (anything with .to_dict()), a dataclass, or a plain mapping. metrics: JSON-able.
    """
    from safetensors.torch import save_file

    from minwm.config import to_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    cfg = config.to_dict() if hasattr(config, "to_dict") else to_dict(config)
    write_text(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    write_json(out / "metrics.json", metrics)


def read_stage_weights(out_dir: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The state dict of a stage output (model.safetensors), with a one-line error when it is missing."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    f = out / "model.safetensors"
    if not f.is_file():
        raise MinwmError(f"{f}: not found (expected the output directory of a finished stage)")
    if not (out / "metrics.json").is_file():
        raise MinwmError(f"{out}: incomplete stage output (no metrics.json; the stage did not finish)")
    return load_file(str(f), device=str(device))
