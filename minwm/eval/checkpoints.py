"""Checkpoints under evaluation: which sampler each stage gets, and the runner that generates a suite case with
one checkpoint and its context (see eval/runner.py's docstring for what the model is given)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from minwm.cameras.camera import Cameras, standing_still
from minwm.errors import MinwmError
from minwm.inference.checkpoint import resolve_path
from minwm.codecs.vae import round_trip, uint8_frames, vae_input

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

def fixed_cameras(cams: Cameras) -> Cameras:
    """Every frame at the start camera (identity w2c), intrinsics kept: the baseline's camera input."""
    w2c, K = standing_still((cams.w2c, cams.intrinsics))
    return Cameras(w2c, K.clone())


@dataclass
class GenItem:
    """One video to generate: the render (frame 0 is the TI2V image), its latent cameras [L], the prompt, the
    seed and the VAE-encoded context latents [1, C, n_ctx, h, w] (CheckpointRunner.encode_context)."""

    frames: Optional[np.ndarray]
    cameras: Cameras
    prompt: str
    seed: int
    context: torch.Tensor


def stack_text(texts: Sequence[Any]) -> Any:
    """Prepared texts of batch 1 -> one of batch len(texts), concatenated along dim 0: a dict of tensors (the
    adapter's text dict) or a dataclass whose fields are tensors or lists of them (Wan's WanTextContext)."""
    t0 = texts[0]

    def cat(vals: list) -> Any:
        v0 = vals[0]
        if isinstance(v0, torch.Tensor):
            return torch.cat(vals)
        if isinstance(v0, (list, tuple)):
            return type(v0)(cat([v[i] for v in vals]) for i in range(len(v0)))
        if isinstance(v0, dict):
            return {k: cat([v[k] for v in vals]) for k in v0}
        if v0 is None or isinstance(v0, (bool, int, float, str)):
            if any(v != v0 for v in vals):
                raise MinwmError(f"text: cannot batch prepared texts that differ in a non-tensor field ({v0!r})")
            return v0
        if dataclasses.is_dataclass(v0):
            return dataclasses.replace(v0, **{f.name: cat([getattr(v, f.name) for v in vals])
                                             for f in dataclasses.fields(v0)})
        raise MinwmError(f"text: cannot batch a prepared text of type {type(v0).__name__}")

    return cat(list(texts)) if len(texts) > 1 else t0


