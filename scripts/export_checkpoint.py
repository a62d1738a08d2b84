#!/usr/bin/env python
"""Export a finished stage output as a self-contained checkpoint folder that `minwm play` / `generate` / `eval`
load anywhere: the backbone (model.safetensors + model_config.json), its config.yaml with codec.vae pointing at
the copied VAE (`vae/`, resolved against the checkpoint folder), and nothing of the training state.

    .venv/bin/python scripts/export_checkpoint.py runs/quickstart/dmd tests/assets/toy_world

The machine-specific data paths in the config (stages.latents, stages.vae.data) are reset to the toy's
defaults, since the exported folder does not carry the data. Written to a temporary folder and renamed, so an
interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from minwm.errors import MinwmError

BACKBONE_FILES = ("model.safetensors", "model_config.json")
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def export(src: Path, dst: Path) -> None:
    for name in BACKBONE_FILES + ("config.yaml",):
        if not (src / name).is_file():
            raise MinwmError(f"{src / name}: not found (expected a finished stage output)")
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    vae = (cfg.get("codec") or {}).get("vae")
    if not vae:
        raise MinwmError(f"{src / 'config.yaml'}: codec.vae is not set; nothing could decode the exported model")
    vae_dir = Path(vae) if Path(vae).is_absolute() else src / vae
    for name in VAE_FILES:
        if not (vae_dir / name).is_file():
            raise MinwmError(f"{vae_dir / name}: not found (codec.vae of {src / 'config.yaml'})")
    cfg["codec"]["vae"] = "vae"
    stages = cfg.get("stages") or {}
    if "latents" in stages:
        stages["latents"] = "data/toy/latents"
    if isinstance(stages.get("vae"), dict) and "data" in stages["vae"]:
        stages["vae"]["data"] = "data/toy/clips"
    if dst.exists():
        raise MinwmError(f"{dst}: already exists (remove it first)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the export is meant to be shared
    try:
        for name in BACKBONE_FILES:
            shutil.copy2(src / name, tmp / name)
        (tmp / "vae").mkdir()
        for name in VAE_FILES:
            shutil.copy2(vae_dir / name, tmp / "vae" / name)
        (tmp / "config.yaml").write_text(f"# exported from {src} by scripts/export_checkpoint.py\n"
                                         + yaml.safe_dump(cfg, sort_keys=False))
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="a finished stage output (e.g. runs/quickstart/dmd)")
    p.add_argument("dst", type=Path, help="the folder to create")
    args = p.parse_args(argv)
    try:
        export(args.src, args.dst)
    except MinwmError as e:
        print(f"export_checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.src} to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
