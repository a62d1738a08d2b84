"""Stage 2a, data: causal ODE trajectories from the Stage-1 AR teacher (RECIPE.md §3, §7).

For every sample (clip i = s mod n of the latent cache, repeat s div n) the frozen AR teacher integrates the flow
ODE from x_T ~ N(0, I) (noise seeded by (train.seed, s), nothing else) with `steps` Euler steps on the shift grid,
teacher-forced on the clip's ground-truth latents: mode "teacher_forcing" with clean_latents = the ground truth,
so every block is integrated at once under the block-causal mask, which equals integrating block by block with
the ground-truth clean blocks (not the generated ones) written into the KV cache at t = 0. CFG on v with the
negative prompt: v = v_u + g (v_c - v_u), g = 6. The camera goes to both branches.

The student's few-step list is the inference section's (`inference.timesteps()`: [1000, 750, 500, 250] warped with
shift 5 -> [1000, 937.5, 833.3, 625.0]), so ODE training and sampling use the same timesteps; each must sit on the
teacher's Euler grid (48 steps: indices [0, 12, 24, 36]). Stored per sample: the states at those timesteps, the
ODE endpoint and the ground truth; the text and cameras stay in the latent cache (the clip's name is stored).

Output (OUT):
    shard_00000.safetensors   samples 0..S-1: {j}.states [K, C, F, h, w], {j}.endpoint, {j}.latents [C, F, h, w];
                              metadata: the samples' indices, clip names and the shard's fingerprint
    index.json                format, settings, fingerprint, shards (written after every shard exists)
    config.yaml, metrics.json (written last: "complete": true, the pipeline's "done")
Each shard is written atomically and depends only on its samples, the teacher and the settings, so a killed run
resumes at the first missing shard and ends with the same bytes as an uninterrupted one. Under torchrun, rank r
makes shards r, r + W, ... `--max-steps N` caps the number of samples at N (no optimiser steps here).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm import tqdm

from minwm.diffusion.losses import cfg_from_uncond
from minwm.diffusion.samplers import euler_sample, euler_sigmas
from minwm.diffusion.schedule import grid_indices, timestep_grid
from minwm.errors import MinwmError
from minwm.stages import common

NAME = "ode-data"
INPUTS: dict[str, str] = {"teacher": "ar"}
TRAIN_DEFAULTS: dict[str, Any] = {}

FORMAT = "minwm-ode-data/1"
INDEX = "index.json"
TEXT_KEYS = ("embeds", "mask", "glyph_embeds", "glyph_mask")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Params:
    # The teacher's Euler grid: `steps` steps on shift_s(1 - i/N) (reference 48, shift 5). The student's
    # timesteps must lie on it (for the default list: a multiple of 4).
    steps: int = 48
    shift: float = 5.0
    # CFG on v over text, v_u + g (v_c - v_u), the unconditional branch on inference.negative_prompt (1: off).
    guidance: float = 6.0
    # Trajectories per clip, each from its own noise (samples = clips x repeats; `--max-steps N` caps them at N).
    repeats: int = 1
    # Teacher batch and samples per shard (a shard is the unit of resume).
    batch_size: int = 4
    shard_samples: int = 16
    # Storage dtype of the states, endpoints and ground truth.
    dtype: str = "float32"

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps: expected >= 1, got {self.steps}")
        if self.shift <= 0:
            raise ValueError(f"shift: expected > 0, got {self.shift}")
        for name in ("repeats", "batch_size", "shard_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")


# ---- pure parts -------------------------------------------------------------------------------------------

def student_indices(timesteps: Sequence[float], steps: int, shift: float) -> list[int]:
    """Where the student's timesteps sit on the teacher's `steps`-step Euler grid ([0, 12, 24, 36] for the
    warped default list on 48 steps at shift 5); MinwmError when one is off the grid."""
    try:
        return grid_indices(timesteps, timestep_grid(steps, shift))
    except MinwmError as e:
        ts = [round(float(t), 3) for t in timesteps]
        raise MinwmError(f"stages.ode_data.steps={steps}, shift={shift}: the student timesteps {ts} must lie on the "
                         f"teacher's Euler grid ({e})") from None


def trajectory(velocity_fn: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor, steps: int,
               shift: float, keep: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler-integrate `velocity_fn` from `noise` over the `steps`-step shift grid down to sigma = 0.

    Returns (states [B, len(keep), ...]: x before Euler step keep[k], i.e. at t_{keep[k]}; endpoint [B, ...])."""
    keep = list(keep)
    if any(not 0 <= k < steps for k in keep):
        raise MinwmError(f"trajectory: kept indices {keep} outside the {steps}-step grid")
    saved: dict[int, torch.Tensor] = {}

    def callback(i: int, t: float, x: torch.Tensor) -> None:
        if i in keep:
            saved[i] = x.clone()

    end = euler_sample(velocity_fn, noise, euler_sigmas(steps, shift), callback=callback)
    return torch.stack([saved[k] for k in keep], dim=1), end


