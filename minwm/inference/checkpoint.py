"""Everything a WorldModel needs from a stage output directory.

A stage output holds model.safetensors, config.yaml (the full minwm config the stage ran with) and, when written
by Backbone.save_pretrained, model_config.json. The backbone is loaded strictly (loading.load_pretrained when
model_config.json is there; else built from config.yaml's `model` section and the weights assigned strictly, a
"transformer." prefix on every key accepted). The codec and text encoder come from config.yaml's `codec`
section: relative paths are resolved against the checkpoint directory first, then the working directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch

from minwm.errors import MinwmError

CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"


def resolve_path(path: Optional[str], base: Optional[Path]) -> Optional[Path]:
    """A config path: as given when absolute, else relative to the checkpoint folder `base` when it exists there."""
    if not path:
        return None
    p = Path(path)
    if p.is_absolute() or base is None:
        return p
    return base / p if (base / p).exists() else p


def build_codec(cfg: Any, base: Optional[Path], device: Any, dtype: torch.dtype):
    """The VideoCodec of config section `codec` (None when there is no such section or no codec.vae)."""
    codec_cfg = cfg.get("codec")
    if codec_cfg is None or not codec_cfg.vae:
        return None
    from minwm.codecs.vae import VideoCodec

    return VideoCodec.from_pretrained(resolve_path(codec_cfg.vae, base), dtype=dtype, device=device)


def build_text_encoder(cfg: Any, base: Optional[Path], device: Any):
    """The TextEncoder of `codec.text` (a fixed random tiny one when not pretrained), or None without a codec
    section."""
    codec_cfg = cfg.get("codec")
    if codec_cfg is None:
        return None
    from minwm.codecs.text import TextEncoder

    tcfg = codec_cfg.text
    if tcfg.pretrained:
        tcfg = dataclasses.replace(tcfg, pretrained=str(resolve_path(tcfg.pretrained, base)))
    enc = TextEncoder.from_config(tcfg)
    enc.model.to(device)
    if enc.glyph_model is not None:
        enc.glyph_model.to(device)
    return enc


def _load_backbone(d: Path, cfg: Any, device: Any, dtype: torch.dtype):
    from minwm.models import loading

    if (d / loading.MODEL_CONFIG).is_file():
        return loading.load_pretrained(d, cfg["model"], device=device, dtype=dtype)
    from minwm.models.backbone import backbone_class

    model_cfg = dataclasses.replace(cfg["model"], pretrained=None)
    sd = loading.read_safetensors(d / WEIGHTS)
    if sd and all(k.startswith("transformer.") for k in sd):
        sd = {k[len("transformer."):]: v for k, v in sd.items()}
    with loading.params_on_meta():
        backbone = backbone_class(model_cfg.arch)(model_cfg)
    loading.assign_state_dict(backbone, sd, str(d / WEIGHTS), base_checkpoint_ok=False, dtype=dtype, device=device)
    return backbone


def load_checkpoint(ckpt_dir: str | Path, device: Any = "cpu", dtype: torch.dtype = torch.float32):
    """(backbone, config, codec or None, text encoder or None) of a stage output directory."""
    from minwm.config import load_config

    d = Path(ckpt_dir)
    if not d.is_dir():
        raise MinwmError(f"{d}: checkpoint directory not found")
    if not (d / WEIGHTS).is_file():
        raise MinwmError(f"{d}: not a checkpoint (no {WEIGHTS})")
    if not (d / CONFIG).is_file():
        raise MinwmError(f"{d}: not a checkpoint (no {CONFIG} with the model, codec and inference settings)")
    cfg = load_config(d / CONFIG)
    backbone = _load_backbone(d, cfg, device, dtype)
    codec = build_codec(cfg, d, device, dtype)
    text_encoder = build_text_encoder(cfg, d, device)
    return backbone, cfg, codec, text_encoder
