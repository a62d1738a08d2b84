"""`minwm camera ...`: convert between camera formats, plot a trajectory, expand an action program."""

from __future__ import annotations

import sys
from pathlib import Path

from minwm.argtypes import positive_int
from minwm.cameras.actions import DEFAULT_INTRINSICS, ActionConfig, actions_to_cameras, parse_actions
from minwm.cameras.formats import FORMATS, load_cameras, save_cameras
from minwm.cameras.jsonfmt import dumps_json
from minwm.errors import MinwmError


def _action_config(args) -> ActionConfig:
    cfg = ActionConfig()
    if getattr(args, "config", None):
        from minwm.config import load_config
        cfg = load_config(args.config).actions
    return cfg


def _trajectory(spec: str, args):
    """A file path (any camera format) or an action program. Programs never contain '.' or '/', so a
    spec with either is a path even when missing (a typo then reads "file not found", not a DSL error)."""
    if Path(spec).exists() or "." in spec or "/" in spec:
        return load_cameras(spec, getattr(args, "from_fmt", None))
    cfg = _action_config(args)
    cams = actions_to_cameras(parse_actions(spec, cfg.max_steps), cfg, args.intrinsics or DEFAULT_INTRINSICS)
    return cams, {"format": "actions", "source": spec}


def cmd_convert(args) -> int:
    cams, meta = load_cameras(args.src, args.from_fmt)
    save_cameras(args.out, cams, args.to, meta, image_size=args.image_size)
    print(f"{args.out}: {len(cams)} cameras ({meta['format']} -> {args.to})")
    return 0


def cmd_show(args) -> int:
    from minwm.cameras.plot import plot_trajectory

    cams, meta = _trajectory(args.spec, args)
    if args.relative:
        cams = cams.relative_to_first()
    plot_trajectory(cams, args.out, title=args.title or str(meta.get("source") or meta.get("path") or ""))
    print(f"{args.out}: {len(cams)} frames")
    return 0


def cmd_parse(args) -> int:
    cfg = _action_config(args)
    cams = actions_to_cameras(parse_actions(args.dsl, cfg.max_steps), cfg, args.intrinsics or DEFAULT_INTRINSICS)
    sys.stdout.write(dumps_json(cams, {"source": args.dsl}))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("camera", help="camera trajectories: convert, show, parse actions")
    sub = p.add_subparsers(dest="camera_command", required=True, metavar="SUBCOMMAND")

    def action_opts(q):
        q.add_argument("--intrinsics", type=float, nargs=4, metavar=("FX", "FY", "CX", "CY"),
                       help="normalised intrinsics for an action program (default: 90-degree horizontal "
                            "field of view, 16:9)")
        q.add_argument("--config", help="YAML config whose `actions` section sets the step sizes")

    c = sub.add_parser("convert", help="convert a camera file to another format")
    c.add_argument("src", help="camera file (RealEstate10K .txt, transforms.json, minwm .json)")
    c.add_argument("--to", required=True, choices=FORMATS, help="output format")
    c.add_argument("--out", required=True, help="output file")
    c.add_argument("--from", dest="from_fmt", choices=FORMATS, help="input format (detected when omitted)")
    c.add_argument("--image-size", type=positive_int, nargs=2, metavar=("H", "W"),
                   help="image size in pixels (needed for nerfstudio output when the input has none)")
    c.set_defaults(func=cmd_convert)

    s = sub.add_parser("show", help="plot a trajectory (top and side views) to a PNG")
    s.add_argument("spec", metavar="DSL|FILE", help="an action program such as 'w*8,l*10' or a camera file")
    s.add_argument("--out", required=True, help="output .png")
    s.add_argument("--from", dest="from_fmt", choices=FORMATS, help="input format (detected when omitted)")
    s.add_argument("--relative", action="store_true", help="plot relative to the first camera")
    s.add_argument("--title", help="text after the frame count in the title")
    action_opts(s)
    s.set_defaults(func=cmd_show)

    q = sub.add_parser("parse", help="expand an action program and print the trajectory as minwm JSON")
    q.add_argument("dsl", help="action program, e.g. 'w*4,w+l*3,a*2'")
    action_opts(q)
    q.set_defaults(func=cmd_parse)
