"""report.md + PNGs + metrics.json of an evaluation (eval/runner.py's result), written atomically as one folder.

Figures: error against frame index (camera errors, PSNR, SSIM; each checkpoint solid, its fixed-camera baseline
dashed, the estimator on the render dotted), per-stage bars (model against baseline for every metric), frame
strips (render, each checkpoint, each baseline) and estimated trajectories against the commanded ones.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from minwm.io import atomic_path

COLUMNS = (("rot_err", "RotErr (rad, sum)", 3), ("rot_err_deg", "RotErr (deg/frame)", 2),
           ("trans_err", "TransErr", 3), ("cam_mc", "CamMC", 3), ("direction_accuracy", "Dir. acc.", 2),
           ("psnr", "PSNR (dB)", 2), ("ssim", "SSIM", 3))
BAR_METRICS = (("rot_err_deg", "RotErr (deg/frame), lower is better"), ("trans_err", "TransErr, lower is better"),
               ("cam_mc", "CamMC, lower is better"), ("direction_accuracy", "Direction accuracy, higher is better"),
               ("psnr", "PSNR (dB), higher is better"), ("ssim", "SSIM, higher is better"))


def fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(v)
    return f"{float(v):.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    plt = _plt()
    try:
        fig.savefig(path, dpi=100, format="png")
    finally:
        plt.close(fig)


def _colours(n: int) -> list:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


# ---- figures ------------------------------------------------------------------------------------------------

def plot_error_vs_frame(result: dict, path: Path, long: bool = False) -> bool:
    """Four panels over the pixel frame index; returns False when there is nothing to draw."""
    plt = _plt()
    ckpts = result["checkpoints"]
    pick = (lambda d: d.get("long") if d else None) if long else (lambda d: d)
    panels = (("rot_deg", "rotation error (deg)"), ("trans", "translation error (normalised)"),
              ("psnr", "PSNR (dB)"), ("ssim", "SSIM"))
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), layout="constrained")
    drawn = False
    ref = (result.get("reference") or {}).get("estimator_long" if long else "estimator")
    cols = _colours(len(ckpts))
    shade = None
    for (key, label), ax in zip(panels, axes.ravel()):
        for (name, c), col in zip(ckpts.items(), cols):
            for which, style in ((c, "-"), (c.get("baseline"), "--")):
                d = pick(which)
                y = (d or {}).get("per_frame", {}).get(key) if d else None
                if not y or all(v is None for v in y):
                    continue
                yy = np.array([np.nan if v is None else v for v in y], dtype=float)
                ax.plot(np.arange(len(yy)), yy, style, color=col, lw=1.6,
                        label=name if style == "-" else f"{name} baseline (fixed camera)")
                drawn = True
            shade = c.get("camera_from_frame") if key in ("rot_deg", "trans") else c.get("scored_from_frame")
        if ref and key in ("rot_deg", "trans"):
            y = ref.get("per_frame", {}).get(key)
            if y:
                yy = np.array([np.nan if v is None else v for v in y], dtype=float)
                ax.plot(np.arange(len(yy)), yy, ":", color="k", lw=1.4, label="render (estimator floor)")
        if shade:
            ax.axvspan(-0.5, shade - 0.5, color="0.85", zorder=0, label="context (given, not scored)")
        ax.set_xlabel("pixel frame")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes.ravel()[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8)
    what = "long walks" if long else "cases at the training clip length"
    fig.suptitle(f"Error against frame index ({what}; mean over cases)")
    _save(fig, path)
    return drawn


def plot_stage_bars(result: dict, path: Path) -> None:
    plt = _plt()
    ckpts = result["checkpoints"]
    names = list(ckpts)
    ref = (result.get("reference") or {}).get("estimator") or {}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), layout="constrained")
    x = np.arange(len(names))
    w = 0.38
    for (key, title), ax in zip(BAR_METRICS, axes.ravel()):
        m = [ckpts[n].get(key) for n in names]
        b = [(ckpts[n].get("baseline") or {}).get(key) for n in names]
        mv = [np.nan if v is None else v for v in m]
        bv = [np.nan if v is None else v for v in b]
        ax.bar(x - w / 2, mv, w, label="model", color="tab:blue")
        ax.bar(x + w / 2, bv, w, label="baseline (fixed camera)", color="tab:gray", hatch="//", alpha=0.8)
        if ref.get(key) is not None and key not in ("psnr", "ssim"):
            ax.axhline(ref[key], color="k", ls=":", lw=1.2, label="render (estimator floor)")
        for xi, v, off in [(xi, v, -w / 2) for xi, v in zip(x, mv)] + [(xi, v, w / 2) for xi, v in zip(x, bv)]:
            if np.isfinite(v):
                ax.text(xi + off, v, fmt(v, 2), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, names, rotation=20 if len(names) > 3 else 0)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle("Per checkpoint: model against its fixed-camera baseline")
    _save(fig, path)


def _upscale(img: np.ndarray, min_side: int = 96) -> np.ndarray:
    k = max(1, int(math.ceil(min_side / min(img.shape[:2]))))
    return img.repeat(k, 0).repeat(k, 1) if k > 1 else img


def strip_frames(n_frames: int, start: int, count: int = 6) -> list[int]:
    """`count` pixel frames from the last context frame to the end, evenly spaced, ends included."""
    if n_frames - start <= count:
        return list(range(start, n_frames))
    return sorted({int(round(v)) for v in np.linspace(start, n_frames - 1, count)})


def plot_strip(case: str, sc: dict, path: Path) -> None:
    plt = _plt()
    rows = [("render (ground truth)", sc["gt"])] + [(k, v) for k, v in sc.items()
                                                     if isinstance(v, np.ndarray) and k != "gt"]
    picks = strip_frames(len(sc["gt"]), sc["start"])
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.6 * len(picks) + 0.4, 1.95 * len(rows) + 0.6),
                             layout="constrained", squeeze=False)
    for ax, (label, frames) in zip(axes[:, 0], rows):
        tiles = [_upscale(frames[min(p, len(frames) - 1)]) for p in picks]
        gap = np.full((tiles[0].shape[0], 3, 3), 255, np.uint8)
        row = np.concatenate(sum(([t, gap] for t in tiles), [])[:-1], 1)
        ax.imshow(row)
        ax.set_yticks([])
        step = tiles[0].shape[1] + 3
        ax.set_xticks([step * i + tiles[0].shape[1] / 2 for i in range(len(picks))], [str(p) for p in picks],
                      fontsize=7)
        ax.set_title(label, loc="left", fontsize=8)
    fig.suptitle(f"{case}: '{sc['program']}' (pixel frames; frame {sc['start']} is the last context frame)",
                 fontsize=9)
    _save(fig, path)


def _normalised_path(cams, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, z) of the camera centres relative to frame `start`, scaled by the largest distance, and the
    yaw / pitch (degrees) relative to it."""
    rel = cams[start:].relative_to_first().c2w.numpy()
    pos = rel[:, :3, 3]
    scale = np.linalg.norm(pos, axis=1).max()
    pos = pos / scale if scale > 1e-9 else pos * 0
    R = rel[:, :3, :3]
    yaw = np.degrees(np.arctan2(R[:, 0, 2], R[:, 2, 2]))
    pitch = np.degrees(np.arcsin(np.clip(-R[:, 1, 2], -1, 1)))
    return pos, yaw, pitch


