"""Strict loading and saving of backbones.

Two on-disk forms:
- a diffusers-format transformer directory: config.json + diffusion_pytorch_model.safetensors (or a
  sharded .safetensors.index.json), or a pipeline root holding one under transformer/;
- ours, written by `save_pretrained`: model.safetensors (keys = the diffusers names plus the camera
  branch's) + model_config.json (the `model` config section with the diffusers kwargs filled in).

Loading is strict both ways: a missing or unexpected key, or a shape mismatch, is a one-line MinwmError
listing the keys. The single allowance: a base (non-camera) diffusers checkpoint lacks ALL camera
parameters; they keep their zero initialisation and a log line says so.

Big models are built with parameters on the meta device and the checkpoint's tensors are assigned in,
so a 1.3B model is never randomly initialised only to be overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from minwm.config import from_dict, to_dict
from minwm.errors import MinwmError
from minwm.io import atomic_path, read_json, write_json
from minwm.models.config import ModelConfig

log = logging.getLogger("minwm.models")

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
FORMAT = "minwm-backbone"

# diffusers class name -> our arch.
DIFFUSERS_ARCH = {"WanTransformer3DModel": "wan", "HunyuanVideo15Transformer3DModel": "hunyuan15"}
_LIST_KEYS = 8  # keys named in an error message before "... and N more"


# ---- state dicts -------------------------------------------------------------------------------
def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MinwmError(f"{path}: no such checkpoint file")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise MinwmError(f"{path}: not a readable safetensors file ({e})") from None


def read_diffusers_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a diffusers-format transformer dir: one safetensors file or a sharded index."""
    d = Path(directory)
    if (d / DIFFUSERS_WEIGHTS).is_file():
        return read_safetensors(d / DIFFUSERS_WEIGHTS)
    index = d / DIFFUSERS_INDEX
    if not index.is_file():
        raise MinwmError(f"{d}: no {DIFFUSERS_WEIGHTS} or {DIFFUSERS_INDEX}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise MinwmError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part = read_safetensors(d / shard)
        sd.update({k: v for k, v in part.items() if weight_map.get(k) == shard})
    absent = sorted(set(weight_map) - set(sd))
    if absent:
        raise MinwmError(f"{index}: {len(absent)} keys listed but absent from their shards: {_names(absent)}")
    return sd


def _names(keys: list[str]) -> str:
    more = len(keys) - _LIST_KEYS
    return ", ".join(keys[:_LIST_KEYS]) + (f" ... and {more} more" if more > 0 else "")


def check_state_dict(module: nn.Module, sd: dict[str, torch.Tensor], where: str,
                     allow_missing: tuple[str, ...] = ()) -> list[str]:
    """Raise a one-line MinwmError unless `sd` has exactly `module`'s state-dict keys with the same
    shapes; keys in `allow_missing` may be absent (returned)."""
    expected = {k: v.shape for k, v in module.state_dict(keep_vars=True).items()}
    missing = sorted(set(expected) - set(sd) - set(allow_missing))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_names(unexpected)}")
        raise MinwmError(f"{where}: checkpoint does not match the model: " + "; ".join(parts))
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k])}" for k in sorted(sd)
             if tuple(sd[k].shape) != tuple(expected[k])]
    if wrong:
        raise MinwmError(f"{where}: checkpoint shapes do not match the model (checkpoint vs model): {_names(wrong)}")
    return sorted(set(allow_missing) - set(sd))


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no random init) while
    buffers stay real, so non-persistent buffers (e.g. RoPE tables) are computed as usual."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def assign_state_dict(backbone, sd: dict[str, torch.Tensor], where: str, base_checkpoint_ok: bool,
                      dtype: Optional[torch.dtype] = None, device: Any = None) -> None:
    """Load `sd` (diffusers names) strictly into `backbone.transformer`, whose parameters may be on meta.

    base_checkpoint_ok: the checkpoint may lack every camera parameter (a base diffusers checkpoint);
    those are then zero-initialised, as the camera branch is at step 0."""
    camera = backbone.camera_parameter_names()
    allow = tuple(camera) if base_checkpoint_ok and camera and not any(k in sd for k in camera) else ()
    absent = check_state_dict(backbone.transformer, sd, where, allow)
    params = dict(backbone.transformer.named_parameters())
    full = dict(sd)
    for k in absent:
        full[k] = torch.zeros(params[k].shape, dtype=next(iter(sd.values())).dtype)
    if dtype is not None:
        full = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}
    if device is not None:
        full = {k: v.to(device) for k, v in full.items()}
    backbone.transformer.load_state_dict(full, strict=True, assign=True)
    # assign=True hands over the tensors as they are; keep trainability as the module declared it.
    for k, p in backbone.transformer.named_parameters():
        p.requires_grad_(params[k].requires_grad)
    if device is not None:
        backbone.to(device)
    if absent:
        log.warning("%s: base checkpoint without camera injection; %d camera parameters (%s) are "
                    "zero-initialised", where, len(absent), backbone.cfg.camera.kind)


# ---- diffusers-format directories ---------------------------------------------------------------
def diffusers_dir(path: str | Path) -> Optional[Path]:
    """The transformer dir inside `path` (itself, or a pipeline's transformer/), if it is diffusers-format."""
    p = Path(path)
    for d in (p, p / "transformer"):
        if (d / DIFFUSERS_CONFIG).is_file() and ((d / DIFFUSERS_WEIGHTS).is_file() or (d / DIFFUSERS_INDEX).is_file()):
            return d
    return None


