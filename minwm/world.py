"""WorldModel: a live session of the few-step autoregressive world model.

    wm = WorldModel.from_checkpoint("runs/toy/dmd")
    first = wm.reset("a sunny street", image=None, seed=0)   # None, or [1, H, W, 3] uint8 when an image is given
    frames = wm.step("w+l")                                  # uint8 [n, H, W, 3], one chunk
    frames = wm.step(["w", "w", "l", "_"])                   # one action per latent frame of the chunk

Per chunk (few-step mode, the default): fresh noise, then for each of the K timesteps x0_hat = G(x_k, t_k)
attending to the KV cache without committing, re-noised to t_{k+1} with fresh noise (the consistency sampler
that training rollouts use), then one pass of G at t = 0 on the result with commit=True writes the chunk's clean
keys/values: K + 1 passes. The cache is a fixed ring buffer (model.window_frames, plus optional sink frames),
keys are roped at read time over the kept frames only, so memory and cost per chunk are flat for any length.
Mode "multistep" runs the multi-step AR baseline instead (inference.baseline_steps UniPC/Euler steps with CFG,
separate conditional/unconditional caches), for comparisons.

Actions and cameras. Latent frame 0 of a rollout sits at the start camera (the identity: everything is relative
to the first frame). Every later latent frame's camera is the previous one moved by that frame's action
(actions_to_cameras with the config's `actions` step sizes), so the action given for latent frame 0 of the first
chunk is ignored. Intrinsics are the training ones: `inference.intrinsics` of the checkpoint's config.

Frames. With a 1 + T*k causal VAE the first chunk decodes to 1 + T*(chunk-1) pixel frames and each later one to
T*chunk (T = 4: 13, then 16). With an image (TI2V), reset() returns that frame (resized to the model's size) and
the first step() returns the remaining T*(chunk-1) frames, so the frame count after n chunks is the same either
way: 1 + T*(n*chunk - 1).

TI2V: the image is encoded as latent frame 0 and held clean (its latent, t = 0) in every pass of the first chunk,
so the refresh writes it into the cache with the rest of the chunk; adapters with image condition channels
(HunyuanVideo-1.5 TI2V) also receive it as `image_latents`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from minwm.cameras.actions import DEFAULT_INTRINSICS, ActionConfig, actions_to_cameras, parse_actions
from minwm.cameras.camera import Cameras
from minwm.errors import MinwmError
from minwm.codecs.vae import uint8_frames, vae_input
from minwm.inference.config import InferenceConfig, apply_overrides

log = logging.getLogger("minwm.world")

class WorldModel:
    """A streaming session over one backbone. Not thread-safe: one caller at a time (the play server
    serialises its clients' steps)."""

    def __init__(self, backbone, config: Any, codec: Any = None, text_encoder: Any = None,
                 device: Any = "cpu", dtype: torch.dtype = torch.float32):
        from minwm.config import parse_config

        self.config = config if config is not None else parse_config({})
        self.inference: InferenceConfig = self.config["inference"]
        self.actions_cfg: ActionConfig = self.config.get("actions") or ActionConfig()
        self.device = torch.device(device)
        self.dtype = dtype
        self.backbone = backbone.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.codec = codec
        self.text_encoder = text_encoder
        self.arch = backbone.arch
        inf = self.inference
        self.chunk_frames = int(backbone.cfg.chunk_frames)
        self.temporal_factor = int(codec.temporal_factor) if codec is not None else 4
        spatial = int(codec.spatial_factor) if codec is not None else 1
        self.latent_height, self.latent_width = self._latent_size(inf, spatial)
        self.height, self.width = self.latent_height * spatial, self.latent_width * spatial
        self.frames_per_chunk = self.temporal_factor * self.chunk_frames
        self.fps = inf.fps
        self.intrinsics = self._intrinsics(inf)
        self.timesteps = inf.timesteps()
        self.mode = inf.mode
        self._caches = [self._new_cache()]
        if self.mode == "multistep":
            self._caches.append(self._new_cache())
        self._decoder = codec.streaming_decoder() if codec is not None else None
        self._text = self._neg_text = None
        self.last_timings: dict[str, float] = {}
        self.frame_index = 0
        self.prompt: Optional[str] = None
        # Cameras so far in buffers that double when full: the only state that grows with the rollout,
        # 160 bytes per latent frame (1.6 MB for 10,000 frames), no per-chunk allocation.
        self._w2c = torch.zeros(0, 4, 4, dtype=torch.float64)
        self._K = torch.zeros(0, 4, dtype=torch.float64)
        self._image_latent: Optional[torch.Tensor] = None
        self._gen = torch.Generator()

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path, device: Any = "cpu", dtype: torch.dtype = torch.float32,
                        **overrides) -> "WorldModel":
        """A session over a stage output directory: model.safetensors + model_config.json (save_pretrained) +
        config.yaml (the full minwm config: model, actions, codec, inference ...). `overrides` replace
        `inference` settings (e.g. steps=[1000, 500], window_frames=12, height=64, width=96)."""
        from minwm.inference.checkpoint import load_checkpoint

        backbone, config, codec, text_encoder = load_checkpoint(ckpt_dir, device=device, dtype=dtype)
        config["inference"] = apply_overrides(config["inference"], overrides)
        return cls(backbone, config, codec, text_encoder, device=device, dtype=dtype)

    @classmethod
    def from_config(cls, cfg: Any, random_weights: bool = True, with_codec: bool = False,
                    with_text_encoder: bool = False, device: Any = "cpu", dtype: torch.dtype = torch.float32,
                    seed: int = 0, **overrides) -> "WorldModel":
        """A session built from a config (a Config, a dict or a YAML path): the backbone with random weights
        (seeded) unless `random_weights` is False and model.pretrained is set; the codec / text encoder only when
        asked (random prompts embeddings otherwise). For the bench and tests."""
        from minwm.config import Config, load_config, parse_config
        from minwm.models.backbone import build_backbone

        if isinstance(cfg, (str, Path)):
            cfg = load_config(cfg)
        elif not isinstance(cfg, Config):
            cfg = parse_config(cfg)
        else:
            path, cfg = cfg.path, Config(cfg)  # the caller's config is left as it was
            cfg.path = path
        cfg["inference"] = apply_overrides(cfg["inference"], overrides)
        model_cfg = cfg["model"]
        if random_weights:
            model_cfg = dataclasses.replace(model_cfg, pretrained=None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = build_backbone(model_cfg)
        codec = text_encoder = None
        if with_codec or with_text_encoder:
            from minwm.inference.checkpoint import build_codec, build_text_encoder

            codec = build_codec(cfg, None, device, dtype) if with_codec else None
            text_encoder = build_text_encoder(cfg, None, device) if with_text_encoder else None
        return cls(backbone, cfg, codec, text_encoder, device=device, dtype=dtype)

    def _intrinsics(self, inf: InferenceConfig) -> tuple[float, float, float, float]:
        """The training intrinsics: inference.intrinsics, else those the procedural data were rendered with
        (data.hfov_deg, square pixels, centred) at this session's aspect ratio."""
        if inf.intrinsics is not None:
            return tuple(float(v) for v in inf.intrinsics)
        data = self.config.get("data")
        if data is not None and hasattr(data, "hfov_deg"):
            from minwm.worlds.trajectories import square_intrinsics

            return tuple(float(v) for v in square_intrinsics(data.hfov_deg, self.height, self.width))
        log.warning("inference.intrinsics is not set and there is no data section; using %s", DEFAULT_INTRINSICS)
        return DEFAULT_INTRINSICS

    def _latent_size(self, inf: InferenceConfig, spatial: int) -> tuple[int, int]:
        """Latent grid: inference.latent_*, else inference.height/width, else the training clips' size
        (data.height/width), divided by the VAE's spatial factor."""
        sizes = []
        data = self.config.get("data")
        for px, lat, name in ((inf.height, inf.latent_height, "height"), (inf.width, inf.latent_width, "width")):
            if lat is None and px is None and data is not None and spatial > 1:
                px = getattr(data, name, None)
            if lat is None and px is None:
                raise MinwmError(f"inference.{name}: not set (give inference.{name} in pixels or "
                                 f"inference.latent_{name})")
            if lat is None:
                if px % spatial:
                    raise MinwmError(f"inference.{name}: {px} is not a multiple of the VAE's spatial factor {spatial}")
                lat = px // spatial
            elif px is not None and px != lat * spatial:
                raise MinwmError(f"inference.{name}: {px} disagrees with latent_{name} {lat} x spatial factor "
                                 f"{spatial}")
            sizes.append(lat)
        p = _spatial_patch(self.backbone)
        for lat, name in zip(sizes, ("height", "width")):
            if lat % p:
                raise MinwmError(f"inference.{name}: latent size {lat} is not a multiple of the patch size {p} "
                                 f"(pixels: a multiple of {p * spatial})")
        return sizes[0], sizes[1]

    def _new_cache(self):
        inf = self.inference
        window = inf.window_frames if inf.window_frames is not None else -1
        return self.backbone.new_cache(1, self.latent_height, self.latent_width, device=self.device,
                                       dtype=self.dtype, window_frames=window, sink_frames=inf.sink_frames)

    # ---- properties -----------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        b = self.backbone
        return int(getattr(b, "latent_channels", None) or b.out_channels)

    @property
    def cameras(self) -> Cameras:
        """The cameras of every latent frame generated so far (relative to the first; empty before step)."""
        n = self.frame_index
        return Cameras(self._w2c[:n].clone(), self._K[:n].clone())

    @property
    def cache_nbytes(self) -> int:
        return sum(c.nbytes() for c in self._caches)

    @property
    def needs_image(self) -> bool:
        """An image-to-video checkpoint (stages.ti2v): trained with latent frame 0 given, never generating it,
        so every rollout starts from a first frame."""
        stages = self.config.get("stages")
        return bool(getattr(stages, "ti2v", False))

    def procedural_image(self, seed: Optional[int] = None) -> tuple[np.ndarray, str]:
        """A start frame from the procedural world this checkpoint's config describes (its `data` section):
        frame 0 of a scene no training clip uses (clip index 10**7 + seed; seed None: inference.seed), with its
        caption. For image-to-video checkpoints when the user gives no image."""
        from minwm.data.procedural import render_clip

        seed = self.inference.seed if seed is None else int(seed)
        clip = render_clip(self.config["data"], 10**7 + seed)
        return fit_image(clip.frames[0], self.height, self.width), clip.caption

    # ---- session --------------------------------------------------------------------------------------
    def reset(self, prompt: str, image: Optional[np.ndarray] = None,
              seed: Optional[int] = None) -> Optional[np.ndarray]:
        """Start a new rollout. Returns the first frame, uint8 [1, H, W, 3], when `image` (uint8 [h, w, 3],
        resized to the model's size when it differs) is given, else None."""
        from minwm.inference.text import encode_prompt

        if image is None and self.needs_image:
            raise MinwmError("image: this checkpoint is image-to-video (stages.ti2v) and needs a first frame "
                             "(WorldModel.procedural_image gives one from its procedural world)")
        seed = self.inference.seed if seed is None else int(seed)
        self._gen = torch.Generator().manual_seed(seed)
        for c in self._caches:
            c.reset()
        if self._decoder is not None:
            self._decoder.reset()
        self.frame_index = 0
        self.last_timings = {}
        # Not under inference_mode: adapters that memoise per text tensor (HunyuanVideo-1.5) read its version
        # counter, which inference tensors lack; encode_prompt itself runs the encoders without grad.
        if prompt != self.prompt or self._text is None:
            self._text = encode_prompt(self.backbone, self.text_encoder, prompt, self.inference.text_tokens,
                                       self.device, self.dtype)
            self.prompt = prompt
        if self.mode == "multistep" and self._neg_text is None:
            self._neg_text = encode_prompt(self.backbone, self.text_encoder, self.inference.negative_prompt,
                                           self.inference.text_tokens, self.device, self.dtype)
        self._image_latent = None
        if image is None:
            return None
        if self.codec is None:
            raise MinwmError("image: this model has no VAE configured (codec.vae), so it cannot take an image")
        frame = fit_image(image, self.height, self.width)
        video = vae_input(frame[None])                                    # [1, 3, 1, H, W]
        with torch.inference_mode():
            self._image_latent = self.codec.encode(video.to(self.device)).to(self.dtype)
        return frame[None]

    def _chunk_actions(self, action: Any) -> list[frozenset]:
        n = self.chunk_frames
        if action is None:
            return [frozenset()] * n
        if isinstance(action, (frozenset, set)):
            return [frozenset(action)] * n
        if isinstance(action, str):
            steps = parse_actions(action, self.actions_cfg.max_steps)
            if len(steps) == 1:
                return steps * n
            if len(steps) == n:
                return steps
            raise MinwmError(f"action: {action!r} is {len(steps)} steps; expected 1 (held for the whole chunk) "
                             f"or {n} (one per latent frame)")
        if isinstance(action, (list, tuple)):
            steps = []
            for a in action:
                if isinstance(a, str):
                    s = parse_actions(a, self.actions_cfg.max_steps)
                    if len(s) != 1:
                        raise MinwmError(f"action: list item {a!r} is {len(s)} steps, expected one")
                    steps.append(s[0])
                elif isinstance(a, (frozenset, set)):
                    steps.append(frozenset(a))
                else:
                    raise MinwmError(f"action: list item of type {type(a).__name__}, expected a string or a set")
            if len(steps) == 1:
                return steps * n
            if len(steps) != n:
                raise MinwmError(f"action: {len(steps)} actions, expected 1 or {n} (one per latent frame)")
            return steps
        raise MinwmError(f"action: expected a string, a set of keys or a list, got {type(action).__name__}")

    def _chunk_cameras(self, action: Any, cameras: Optional[Cameras]) -> Cameras:
        n = self.chunk_frames
        if cameras is not None:
            if action is not None:
                raise MinwmError("step: give an action or cameras, not both")
            if len(cameras) != n:
                raise MinwmError(f"cameras: {len(cameras)} cameras, expected one per latent frame of the chunk ({n})")
            return cameras.validate("cameras")
        steps = self._chunk_actions(action)
        K = self.intrinsics
        if self.frame_index == 0:  # latent frame 0 is the start camera; its action is ignored
            return actions_to_cameras(steps[1:], self.actions_cfg, K)
        start = self._w2c[self.frame_index - 1]
        return actions_to_cameras(steps, self.actions_cfg, K, start=start)[1:]

    def step_latents(self, action: Any = None, *, cameras: Optional[Cameras] = None) -> torch.Tensor:
        """Generate one chunk without decoding: clean latents [1, C, chunk_frames, h, w]. `cameras` (one per
        latent frame of the chunk, relative to the rollout's first frame) replaces the action."""
        from minwm.inference.sampling import Conditioning, fewstep_chunk, multistep_chunk

        if self._text is None:
            raise MinwmError("step: call reset(prompt) first")
        cams = self._chunk_cameras(action, cameras)
        w2c, K = cams.to(self.dtype, self.device)
        cam_in = (w2c[None], K[None])
        first = self.frame_index == 0
        clean = self._image_latent if first and not getattr(self.backbone, "condition_channels", False) else None
        img = self._image_latent if getattr(self.backbone, "condition_channels", False) else None
        shape = (1, self.latent_channels, self.chunk_frames, self.latent_height, self.latent_width)
        noise = torch.randn(shape, generator=self._gen).to(self.device, self.dtype)
        cond = Conditioning(self._text, cam_in, clean, img)
        with torch.inference_mode():
            if self.mode == "fewstep":
                x0, timings = fewstep_chunk(self.backbone, noise, self.timesteps, cond, self._caches[0], self._noise)
            else:
                inf = self.inference
                cond_u = Conditioning(self._neg_text, inf.uncond_cameras(cam_in), clean, img)
                x0, timings = multistep_chunk(self.backbone, noise, cond, cond_u, tuple(self._caches),
                                              inf.baseline_steps, inf.shift, inf.guidance, inf.sampler)
        self._record_cameras(cams)
        self.frame_index += self.chunk_frames
        self.last_timings = dict(timings, decode_s=0.0)
        return x0

    def prefill(self, latents: torch.Tensor, cameras: Cameras) -> np.ndarray:
        """Start a freshly reset rollout from real footage: latents [1, C, chunk_frames, h, w] (VAE-encoded) go
        into the caches as a finished chunk at t = 0 (the refresh pass every generated chunk gets) with their
        cameras (relative to the rollout's first frame), and are decoded; returns their pixel frames, uint8
        [n, H, W, 3]. The T2V way to continue a given video (evaluation gives the first chunk of a render)."""
        from minwm.inference.sampling import Conditioning, refresh

        if self._text is None:
            raise MinwmError("prefill: call reset(prompt) first")
        if self.frame_index != 0:
            raise MinwmError("prefill: the session must be freshly reset")
        if self._decoder is None:
            raise MinwmError("prefill: this model has no VAE configured (codec.vae)")
        if latents.ndim != 5 or latents.shape[2] != self.chunk_frames or len(cameras) != self.chunk_frames:
            raise MinwmError(f"prefill: expected one chunk of {self.chunk_frames} latent frames and cameras, got "
                             f"latents {tuple(latents.shape)} and {len(cameras)} cameras")
        w2c, K = cameras.validate("cameras").to(self.dtype, self.device)
        cam_in = (w2c[None], K[None])
        x = latents.to(self.device, self.dtype)
        with torch.inference_mode():
            refresh(self.backbone, x, Conditioning(self._text, cam_in), self._caches[0])
            if self.mode == "multistep" and self.inference.guidance != 1.0:
                refresh(self.backbone, x, Conditioning(self._neg_text, self.inference.uncond_cameras(cam_in)),
                        self._caches[1])
            frames = uint8_frames(self._decoder(x))
        self._record_cameras(cameras)
        self.frame_index += self.chunk_frames
        return frames

    def _record_cameras(self, cams: Cameras) -> None:
        n0, n1 = self.frame_index, self.frame_index + len(cams)
        if n1 > len(self._w2c):
            cap = max(n1, 2 * len(self._w2c), 64)
            w2c, K = torch.zeros(cap, 4, 4, dtype=torch.float64), torch.zeros(cap, 4, dtype=torch.float64)
            w2c[:n0], K[:n0] = self._w2c[:n0], self._K[:n0]
            self._w2c, self._K = w2c, K
        self._w2c[n0:n1] = cams.w2c
        self._K[n0:n1] = cams.intrinsics

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self._gen).to(like.device, like.dtype)

    def step(self, action: Any = None, *, cameras: Optional[Cameras] = None) -> np.ndarray:
        """Generate and decode one chunk: uint8 [n_pixel_frames, H, W, 3] (see the module docstring for n).
        `action`: one step (a string like "w+l" or a set of keys) held for the whole chunk, a DSL string of
        exactly chunk_frames steps, or a list of chunk_frames steps; None = no motion."""
        if self._decoder is None:
            raise MinwmError("step: this model has no VAE configured (codec.vae); use step_latents")
        first = self.frame_index == 0
        latents = self.step_latents(action, cameras=cameras)
        t0 = time.perf_counter()
        with torch.inference_mode():
            video = self._decoder(latents)
        from minwm.inference.sampling import sync

        sync(self.device)
        self.last_timings["decode_s"] = time.perf_counter() - t0
        frames = uint8_frames(video)
        if first and self._image_latent is not None:
            frames = frames[1:]  # frame 0 is the image reset() returned
        return frames

    def close(self) -> None:
        """Free the caches and the model (the session cannot be used afterwards)."""
        self._caches = []
        self._decoder = None
        self._text = self._neg_text = None
        self.backbone = None
        self.codec = self.text_encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> "WorldModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fit_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [h, w, 3] (RGB; grey or RGBA accepted) resized to height x width (area / cubic interpolation)."""
    import cv2

    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, -1)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise MinwmError(f"image: shape {a.shape}, expected [H, W, 3] RGB")
    a = a[..., :3]
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.shape[:2] != (height, width):
        interp = cv2.INTER_AREA if a.shape[0] > height else cv2.INTER_CUBIC
        a = cv2.resize(a, (width, height), interpolation=interp)
    return np.ascontiguousarray(a)


def _spatial_patch(backbone) -> int:
    p = backbone.transformer.config.patch_size
    return int(p if isinstance(p, int) else p[1])


def action_label(steps: Sequence[frozenset]) -> str:
    """Keys of a step as a short label ("w+l"; "_" for none) for overlays and logs."""
    from minwm.cameras.actions import format_actions

    return format_actions(list(steps))
