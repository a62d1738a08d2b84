"""`minwm bench latency`: the paper's Table 1 on any backbone config (see bench/latency.py)."""

from __future__ import annotations

from minwm.argtypes import positive_int


def register(sub) -> None:
    p = sub.add_parser("bench", help="latency and throughput benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    q = bsub.add_parser("latency", help="first-frame latency, steady FPS, per-chunk latency, peak memory",
                        description="First-frame latency of the 50-step CFG bidirectional, 50-step CFG AR and "
                                    "few-step AR models with the speed-up, steady-state FPS, latency per chunk "
                                    "against chunk index and peak memory. Writes bench.md, bench.json and "
                                    "bench.png to --out.")
    q.add_argument("--config", required=True, help="YAML with model, inference and bench sections")
    q.add_argument("--random-weights", action="store_true",
                   help="random backbone weights (default when model.pretrained is unset)")
    q.add_argument("--chunks", type=positive_int, help="streamed chunks to time (default bench.chunks)")
    q.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    q.add_argument("--threads", type=positive_int, help="torch CPU threads (default bench.threads)")
    q.add_argument("--baseline-steps", type=positive_int,
                   help="measure only this many steps of each 50-step baseline and extrapolate (labelled so)")
    q.add_argument("--runs", type=positive_int, help="repeats of each latency measurement; the min is reported")
    q.add_argument("--no-baselines", action="store_true",
                   help="skip the multi-step baselines (long streaming runs: flat cost and memory only)")
    q.add_argument("--device", default="cpu")
    q.add_argument("--with-codec", action="store_true", help="also time VAE decode (needs codec.vae)")
    q.set_defaults(func=_run_latency)


def _run_latency(args) -> int:
    from minwm.bench.latency import run_latency_cli

    return run_latency_cli(args)
