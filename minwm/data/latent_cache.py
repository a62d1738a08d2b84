"""The latent cache: clips encoded once by the codec and text encoder, for every training stage.

Layout of a cache folder:
    OUT/shard_00000.safetensors   clips 0..n-1 of the sorted clip list (n = codec.shard_clips)
    OUT/shard_00001.safetensors   ...
    OUT/index.json                written last: shards, clips (name -> shard), rejected clips + reasons

Each shard is one safetensors file written atomically (minwm/io.py), holding per clip `{j}.latents`
[C, f, h, w] float32 (normalised), `{j}.embeds` [L, D], `{j}.mask` [L], `{j}.w2c` [f, 4, 4] and
`{j}.intrinsics` [f, 4] float64 (the camera of latent frame i is that of pixel frame 4i), plus glyph
embeddings for HunyuanVideo-1.5; its metadata (one JSON string, so the bytes are deterministic) names
the clips, captions, sources, rejected clips of that shard with reasons, and a fingerprint of the
codec, text encoder and shard contents. A killed run resumes at the first missing shard: shards are
complete or absent, never half-written, and the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from minwm.cameras.camera import Cameras, latent_cameras
from minwm.codecs.vae import vae_input
from minwm.errors import MinwmError
from minwm.io import atomic_path, read_json, write_json

INDEX = "index.json"
FORMAT = "minwm-latent-cache/1"


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


@dataclass
class Prepared:
    """A clip ready to encode: video [1, 3, F', H, W] in [-1, 1] and the cameras of its F' frames."""
    video: torch.Tensor
    cameras: Cameras
    frames_dropped: int


def prepare_clip(clip, temporal_factor: int, spatial_factor: int) -> Prepared:
    """Check one clip and turn it into VAE input; any problem is a MinwmError whose message is the
    rejection reason. Frames beyond the longest 1 + t*k prefix are dropped together with their
    cameras, so poses never shift against frames."""
    frames = np.asarray(clip.frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise MinwmError(f"frames have shape {frames.shape} and dtype {frames.dtype}, expected uint8 [F, H, W, 3]")
    F, H, W = frames.shape[:3]
    if F < 1:
        raise MinwmError("no frames")
    cams = clip.cameras
    if len(cams) != F:
        raise MinwmError(f"{len(cams)} cameras for {F} frames")
    cams.validate("cameras")
    if H % spatial_factor or W % spatial_factor:
        raise MinwmError(f"size {H}x{W} is not divisible by the VAE's spatial factor {spatial_factor}")
    keep = 1 + (F - 1) // temporal_factor * temporal_factor
    video = vae_input(frames[:keep])
    return Prepared(video, cams[:keep], F - keep)


def _file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def codec_fingerprint(codec, text_encoder) -> dict[str, Any]:
    """What determines the cache's bytes besides the clips: the VAE (config and weights) and the text
    encoder (its config and weights). A resumed run refuses shards made with different ones."""
    def digest_module(m: torch.nn.Module) -> str:
        h = hashlib.sha256()
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
        return h.hexdigest()[:16]

    text = {"kind": text_encoder.kind, "max_len": text_encoder.max_len, "weights": digest_module(text_encoder.model)}
    if text_encoder.glyph_model is not None:
        text["glyph_weights"] = digest_module(text_encoder.glyph_model)
    return {"vae_kind": codec.kind, "vae_config": json.loads(json.dumps(dict(codec.vae.config), default=str)),
            "vae_weights": digest_module(codec.vae), "text": text}


def _shard_meta(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["minwm"])


def encode_clip(codec, prepared: Prepared) -> dict[str, torch.Tensor]:
    lat = codec.encode(prepared.video)[0].contiguous()
    cams = latent_cameras(prepared.cameras, codec.temporal_factor)
    return {"latents": lat.float(), "w2c": cams.w2c.contiguous(), "intrinsics": cams.intrinsics.contiguous()}


def build_cache(clips, names: Sequence[str], codec, text_encoder, out: str | Path, shard_clips: int = 8,
                progress: Callable[[int, int], None] | None = None) -> dict:
    """Encode `clips` (`clips(i)` returns the i-th clip in `names` order, or raises MinwmError for a
    clip that cannot be read) into the cache folder `out`, resuming from complete shards there.
    Returns the index (also written to OUT/index.json)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".shard_*.tmp"):  # temporaries of a killed run: never complete shards
        shutil.rmtree(stale, ignore_errors=True)
    fp = codec_fingerprint(codec, text_encoder)
    n_shards = (len(names) + shard_clips - 1) // shard_clips
    index: dict[str, Any] = {"format": FORMAT, "fingerprint": fp, "shard_clips": shard_clips,
                             "shards": [], "clips": {}, "rejected": {}}
    for s in range(n_shards):
        members = list(names[s * shard_clips:(s + 1) * shard_clips])
        path = out / shard_name(s)
        shard_fp = hashlib.sha256(json.dumps([fp, members], sort_keys=True).encode()).hexdigest()[:16]
        if path.exists():
            try:
                meta = _shard_meta(path)
            except Exception:
                raise MinwmError(f"{path}: unreadable shard (not written by minwm? remove it to re-encode)") from None
            if meta.get("fingerprint") != shard_fp:
                raise MinwmError(f"{path}: made with a different codec, text encoder or clip list; "
                                 f"encode into a new folder")
        else:
            tensors: dict[str, torch.Tensor] = {}
            items, rejected = [], {}
            for j, name in enumerate(members):
                try:
                    clip = clips(s * shard_clips + j)
                    prepared = prepare_clip(clip, codec.temporal_factor, codec.spatial_factor)
                    enc = encode_clip(codec, prepared)
                    if not torch.isfinite(enc["latents"]).all():
                        raise MinwmError("non-finite latents")
                except (MinwmError, OSError, ValueError) as e:
                    # A clip that cannot be read or used is skipped whole, with its reason on record.
                    reason = " ".join(str(e).split()) or type(e).__name__
                    rejected[name] = reason.removeprefix(f"clip {name}: ")
                    print(f"minwm: clip {name} rejected: {rejected[name]}")
                    continue
                text = text_encoder.encode([clip.caption])
                k = len(items)
                for key, v in enc.items():
                    tensors[f"{k}.{key}"] = v
                for key, v in text.items():
                    tensors[f"{k}.{key}"] = v[0].contiguous()
                items.append({"name": name, "caption": clip.caption, "source": getattr(clip, "source", ""),
                              "frames": int(prepared.video.shape[2]),
                              "frames_dropped": prepared.frames_dropped,
                              "latent_shape": list(enc["latents"].shape)})
            meta = {"format": FORMAT, "fingerprint": shard_fp, "clips": items, "rejected": rejected}
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={"minwm": json.dumps(meta, sort_keys=True)})
        index["shards"].append({"file": path.name, "clips": len(meta["clips"])})
        for j, item in enumerate(meta["clips"]):
            index["clips"][item["name"]] = [s, j]
        index["rejected"].update(meta["rejected"])
        if progress:
            progress(s + 1, n_shards)
    write_json(out / INDEX, index)
    return index


