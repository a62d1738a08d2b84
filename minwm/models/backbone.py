"""The backbone protocol every adapter (wan, hunyuan15) implements, its shared input checks, and the
`build_backbone(model_cfg)` factory.

A backbone predicts the flow-matching velocity for latents [B, C, F, H, W] given per-frame timesteps,
text, and cameras, in one of three modes that share one attention path:

- "bidirectional": full attention over all frames (the pretrained model's behaviour).
- "teacher_forcing": the sequence is [clean copy | noisy copy] (2S tokens), both copies at the same
  RoPE positions and cameras, the clean copy modulated with t = 0, under the block-causal TF mask;
  only the noisy half goes through the output head.
- "streaming": the latents are one chunk; its queries attend to the KV cache (earlier chunks) plus
  the chunk itself; with commit=True the chunk's keys/values are appended to the cache (the clean
  t = 0 refresh pass after a chunk is denoised). A refresh pass wants only the cache writes: with
  commit=True, output=False the adapter stops once the last layer's keys/values are written (that
  layer's attention, FFN and the output head feed nothing) and returns None.
"""

from __future__ import annotations

import abc
import importlib
from typing import Any, Optional

import torch
from torch import nn

from minwm.errors import MinwmError
from minwm.models.config import ModelConfig

MODES = ("bidirectional", "teacher_forcing", "streaming")

# arch -> "module:Class"; imported lazily so one adapter's import cost or absence never hits the other.
BACKBONES: dict[str, str] = {
    "wan": "minwm.models.wan:WanBackbone",
    "hunyuan15": "minwm.models.hunyuan15:Hunyuan15Backbone",
}


def backbone_class(arch: str) -> type:
    if arch not in BACKBONES:
        raise MinwmError(f"model.arch: unknown backbone {arch!r} (expected one of: {', '.join(BACKBONES)})")
    module, cls = BACKBONES[arch].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise MinwmError(f"model.arch: backbone {arch!r} is not available ({e})") from None


def build_backbone(model_cfg: ModelConfig, device: Any = None, dtype: Optional[torch.dtype] = None) -> "Backbone":
    """The backbone a `model` config section describes: loaded strictly from `model_cfg.pretrained`
    (a diffusers-format dir or one of our save_pretrained dirs) when set, else randomly initialised
    from `model_cfg.diffusers`."""
    if model_cfg.pretrained:
        from minwm.models.loading import from_pretrained

        return from_pretrained(model_cfg.pretrained, model_cfg, device=device, dtype=dtype)
    model = backbone_class(model_cfg.arch)(model_cfg)
    return model.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else model


def frame_timesteps(timesteps: Any, batch: int, frames: int, device=None) -> torch.Tensor:
    """Per-frame timesteps [B, F] float32 from a scalar, [B] or [B, F] input (t in [0, 1000])."""
    t = torch.as_tensor(timesteps, device=device)
    if t.is_floating_point() and t.dtype != torch.float64:
        t = t.float()  # never run timesteps in bf16: its spacing near 1000 is 4
    elif not t.is_floating_point():
        t = t.float()
    if t.ndim == 0:
        t = t.expand(batch, frames)
    elif t.ndim == 1 and t.shape[0] == batch:
        t = t[:, None].expand(batch, frames)
    elif t.ndim != 2 or tuple(t.shape) != (batch, frames):
        raise MinwmError(f"timesteps: shape {tuple(t.shape)}, expected [{batch}, {frames}] (one per latent frame)")
    if not torch.isfinite(t).all():
        raise MinwmError("timesteps: non-finite value")
    return t.float()