def plot_trajectories(showcase: dict, path: Path) -> bool:
    plt = _plt()
    cases = [(k, v) for k, v in showcase.items() if v.get("estimated")]
    if not cases:
        return False
    fig, axes = plt.subplots(len(cases), 2, figsize=(12, 3.6 * len(cases)), layout="constrained", squeeze=False)
    for (name, sc), (ax_p, ax_r) in zip(cases, axes):
        start = sc["start"]
        series = [("commanded", sc["gt_cameras"], "k", "-")]
        labels = list(sc["estimated"])
        cols = _colours(len(labels))
        for lab, col in zip(labels, cols):
            style = "--" if lab.endswith("(baseline)") else (":" if lab.startswith("render") else "-")
            series.append((lab, sc["estimated"][lab], col, style))
        frames = np.arange(start, len(sc["gt"]))
        for lab, cams, col, style in series:
            pos, yaw, pitch = _normalised_path(cams, start)
            lw = 2.4 if lab == "commanded" else 1.4
            ax_p.plot(pos[:, 0], pos[:, 2], style, color=col, lw=lw, label=lab)
            ax_r.plot(frames, yaw, style, color=col, lw=lw, label=f"{lab} yaw")
            if np.abs(pitch).max() > 0.5:
                ax_r.plot(frames, pitch, style, color=col, lw=lw * 0.6, alpha=0.6)
        ax_p.set_title(f"{name}: path seen from above (normalised scale)", fontsize=9)
        ax_p.set_xlabel("x (right)")
        ax_p.set_ylabel("z (forward)")
        ax_p.set_aspect("equal", adjustable="datalim")
        ax_p.grid(alpha=0.3)
        ax_r.set_title(f"{name}: yaw (thick) and pitch (thin) from frame {start}", fontsize=9)
        ax_r.set_xlabel("pixel frame")
        ax_r.set_ylabel("degrees")
        ax_r.grid(alpha=0.3)
        ax_p.legend(fontsize=7, loc="best")
    fig.suptitle("Estimated camera against the commanded trajectory")
    _save(fig, path)
    return True


