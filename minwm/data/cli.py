"""`minwm data ...`: render procedural clips, import real clips, show a contact sheet.

Each action is added by a function `add_<action>(subparsers)` listed in ACTIONS as "module:function",
so another module can add one (e.g. `encode`) with one line here and its own code elsewhere.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

from minwm.errors import MinwmError

ACTIONS = [
    "minwm.data.cli:add_render",
    "minwm.data.cli:add_import",
    "minwm.data.cli:add_show",
    "minwm.data.encode_cli:add_encode",
]


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="render, import and inspect clip datasets",
                              description="Clip datasets: frames, per-frame cameras, caption, source.")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    for spec in ACTIONS:
        module, fn = spec.split(":")
        getattr(importlib.import_module(module), fn)(sub)


# ---- argument types --------------------------------------------------------------------------
def parse_size(text: str, flag: str = "--size") -> tuple[int, int]:
    """'HxW' -> (H, W), both >= 1."""
    parts = text.lower().split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise MinwmError(f"{flag}: expected HxW (e.g. 64x64), got '{text}'") from None
    if h < 1 or w < 1:
        raise MinwmError(f"{flag}: height and width must be >= 1, got '{text}'")
    return h, w


def parse_pose_noise(text: str) -> tuple[float, float]:
    """'ROT_DEG,TRANS' -> (rotation std in degrees, translation std in scene units), both >= 0."""
    try:
        rot, trans = (float(p) for p in text.split(","))
    except ValueError:
        raise MinwmError(f"--pose-noise: expected ROT_DEG,TRANS (e.g. 0.5,0.01), got '{text}'") from None
    if not (rot >= 0 and trans >= 0):
        raise MinwmError(f"--pose-noise: both values must be >= 0, got '{text}'")
    return rot, trans


# ---- render ----------------------------------------------------------------------------------
def add_render(sub) -> None:
    p = sub.add_parser("render", help="render procedural clips (frames + exact cameras + captions)")
    p.add_argument("--out", required=True, help="output dataset directory (must not hold a dataset)")
    p.add_argument("--num-clips", type=int, help="number of clips (config data.num_clips)")
    p.add_argument("--frames", type=int, help="frames per clip, 1 + 4k (config data.frames)")
    p.add_argument("--size", help="HxW in pixels (config data.height/width)")
    p.add_argument("--seed", type=int, help="dataset seed (config data.seed)")
    p.add_argument("--trajectories", help="file of action programs (text, one per line, or JSON), or 'eval' for "
                                          "the prescribed evaluation set; clips cycle through them instead of "
                                          "random programs")
    p.add_argument("--pose-noise", help="ROT_DEG,TRANS: std of noise added to the STORED cameras (frames are "
                                        "rendered from the exact ones)")
    p.add_argument("--supersample", type=int, help="s x s rays per pixel (config data.supersample)")
    p.add_argument("--config", help="YAML config; its data and actions sections are used")
    p.add_argument("--workers", type=int, default=1, help="render in this many processes (same output bytes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_render)


def _data_config(args):
    from minwm.cameras.actions import ActionConfig
    from minwm.data.clips import DataConfig

    if args.config:
        from minwm.config import load_config

        full = load_config(args.config)
        cfg, actions = full["data"], full["actions"]
    else:
        cfg, actions = DataConfig(), ActionConfig()
    changes = {}
    for key in ("num_clips", "frames", "seed", "supersample"):
        if getattr(args, key, None) is not None:
            changes[key] = getattr(args, key)
    if getattr(args, "size", None):
        changes["height"], changes["width"] = parse_size(args.size)
    if getattr(args, "pose_noise", None):
        changes["pose_noise_rot_deg"], changes["pose_noise_trans"] = parse_pose_noise(args.pose_noise)
    if "frames" in changes and (changes["frames"] < 1 or (changes["frames"] - 1) % 4):
        raise MinwmError(f"--frames: {changes['frames']} is not 1 + 4k (e.g. 5, 9, 17, 33)")
    try:
        cfg = dataclasses.replace(cfg, **changes)
    except ValueError as e:
        raise MinwmError(f"data: {e}") from None
    return cfg, actions


def cmd_render(args) -> int:
    from minwm.data.procedural import load_programs, render_dataset
    from minwm.worlds.render import keep_freed_memory

    cfg, actions = _data_config(args)
    programs = None
    if args.trajectories == "eval":
        from minwm.worlds.trajectories import eval_trajectories, num_latent_frames

        programs = list(eval_trajectories(num_latent_frames(cfg.frames)).items())
    elif args.trajectories:
        programs = load_programs(args.trajectories, cfg.frames, actions)
    if args.workers < 1:
        raise MinwmError(f"--workers: expected >= 1, got {args.workers}")
    keep_freed_memory()
    out = render_dataset(cfg, args.out, programs, actions, progress=not args.quiet, workers=args.workers)
    print(f"{out}: {cfg.num_clips} clips of {cfg.frames} frames at {cfg.height}x{cfg.width}")
    return 0


# ---- import ----------------------------------------------------------------------------------
def add_import(sub) -> None:
    p = sub.add_parser("import", help="import a real clip (images or video + camera file)")
    p.add_argument("--format", choices=("re10k", "nerfstudio", "json"),
                   help="camera file format (detected from the file when omitted)")
    p.add_argument("--frames", required=True, help="folder of images or a video file")
    p.add_argument("--cameras", required=True, help="camera file (RealEstate10K .txt, transforms.json, minwm json)")
    p.add_argument("--out", required=True, help="dataset directory (created, or appended to)")
    p.add_argument("--size", help="HxW: centre-crop to this aspect and resize (intrinsics adjusted)")
    p.add_argument("--name", help="clip name (default: the video's or folder's name)")
    p.add_argument("--caption", default="", help="caption text (default empty)")
    p.set_defaults(func=cmd_import)


def cmd_import(args) -> int:
    from minwm.data.importers import import_clip

    size = parse_size(args.size) if args.size else None
    clip = import_clip(args.frames, args.cameras, args.out, fmt=args.format, size=size, name=args.name,
                       caption=args.caption)
    F, H, W = clip.frames.shape[:3]
    print(f"{args.out}: imported clip {clip.name} ({F} frames, {H}x{W})")
    return 0


# ---- show ------------------------------------------------------------------------------------
def add_show(sub) -> None:
    p = sub.add_parser("show", help="contact sheet of a dataset: frames per clip and a top-down path")
    p.add_argument("root", help="dataset directory")
    p.add_argument("--out", required=True, help="output image (.png)")
    p.add_argument("--clips", type=int, default=6, help="clips (rows) to show")
    p.add_argument("--frames", type=int, default=5, help="frames per clip")
    p.add_argument("--start", type=int, default=0, help="first clip to show")
    p.set_defaults(func=cmd_show)


def cmd_show(args) -> int:
    from minwm.data.contact_sheet import make_contact_sheet

    out = make_contact_sheet(args.root, args.out, args.clips, args.frames, args.start)
    print(f"{Path(out)}: contact sheet of {args.root}")
    return 0
