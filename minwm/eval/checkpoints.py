"""Checkpoints under evaluation: which sampler each stage gets, and the runner that generates a suite case with
one checkpoint and its context (see eval/runner.py's docstring for what the model is given)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from minwm.cameras.camera import Cameras
from minwm.errors import MinwmError

SAMPLERS = ("auto", "fewstep", "multistep", "bidirectional")
STAGE_SAMPLER = {"bidirectional": "bidirectional", "ar": "multistep", "ode": "fewstep", "cd": "fewstep",
                 "dmd": "fewstep"}


# ---- checkpoints ------------------------------------------------------------------------------------------

def checkpoint_names(ckpts: dict | Sequence) -> dict[str, Path]:
    """name -> directory. A list is named by directory name (runs/x/ar -> "ar"), with the parent prepended
    when two names collide. Every directory is checked before any work (one-line errors)."""
    if isinstance(ckpts, (str, Path)):
        ckpts = [ckpts]
    if isinstance(ckpts, dict):
        items = [(str(k), Path(v)) for k, v in ckpts.items()]
    else:
        paths = [Path(p) for p in ckpts]
        names = [p.resolve().name for p in paths]
        items = []
        for p, n in zip(paths, names):
            if names.count(n) > 1:
                n = f"{p.resolve().parent.name}/{n}"
            items.append((n, p))
    if not items:
        raise MinwmError("--ckpt: no checkpoint given")
    seen = set()
    for name, p in items:
        if name in seen:
            raise MinwmError(f"--ckpt {p}: checkpoint name {name!r} given twice")
        seen.add(name)
        if not p.is_dir():
            raise MinwmError(f"--ckpt {p}: checkpoint directory not found")
        for f in ("model.safetensors", "config.yaml"):
            if not (p / f).is_file():
                raise MinwmError(f"--ckpt {p}: not a checkpoint (no {f})")
    return dict(items)


def recorded_stage(ckpt: Path) -> Optional[str]:
    """The stage that wrote the checkpoint (metrics.json "stage"), or None."""
    try:
        m = json.loads((Path(ckpt) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    s = m.get("stage") if isinstance(m, dict) else None
    return s if isinstance(s, str) else None


def choose_sampler(stage: Optional[str], inference_mode: str, override: str = "auto") -> str:
    if override not in SAMPLERS:
        raise MinwmError(f"--sampler: expected one of {', '.join(SAMPLERS)}, got {override!r}")
    if override != "auto":
        return override
    if stage in STAGE_SAMPLER:
        return STAGE_SAMPLER[stage]
    return "multistep" if inference_mode == "multistep" else "fewstep"


# ---- one checkpoint -----------------------------------------------------------------------------------------

def _uint8(video: torch.Tensor) -> np.ndarray:
    """[1, 3, n, H, W] in [-1, 1] -> uint8 [n, H, W, 3]."""
    v = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def fixed_cameras(cams: Cameras) -> Cameras:
    """Every frame at the start camera (identity w2c), intrinsics kept: the baseline's camera input."""
    F = len(cams)
    return Cameras(torch.eye(4, dtype=torch.float64).repeat(F, 1, 1), cams.intrinsics.clone())


def prefill(wm, latents: torch.Tensor, cams: Cameras) -> np.ndarray:
    """Write real latents [1, C, chunk, h, w] into a freshly reset WorldModel's caches as a finished chunk at
    t = 0 (the refresh pass every generated chunk gets) and decode them; returns their pixel frames.

    WorldModel has no public prefill yet, so this reaches into its session state (caches, prepared text,
    streaming decoder, camera record) exactly as its own step_latents / step do after a chunk."""
    from minwm.inference.sampling import Conditioning, refresh

    if wm.frame_index != 0:
        raise MinwmError("prefill: the session must be freshly reset")
    if latents.shape[2] != wm.chunk_frames or len(cams) != wm.chunk_frames:
        raise MinwmError(f"prefill: expected one chunk of {wm.chunk_frames} latent frames, got {latents.shape[2]}")
    w2c, K = cams.to(wm.dtype, wm.device)
    cam_in = (w2c[None], K[None])
    x = latents.to(wm.device, wm.dtype)
    with torch.inference_mode():
        refresh(wm.backbone, x, Conditioning(wm._text, cam_in), wm._caches[0])
        if wm.mode == "multistep" and wm.inference.guidance != 1.0:
            refresh(wm.backbone, x, Conditioning(wm._neg_text, cam_in), wm._caches[1])
        frames = _uint8(wm._decoder(x))
    wm._record_cameras(cams)
    wm.frame_index += wm.chunk_frames
    return frames