def guided_velocity(model: Any, text: Any, negative: Any, cameras: Any, clean: torch.Tensor, guidance: float,
                    n_clean: int = 0, extra: Optional[dict] = None,
                    negative_cameras: Any = None) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """velocity_fn(x, t) of the teacher-forced AR teacher with CFG v_u + g (v_c - v_u) (g = 1: conditional only;
    the unconditional branch sees `negative_cameras`, default `cameras`).
    All frames run at t except the first `n_clean` (TI2V: held at the ground truth, t = 0, velocity 0)."""
    extra = dict(extra or {})
    cams_u = cameras if negative_cameras is None else negative_cameras

    def fn(x: torch.Tensor, t: float) -> torch.Tensor:
        B, _, F = x.shape[:3]
        tt = torch.full((B, F), float(t), dtype=torch.float32, device=x.device)
        if n_clean:
            x = x.clone()
            x[:, :, :n_clean] = clean[:, :, :n_clean]
            tt[:, :n_clean] = 0.0
        kw = dict(mode="teacher_forcing", clean_latents=clean, **extra)
        v = model(x, tt, text, cameras, **kw)
        if guidance != 1.0:
            v = cfg_from_uncond(cond=v, uncond=model(x, tt, negative, cams_u, **kw), scale=guidance)
        if n_clean:
            v = v.clone()
            v[:, :, :n_clean] = 0
        return v
    return fn


def sample_noise(seed: int, sample: int, shape: Sequence[int]) -> torch.Tensor:
    """x_T of sample `sample`: a function of (seed, sample) only (CPU float32), whatever the batch or resume."""
    from minwm.train.data import mix_seed

    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(mix_seed(seed, "ode-data", sample)))


def shard_members(num_samples: int, shard_samples: int, shard: int) -> list[int]:
    return list(range(shard * shard_samples, min(num_samples, (shard + 1) * shard_samples)))


# ---- fingerprints -----------------------------------------------------------------------------------------

def module_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _shard_meta(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["minwm"])
    except Exception:
        raise MinwmError(f"{path}: unreadable ODE-data shard (remove it to make it again)") from None


# ---- the stage --------------------------------------------------------------------------------------------