# ---- markdown -----------------------------------------------------------------------------------------------

def _row(label: str, d: Optional[dict], extra: list[str]) -> list[str]:
    d = d or {}
    return [label] + extra + [fmt(d.get(k), n) for k, _, n in COLUMNS] + \
        [fmt(d.get("pose_failures")) if d.get("pose_failures") is not None else "–"]


def summary_table(result: dict, long: bool = False) -> str:
    header = ["run", "stage / sampler"] + [h for _, h, _ in COLUMNS] + ["pose failures"]
    rows = []
    for name, c in result["checkpoints"].items():
        d, b = (c.get("long"), (c.get("baseline") or {}).get("long")) if long else (c, c.get("baseline"))
        how = f"{c.get('stage') or '?'} / {c.get('sampler')} ({c.get('steps')} steps)"
        rows.append(_row(f"**{name}**", d, [how]))
        if c.get("camera"):
            rows.append(_row(f"{name} baseline (fixed camera)", b, [how]))
    ref = (result.get("reference") or {}).get("estimator_long" if long else "estimator")
    if ref:
        rows.append(_row("render (estimator floor)", ref, ["ground truth"]))
    rt = None if long else (result.get("reference") or {}).get("vae_roundtrip")
    if rt:
        rows.append(_row("render through the VAE (a perfect model)", rt, ["ground truth, VAE encode + decode"]))
    return table(header, rows)


def control_table(result: dict) -> str:
    rows = []
    for name, c in result["checkpoints"].items():
        b = c.get("baseline") or {}
        if not c.get("camera"):
            rows.append([name, "–", "–", "–", "no camera input"])
            continue

        def diff(k, sign=1.0):
            x, y = c.get(k), b.get(k)
            return "–" if x is None or y is None else f"{sign * (y - x) + 0.0:+.3f}"
        if c.get("num_cases") and (c.get("pose_failures") or 0) >= c["num_cases"]:
            verdict = "unreadable: the pose estimator failed on every video"
        elif (c.get("direction_accuracy") or 0) > (b.get("direction_accuracy") or 0) + 0.1:
            verdict = "the camera controls the motion"
        else:
            verdict = "little or no control"
        rows.append([name, diff("rot_err_deg"), diff("trans_err"), diff("direction_accuracy", -1.0), verdict])
    return table(["checkpoint", "RotErr deg/frame: baseline - model", "TransErr: baseline - model",
                  "Dir. acc.: model - baseline", "reading"], rows)


