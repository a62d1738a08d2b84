"""Procedural renderer throughput: frames per second at a given size and torch thread count.

    python scripts/bench_render.py --size 64x64 --threads 2

Scenes and trajectories are made first (as `minwm data render` does per clip), then timed:
rendering only, best of --repeats passes over --clips clips (best-of, because the machine may be
shared). Also prints the CPU seconds per frame (robust to other load) and the end-to-end rate of
making whole clips (scene + trajectory + caption + render).
"""

from __future__ import annotations

import argparse
import os
import time

# On a shared machine, OpenMP threads that spin while waiting for a busy core cost far more than
# they save (measured: 4x slower at 2 threads under load). Set before torch loads; override by env.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from minwm.data.clips import DataConfig
from minwm.data.procedural import render_clip
from minwm.worlds.render import keep_freed_memory, pack_scene, render
from minwm.worlds.scene import generate_scene
from minwm.worlds.trajectories import num_latent_frames, program_cameras, random_program, square_intrinsics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="64x64")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--supersample", type=int, default=1)
    ap.add_argument("--no-edge-aa", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    H, W = (int(x) for x in args.size.lower().split("x"))
    torch.set_num_threads(args.threads)
    keep_freed_memory()

    K = square_intrinsics(60, H, W)
    work = []
    for i in range(args.clips):
        rng = np.random.default_rng([0, i])
        cams = program_cameras(random_program(rng, num_latent_frames(args.frames) - 1), args.frames, K)
        work.append((pack_scene(generate_scene(rng, cams.positions.numpy())), cams))
    render(*work[0], H, W)                                                   # warm-up
    n = args.clips * args.frames
    best_wall = best_cpu = float("inf")
    for _ in range(args.repeats):
        w, c = time.perf_counter(), time.process_time()
        for st, cams in work:
            render(st, cams, H, W, args.supersample, edge_aa=not args.no_edge_aa)
        best_wall = min(best_wall, time.perf_counter() - w)
        best_cpu = min(best_cpu, time.process_time() - c)

    cfg = DataConfig(frames=args.frames, height=H, width=W, supersample=args.supersample)
    w = time.perf_counter()
    for i in range(args.clips):
        render_clip(cfg, i)
    clip_wall = time.perf_counter() - w

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"render {H}x{W}, {args.frames} frames/clip, {args.clips} clips, torch threads={args.threads}, "
          f"supersample={args.supersample}, edge_aa={not args.no_edge_aa}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} (load average {load:.1f})")
    print(f"  {n / best_wall:8.0f} frames/s wall (best of {args.repeats})")
    print(f"  {1e3 * best_cpu / n:8.3f} ms CPU per frame ({n / best_cpu:.0f} frames per CPU-second)")
    print(f"  {n / clip_wall:8.0f} frames/s end to end (scene + trajectory + caption + render)")


if __name__ == "__main__":
    main()
