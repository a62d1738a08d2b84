"""`minwm ablate`: the paper's camera-control ablations, scaled to the toy (long experiments, not tests).

All three train the bidirectional camera stage (where the paper studies when control emerges) through the stage
entry point (stages.pipeline.run_stage) on variants of one config, evaluate every variant with the same suite
(default toy-ablate: held-out scenes, the moves control is judged on, each with its fixed-camera baseline) and
end in a table and a plot of control against the ablated quantity:

- pose-noise (Fig. 3a, exact against estimated poses): clips rendered with exact poses and with per-frame pose
  noise on the STORED cameras (`data.pose_noise_rot_deg / pose_noise_trans`, what `minwm data render
  --pose-noise` does; the frames are identical), each encoded and trained on. Values "ROT_DEG,TRANS".
- steps (Fig. 4, control against training steps): one run, its stage output copied out at each value (the run is
  resumed exactly from its checkpoint between values, so it is the same run as one of max(values) steps).
- batch-size (Fig. 5, control against batch size): one run per batch size at equal optimiser steps.

Everything lands under OUT (default runs/ablate/<config name>): data/<variant>/{clips,latents} (shared between
ablations), <ablation>/<variant>/{bidirectional,eval}, <ablation>/report.md, ablation.png, ablation.json.
A re-run skips finished renders, encodings, trainings and evaluations, so a killed ablation continues.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from minwm.errors import MinwmError
from minwm.io import atomic_path, write_json, write_text

ABLATIONS = ("pose-noise", "steps", "batch-size")
STAGE = "bidirectional"
OUTPUT_FILES = ("model.safetensors", "model_config.json", "config.yaml", "metrics.json", "loss_curve.png")
TITLES = {"pose-noise": ("Exact against noisy training poses (paper Fig. 3a)", "pose noise (rot deg, trans)"),
          "steps": ("Camera control against training steps (paper Fig. 4)", "training steps"),
          "batch-size": ("Camera control against batch size (paper Fig. 5)", "batch size")}


# ---- variants -------------------------------------------------------------------------------------------------

def default_values(ablation: str, max_steps: int, batch_size: int) -> list[str]:
    if ablation == "pose-noise":
        # 1 and 3 degrees / 0.02 and 0.06 units per frame: a third to about one toy action step (3 deg, 0.08).
        return ["0,0", "1,0.02", "3,0.06"]
    if ablation == "steps":
        return [str(v) for v in sorted({max(1, max_steps // 6), max(1, max_steps // 3), max(1, 2 * max_steps // 3),
                                        max_steps})]
    if ablation == "batch-size":
        return [str(b) for b in sorted({1, 2, 4, batch_size})]
    raise MinwmError(f"ablate: unknown ablation {ablation!r} (expected one of: {', '.join(ABLATIONS)})")


def parse_values(ablation: str, values: list[str]) -> list[Any]:
    """Check the ablated values: pose noise as (rot_deg, trans) pairs >= 0, steps and batch sizes integers >= 1."""
    if not values:
        raise MinwmError("--values: no values")
    out: list[Any] = []
    for v in values:
        if ablation == "pose-noise":
            parts = str(v).split(",")
            try:
                rot, trans = (float(p) for p in parts)
            except ValueError:
                raise MinwmError(f"--values {v}: expected ROT_DEG,TRANS (e.g. 2,0.05)") from None
            if rot < 0 or trans < 0:
                raise MinwmError(f"--values {v}: pose noise must be >= 0")
            out.append((rot, trans))
        else:
            try:
                n = int(v)
            except ValueError:
                raise MinwmError(f"--values {v}: expected an integer") from None
            if n < 1:
                raise MinwmError(f"--values {v}: expected >= 1")
            out.append(n)
    if len(set(out)) != len(out):
        raise MinwmError(f"--values: repeated value in {', '.join(map(str, values))}")
    return sorted(out)


def variant_name(ablation: str, value: Any) -> str:
    if ablation == "pose-noise":
        return "exact" if value == (0.0, 0.0) else f"noise-{value[0]:g}deg-{value[1]:g}"
    return f"{'steps' if ablation == 'steps' else 'batch'}-{value}"


def value_label(ablation: str, value: Any) -> str:
    if ablation == "pose-noise":
        return "exact" if value == (0.0, 0.0) else f"{value[0]:g} deg, {value[1]:g}"
    return str(value)


# ---- one variant's data and training --------------------------------------------------------------------------

def _load(config: str | Path, overrides: dict):
    from minwm.config import load_config

    return load_config(config, overrides)


def ensure_data(cfg, root: Path, noise: tuple[float, float], clips: Optional[int], echo) -> Path:
    """Render (once) and encode (resumable) the clips of one pose-noise level; returns the latent cache path."""
    import dataclasses

    from minwm.data.procedural import render_dataset
    from minwm.stages.pipeline import encode_latents

    data_cfg = dataclasses.replace(cfg["data"], pose_noise_rot_deg=noise[0], pose_noise_trans=noise[1],
                                   **({"num_clips": clips} if clips else {}))
    name = variant_name("pose-noise", noise) + f"-{data_cfg.num_clips}clips"
    clip_dir, lat_dir = root / name / "clips", root / name / "latents"
    if not (clip_dir / "index.json").is_file():
        echo(f"ablate: rendering {data_cfg.num_clips} clips into {clip_dir}")
        with atomic_path(clip_dir) as tmp:
            render_dataset(data_cfg, tmp, actions=cfg["actions"], progress=True)
    cfg["stages"] = dataclasses.replace(cfg["stages"], latents=str(lat_dir))
    encode_latents(clip_dir, cfg, echo)
    return lat_dir


def snapshot(src: Path, dst: Path) -> None:
    """Copy a finished stage output (weights, configs, metrics) to dst, atomically."""
    with atomic_path(dst) as tmp:
        tmp.mkdir(parents=True)
        for f in OUTPUT_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / f)


def _evaluated(eval_dir: Path, suite: str) -> Optional[dict]:
    try:
        m = json.loads((eval_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and (m.get("suite") or {}).get("name") == suite else None


# ---- the ablation -----------------------------------------------------------------------------------------------

def run_ablation(ablation: str, config: str | Path, out: Optional[str | Path] = None, *,
                 values: Optional[list[str]] = None, suite: str = "toy-ablate", max_steps: Optional[int] = None,
                 clips: Optional[int] = None, vae: Optional[str] = None, threads: int = 1, pose_workers: int = 1,
                 echo=print) -> dict:
    """Train and evaluate every variant of `ablation`; writes OUT/<ablation>/report.md, ablation.png and
    ablation.json and returns the ablation.json content."""
    from minwm.eval.runner import evaluate
    from minwm.eval.suite import get_suite
    from minwm.stages import common
    from minwm.stages.config import stage_train_config
    from minwm.stages.pipeline import run_stage

    if ablation not in ABLATIONS:
        raise MinwmError(f"ablate: unknown ablation {ablation!r} (expected one of: {', '.join(ABLATIONS)})")
    get_suite(suite)
    if clips is not None and clips < 1:
        raise MinwmError(f"--clips: expected >= 1, got {clips}")
    if max_steps is not None and max_steps < 1:
        raise MinwmError(f"--max-steps: expected >= 1, got {max_steps}")
    config = Path(config)
    base_over: dict[str, Any] = {"stages": {"threads": threads}} if threads else {}
    if vae:
        base_over["codec"] = {"vae": str(Path(vae).resolve())}
    cfg = _load(config, base_over)
    if not cfg["codec"].vae:
        raise MinwmError(f"{config}: codec.vae is not set; the ablations encode clips and decode generated video "
                         f"with a trained VAE (run `minwm train vae` first, then pass --vae DIR or set codec.vae)")
    if not Path(cfg["codec"].vae).is_dir():
        raise MinwmError(f"{config}: codec.vae {cfg['codec'].vae}: VAE directory not found")
    train = stage_train_config(cfg, STAGE)
    n_steps = max_steps or train.max_steps
    parsed = parse_values(ablation, values or default_values(ablation, n_steps, train.batch_size))
    root = Path(out) if out else Path("runs") / "ablate" / config.stem
    adir = root / ablation
    data_root = root / "data"

    def stage_over(**train_over) -> dict:
        return {**base_over, "stages": {**base_over.get("stages", {}), STAGE: {"train": train_over}}}

    variants: list[tuple[Any, Path]] = []          # (value, checkpoint dir)
    if ablation == "steps":
        cfg_v = _load(config, stage_over())
        ensure_data(cfg_v, data_root, (0.0, 0.0), clips, echo)
        run_dir = adir / "run" / STAGE
        for v in parsed:
            ckpt = adir / variant_name(ablation, v) / STAGE
            if not common.is_complete(ckpt):
                echo(f"ablate steps: training {run_dir} to step {v}")
                run_stage(STAGE, cfg_v, run_dir, resume=True, max_steps=v)
                done = json.loads((run_dir / common.METRICS).read_text()).get("steps")
                if done != v:
                    raise MinwmError(f"{run_dir}: the run is at step {done}, not {v} (it went past this value "
                                     f"before); delete {run_dir.parent} to redo the steps ablation")
                snapshot(run_dir, ckpt)
            variants.append((v, ckpt))
    else:
        for v in parsed:
            if ablation == "pose-noise":
                cfg_v = _load(config, stage_over(max_steps=n_steps))
                ensure_data(cfg_v, data_root, v, clips, echo)
            else:
                cfg_v = _load(config, stage_over(max_steps=n_steps, batch_size=v))
                ensure_data(cfg_v, data_root, (0.0, 0.0), clips, echo)
            ckpt = adir / variant_name(ablation, v) / STAGE
            if not common.is_complete(ckpt):
                echo(f"ablate {ablation}: training {ckpt}")
                run_stage(STAGE, cfg_v, ckpt, resume=True)
            variants.append((v, ckpt))

    rows = []
    for v, ckpt in variants:
        name = variant_name(ablation, v)
        eval_dir = ckpt.parent / "eval"
        res = _evaluated(eval_dir, suite)
        if res is None:
            echo(f"ablate {ablation}: evaluating {name}")
            res = evaluate({name: ckpt}, suite, eval_dir, threads=threads, pose_workers=pose_workers, echo=echo)
        c = res["checkpoints"][name]
        rows.append({"variant": name, "value": list(v) if isinstance(v, tuple) else v,
                     "label": value_label(ablation, v), "checkpoint": str(ckpt), "eval": str(eval_dir / "report.md"),
                     **{k: c.get(k) for k in ("rot_err", "rot_err_deg", "trans_err", "cam_mc", "direction_accuracy",
                                              "psnr", "ssim", "pose_failures")},
                     "baseline": {k: (c.get("baseline") or {}).get(k)
                                  for k in ("rot_err_deg", "trans_err", "direction_accuracy", "psnr", "ssim")}})
    result = {"ablation": ablation, "config": str(config), "suite": suite, "stage": STAGE,
              "max_steps": n_steps, "clips": clips or cfg["data"].num_clips, "rows": rows}
    write_ablation_report(result, adir)
    echo(f"ablate {ablation}: wrote {adir / 'report.md'}")
    return result


# ---- report -----------------------------------------------------------------------------------------------------

def plot_ablation(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result["rows"]
    ab = result["ablation"]
    numeric = ab in ("steps", "batch-size")
    x = np.array([r["value"] for r in rows], dtype=float) if numeric else np.arange(len(rows))
    panels = (("rot_err_deg", "RotErr (deg/frame), lower is better"), ("trans_err", "TransErr, lower is better"),
              ("direction_accuracy", "Direction accuracy, higher is better"), ("psnr", "PSNR (dB)"))
    fig, axes = plt.subplots(1, 4, figsize=(16, 4), layout="constrained")
    val = lambda v: np.nan if v is None else v  # noqa: E731
    for (key, title), ax in zip(panels, axes):
        ax.plot(x, [val(r.get(key)) for r in rows], "o-", color="tab:blue", label="model")
        ax.plot(x, [val(r["baseline"].get(key)) for r in rows], "s--", color="tab:gray",
                label="baseline (fixed camera)")
        if ab == "batch-size":
            ax.set_xscale("log", base=2)
        ax.set_xticks(x, [r["label"] for r in rows])
        ax.set_xlabel(TITLES[ab][1])
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{TITLES[ab][0]}: bidirectional stage, suite {result['suite']}")
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def write_ablation_report(result: dict, adir: Path) -> None:
    from minwm.eval.report import fmt, table

    adir.mkdir(parents=True, exist_ok=True)
    plot_ablation(result, adir / "ablation.png")
    ab = result["ablation"]
    rows = [[r["label"], fmt(r.get("rot_err_deg"), 2), fmt(r.get("trans_err")), fmt(r.get("cam_mc")),
             fmt(r.get("direction_accuracy"), 2), fmt(r["baseline"].get("direction_accuracy"), 2),
             fmt(r.get("psnr"), 2), fmt(r.get("ssim")), fmt(r.get("pose_failures")),
             f"[report]({Path(r['eval']).relative_to(adir) if Path(r['eval']).is_relative_to(adir) else r['eval']})"]
            for r in result["rows"]]
    lines = [f"# {TITLES[ab][0]}", "",
             f"Config `{result['config']}`, stage `{result['stage']}`, {result['clips']} training clips, "
             f"{result['max_steps']} steps per run unless the steps are the ablated quantity; evaluated on suite "
             f"`{result['suite']}` (held-out scenes; the baseline is each checkpoint with a fixed camera).", "",
             table([TITLES[ab][1], "RotErr deg/frame", "TransErr", "CamMC", "Dir. acc.", "baseline Dir. acc.",
                    "PSNR", "SSIM", "pose failures", "eval"], rows), "",
             "![ablation](ablation.png)", "",
             "Control shows as RotErr / TransErr below the baseline's and direction accuracy above it; where model "
             "and baseline coincide the camera input is being ignored.", ""]
    write_text(adir / "report.md", "\n".join(lines))
    write_json(adir / "ablation.json", result)