def read_index(root: str | Path) -> dict:
    p = Path(root) / INDEX
    if not p.is_file():
        raise MinwmError(f"{p}: not found (is {root} a latent cache made by `minwm data encode`?)")
    index = read_json(p)
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise MinwmError(f"{p}: format is {index.get('format') if isinstance(index, dict) else None!r}, "
                         f"expected {FORMAT!r}")
    return index


class LatentDataset(torch.utils.data.Dataset):
    """The clips of a latent cache, in index order. Item i is a dict: latents [C, f, h, w], embeds
    [L, D], mask [L], w2c [f, 4, 4], intrinsics [f, 4] (+ glyph_embeds / glyph_mask), and the strings
    name and caption."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.index = read_index(self.root)
        self._items: list[tuple[int, int]] = []
        self._meta: list[dict] = []
        for s, shard in enumerate(self.index["shards"]):
            path = self.root / shard["file"]
            if not path.is_file():
                raise MinwmError(f"{path}: shard listed in {INDEX} is missing")
            meta = _shard_meta(path)
            for j, item in enumerate(meta["clips"]):
                self._items.append((s, j))
                self._meta.append(item)
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._items)

    @property
    def names(self) -> list[str]:
        return [m["name"] for m in self._meta]

    def _handle(self, s: int):
        from safetensors import safe_open
        if s not in self._open:
            self._open[s] = safe_open(str(self.root / self.index["shards"][s]["file"]), "pt")
        return self._open[s]

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, j = self._items[i]
        f = self._handle(s)
        prefix = f"{j}."
        out: dict[str, Any] = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        out["name"] = self._meta[i]["name"]
        out["caption"] = self._meta[i]["caption"]
        return out

    def cameras(self, i: int) -> Cameras:
        item = self[i]
        return Cameras(item["w2c"], item["intrinsics"])

    def __getstate__(self):  # DataLoader workers reopen shards themselves
        d = dict(self.__dict__)
        d["_open"] = {}
        return d