def trajectory_table(c: dict) -> str:
    per = c.get("per_trajectory") or {}
    base = (c.get("baseline") or {}).get("per_trajectory") or {}
    rows = []
    for t, d in per.items():
        b = base.get(t, {})
        rows.append([t, fmt(d.get("rot_err_deg"), 2), fmt(d.get("trans_err")), fmt(d.get("direction_accuracy"), 2),
                     fmt(d.get("psnr"), 2), fmt(d.get("ssim")), fmt(b.get("rot_err_deg"), 2),
                     fmt(b.get("direction_accuracy"), 2)])
    return table(["trajectory", "RotErr deg/frame", "TransErr", "Dir. acc.", "PSNR", "SSIM", "baseline RotErr",
                  "baseline Dir. acc."], rows)


def render_markdown(result: dict, figures: dict[str, str]) -> str:
    s = result["suite"]
    ckpts = result["checkpoints"]
    first = next(iter(ckpts.values()))
    given = first.get("conditioning") or ""
    lines = [f"# minwm eval: suite `{s['name']}`", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}; {s['cases']} held-out cases ({s['description']}); "
             f"{len(ckpts)} checkpoint(s); {result['time_s']:.0f} s in all ({result['threads']} thread(s)).", "",
             "## How this was measured", "",
             f"- **Ground truth.** Each case is a held-out procedural scene rendered exactly along the commanded "
             f"trajectory (scene seed {s['seed']}, never a training data.seed; objects are kept clear of each "
             f"path as in training). The prompt is the scene's caption.",
             f"- **What the model is given.** {given[:1].upper() + given[1:]}; the rest of the clip "
             f"({first.get('latent_frames')} latent frames in all) is generated along the trajectory. Streaming "
             f"checkpoints continue from that cache chunk by chunk; a bidirectional checkpoint samples the whole "
             f"clip with the same context held on its noising path (multi-step, CFG"
             + (f", {s['multistep_steps']} steps" if s.get('multistep_steps') else "") + ").",
             "- **Baseline.** The same checkpoint, seeds and context with its camera input replaced by a fixed "
             "camera (every latent frame at the start camera). The gap between a checkpoint and its baseline is the "
             "control the camera gives; a model that ignores its camera scores the same as its baseline.",
             "- **Camera metrics.** The camera of every frame is estimated from the decoded video "
             "(minwm.eval.pose) and compared with the exact cameras from the last context frame on (CamI2V "
             "definitions: RotErr sums per-frame geodesic angles in radians, RotErr deg/frame is their mean, "
             "TransErr and CamMC use translations normalised by each trajectory's largest). Dir. acc. is the "
             "fraction of commanded (step, axis) pairs that moved the commanded way (pause excluded). The "
             "estimator run on the render itself gives the floor (*render (estimator floor)*); run on the render "
             "passed through the VAE (*a perfect model*), it gives the best scores any model decoded by this VAE "
             "can get. A video the estimator cannot read is a pose failure: left out of the errors, direction "
             "accuracy 0.",
             "- **Image metrics.** PSNR / SSIM per generated frame against the render (context frames are not "
             "scored). Context VAE round trip: "
             f"{fmt((result.get('reference') or {}).get('context_psnr'), 2)} dB, the ceiling a perfect model "
             "could reach with this VAE.",
             "- Errors: lower is better; Dir. acc., PSNR, SSIM: higher is better. Headline rows average the cases "
             "at the training clip length; long walks are reported separately.", ""]
    notes = [f"- **{n}**: {c['note']}" for n, c in ckpts.items() if c.get("note")]
    notes += [f"- **{n}**: the pose estimator could not read {c['pose_failures']} of {c['num_cases']} generated "
              f"videos (too flat, or changing too much between frames), so its camera errors describe only the "
              f"rest; look at the frame strips." for n, c in ckpts.items()
              if c.get("camera") and c.get("num_cases") and (c.get("pose_failures") or 0) * 2 > c["num_cases"]]
    if notes:
        lines += ["## Notes", ""] + notes + [""]
    lines += ["## Summary", "", summary_table(result), "", "## Control the camera gives", "", control_table(result),
              ""]
    if "error_vs_frame" in figures:
        lines += ["## Error against frame index", "", f"![error against frame index]({figures['error_vs_frame']})",
                  ""]
    if "stages" in figures:
        title = "Per-stage comparison" if len(ckpts) > 1 else "Model against baseline"
        lines += [f"## {title}", "", f"![{title.lower()}]({figures['stages']})", ""]
    lines += ["## Per trajectory", ""]
    for n, c in ckpts.items():
        lines += [f"### {n}", "", trajectory_table(c), ""]
    if any(c.get("long") for c in ckpts.values()):
        lines += ["## Long walks", "", f"Trajectories {', '.join(s['long'])} at {s['long_factor']}x the clip "
                  "length.", "", summary_table(result, long=True), ""]
        if "error_vs_frame_long" in figures:
            lines += [f"![long walks]({figures['error_vs_frame_long']})", ""]
    strips = [k for k in figures if k.startswith("strip:")]
    if strips:
        lines += ["## Frame strips", "", "Rows: the render, then each checkpoint and its baseline; columns: pixel "
                  "frames from the last context frame to the end.", ""]
        lines += [f"![{k[6:]}]({figures[k]})" for k in strips] + [""]
    if "trajectories" in figures:
        lines += ["## Estimated trajectories", "", f"![trajectories]({figures['trajectories']})", ""]
    fails = [(n, r["name"], r["pose_error"]) for n, c in ckpts.items() for r in c.get("cases", [])
             if r.get("pose_error")]
    fails += [(f"{n} baseline", r["name"], r["pose_error"]) for n, c in ckpts.items()
              for r in (c.get("baseline") or {}).get("cases", []) or [] if r.get("pose_error")]
    if fails:
        lines += ["## Pose failures", ""] + [f"- {n}, {case}: {err}" for n, case, err in fails[:40]]
        if len(fails) > 40:
            lines.append(f"- ... {len(fails) - 40} more (metrics.json)")
        lines.append("")
    lines += ["## Runs", "", table(["checkpoint", "path", "camera", "time (s)"],
                                   [[n, f"`{c['path']}`", c.get("camera_kind", "?"), fmt(c.get("time_s"), 1)]
                                    for n, c in ckpts.items()]), ""]
    return "\n".join(lines)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def write_report(result: dict, out_dir: str | Path, showcase: Optional[dict] = None) -> Path:
    """Write report.md, metrics.json and the figures into out_dir (replaced as a whole, atomically)."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        figures: dict[str, str] = {}
        if plot_error_vs_frame(result, tmp / "error_vs_frame.png"):
            figures["error_vs_frame"] = "error_vs_frame.png"
        else:
            (tmp / "error_vs_frame.png").unlink(missing_ok=True)
        if any(c.get("long") for c in result["checkpoints"].values()):
            if plot_error_vs_frame(result, tmp / "error_vs_frame_long.png", long=True):
                figures["error_vs_frame_long"] = "error_vs_frame_long.png"
        plot_stage_bars(result, tmp / "stages.png")
        figures["stages"] = "stages.png"
        for case, sc in (showcase or {}).items():
            f = f"strip_{_slug(case)}.png"
            plot_strip(case, sc, tmp / f)
            figures[f"strip:{case}"] = f
        if showcase and plot_trajectories(showcase, tmp / "trajectories.png"):
            figures["trajectories"] = "trajectories.png"
        (tmp / "report.md").write_text(render_markdown(result, figures))
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return out_dir
