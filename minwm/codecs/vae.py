"""The video codec: diffusers' AutoencoderKLWan (or AutoencoderKLHunyuanVideo15) behind one interface.

`encode` maps a video in [-1, 1], [B, 3, 1+4k, H, W], to *normalised* latents [B, C, 1+k, h, w] (the
posterior mean, normalised per channel with the config's latents_mean / latents_std exactly as the Wan
pipelines do: (z - mean) / std; HunyuanVideo-1.5 multiplies by its scaling_factor). `decode` inverts
the normalisation and decodes. `StreamingDecoder` decodes latents chunk by chunk with its own copy of
the Wan decoder's causal-conv feature cache, so the frames equal a full decode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minwm.errors import MinwmError
from minwm.io import read_json

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def vae_input(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames [F, H, W, 3] -> the VAE's input video [1, 3, F, H, W] in [-1, 1] (float32, CPU)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1


def uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[1, 3, n, H, W] in [-1, 1] -> uint8 [n, H, W, 3] (the inverse of vae_input, rounded)."""
    v = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def round_trip(codec: "VideoCodec", frames: np.ndarray) -> np.ndarray:
    """uint8 frames [1 + 4k, H, W, 3] encoded and decoded by `codec`: what a perfect model decoded by this VAE
    would output (evaluation's perfect-model row, scripts/check_pose_estimator.py --vae)."""
    with torch.inference_mode():
        video = codec.decode(codec.encode(vae_input(frames).to(next(codec.vae.parameters()).device)))
    return uint8_frames(video)[:len(frames)]


def _vae_class(kind: str):
    from diffusers import AutoencoderKLHunyuanVideo15, AutoencoderKLWan
    return {"wan": AutoencoderKLWan, "hunyuan15": AutoencoderKLHunyuanVideo15}[kind]


def _kind_from_class_name(name: str | None, where: str) -> str:
    kinds = {"AutoencoderKLWan": "wan", "AutoencoderKLHunyuanVideo15": "hunyuan15"}
    if name not in kinds:
        raise MinwmError(f"{where}: _class_name is {name!r}, expected one of {', '.join(kinds)}")
    return kinds[name]


def load_state_dict_strict(module: torch.nn.Module, folder: Path, weights: str = WEIGHTS_NAME,
                           index: str = WEIGHTS_INDEX_NAME) -> None:
    """Load safetensors weights (one file or an index of shards) into `module`; any missing or unexpected
    key, or a shape mismatch, is a one-line error naming the file and the key."""
    from safetensors.torch import load_file

    single, idx = folder / weights, folder / index
    if single.is_file():
        files = [single]
    elif idx.is_file():
        try:
            names = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise MinwmError(f"{idx}: not a safetensors index ({e})") from None
        files = [folder / n for n in names]
        for f in files:
            if not f.is_file():
                raise MinwmError(f"{f}: weight shard listed in {idx.name} is missing")
    else:
        raise MinwmError(f"{single}: no weights found (expected {weights} or {index})")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors raises several types for truncated / foreign files
            raise MinwmError(f"{f}: cannot read safetensors ({str(e).splitlines()[0]})") from None
    own = module.state_dict()
    # Tied parameters (e.g. a T5's shared embedding) are saved once: a missing key is fine when a key
    # sharing its storage was loaded.
    by_ptr: dict[int, list[str]] = {}
    for k, v in own.items():
        by_ptr.setdefault(v.data_ptr(), []).append(k)
    for group in by_ptr.values():
        present = [k for k in group if k in state]
        for k in group:
            if k not in state and present and len(group) > 1:
                state[k] = state[present[0]]
    missing = sorted(set(own) - set(state))
    if missing:
        raise MinwmError(f"{files[0]}: missing key '{missing[0]}' ({len(missing)} missing in all)")
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise MinwmError(f"{files[0]}: unexpected key '{unexpected[0]}' ({len(unexpected)} in all)")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise MinwmError(f"{files[0]}: key '{k}' has shape {tuple(v.shape)}, the config expects "
                             f"{tuple(own[k].shape)}")
    module.load_state_dict(state, strict=True)


def read_model_config(folder: Path) -> dict[str, Any]:
    cfg = folder / "config.json"
    if not folder.is_dir():
        raise MinwmError(f"{folder}: codec directory not found")
    if not cfg.is_file():
        raise MinwmError(f"{cfg}: missing (expected a diffusers model directory with config.json)")
    data = read_json(cfg)
    if not isinstance(data, dict):
        raise MinwmError(f"{cfg}: expected a JSON object")
    return data


