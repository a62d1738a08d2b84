"""`minwm train STAGE` and `minwm pipeline RECIPE`."""

from __future__ import annotations

import argparse
from pathlib import Path

from minwm.errors import MinwmError
from minwm.stages import STAGES


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one stage (vae, bidirectional, ar, ode-data, ode, cd, dmd)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("stage", metavar="STAGE", help=f"one of: {', '.join(STAGES)}")
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("--init", action="append", default=[], metavar="[NAME=]DIR",
                   help="an input checkpoint (a finished stage output); NAME defaults to 'init' "
                        "(e.g. --init runs/toy/ar --init teacher=runs/toy/ar)")
    p.add_argument("--out", help="output directory (default: runs/<config name>/<stage>)")
    p.add_argument("--resume", action="store_true", help="continue from the output directory's latest checkpoint")
    p.add_argument("--max-steps", type=int, help="override the stage's train.max_steps")
    p.set_defaults(func=cmd_train)

    q = subparsers.add_parser("pipeline", help="run a recipe: ordered stages, one output directory each, resumable",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("recipe", metavar="RECIPE", help="recipe YAML (config, name, stages)")
    q.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage (earlier ones must be done)")
    q.add_argument("--until", metavar="STAGE", help="stop after this stage")
    q.add_argument("--fresh", action="store_true",
                   help="delete the selected stages' outputs and checkpoints first, instead of skipping / resuming")
    q.add_argument("--runs", help="root of the run directories (default: the recipe's `runs`, else ./runs)")
    q.set_defaults(func=cmd_pipeline)


def parse_inits(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            name, path = "init", v
        if not name or not path:
            raise MinwmError(f"--init {v}: expected DIR or NAME=DIR")
        if name in out:
            raise MinwmError(f"--init {v}: input {name!r} given twice")
        out[name] = path
    return out


def cmd_train(args) -> int:
    from minwm.config import load_config
    from minwm.stages import check_name
    from minwm.stages.pipeline import run_stage

    check_name(args.stage, "train")
    if args.max_steps is not None and args.max_steps < 0:
        raise MinwmError(f"--max-steps: expected >= 0, got {args.max_steps}")
    init = parse_inits(args.init)
    cfg = load_config(args.config)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem / args.stage
    path = run_stage(args.stage, cfg, out, init, resume=args.resume, max_steps=args.max_steps)
    print(f"{args.stage}: wrote {path}")
    return 0


def cmd_pipeline(args) -> int:
    from minwm.stages.pipeline import run_pipeline

    outs = run_pipeline(args.recipe, start=args.start, until=args.until, fresh=args.fresh, runs=args.runs)
    print(f"pipeline: {len(outs)} stages done; last output {outs[-1]}")
    return 0