def run(cfg: Any, out_dir: str | Path, *, init: Optional[dict[str, str]] = None, resume: bool = False,
        max_steps: Optional[int] = None) -> Path:
    from safetensors.torch import save_file

    from minwm.io import atomic_path, write_json, write_text
    from minwm.train import distributed as D
    from minwm.train.trainer import resolve_precision

    ctx = common.prepare(NAME, cfg, out_dir, init, resume, max_steps)
    p: Params = ctx.params
    out = ctx.out_dir
    timesteps = cfg["inference"].timesteps()
    keep = student_indices(timesteps, p.steps, p.shift)
    data = common.latent_dataset(ctx)
    teacher = common.build_model(ctx, "teacher", trainable=False)
    common.check_data(data, teacher, ctx, chunked=True)
    cond = common.Conditioner(ctx, teacher, data, need_negative=p.guidance != 1.0)
    names = data.cache.names
    total = len(data) * p.repeats
    num_samples = total if max_steps is None else min(total, max_steps)
    seed = ctx.train.seed
    dtype = DTYPES[p.dtype]
    # The teacher runs under the trainer's precision rule (bf16 autocast on a bf16 GPU unless train says "no");
    # the Euler arithmetic stays float64 and the states float32.
    bf16 = resolve_precision(ctx.train.mixed_precision, ctx.device) == "bf16"

    def amp():
        return torch.autocast(ctx.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    settings = {"steps": p.steps, "shift": p.shift, "guidance": p.guidance, "repeats": p.repeats,
                "batch_size": p.batch_size, "shard_samples": p.shard_samples, "dtype": p.dtype, "seed": seed,
                "timesteps": timesteps, "latent_frames": cfg["stages"].latent_frames, "ti2v": cfg["stages"].ti2v,
                "negative_prompt": cfg["inference"].negative_prompt if p.guidance != 1.0 else None}
    if p.guidance != 1.0 and cfg["inference"].camera_guidance:
        settings["camera_guidance"] = True      # only when on: data made without it keeps its fingerprint
    fingerprint = {"settings": settings, "teacher": module_digest(teacher),
                   "latents": _digest([data.cache.index.get("fingerprint"), names])}
    shards = (num_samples + p.shard_samples - 1) // p.shard_samples
    existing = sorted(out.glob("shard_*.safetensors")) if out.is_dir() else []
    if existing and not resume:
        raise MinwmError(f"{out}: already holds ODE-data shards; continue with --resume or choose a new output "
                         f"directory")
    if ctx.info.is_main and out.is_dir():
        for stale in out.glob(".shard_*.tmp"):  # temporaries of a killed run, never complete shards
            shutil.rmtree(stale, ignore_errors=True)
    D.barrier()

    def shard_fp(members: list[int]) -> str:
        return _digest([fingerprint, members])

    t0 = time.monotonic()
    made = 0
    mine = [s for s in range(shards) if s % ctx.info.world_size == ctx.info.rank]
    bar = tqdm(total=num_samples, desc=NAME, disable=not ctx.info.is_main, dynamic_ncols=True, mininterval=1.0)
    for s in mine:
        members = shard_members(num_samples, p.shard_samples, s)
        path = out / shard_name(s)
        if path.exists():
            if _shard_meta(path).get("fingerprint") != shard_fp(members):
                raise MinwmError(f"{path}: made with another teacher, latent cache or stages.ode_data settings; "
                                 f"write into a new output directory")
            bar.update(len(members))
            continue
        tensors: dict[str, torch.Tensor] = {}
        items = []
        for b0 in range(0, len(members), p.batch_size):
            batch = members[b0:b0 + p.batch_size]
            clips = [i % len(data) for i in batch]
            rows = [data[c] for c in clips]
            x0 = torch.stack([r["latents"] for r in rows]).to(ctx.device)
            B, C, F, h, w = x0.shape
            text = _prepare_text(teacher, common.text_dict(teacher.arch, _collate(rows, TEXT_KEYS)))
            neg = _prepare_text(teacher, cond.negative(B, ctx.device)) if p.guidance != 1.0 else None
            w2c = torch.stack([r["w2c"] for r in rows])
            K = torch.stack([r["intrinsics"] for r in rows])
            cams = tuple(c.to(ctx.device) for c in common.relative_cameras(w2c, K)) \
                if teacher.cfg.camera.kind != "none" else None
            n_clean = cond.clean_frames(F)
            noise = torch.stack([sample_noise(seed, i, (C, F, h, w)) for i in batch]).to(ctx.device)
            if n_clean:
                noise[:, :, :n_clean] = x0[:, :, :n_clean]
            fn = guided_velocity(teacher, text, neg, cams, x0, p.guidance, n_clean, cond.extra(x0),
                                 negative_cameras=cond.uncond_cameras(cams))
            with torch.inference_mode(), amp():
                states, end = trajectory(fn, noise, p.steps, p.shift, keep)
            for j, (i, c) in enumerate(zip(batch, clips)):
                k = len(items)
                tensors[f"{k}.states"] = states[j].to("cpu", dtype).contiguous()
                tensors[f"{k}.endpoint"] = end[j].to("cpu", dtype).contiguous()
                tensors[f"{k}.latents"] = x0[j].to("cpu", dtype).contiguous()
                items.append({"sample": i, "clip": c, "name": names[c]})
            bar.update(len(batch))
            made += len(batch)
        meta = {"format": FORMAT, "fingerprint": shard_fp(members), "samples": items}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"minwm": json.dumps(meta, sort_keys=True)})
    bar.close()
    D.barrier()
    if ctx.info.is_main:
        index = {"format": FORMAT, "fingerprint": fingerprint, "settings": settings, "timesteps": timesteps,
                 "grid_indices": keep, "latents": str(data.root), "samples": num_samples,
                 "shards": [{"file": shard_name(s), "samples": len(shard_members(num_samples, p.shard_samples, s))}
                            for s in range(shards)]}
        write_json(out / INDEX, index)
        write_text(out / "config.yaml", cfg.dump())
        write_json(out / common.METRICS, {
            "stage": NAME, "complete": True, "samples": num_samples, "shards": shards, "made_now": made,
            "seconds_now": round(time.monotonic() - t0, 3), "timesteps": timesteps, "grid_indices": keep,
            "inputs": {k: str(v) for k, v in ctx.inputs.items()}})
    D.barrier()
    return out


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def _collate(rows: list[dict], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in keys if k in rows[0]}


