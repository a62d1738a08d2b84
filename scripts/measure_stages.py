"""Measure that the bidirectional and ar stages' losses fall on the toy (procedural world, tiny Wan, PRoPE).

    python scripts/measure_stages.py WORKDIR [--clips 32] [--vae-steps 60] [--steps 60] [--batch 4]

Renders clips, trains the toy VAE briefly, encodes the latent cache, trains `bidirectional` then `ar` from it with
configs/toy.yaml (step counts and batch overridden), and prints first/last-20-step mean losses; the loss curves
are WORKDIR/<stage>/loss_curve.png. Every step resumes if the script is killed and started again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def minwm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "minwm", *args], cwd=ROOT, check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--vae-steps", type=int, default=60)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args()
    w = Path(a.workdir).resolve()
    w.mkdir(parents=True, exist_ok=True)
    import yaml

    cfg = yaml.safe_load((ROOT / "configs/toy.yaml").read_text())
    cfg["data"]["num_clips"] = a.clips
    cfg["codec"]["vae"] = str(w / "vae")
    cfg["stages"]["vae"] = {"data": str(w / "clips"), "heldout_clips": 4, "eval_every": 20,
                            "train": {"max_steps": a.vae_steps, "ckpt_every": 20}}
    cfg["stages"]["latents"] = str(w / "latents")
    cfg["train"].update(batch_size=a.batch, lr_warmup_steps=10, ckpt_every=20)
    for s in ("bidirectional", "ar"):
        cfg["stages"][s]["train"] = {"max_steps": a.steps}
    cfg_path = w / "toy.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.time()
    if not (w / "clips").exists():
        minwm("data", "render", "--config", str(cfg_path), "--out", str(w / "clips"), "--quiet")
    print(f"render done {time.time() - t0:.0f}s", flush=True)
    if not (w / "vae" / "metrics.json").exists():
        minwm("train", "vae", "--config", str(cfg_path), "--out", str(w / "vae"), "--resume")
    print(f"vae done {time.time() - t0:.0f}s", flush=True)
    minwm("data", "encode", "--config", str(cfg_path), "--data", str(w / "clips"), "--out", str(w / "latents"),
          "--quiet")
    print(f"encode done {time.time() - t0:.0f}s", flush=True)
    if not (w / "bidirectional" / "metrics.json").exists():
        minwm("train", "bidirectional", "--config", str(cfg_path), "--out", str(w / "bidirectional"), "--resume")
    print(f"bidirectional done {time.time() - t0:.0f}s", flush=True)
    if not (w / "ar" / "metrics.json").exists():
        minwm("train", "ar", "--config", str(cfg_path), "--init", str(w / "bidirectional"), "--out", str(w / "ar"),
              "--resume")
    print(f"ar done {time.time() - t0:.0f}s", flush=True)
    for s in ("bidirectional", "ar"):
        m = json.loads((w / s / "metrics.json").read_text())
        h = m["history"]
        first = sum(r["model/loss"] for r in h[:20]) / len(h[:20])
        last = sum(r["model/loss"] for r in h[-20:]) / len(h[-20:])
        st = sorted(r["step_time"] for r in h)[len(h) // 2]
        print(f"{s}: {m['steps']} steps, batch {a.batch}: loss first-20 mean {first:.4f} -> last-20 mean {last:.4f}; "
              f"median step {st:.2f}s; curve {w / s / 'loss_curve.png'}", flush=True)


if __name__ == "__main__":
    main()