def read_diffusers_config(directory: Path, cls: type) -> dict:
    path = directory / DIFFUSERS_CONFIG
    raw = read_json(path)
    name = raw.get("_class_name")
    if name is not None and name != cls.__name__:
        raise MinwmError(f"{path}: _class_name is {name!r}, expected {cls.__name__!r}")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    ignored = sorted(k for k in raw if not k.startswith("_") and k not in accepted)
    if ignored:
        log.warning("%s: ignoring config keys %s unknown to %s", path, ", ".join(ignored), cls.__name__)
    return {k: v for k, v in raw.items() if k in accepted}


def _merge_diffusers_kwargs(from_file: dict, from_cfg: dict, where: str) -> dict:
    for k, v in from_cfg.items():
        if k in from_file and _norm(from_file[k]) != _norm(v):
            raise MinwmError(f"model.diffusers.{k}: {v!r} disagrees with {where} ({from_file[k]!r})")
    return {**from_cfg, **from_file}


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def from_pretrained(path: str | Path, model_cfg: Optional[ModelConfig] = None, *, device: Any = None,
                    dtype: Optional[torch.dtype] = None):
    """A backbone loaded strictly from `path`: one of our save_pretrained dirs, a diffusers-format
    transformer dir (or pipeline root), or a single .safetensors file (architecture from model_cfg).

    model_cfg supplies the camera injection and chunk/window settings (default: ModelConfig()); its
    `diffusers` kwargs, where given, must agree with the checkpoint's config. dtype None keeps the
    checkpoint's dtype."""
    from minwm.models.backbone import backbone_class

    p = Path(path)
    if (p / MODEL_CONFIG).is_file():
        return load_pretrained(p, model_cfg, device=device, dtype=dtype)
    cfg = model_cfg if model_cfg is not None else ModelConfig()
    if p.is_file() and p.suffix == ".safetensors":
        if not cfg.diffusers:
            raise MinwmError(f"{p}: a bare safetensors file needs the architecture in model.diffusers")
        sd, kwargs, where = read_safetensors(p), dict(cfg.diffusers), str(p)
        arch = cfg.arch
    else:
        d = diffusers_dir(p)
        if d is None:
            raise MinwmError(f"{p}: not a checkpoint (expected {MODEL_CONFIG}, or a diffusers dir with "
                             f"{DIFFUSERS_CONFIG} and {DIFFUSERS_WEIGHTS})")
        name = json.loads((d / DIFFUSERS_CONFIG).read_text()).get("_class_name", "")
        arch = DIFFUSERS_ARCH.get(name, cfg.arch)
        if model_cfg is not None and arch != cfg.arch:
            raise MinwmError(f"model.arch: {cfg.arch!r} but {d / DIFFUSERS_CONFIG} holds a {name} ({arch!r})")
        cls = backbone_class(arch)
        kwargs = _merge_diffusers_kwargs(read_diffusers_config(d, cls.diffusers_class()), dict(cfg.diffusers),
                                         str(d / DIFFUSERS_CONFIG))
        sd, where = read_diffusers_weights(d), str(d)
    cfg = dataclasses.replace(cfg, arch=arch, diffusers=kwargs, pretrained=str(path))
    with params_on_meta():
        model = backbone_class(arch)(cfg)
    assign_state_dict(model, sd, where, base_checkpoint_ok=True, dtype=dtype, device=device)
    return model


# ---- our own format --------------------------------------------------------------------------------
def save_pretrained(backbone, directory: str | Path) -> None:
    """Write model.safetensors + model_config.json into `directory` (created if needed; other files in it
    are left alone, each of ours is written atomically)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(backbone.cfg, diffusers=_jsonable(backbone.diffusers_config), pretrained=None)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in backbone.transformer.state_dict().items()}
    with atomic_path(d / WEIGHTS) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt", "minwm": FORMAT})
    write_json(d / MODEL_CONFIG, {"format": FORMAT, "version": 1, "model": to_dict(cfg)})


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def read_model_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / MODEL_CONFIG
    if not path.is_file():
        raise MinwmError(f"{path}: missing (not a directory written by save_pretrained)")
    raw = read_json(path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise MinwmError(f"{path}: format is {raw.get('format') if isinstance(raw, dict) else None!r}, expected {FORMAT!r}")
    return from_dict(ModelConfig, raw.get("model"), f"{path}:model")


def load_pretrained(directory: str | Path, model_cfg: Optional[ModelConfig] = None, *, device: Any = None,
                    dtype: Optional[torch.dtype] = None):
    """A backbone from a save_pretrained dir, strictly (no key may be missing or extra, camera ones
    included). The saved architecture and camera injection are authoritative; model_cfg may change only
    the runtime settings (chunk_frames, window_frames, sink_frames) and must otherwise agree."""
    from minwm.models.backbone import backbone_class

    d = Path(directory)
    saved = read_model_config(d)
    cfg = saved
    if model_cfg is not None:
        if model_cfg.arch != saved.arch:
            raise MinwmError(f"model.arch: {model_cfg.arch!r} but {d / MODEL_CONFIG} is {saved.arch!r}")
        for k, v in to_dict(model_cfg.camera).items():
            if getattr(saved.camera, k) != v:
                raise MinwmError(f"model.camera.{k}: {v!r} but {d} was trained with {getattr(saved.camera, k)!r}")
        _merge_diffusers_kwargs(saved.diffusers, dict(model_cfg.diffusers), str(d / MODEL_CONFIG))
        cfg = dataclasses.replace(saved, chunk_frames=model_cfg.chunk_frames, window_frames=model_cfg.window_frames,
                                  sink_frames=model_cfg.sink_frames)
    cfg = dataclasses.replace(cfg, pretrained=str(directory))
    with params_on_meta():
        model = backbone_class(cfg.arch)(cfg)
    assign_state_dict(model, read_safetensors(d / WEIGHTS), str(d / WEIGHTS), base_checkpoint_ok=False,
                      dtype=dtype, device=device)
    return model
