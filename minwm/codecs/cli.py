"""`minwm codec check`: reconstruct clips with a VAE and report PSNR / SSIM with a picture to look at."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from minwm.errors import MinwmError


def register(subparsers) -> None:
    p = subparsers.add_parser("codec", help="video codec (VAE) tools")
    sub = p.add_subparsers(dest="codec_command", required=True, metavar="ACTION")
    c = sub.add_parser("check", help="reconstruct held-out clips; write per-clip PSNR/SSIM and a strip image",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--codec", required=True, help="diffusers VAE directory (e.g. the output of `minwm train vae`)")
    c.add_argument("--data", required=True, help="clip folder (from `minwm data render`)")
    c.add_argument("--out", required=True, help="output folder for metrics.json and strip.png")
    c.add_argument("--max-clips", type=int, default=16, help="reconstruct at most this many clips")
    c.add_argument("--strip-clips", type=int, default=4, help="clips shown in strip.png")
    c.set_defaults(func=cmd_check)


def open_clips(root: str | Path):
    """(names, loader) for a clip folder; loader(i) returns the i-th Clip (MinwmError for a bad one)."""
    from minwm.data.clips import ClipDataset
    ds = ClipDataset(root)
    names = list(getattr(ds, "names", None) or [])
    if not names:
        names = [ds[i].name for i in range(len(ds))]
    return names, ds.__getitem__


def check_codec(codec_dir: str | Path, data: str | Path, out: str | Path, max_clips: int = 16,
                strip_clips: int = 4) -> dict:
    import cv2

    from minwm.codecs.quality import psnr, ssim, strip_image
    from minwm.codecs.vae import VideoCodec
    from minwm.data.latent_cache import prepare_clip
    from minwm.io import atomic_path, write_json

    codec = VideoCodec.from_pretrained(codec_dir)
    names, load = open_clips(data)
    if not names:
        raise MinwmError(f"{data}: no clips found")
    per_clip, rejected, strips = {}, {}, []
    for i, name in enumerate(names[:max_clips]):
        try:
            prepared = prepare_clip(load(i), codec.temporal_factor, codec.spatial_factor)
        except (MinwmError, OSError, ValueError) as e:
            rejected[name] = str(e)
            continue
        x = prepared.video
        y = codec.decode(codec.encode(x))
        per_clip[name] = {"psnr": round(float(psnr(x, y)[0]), 3), "ssim": round(float(ssim(x, y)[0]), 4),
                          "frames": int(x.shape[2])}
        if len(strips) < strip_clips:
            strips.append(strip_image(x[0], y[0]))
    if not per_clip:
        raise MinwmError(f"{data}: no usable clips (first rejection: {next(iter(rejected.items()))})")
    out = Path(out)
    metrics = {"codec": str(codec_dir), "data": str(data),
               "mean_psnr": round(float(np.mean([m["psnr"] for m in per_clip.values()])), 3),
               "mean_ssim": round(float(np.mean([m["ssim"] for m in per_clip.values()])), 4),
               "clips": per_clip, "rejected": rejected}
    width = max(s.shape[1] for s in strips)
    pad = [np.pad(s, ((0, 4), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in strips]
    with atomic_path(out / "strip.png") as tmp:
        if not cv2.imwrite(str(tmp), np.concatenate(pad, 0)[..., ::-1]):
            raise MinwmError(f"{out / 'strip.png'}: cannot write image")
    write_json(out / "metrics.json", metrics)
    return metrics


def cmd_check(args) -> int:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    m = check_codec(args.codec, args.data, args.out, args.max_clips, args.strip_clips)
    worst = min(m["clips"].items(), key=lambda kv: kv[1]["psnr"])
    print(f"{len(m['clips'])} clips: PSNR {m['mean_psnr']:.2f} dB, SSIM {m['mean_ssim']:.4f} "
          f"(worst {worst[0]}: {worst[1]['psnr']:.2f} dB); {len(m['rejected'])} rejected")
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'strip.png'}")
    return 0