def batches(items: Sequence[GenItem], batch_size: int) -> list[list[int]]:
    """Indices of `items` in batches of equal latent length (one batch runs as one tensor), at most batch_size
    each, in order of first appearance."""
    if batch_size < 1:
        raise MinwmError(f"batch_size: expected >= 1, got {batch_size}")
    groups: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(len(it.cameras), []).append(i)
    return [idx[j:j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]


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
        self.vae_dir = str(resolve_path(cfg["codec"].vae, self.path).resolve())   # names the VAE (roundtrip memo)
        self.config = self.wm.config
        self.camera_kind = self.config["model"].camera.kind
        self.has_camera = self.camera_kind != "none"
        # image-conditioned: trained with frame 0 given (stages.ti2v), or an adapter with image channels
        self.ti2v = self.wm.needs_image or bool(getattr(self.wm.backbone, "condition_channels", False))
        self.context_frames = 1 if self.ti2v else self.wm.chunk_frames
        self._texts: dict[str, Any] = {}     # prompt -> prepared text (batch 1)

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
        with torch.inference_mode():
            return self.wm.codec.encode(vae_input(frames[:n]).to(self.wm.device)).to(self.wm.dtype)

    def roundtrip(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames [F, H, W, 3] through this checkpoint's VAE (encode + decode): a perfect model's output."""
        return round_trip(self.wm.codec, frames)

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
            parts = [wm.prefill(context, cams[:c])]
            start = 1
        for k in range(start, -(-L // c)):
            idx = [min(i, L - 1) for i in range(k * c, (k + 1) * c)]  # past the end: hold the last camera
            parts.append(wm.step(cameras=Cameras(cams.w2c[idx], cams.intrinsics[idx])))
        return np.concatenate(parts)

    def _bidirectional(self, cams: Cameras, prompt: str, seed: int, context: torch.Tensor) -> np.ndarray:
        x0 = self._bidirectional_latents([GenItem(None, cams, prompt, seed, context)])
        with torch.inference_mode():
            return uint8_frames(self.wm.codec.decode(x0))

    # -- batched generation (what `minwm eval` runs) --
    def generate_batch(self, items: Sequence[GenItem], batch_size: int = 16) -> list[np.ndarray]:
        """`generate` for many items at once: uint8 videos in the order of `items`, each equal to what
        generate(*item) returns (up to float rounding in batched kernels, at most one 8-bit level). Items of equal
        latent length run together, at most `batch_size` at a time; each item draws its noise from its own
        torch.Generator(seed) in the order a lone WorldModel session would, so a video does not depend on which
        items it was batched with."""
        items = [it if isinstance(it, GenItem) else GenItem(*it) for it in items]
        out: list[Optional[np.ndarray]] = [None] * len(items)
        for part in batches(items, batch_size):
            for i, v in zip(part, self._generate_group([items[i] for i in part])):
                out[i] = v
        return out  # type: ignore[return-value]

    def iter_generate(self, items: Sequence[GenItem], batch_size: int = 16):
        """generate_batch one batch at a time: yields (indices into `items`, their videos), so a caller can score
        a batch while the next is generated."""
        for part in batches(items, batch_size):
            yield part, self.generate_batch([items[i] for i in part], batch_size)

    def _text(self, prompt: str) -> Any:
        from minwm.inference.text import encode_prompt

        if prompt not in self._texts:
            if len(self._texts) >= 256:     # a suite has a few captions; this only bounds a long-lived runner
                self._texts.clear()
            wm, inf = self.wm, self.wm.inference
            self._texts[prompt] = encode_prompt(wm.backbone, wm.text_encoder, prompt, inf.text_tokens, wm.device,
                                                wm.dtype)
        return self._texts[prompt]

    def _batch_text(self, prompts: Sequence[str]) -> Any:
        # Not under inference_mode: adapters memoising per text tensor (HunyuanVideo-1.5) read version counters.
        return stack_text([self._text(p) for p in prompts])

    def _generate_group(self, items: list[GenItem]) -> list[np.ndarray]:
        wm, T = self.wm, self.wm.temporal_factor
        L = len(items[0].cameras)
        if self.sampler == "bidirectional":
            x0 = self._bidirectional_latents(items)
        else:
            x0 = self._stream_latents(items)
        with torch.inference_mode():
            video = wm.codec.decode(x0[:, :, :L])       # whole clips: equal to the streaming decode (causal VAE)
        n = 1 + T * (L - 1)
        out = [uint8_frames(video[b:b + 1])[:n] for b in range(len(items))]
        if self.ti2v and self.sampler != "bidirectional":
            from minwm.world import fit_image

            for b, it in enumerate(items):   # WorldModel.reset returns the image itself as frame 0, not its decode
                out[b][0] = fit_image(it.frames[0], wm.height, wm.width)
        return out

    def _noise(self, gens: list[torch.Tensor], shape: tuple) -> torch.Tensor:
        """[B, *shape[1:]]: item b's slice from its own generator (as WorldModel draws [1, ...] per session)."""
        wm = self.wm
        return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gens]).to(wm.device, wm.dtype)

    def _cams(self, cams: list[Cameras]) -> tuple[torch.Tensor, torch.Tensor]:
        w2c, K = zip(*(c.to(self.wm.dtype, self.wm.device) for c in cams))
        return torch.stack(w2c), torch.stack(K)

    def _stream_latents(self, items: list[GenItem]) -> torch.Tensor:
        """The streaming sampler over a batch, chunk by chunk, as WorldModel.reset / step_latents (and WorldModel.prefill
        for T2V context) run it for one item: clean latents [B, C, chunks * chunk_frames, h, w]."""
        from minwm.inference.sampling import Conditioning, fewstep_chunk, multistep_chunk, refresh

        wm, inf = self.wm, self.wm.inference
        B, c, L = len(items), wm.chunk_frames, len(items[0].cameras)
        dev, dt = wm.device, wm.dtype
        for it in items:
            it.cameras.validate("cameras")
        gens = [torch.Generator().manual_seed(int(it.seed)) for it in items]
        text = self._batch_text([it.prompt for it in items])
        guided = wm.mode == "multistep" and inf.guidance != 1.0
        neg = self._batch_text([inf.negative_prompt] * B) if wm.mode == "multistep" else None
        window = inf.window_frames if inf.window_frames is not None else -1
        caches = [wm.backbone.new_cache(B, wm.latent_height, wm.latent_width, device=dev, dtype=dt,
                                        window_frames=window, sink_frames=inf.sink_frames)
                  for _ in range(2 if wm.mode == "multistep" else 1)]
        cond_ch = bool(getattr(wm.backbone, "condition_channels", False))
        image = torch.cat([it.context[:, :, :1] for it in items]).to(dev, dt) if self.ti2v else None
        img = image if cond_ch else None

        def noise_fn(like: torch.Tensor) -> torch.Tensor:
            return self._noise(gens, tuple(like.shape))

        parts = []
        start = 0
        with torch.inference_mode():
            if not self.ti2v:   # T2V: the context chunk is written into the caches at t = 0 (as WorldModel.prefill)
                x = torch.cat([it.context for it in items]).to(dev, dt)
                if x.shape[2] != c:
                    raise MinwmError(f"context: expected {c} latent frames, got {x.shape[2]}")
                cam_in = self._cams([it.cameras[:c] for it in items])
                refresh(wm.backbone, x, Conditioning(text, cam_in), caches[0])
                if guided:
                    refresh(wm.backbone, x, Conditioning(neg, inf.uncond_cameras(cam_in)), caches[1])
                parts.append(x)
                start = 1
            for k in range(start, -(-L // c)):
                idx = [min(i, L - 1) for i in range(k * c, (k + 1) * c)]  # past the end: hold the last camera
                cam_in = self._cams([Cameras(it.cameras.w2c[idx], it.cameras.intrinsics[idx]) for it in items])
                clean = image if k == 0 and self.ti2v and not cond_ch else None
                noise = self._noise(gens, (B, wm.latent_channels, c, wm.latent_height, wm.latent_width))
                cond = Conditioning(text, cam_in, clean, img)
                if wm.mode == "fewstep":
                    x0, _ = fewstep_chunk(wm.backbone, noise, wm.timesteps, cond, caches[0], noise_fn)
                else:
                    cond_u = Conditioning(neg, inf.uncond_cameras(cam_in), clean, img)
                    x0, _ = multistep_chunk(wm.backbone, noise, cond, cond_u, tuple(caches), inf.baseline_steps,
                                            inf.shift, inf.guidance, inf.sampler)
                parts.append(x0)
        return torch.cat(parts, 2)

    def _bidirectional_latents(self, items: list[GenItem]) -> torch.Tensor:
        """The whole clips at once with the multi-step CFG sampler: [B, C, L, h, w] (see the module docstring
        of eval/runner.py for the context conditioning)."""
        from minwm.diffusion.losses import cfg_from_uncond
        from minwm.inference.sampling import Conditioning, bidirectional_sample, integrate, velocity

        wm, inf = self.wm, self.wm.inference
        dev, dt = wm.device, wm.dtype
        B, L = len(items), len(items[0].cameras)
        text = self._batch_text([it.prompt for it in items])
        neg = self._batch_text([inf.negative_prompt] * B)
        gens = [torch.Generator().manual_seed(int(it.seed)) for it in items]
        noise = self._noise(gens, (B, wm.latent_channels, L, wm.latent_height, wm.latent_width))
        cam_in = self._cams([it.cameras for it in items])
        context = torch.cat([it.context for it in items]).to(dev, dt)
        img = context[:, :, :1] if getattr(wm.backbone, "condition_channels", False) else None
        if self.ti2v:
            # Trained with frame 0 clean at t = 0 (stages.ti2v): sampled the same way.
            first = context[:, :, :1]
            cond_c = Conditioning(text, cam_in, first, img)
            cond_u = Conditioning(neg, inf.uncond_cameras(cam_in), first, img)
            with torch.inference_mode():
                return bidirectional_sample(wm.backbone, noise, cond_c, cond_u, inf.baseline_steps, inf.shift,
                                            inf.guidance, inf.sampler)
        cond_c = Conditioning(text, cam_in, None, img)
        cond_u = Conditioning(neg, inf.uncond_cameras(cam_in), None, img)
        n = context.shape[2]
        ctx, ctx_noise = context, noise[:, :, :n]

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
            return x0

    def close(self) -> None:
        self._texts = {}
        self.wm.close()