class CheckpointRunner:
    """Generates suite cases with one checkpoint (see the module docstring for the conditioning)."""

    def __init__(self, name: str, path: Path, sampler: str = "auto", device: str = "cpu",
                 multistep_steps: Optional[int] = None):
        from minwm.world import WorldModel

        self.name, self.path = name, Path(path)
        self.stage = recorded_stage(self.path)
        from minwm.config import load_config

        cfg = load_config(self.path / "config.yaml")
        if cfg.get("codec") is None or not cfg["codec"].vae:
            raise MinwmError(f"{self.path}/config.yaml: codec.vae is not set; evaluation compares decoded video "
                             f"with renders, so the checkpoint needs its VAE")
        self.sampler = choose_sampler(self.stage, cfg["inference"].mode, sampler)
        overrides: dict[str, Any] = {"mode": "multistep" if self.sampler == "multistep" else "fewstep"}
        if multistep_steps is not None and self.sampler != "fewstep":
            overrides["baseline_steps"] = int(multistep_steps)
        self.wm = WorldModel.from_checkpoint(self.path, device=device, **overrides)
        self.config = self.wm.config
        self.camera_kind = self.config["model"].camera.kind
        self.has_camera = self.camera_kind != "none"
        self.ti2v = bool(getattr(self.config["stages"], "ti2v", False)) or \
            bool(getattr(self.wm.backbone, "condition_channels", False))
        self.context_frames = 1 if self.ti2v else self.wm.chunk_frames
        self._neg = None

    # -- what the suite is rendered with --
    def render_key(self) -> tuple:
        wm, data = self.wm, self.config["data"]
        a = self.wm.actions_cfg
        return (wm.height, wm.width, float(data.hfov_deg), a.translation_step, a.rotation_step_deg,
                wm.temporal_factor)

    def training_latent_frames(self) -> int:
        st = self.config["stages"]
        if getattr(st, "latent_frames", None):
            return int(st.latent_frames)
        return 1 + (self.config["data"].frames - 1) // self.wm.temporal_factor

    @property
    def conditioning(self) -> str:
        T = self.wm.temporal_factor
        if self.ti2v:
            return "first frame (TI2V: WorldModel.reset(image=frame 0))"
        return (f"first chunk ({self.context_frames} latent frames = pixel frames 0-{T * (self.context_frames - 1)}"
                f" of the render, VAE-encoded, written into the cache as clean context at t = 0)")

    # -- generation --
    def encode_context(self, frames: np.ndarray) -> torch.Tensor:
        T = self.wm.temporal_factor
        n = 1 + T * (self.context_frames - 1)
        video = torch.from_numpy(np.ascontiguousarray(frames[:n])).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        with torch.inference_mode():
            return self.wm.codec.encode(video.to(self.wm.device)).to(self.wm.dtype)

    def generate(self, frames: np.ndarray, latent_cams: Cameras, prompt: str, seed: int,
                 context: torch.Tensor) -> np.ndarray:
        """uint8 [1 + T(L-1), H, W, 3]: the context frames (decoded) then the generated ones."""
        L, T = len(latent_cams), self.wm.temporal_factor
        if self.sampler == "bidirectional":
            out = self._bidirectional(latent_cams, prompt, seed, context)
        else:
            out = self._stream(frames, latent_cams, prompt, seed, context)
        return out[:1 + T * (L - 1)]

    def _stream(self, frames, cams: Cameras, prompt: str, seed: int, context: torch.Tensor) -> np.ndarray:
        wm, c, L = self.wm, self.wm.chunk_frames, len(cams)
        if self.ti2v:
            parts = [wm.reset(prompt, image=frames[0], seed=seed)]
            start = 0
        else:
            wm.reset(prompt, seed=seed)
            parts = [prefill(wm, context, cams[:c])]
            start = 1
        for k in range(start, -(-L // c)):
            idx = [min(i, L - 1) for i in range(k * c, (k + 1) * c)]  # past the end: hold the last camera
            parts.append(wm.step(cameras=Cameras(cams.w2c[idx], cams.intrinsics[idx])))
        return np.concatenate(parts)

    def _bidirectional(self, cams: Cameras, prompt: str, seed: int, context: torch.Tensor) -> np.ndarray:
        from minwm.diffusion.losses import cfg_from_uncond
        from minwm.inference.sampling import Conditioning, integrate, velocity
        from minwm.inference.text import encode_prompt

        wm, inf = self.wm, self.wm.inference
        dev, dt = wm.device, wm.dtype
        text = encode_prompt(wm.backbone, wm.text_encoder, prompt, inf.text_tokens, dev, dt)
        if self._neg is None:
            self._neg = encode_prompt(wm.backbone, wm.text_encoder, inf.negative_prompt, inf.text_tokens, dev, dt)
        gen = torch.Generator().manual_seed(seed)
        shape = (1, wm.latent_channels, len(cams), wm.latent_height, wm.latent_width)
        noise = torch.randn(shape, generator=gen).to(dev, dt)
        w2c, K = cams.to(dt, dev)
        img = context[:, :, :1] if getattr(wm.backbone, "condition_channels", False) else None
        cond_c = Conditioning(text, (w2c[None], K[None]), None, img)
        cond_u = Conditioning(self._neg, (w2c[None], K[None]), None, img)
        n = context.shape[2]
        ctx, ctx_noise = context.to(dev, dt), noise[:, :, :n]

        def fn(x: torch.Tensor, t: float) -> torch.Tensor:
            s = t / 1000.0
            x = x.clone()
            x[:, :, :n] = (1 - s) * ctx + s * ctx_noise   # the context's own noising path at this t
            v, _, _ = velocity(wm.backbone, x, t, cond_c, mode="bidirectional")
            if inf.guidance != 1.0:
                v_u, _, _ = velocity(wm.backbone, x, t, cond_u, mode="bidirectional")
                v = cfg_from_uncond(cond=v, uncond=v_u, scale=inf.guidance)
            v = v.clone()
            v[:, :, :n] = ctx_noise - ctx                  # keeps the sampler's context on that straight path
            return v

        with torch.inference_mode():
            x0 = integrate(fn, noise, inf.baseline_steps, inf.shift, inf.sampler)
            x0[:, :, :n] = ctx
            return _uint8(wm.codec.decode(x0))

    def close(self) -> None:
        self.wm.close()
