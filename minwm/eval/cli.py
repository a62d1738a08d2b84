"""`minwm eval` (camera control and image quality of checkpoints on a held-out suite) and `minwm ablate`."""

from __future__ import annotations

import argparse
from pathlib import Path

from minwm.errors import MinwmError


def register(subparsers) -> None:
    from minwm.eval.ablate import ABLATIONS
    from minwm.eval.checkpoints import SAMPLERS
    from minwm.eval.suite import SUITES

    p = subparsers.add_parser(
        "eval", help="camera control (RotErr, TransErr, CamMC, direction) and PSNR/SSIM of checkpoints against "
                     "exact renders of held-out scenes, with a fixed-camera baseline; writes report.md",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, metavar="[NAME=]DIR",
                   help="a stage output directory; repeat to compare stages (e.g. --ckpt runs/toy/bidirectional "
                        "--ckpt runs/toy/ar --ckpt runs/toy/dmd); NAME defaults to the directory name")
    p.add_argument("--suite", default="toy-heldout", help=f"one of: {', '.join(SUITES)}")
    p.add_argument("--out", help="report folder (default: <parent of the first --ckpt>/eval/<suite>)")
    p.add_argument("--sampler", default="auto", choices=SAMPLERS,
                   help="auto: from the stage in the checkpoint's metrics.json (bidirectional, ar -> multistep, "
                        "ode/cd/dmd -> fewstep)")
    p.add_argument("--latent-frames", type=int, help="clip length in latent frames (default: the training length)")
    p.add_argument("--multistep-steps", type=int, help="steps of the multi-step samplers (default: the suite's)")
    p.add_argument("--seed", type=int, default=0, help="generation seed (the scenes are fixed by the suite)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch / OpenCV threads (1 is fastest on a busy machine)")
    p.add_argument("--pose-workers", type=int, default=None,
                   help="background processes estimating cameras while the next videos are generated (0: inline; "
                        "default: 2 on a machine with 2 or more cores)")
    p.add_argument("--vae-floor", action=argparse.BooleanOptionalAction, default=None,
                   help="also score every render passed through the checkpoint's VAE (what a perfect model decoded "
                        "by it would score; one more pose estimate per case; default: the suite's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    q = subparsers.add_parser(
        "ablate", help="the paper's camera-control ablations on the toy: exact vs noisy poses (Fig. 3a), training "
                       "steps (Fig. 4), batch size (Fig. 5); long experiments",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("ablation", choices=ABLATIONS)
    q.add_argument("--config", required=True, help="YAML config (e.g. configs/toy.yaml)")
    q.add_argument("--out", help="root folder (default: runs/ablate/<config name>)")
    q.add_argument("--values", help="the ablated values, separated by ';' or spaces (pose-noise: ROT_DEG,TRANS "
                                    "pairs like '0,0;2,0.05'; steps / batch-size: integers); default per ablation")
    q.add_argument("--suite", default="toy-ablate", help=f"evaluation suite, one of: {', '.join(SUITES)}")
    q.add_argument("--max-steps", type=int, help="training steps per run (default: the config's for the stage)")
    q.add_argument("--clips", type=int, help="training clips to render (default: the config's data.num_clips)")
    q.add_argument("--vae", help="trained VAE directory (default: the config's codec.vae)")
    q.add_argument("--threads", type=int, default=1, help="torch threads for training and evaluation")
    q.add_argument("--pose-workers", type=int, default=1, help="background pose-estimation processes in evaluation")
    q.set_defaults(func=cmd_ablate)


def parse_ckpts(values: list[str]) -> dict[str, str] | list[str]:
    """[NAME=]DIR items -> {name: dir} when any is named (unnamed ones use their directory name), else the list."""
    if not any("=" in v and "/" not in v.split("=", 1)[0] for v in values):
        return list(values)
    from minwm.eval.checkpoints import checkpoint_names

    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or "/" in name:
            name, path = next(iter(checkpoint_names([v]))), v
        if not name or not path:
            raise MinwmError(f"--ckpt {v}: expected DIR or NAME=DIR")
        if name in out:
            raise MinwmError(f"--ckpt {v}: name {name!r} given twice")
        out[name] = path
    return out


def cmd_eval(args) -> int:
    from minwm.eval.runner import evaluate
    from minwm.eval.suite import get_suite, with_overrides

    suite = get_suite(args.suite)  # an unknown suite fails before any checkpoint is loaded
    if args.vae_floor is not None:
        suite = with_overrides(suite, vae_floor=args.vae_floor)
    ckpts = parse_ckpts(args.ckpt)
    first = Path(next(iter(ckpts.values())) if isinstance(ckpts, dict) else ckpts[0])
    out = Path(args.out) if args.out else first.parent / "eval" / args.suite
    for flag, v in (("--threads", args.threads), ("--multistep-steps", args.multistep_steps)):
        if v is not None and v < 1:
            raise MinwmError(f"{flag}: expected >= 1, got {v}")
    if args.pose_workers is not None and args.pose_workers < 0:
        raise MinwmError(f"--pose-workers: expected >= 0, got {args.pose_workers}")
    result = evaluate(ckpts, suite, out, sampler=args.sampler, device=args.device, threads=args.threads,
                      seed=args.seed, latent_frames=args.latent_frames, multistep_steps=args.multistep_steps,
                      pose_workers=args.pose_workers, progress=not args.quiet)
    for name, c in result["checkpoints"].items():
        b = c.get("baseline") or {}

        def f(v, d=3):
            return "-" if v is None else f"{v:.{d}f}"
        cam = (f"RotErr {f(c['rot_err_deg'], 2)} deg/frame (baseline {f(b.get('rot_err_deg'), 2)}), "
               f"TransErr {f(c['trans_err'])} (baseline {f(b.get('trans_err'))}), "
               f"direction {f(c['direction_accuracy'], 2)} (baseline {f(b.get('direction_accuracy'), 2)}), "
               if c.get("camera") else "no camera input, ")
        print(f"{name}: {cam}PSNR {f(c['psnr'], 2)} dB, SSIM {f(c['ssim'])}")
    print(f"wrote {out / 'report.md'} ({result['time_s']:.0f} s)")
    return 0


def cmd_ablate(args) -> int:
    from minwm.eval.ablate import run_ablation
    from minwm.eval.suite import get_suite

    get_suite(args.suite)
    values = None
    if args.values:
        sep = ";" if ";" in args.values else None
        values = [v.strip() for v in args.values.split(sep) if v.strip()]
    run_ablation(args.ablation, args.config, args.out, values=values, suite=args.suite, max_steps=args.max_steps,
                 clips=args.clips, vae=args.vae, threads=args.threads, pose_workers=args.pose_workers)
    return 0