def resolve_vae_dir(path: str | Path) -> Path:
    """A diffusers pipeline root keeps its VAE in vae/; accept either that root or the VAE folder."""
    p = Path(path)
    if not (p / "config.json").is_file() and (p / "vae" / "config.json").is_file():
        return p / "vae"
    return p


def _rms_norm_forward(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """WanRMS_norm's forward with F.normalize(x, dim) = x / max(|x|, 1e-12) written as x * rsqrt(max(|x|^2,
    1e-24)): the same function (to float rounding), but a plain sum over the channel dimension instead of
    torch's vector-norm kernel, which is several times slower forward and backward on a channels-first
    CPU tensor (15% of a toy VAE training step)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    dim = 1 if norm.channel_first else -1
    normalised = (xf * (xf * xf).sum(dim, keepdim=True).clamp_min(1e-24).rsqrt()).to(x.dtype)
    return normalised * norm.scale * norm.gamma + norm.bias


def use_fast_rms_norms(vae: torch.nn.Module) -> int:
    """Give every WanRMS_norm in `vae` the faster equivalent forward (weights and state dict unchanged);
    returns how many were switched."""
    import functools

    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm
    n = 0
    for m in vae.modules():
        if isinstance(m, WanRMS_norm):
            m.forward = functools.partial(_rms_norm_forward, m)
            n += 1
    return n


class VideoCodec:
    """A frozen (or trainable: `.vae` is the plain diffusers module) video VAE with normalised latents."""

    def __init__(self, vae: torch.nn.Module, kind: str, source: str = "<memory>"):
        self.vae = vae
        self.kind = kind
        self.source = source
        cfg = vae.config
        if kind == "wan":
            patch = cfg.patch_size or 1
            self.temporal_factor = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
            # The architecture, not config.scale_factor_spatial, fixes the factor: one 2x downsample per
            # level but the last, times the patchify.
            self.spatial_factor = 2 ** (len(cfg.dim_mult) - 1) * patch
            self.latent_channels = cfg.z_dim
            if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
                raise MinwmError(f"{source}: latents_mean/latents_std have {len(cfg.latents_mean)}/"
                                 f"{len(cfg.latents_std)} entries, expected z_dim={cfg.z_dim}")
        else:
            self.temporal_factor = cfg.temporal_compression_ratio
            self.spatial_factor = cfg.spatial_compression_ratio
            self.latent_channels = cfg.latent_channels

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device=None) -> "VideoCodec":
        folder = resolve_vae_dir(path)
        data = read_model_config(folder)
        kind = _kind_from_class_name(data.get("_class_name"), str(folder / "config.json"))
        klass = _vae_class(kind)
        # Build from the config (diffusers drops its own bookkeeping keys), then load weights strictly:
        # diffusers' own from_pretrained only warns about missing keys and leaves them random.
        kwargs = {k: v for k, v in data.items() if not k.startswith("_")}
        try:
            vae = klass.from_config(kwargs)
        except Exception as e:
            raise MinwmError(f"{folder / 'config.json'}: cannot build {klass.__name__} ({e})") from None
        load_state_dict_strict(vae, folder)
        if device is not None:
            vae = vae.to(device)
        if dtype != torch.float32:  # (a no-op cast would only make diffusers warn)
            vae = vae.to(dtype)
        vae = vae.eval().requires_grad_(False)
        return cls(vae, kind, str(folder))

    @classmethod
    def from_config(cls, kwargs: dict[str, Any], kind: str = "wan", seed: int = 0) -> "VideoCodec":
        """A randomly initialised VAE (for training the toy, and for tests)."""
        kwargs = dict(kwargs)
        if kind == "wan":
            z = kwargs.get("z_dim", 16)
            kwargs.setdefault("latents_mean", [0.0] * z)
            kwargs.setdefault("latents_std", [1.0] * z)
            kwargs.setdefault("scale_factor_spatial", 2 ** (len(kwargs.get("dim_mult", [1, 2, 4, 4])) - 1)
                              * (kwargs.get("patch_size") or 1))
            kwargs.setdefault("scale_factor_temporal", 2 ** sum(bool(t) for t in
                                                                kwargs.get("temperal_downsample", [False, True, True])))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                vae = _vae_class(kind)(**kwargs)
            except TypeError as e:
                raise MinwmError(f"codec.vae_tiny: {e}") from None
        return cls(vae, kind)

    def save_pretrained(self, path: str | Path) -> None:
        """diffusers format; written atomically so a reader never sees a half-saved VAE."""
        from minwm.io import atomic_path
        with atomic_path(path) as tmp:
            self.vae.save_pretrained(str(tmp), safe_serialization=True)

    def set_latent_stats(self, mean: list[float], std: list[float]) -> None:
        """Record per-channel latent statistics in the VAE config (Wan only), as Wan's own config does."""
        if self.kind != "wan":
            raise MinwmError("set_latent_stats: only the Wan VAE normalises with per-channel statistics")
        self.vae.register_to_config(latents_mean=[float(m) for m in mean], latents_std=[float(s) for s in std])

    # ---- shapes -------------------------------------------------------------------------------
    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.temporal_factor

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.temporal_factor

    def check_video(self, video: torch.Tensor, where: str = "video") -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise MinwmError(f"{where}: shape {tuple(video.shape)}, expected [B, 3, F, H, W]")
        F, H, W = video.shape[2:]
        t, s = self.temporal_factor, self.spatial_factor
        if (F - 1) % t:
            raise MinwmError(f"{where}: {F} frames in shape {tuple(video.shape)}, expected 1 + {t}k frames")
        if H % s or W % s:
            raise MinwmError(f"{where}: size {H}x{W} in shape {tuple(video.shape)} is not divisible by the "
                             f"VAE's spatial factor {s}")

    def check_latents(self, latents: torch.Tensor, where: str = "latents") -> None:
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise MinwmError(f"{where}: shape {tuple(latents.shape)}, expected [B, {self.latent_channels}, f, h, w]")

    # ---- normalisation ------------------------------------------------------------------------
    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        if self.kind == "wan":
            shape = (1, self.latent_channels, 1, 1, 1)
            mean = torch.tensor(cfg.latents_mean, dtype=like.dtype, device=like.device).view(shape)
            std = torch.tensor(cfg.latents_std, dtype=like.dtype, device=like.device).view(shape)
            return mean, std
        one = torch.ones((), dtype=like.dtype, device=like.device)
        return 0 * one, one / cfg.scaling_factor

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        return latents * std + mean

    # ---- encode / decode ----------------------------------------------------------------------
    def posterior(self, video: torch.Tensor):
        """The diffusers posterior (DiagonalGaussianDistribution) of raw, unnormalised latents."""
        self.check_video(video)
        return self.vae.encode(video.to(self._dtype())).latent_dist

    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """video [B, 3, 1+4k, H, W] in [-1, 1] -> normalised latents [B, C, 1+k, H/s, W/s] (posterior
        mean, as the Wan pipelines encode conditioning frames; `sample=True` draws from it instead)."""
        with torch.no_grad():
            post = self.posterior(video)
            z = post.sample(generator) if sample else post.mode()
        return self.normalise(z.float())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, f, h, w] -> video [B, 3, 1+4(f-1), H, W] in [-1, 1]."""
        self.check_latents(latents)
        with torch.no_grad():
            return self.vae.decode(self.denormalise(latents.float()).to(self._dtype())).sample.float()

    def streaming_decoder(self) -> "StreamingDecoder":
        return StreamingDecoder(self)

    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype


class StreamingDecoder:
    """Decode latents as they arrive. Feeding latent frames [0, a), [a, b), ... returns the pixel frames
    of each chunk (first latent -> 1 frame, every later one -> temporal_factor frames); their
    concatenation equals `codec.decode` of all latents at once.

    Wan: the decoder's causal convolutions keep their last input frames in a feature cache; diffusers'
    own decode already runs one latent frame at a time through that cache, so keeping our own cache
    across calls reproduces it exactly at constant cost per chunk. HunyuanVideo-1.5's decoder has no
    cache in diffusers: it is causal, so we re-decode all latents seen so far and return the new frames
    (exact, but cost grows with the history)."""

    def __init__(self, codec: VideoCodec):
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        vae = self.codec.vae
        self._frames_seen = 0
        self._history: list[torch.Tensor] = []
        if self.codec.kind == "wan":
            self._cache: list[Any] = [None] * vae._cached_conv_counts["decoder"]

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        codec = self.codec
        codec.check_latents(latents, "streaming decode latents")
        with torch.no_grad():
            z = codec.denormalise(latents.float()).to(codec._dtype())
            if codec.kind == "wan":
                out = self._decode_wan(z)
            else:
                self._history.append(z)
                full = codec.vae.decode(torch.cat(self._history, 2)).sample
                n_before = 0 if self._frames_seen == 0 else codec.pixel_frames(self._frames_seen)
                out = full[:, :, n_before:]
            self._frames_seen += latents.shape[2]
        return out.float()

    def _decode_wan(self, z: torch.Tensor) -> torch.Tensor:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
        vae = self.codec.vae
        outs = []
        for i in range(z.shape[2]):
            x = vae.post_quant_conv(z[:, :, i:i + 1])
            first = self._frames_seen == 0 and i == 0
            outs.append(vae.decoder(x, feat_cache=self._cache, feat_idx=[0], first_chunk=first))
        out = torch.cat(outs, 2)
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0)
