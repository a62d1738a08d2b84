"""`minwm data encode`: clips -> latent cache, with the codec and text encoder the config names."""

from __future__ import annotations

import argparse

from minwm.errors import MinwmError


def add_encode(sub) -> None:
    p = sub.add_parser("encode", help="encode clips into a latent cache (latents, text embeddings, cameras)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config; its codec section names the VAE and text encoder")
    p.add_argument("--data", required=True, help="clip dataset directory")
    p.add_argument("--out", required=True, help="latent cache directory (a killed run resumes here)")
    p.add_argument("--vae", help="VAE directory, overriding codec.vae")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_encode)


def cmd_encode(args) -> int:
    import torch
    from tqdm import tqdm

    from minwm.codecs.cli import open_clips
    from minwm.codecs.text import TextEncoder
    from minwm.codecs.vae import VideoCodec
    from minwm.config import load_config
    from minwm.data.latent_cache import build_cache

    cfg = load_config(args.config)
    cc = cfg["codec"]
    vae_dir = args.vae or cc.vae
    if not vae_dir:
        raise MinwmError(f"{args.config}: codec.vae is not set (train the toy VAE with `minwm train vae` "
                         f"or point it at a diffusers VAE directory)")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    codec = VideoCodec.from_pretrained(vae_dir)
    text = TextEncoder.from_config(cc.text)
    names, load = open_clips(args.data)
    bar = tqdm(total=(len(names) + cc.shard_clips - 1) // cc.shard_clips, desc="encode", unit="shard",
               disable=args.quiet)

    def progress(done, total):
        bar.n = done
        bar.refresh()

    try:
        index = build_cache(load, names, codec, text, args.out, cc.shard_clips, progress)
    finally:
        bar.close()
    print(f"{args.out}: {len(index['clips'])} clips encoded in {len(index['shards'])} shards, "
          f"{len(index['rejected'])} rejected")
    return 0