def _prepare_text(model: Any, text: dict[str, torch.Tensor], device: Any = None) -> Any:
    """The text on the model's device and, where the adapter can, its per-block cross-attention K/V computed once
    (reused by all 2 x `steps` teacher passes of a batch)."""
    dev = device if device is not None else next(model.parameters()).device
    text = {k: v.to(dev) for k, v in text.items()}
    encode = getattr(model, "encode_text", None)
    if encode is None:
        return text
    with torch.inference_mode():
        return encode(text)


# ---- reading ----------------------------------------------------------------------------------------------

def read_index(root: str | Path) -> dict:
    p = Path(root) / INDEX
    try:
        index = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise MinwmError(f"{p}: no readable ODE-data index ({type(e).__name__}); expected the output directory of "
                         f"the ode-data stage") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise MinwmError(f"{p}: not an ODE-data index (expected format {FORMAT!r})")
    return index


class ODETrajectories(torch.utils.data.Dataset):
    """ODE-data samples joined with their clips' text and cameras from the latent cache (by clip name).

    Item: states [K, C, F, h, w], endpoint and latents (the ground truth) [C, F, h, w] float32, plus the clip's
    w2c, intrinsics, embeds, mask (+ glyph_*) as common.StageDataset gives them."""

    def __init__(self, root: str | Path, clips: "common.StageDataset"):
        self.root = Path(root)
        self.index = read_index(self.root)
        self.timesteps = [float(t) for t in self.index["timesteps"]]
        self.clips = clips
        by_name = {n: i for i, n in enumerate(clips.cache.names)}
        self._items: list[tuple[int, int, int]] = []  # (shard, j, clip index in `clips`)
        for s, shard in enumerate(self.index["shards"]):
            path = self.root / shard["file"]
            if not path.is_file():
                raise MinwmError(f"{path}: shard listed in {INDEX} is missing")
            for j, item in enumerate(_shard_meta(path)["samples"]):
                if item["name"] not in by_name:
                    raise MinwmError(f"{path}: clip {item['name']!r} is not in the latent cache {clips.root} "
                                     f"(the ODE data was made from another cache)")
                self._items.append((s, j, by_name[item["name"]]))
        if not self._items:
            raise MinwmError(f"{self.root}: no ODE-data samples")
        self._open: dict[int, Any] = {}
        first = self[0]
        clip = clips[self._items[0][2]]["latents"]
        if first["latents"].shape != clip.shape or not torch.allclose(first["latents"], clip, atol=1e-2, rtol=1e-2):
            raise MinwmError(f"{self.root}: the stored ground truth does not match clip "
                             f"{clips.cache.names[self._items[0][2]]!r} of {clips.root} (another cache, or another "
                             f"stages.latent_frames than when the ODE data was made)")

    def __len__(self) -> int:
        return len(self._items)

    def _handle(self, s: int):
        from safetensors import safe_open

        if s not in self._open:
            self._open[s] = safe_open(str(self.root / self.index["shards"][s]["file"]), "pt")
        return self._open[s]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, j, c = self._items[i]
        f = self._handle(s)
        item = {k: v for k, v in self.clips[c].items() if k != "latents"}
        for key in ("states", "endpoint", "latents"):
            item[key] = f.get_tensor(f"{j}.{key}").float()
        return item

    def __getstate__(self):  # DataLoader workers reopen shards themselves
        d = dict(self.__dict__)
        d["_open"] = {}
        return d
