"""Helpers for the stage tests: a tiny synthetic latent cache in the on-disk format of
minwm.data.latent_cache (shards + index.json), and a tiny config around it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from minwm.config import parse_config
from minwm.data.latent_cache import FORMAT, INDEX, shard_name

TINY_WAN = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, eps=1e-6)


TINY_HY = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
               num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=32,
               text_embed_2_dim=32, image_embed_dim=8, rope_axes_dim=(4, 6, 6), task_type="i2v")


def text_config(kind: str = "umt5") -> dict:
    return {"max_text_len": 8} if kind == "umt5" else {"kind": "hunyuan15", "tiny": {}, "max_text_len": 8}


def tiny_text_encoder(kind: str = "umt5"):
    from minwm.codecs.config import TextEncoderConfig
    from minwm.codecs.text import TextEncoder

    return TextEncoder.from_config(TextEncoderConfig(**text_config(kind)))


def make_cache(root: Path, n: int = 8, frames: int = 4, size: int = 4, channels: int = 4, shard_clips: int = 4,
               seed: int = 0, text_kind: str = "umt5") -> Path:
    """n clips of smooth latents that move with a per-clip camera translation (so there is something to learn)."""
    from minwm.stages.common import text_encoder_digest

    enc = tiny_text_encoder(text_kind)
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "fingerprint": {"text": text_encoder_digest(enc)}, "shard_clips": shard_clips,
             "shards": [], "clips": {}, "rejected": {}}
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for s in range(math.ceil(n / shard_clips)):
        tensors, items = {}, []
        for j in range(min(shard_clips, n - s * shard_clips)):
            i = s * shard_clips + j
            speed = float(torch.rand((), generator=g)) * 2 - 1
            caption = ["a red room", "a blue street", "a green field"][i % 3]
            phase = torch.rand(channels, generator=g) * 6.28
            lat = torch.stack([torch.stack([torch.sin(0.9 * (xx + speed * f) + phase[c]) * torch.cos(0.7 * yy)
                                            for f in range(frames)]) for c in range(channels)]).float()
            w2c = torch.eye(4, dtype=torch.float64).repeat(frames, 1, 1)
            w2c[:, 0, 3] = -speed * torch.arange(frames, dtype=torch.float64) * 0.1
            text = enc.encode([caption])
            tensors.update({f"{j}.latents": lat, f"{j}.w2c": w2c,
                            f"{j}.intrinsics": torch.tensor([[0.87, 0.87, 0.5, 0.5]] * frames, dtype=torch.float64),
                            **{f"{j}.{k}": v[0].contiguous() for k, v in text.items()}})
            items.append({"name": f"clip{i:03d}", "caption": caption, "source": "synthetic", "frames": 4 * frames - 3,
                          "frames_dropped": 0, "latent_shape": list(lat.shape)})
            index["clips"][f"clip{i:03d}"] = [s, j]
        meta = {"format": FORMAT, "fingerprint": f"synthetic{s}", "clips": items, "rejected": {}}
        save_file(tensors, str(root / shard_name(s)), metadata={"minwm": json.dumps(meta, sort_keys=True)})
        index["shards"].append({"file": shard_name(s), "clips": len(items)})
    (root / INDEX).write_text(json.dumps(index))
    return root


def tiny_config(cache: Path, *, steps: int = 10, chunk: int = 2, batch: int = 2, ckpt_every: int = 5,
                arch: str = "wan", ti2v: bool = False, **stages):
    diffusers = dict(TINY_WAN) if arch == "wan" else dict(TINY_HY)
    data = {
        "model": {"arch": arch, "diffusers": diffusers, "chunk_frames": chunk, "window_frames": 8},
        "codec": {"text": text_config("umt5" if arch == "wan" else "hunyuan15")},
        "train": {"lr": 1e-3, "batch_size": batch, "max_steps": steps, "ckpt_every": ckpt_every, "log_every": 100,
                  "tensorboard": False, "plot": False, "mixed_precision": "no"},
        "stages": {"latents": str(cache), "threads": 1, "ti2v": ti2v, **stages},
    }
    return parse_config(data, "tiny.yaml")


# ---- what the exact-resume tests compare ------------------------------------------------------------------
def history(run: Path) -> list[dict]:
    hist = json.loads((run / "metrics.json").read_text())["history"]
    return [{k: v for k, v in r.items() if k not in ("time", "step_time")} for r in hist]


def dcp_state(checkpoint: Path) -> dict:
    """Everything a checkpoint holds (modules, optimisers, EMA) as one flat dict of tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dst = checkpoint.parent.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint / "state"), str(dst))
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)
        else:
            flat[prefix] = obj
    walk("", torch.load(dst, weights_only=False))
    return flat