def check_inputs(
    latents: torch.Tensor,
    cameras: Optional[tuple[torch.Tensor, torch.Tensor]],
    *,
    in_channels: int,
    patch_size: tuple[int, int, int],
    chunk_frames: int,
    mode: str,
    camera_kind: str,
    clean_latents: Optional[torch.Tensor] = None,
    cache: Any = None,
    commit: bool = False,
    output: bool = True,
) -> None:
    """One-line MinwmErrors for the mistakes a caller can make, raised before any compute."""
    if mode not in MODES:
        raise MinwmError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise MinwmError(f"latents: shape {shape}, expected [B, C, F, H, W]")
    B, C, F, H, W = latents.shape
    if C != in_channels:
        raise MinwmError(f"latents: {C} channels, expected {in_channels}")
    p_t, p_h, p_w = patch_size
    if H % p_h or W % p_w:
        raise MinwmError(f"latents: spatial size {H}x{W} is not divisible by the patch size {p_h}x{p_w}")
    if F % p_t:
        raise MinwmError(f"latents: {F} frames is not divisible by the temporal patch size {p_t}")
    if mode == "teacher_forcing":
        if F % chunk_frames:
            raise MinwmError(f"latents: {F} frames is not divisible by chunk_frames={chunk_frames}")
        if clean_latents is None:
            raise MinwmError("clean_latents: required in teacher_forcing mode")
        if tuple(clean_latents.shape) != tuple(latents.shape):
            raise MinwmError(f"clean_latents: shape {tuple(clean_latents.shape)}, expected {tuple(latents.shape)}")
    elif clean_latents is not None:
        raise MinwmError(f"clean_latents: only used in teacher_forcing mode, got mode {mode!r}")
    if mode == "streaming":
        if cache is None:
            raise MinwmError("cache: streaming mode needs a KV cache (backbone.new_cache(...))")
        if F != chunk_frames:
            raise MinwmError(f"latents: streaming takes one chunk of chunk_frames={chunk_frames} frames, got {F}")
    elif cache is not None or commit:
        raise MinwmError(f"{'cache' if cache is not None else 'commit'}: only used in streaming mode, got mode {mode!r}")
    if not output and not (mode == "streaming" and commit):
        raise MinwmError("output=False: only for a committing streaming pass (mode='streaming', commit=True)")
    if camera_kind != "none":
        if cameras is None:
            raise MinwmError(f"cameras: required by camera injection {camera_kind!r}")
        w2c, K = cameras
        if w2c.ndim != 4 or tuple(w2c.shape[2:]) != (4, 4) or w2c.shape[0] != B:
            raise MinwmError(f"cameras: w2c has shape {tuple(w2c.shape)}, expected [{B}, {F}, 4, 4]")
        if w2c.shape[1] != F:
            raise MinwmError(f"cameras: {w2c.shape[1]} camera frames for {F} latent frames")
        if tuple(K.shape) != (B, F, 4):
            raise MinwmError(f"cameras: intrinsics have shape {tuple(K.shape)}, expected [{B}, {F}, 4]")


class Backbone(nn.Module, abc.ABC):
    """Base class of the adapters. Subclasses set `arch`, build `self.transformer` (the diffusers
    model, with any camera modules registered inside it so its state_dict is the checkpoint format),
    and implement `forward`, `new_cache` and `camera_parameter_names`."""

    arch: str = ""
    transformer: nn.Module

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False

    # ---- what subclasses provide -------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, latents, timesteps, text, cameras=None, *, mode="bidirectional", clean_latents=None,
                cache=None, commit=False, frame_offset=0, output=True):
        """Flow-matching velocity [B, C, F, H, W] (None when output=False).

        latents [B, C, F, H, W]; timesteps [B, F] float in [0, 1000] (a scalar or [B] is broadcast);
        text: the adapter's text dict (Wan: {"encoder_hidden_states": [B, L, D]}) or its prepared context;
        cameras: (w2c [B, F, 4, 4], normalised intrinsics [B, F, 4]), required unless camera.kind is none;
        mode: see the module docstring; clean_latents: teacher forcing's clean copy (same shape);
        cache: the KV cache (streaming only); commit: append this call's keys/values to the cache;
        frame_offset: added to every temporal RoPE position of the call; output=False (streaming with
        commit only): write the cache and skip what only the returned velocity needs."""

    @abc.abstractmethod
    def new_cache(self, batch: int, height: int, width: int, device=None, dtype=None):
        """A KV cache for streaming at this latent size (window and sinks from the config)."""

    @abc.abstractmethod
    def camera_parameter_names(self) -> list[str]:
        """State-dict keys (of `self.transformer`) that belong to camera injection: the only keys a base
        (non-camera) diffusers checkpoint may lack."""

    @classmethod
    @abc.abstractmethod
    def diffusers_class(cls) -> type:
        """The diffusers model class whose weights and submodules this adapter drives."""

    # ---- shared ------------------------------------------------------------------------------
    @property
    def diffusers_config(self) -> dict:
        """The diffusers constructor kwargs of `self.transformer` (what config.json holds)."""
        return {k: v for k, v in dict(self.transformer.config).items() if not k.startswith("_")}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory) -> None:
        from minwm.models.loading import save_pretrained

        save_pretrained(self, directory)
