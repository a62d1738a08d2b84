"""The `model` section of a config: which backbone, its diffusers config, and how the camera enters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class CameraInjectionConfig:
    # "prope": a second attention branch over PRoPE-transformed q, k, v (zero-initialised output projection).
    # "plucker": Plucker ray maps added to the patch tokens through a zero-initialised projection.
    # "none": no camera input.
    kind: str = "prope"
    # "paper": the minWM paper's operator (P on half of each head's channels, x/y RoPE on the rest).
    # "full": P on all channels, no x/y RoPE (the upstream variant; for ablation only).
    prope_layout: str = "paper"
    prope_rope_base: float = 100.0

    def __post_init__(self):
        if self.kind not in ("prope", "plucker", "none"):
            raise ValueError(f"camera.kind: expected prope, plucker or none, got {self.kind!r}")
        if self.prope_layout not in ("paper", "full"):
            raise ValueError(f"camera.prope_layout: expected paper or full, got {self.prope_layout!r}")


@dataclass
class ModelConfig:
    # "wan" (Wan2.1, cross-attention DiT) or "hunyuan15" (HunyuanVideo-1.5, MMDiT joint attention).
    arch: str = "wan"
    # A local diffusers-format transformer directory (config.json + safetensors) to load strictly;
    # when null, the model is built from `diffusers` below with random weights.
    pretrained: Optional[str] = None
    # Keyword arguments of the diffusers model class (WanTransformer3DModel / HunyuanVideo15Transformer3DModel).
    diffusers: dict[str, Any] = field(default_factory=dict)
    camera: CameraInjectionConfig = field(default_factory=CameraInjectionConfig)
    # Autoregressive chunk, in latent frames.
    chunk_frames: int = 4
    # Streaming attention window (latent frames kept in the KV cache) and sink frames kept forever.
    window_frames: int = 20
    sink_frames: int = 0

    def __post_init__(self):
        if self.arch not in ("wan", "hunyuan15"):
            raise ValueError(f"arch: expected wan or hunyuan15, got {self.arch!r}")
        if self.chunk_frames < 1:
            raise ValueError(f"chunk_frames: expected >= 1, got {self.chunk_frames}")
