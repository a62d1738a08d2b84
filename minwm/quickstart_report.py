"""The quickstart's evaluation adapter, sample videos, training-curve figure, report.md and summary.json.

summary.json (the machine-readable result of `minwm quickstart`):
    eval         stage name (bidirectional, ar, cd or ode, dmd) -> that checkpoint's entry of `minwm eval`'s
                 metrics.json (its "checkpoints"; eval_suite and eval_reference hold the rest)
    bench        bench.json of `minwm bench latency` for the final model's config
    wall_time_s  step name -> seconds (render, vae, encode, each stage, eval, samples, bench, report,
                 total; install time is not seen from inside the command)
    plus settings, the final checkpoint, the play command and the acceptance checks of issue #8.

report.md puts in one page: the latency table (Table 1 for the toy), the controllability table per stage beside
the no-camera baseline, a frame strip per stage for one held-out prompt and trajectory, a GIF per stage, the
training curves and the command to play the final model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

STAGE_TITLE = {"bidirectional": "Phase 1: bidirectional + camera", "ar": "Stage 1: teacher-forcing AR",
               "cd": "Stage 2: causal CD", "ode": "Stage 2: causal ODE", "dmd": "Stage 3: DMD"}
UPSCALE = 2   # 64x64 toy frames are hard to read at 1:1 in a report


# ---- evaluation ---------------------------------------------------------------------------------------------
def quick_suite():
    """The quickstart's evaluation: 2 held-out scenes x the ten single actions (what issue #8's direction accuracy
    is judged on). About a third of toy-heldout's cost, which does not fit the quickstart's 20 minutes with four
    checkpoints; `--suite toy-heldout` runs the full one. To hold the 20 minutes (a fresh-clone run took 19:49
    with 20 steps), the multi-step samplers (bidirectional, AR) take 10 UniPC steps instead of toy-heldout's 20,
    and there is no VAE round-trip row (its 20 extra pose estimates cost about 40 s; `minwm eval --vae-floor` adds it)."""
    from minwm.eval.suite import SINGLE_KEYS, Suite

    return Suite(name="quickstart", description="2 held-out scenes x the ten single actions held for the clip",
                 scenes=2, trajectories=tuple(f"hold_{k}" for k in SINGLE_KEYS), multistep_steps=10,
                 strips=("hold_w", "hold_l"), vae_floor=False)


def resolve_suite(name: str):
    from minwm.eval.suite import get_suite

    return quick_suite() if name == "quickstart" else get_suite(name)


def evaluate_all(ckpts: dict[str, Path], out_dir: Path, suite: str = "quickstart", device: str = "cpu",
                 progress: bool = True, echo=print) -> dict:
    """`minwm eval` of every stage in one run (the ground truth renders and the estimator's reference are shared)
    into out_dir; its metrics.json, written last with the rest, is the step's completion marker."""
    from minwm.eval.runner import evaluate

    return evaluate({k: str(v) for k, v in ckpts.items()}, suite=resolve_suite(suite), out_dir=out_dir,
                    device=device, progress=progress, echo=echo)


def single_action_metrics(c: Optional[dict]) -> dict:
    """Mean direction accuracy and RotErr over the single-action trajectories (hold_<key>) of one checkpoint's
    eval entry and of its fixed-camera baseline (None where not measured)."""
    from minwm.eval.suite import SINGLE_KEYS

    def mean(per: dict, key: str) -> Optional[float]:
        vals = [per[f"hold_{k}"].get(key) for k in SINGLE_KEYS if f"hold_{k}" in per]
        vals = [v for v in vals if isinstance(v, (int, float))]
        return sum(vals) / len(vals) if vals else None

    c = c or {}
    per, base = c.get("per_trajectory") or {}, (c.get("baseline") or {}).get("per_trajectory") or {}
    return {"direction_accuracy": mean(per, "direction_accuracy"), "rot_err_deg": mean(per, "rot_err_deg"),
            "baseline_direction_accuracy": mean(base, "direction_accuracy"),
            "baseline_rot_err_deg": mean(base, "rot_err_deg")}


# ---- sample videos -----------------------------------------------------------------------------------------
SAMPLE_TRAJECTORY = "walk_then_turn"


def upscale(frames: np.ndarray, k: int = UPSCALE) -> np.ndarray:
    return frames.repeat(k, axis=-3).repeat(k, axis=-2) if k > 1 else frames


def write_gif(path: Path, frames: np.ndarray, fps: int) -> None:
    import imageio.v2 as imageio

    from minwm.io import atomic_path

    with atomic_path(path) as tmp:
        imageio.mimsave(str(tmp), list(upscale(frames)), format="GIF", duration=1.0 / max(1, fps), loop=0)


def strip_indices(n_frames: int, temporal_factor: int = 4) -> list[int]:
    """The pixel frame of every latent frame (0, 4, 8, ...): one thumbnail per step of the trajectory."""
    return list(range(0, n_frames, temporal_factor))


def plot_strips(rows: list[tuple[str, np.ndarray]], path: Path, title: str, context_end: int = 0) -> None:
    """One row of thumbnails per (label, frames); frames up to context_end are the given context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minwm.io import atomic_path

    idx = strip_indices(len(rows[0][1]))
    fig, axes = plt.subplots(len(rows), len(idx), figsize=(1.3 * len(idx) + 1.8, 1.4 * len(rows) + 0.3),
                             squeeze=False)
    for r, (label, frames) in enumerate(rows):
        for c, i in enumerate(idx):
            ax = axes[r][c]
            if i < len(frames):
                ax.imshow(frames[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {i}" + (" (context)" if i <= context_end else ""), fontsize=7)
        axes[r][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(str(tmp), dpi=110, format="png")
    plt.close(fig)


def make_samples(ckpts: dict[str, Path], out_dir: Path, suite: str = "quickstart", device: str = "cpu",
                 progress: bool = True) -> dict:
    """One held-out case (scene 0 of the eval suite, walk then turn) through every stage, generated exactly as
    the eval generates its cases (same context, prompt and seed): OUT/samples/<stage>.gif, the render
    (reference.gif), strips.png; samples.json, written last, lists them."""
    from tqdm import tqdm

    from minwm.cameras.actions import parse_actions
    from minwm.eval.checkpoints import CheckpointRunner
    from minwm.eval.runner import case_seed
    from minwm.eval.suite import Case, render_case
    from minwm.io import write_json
    from minwm.worlds.trajectories import eval_trajectories

    s = resolve_suite(suite)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, files, info = [], {}, {}
    for stage, ckpt in tqdm(list(ckpts.items()), desc="samples", unit="stage", disable=not progress):
        runner = CheckpointRunner(stage, Path(ckpt), "auto", device, s.multistep_steps)
        try:
            wm = runner.wm
            T = wm.temporal_factor
            if not rows:   # the case, rendered once (every stage of the run shares size and step sizes)
                L = s.latent_frames or runner.training_latent_frames()
                program = eval_trajectories(L)[SAMPLE_TRAJECTORY]
                case = Case(f"s0/{SAMPLE_TRAJECTORY}", 0, SAMPLE_TRAJECTORY, program, L, "sequence")
                gt = render_case(case, s, wm.height, wm.width, runner.config["data"].hfov_deg, wm.actions_cfg, T)
                seed = case_seed(0, case)
                rows.append(("render", np.asarray(gt.frames)))
                write_gif(out_dir / "reference.gif", rows[0][1], wm.fps)
                files["reference"] = "reference.gif"
                steps = parse_actions(program, max(wm.actions_cfg.max_steps, L))
                info = {"case": case.name, "prompt": gt.caption, "program": program, "seed": seed,
                        "context_frames": 1 + T * (runner.context_frames - 1), "steps": len(steps)}
            video = runner.generate(gt.frames, gt.cameras[::T], gt.caption, seed, runner.encode_context(gt.frames))
            info.setdefault("samplers", {})[stage] = runner.sampler
        finally:
            runner.close()
        write_gif(out_dir / f"{stage}.gif", video, wm.fps)
        files[stage] = f"{stage}.gif"
        rows.append((stage, video))
    plot_strips([(label, upscale(f)) for label, f in rows], out_dir / "strips.png",
                f'{info["case"]}: "{info["program"]}"', info["context_frames"] - 1)
    info.update(gifs=files, strips="strips.png")
    write_json(out_dir / "samples.json", info)
    return info


# ---- training curves ---------------------------------------------------------------------------------------
def smooth(values: list[float], k: int) -> list[float]:
    """Trailing moving average over k points (the first points average what exists)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_training(stage_dirs: dict[str, Path], path: Path) -> Optional[Path]:
    """One panel per stage: its loss(es) over steps (smoothed), the VAE's held-out PSNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minwm.io import atomic_path

    panels = []
    for stage, d in stage_dirs.items():
        p = Path(d) / "metrics.json"
        if not p.is_file():
            continue
        m = json.loads(p.read_text())
        hist = m.get("history") or []
        if stage == "vae" and m.get("psnr_curve"):
            panels.append((stage, "held-out PSNR (dB) vs training s", {"psnr": m["psnr_curve"]}))
            continue
        keys = sorted({k for r in hist for k in r if k.endswith("loss")})
        series = {k: [(r["step"], r[k]) for r in hist if isinstance(r.get(k), (int, float))] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if series:
            panels.append((stage, "loss vs step", series))
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (stage, ylabel, series) in zip(axes.flat, panels):
        for k, pts in series.items():
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, smooth(ys, max(1, len(ys) // 10)), lw=1, label=k.split("/")[0] if len(series) > 1 else None)
        ax.set_title(stage, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(str(tmp), dpi=110, format="png")
    plt.close(fig)
    return path


# ---- summary and report -------------------------------------------------------------------------------------
def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def acceptance(evals: dict[str, dict], bench: Optional[dict]) -> dict:
    """Issue #8's checks on the final model (single-action held-out trajectories), each with its figures and
    pass (None: not measured)."""
    if not evals:
        return {}
    final = single_action_metrics(evals[list(evals)[-1]])
    first = single_action_metrics(evals["bidirectional"]) if "bidirectional" in evals else {}
    acc, rot, base = final["direction_accuracy"], final["rot_err_deg"], final["baseline_rot_err_deg"]
    rot_bi = first.get("rot_err_deg")
    sp = (bench or {}).get("first_frame_speedup")

    def check(ok, **figures):
        return {**figures, "pass": ok}

    return {
        "direction_accuracy_ge_0.9": check(None if acc is None else acc >= 0.9, value=acc),
        "rot_err_le_half_no_camera": check(None if rot is None or base is None else rot <= 0.5 * base,
                                           value=rot, no_camera=base),
        "rot_err_within_1.5x_bidirectional": check(None if rot is None or rot_bi is None else rot <= 1.5 * rot_bi,
                                                   value=rot, bidirectional=rot_bi),
        "first_frame_speedup_over_bidirectional": check(None if sp is None else sp > 1.0, value=sp),
    }


def build_summary(qs, wall: dict) -> dict:
    from minwm.quickstart import shown

    out = qs.out
    m = read_json(out / "eval" / "metrics.json") or {}
    evals = {k: v for k, v in (m.get("checkpoints") or {}).items() if k in qs.eval_stages}
    bench = read_json(out / "bench" / "bench.json")
    final = shown(qs.stage_dir(qs.eval_stages[-1]))
    return {"settings": qs.settings(), "stages": [s.stage for s in qs.steps_plan], "final_checkpoint": final,
            "play": f"minwm play --ckpt {final}", "eval": evals, "bench": bench or {},
            "wall_time_s": dict(wall),
            "eval_suite": m.get("suite"), "eval_reference": m.get("reference"),
            "single_action": {k: single_action_metrics(v) for k, v in evals.items()},
            "acceptance": acceptance(evals, bench)}


def _f(v: Any, fmt: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return format(v, fmt)
    return str(v)


def _s(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"


def latency_table(b: dict) -> list[str]:
    if not b:
        return ["(no benchmark)"]
    ff = b.get("first_frame_latency_s", {})
    base = b.get("baselines", {})
    wd = (b.get("with_decode") or {}).get("first_frame_latency_s", {})
    steps = len(b.get("shape", {}).get("steps", [])) or "few"
    n = base.get("total_steps", 50)
    ex = " (extrapolated)" if base.get("extrapolated") else ""
    few = ff.get("ar_fewstep")
    rows = [("Bidirectional (Phase 1)", f"{n} x 2 (CFG)", ff.get("bidirectional"), wd.get("bidirectional")),
            ("AR, multi-step (Stage 1)", f"{n} x 2 (CFG)", ff.get("ar_multistep"), wd.get("ar_multistep")),
            ("AR, few-step (Stages 2-3)", f"{steps}", few, wd.get("ar_fewstep"))]
    lines = ["| model | steps (passes) | first-frame latency | with VAE decode | speed-up |", "|---|---|---|---|---|"]
    for name, st, v, vd in rows:
        sp = f"{v / few:.0f}x" if v and few else "-"
        lines.append(f"| {name} | {st} | {_s(v)}{ex if 'few' not in name and v else ''} | {_s(vd)} | {sp} |")
    s = b.get("shape", {})
    lines += ["", f"{b.get('parameters', 0) / 1e6:.2f}M parameters, {b.get('device')}, {b.get('threads')} threads; "
              f"latent {s.get('latent_height')}x{s.get('latent_width')} ({s.get('tokens_per_frame')} tokens/frame), "
              f"chunk {s.get('chunk_frames')} latent frames; the bidirectional model makes its whole "
              f"{s.get('bidirectional_frames')}-latent-frame clip before its first frame. Steady streaming: "
              f"{_s(b.get('steady_chunk_s'))} per chunk ({b.get('steady_fps', 0):.1f} frames/s without decode). "
              f"First-frame speed-up of few-step AR over {n}-step bidirectional: "
              f"**{_f(b.get('first_frame_speedup'), '.0f')}x**. Full benchmark: [bench/bench.md](bench/bench.md)."]
    return lines


def control_table(evals: dict[str, dict]) -> list[str]:
    """Per stage: the checkpoint and its no-camera (fixed-camera) baseline, on the single actions and overall."""
    if not evals:
        return ["(no evaluation)"]
    head = ["model", "dir. acc. (single)", "RotErr deg/frame (single)", "dir. acc. (all)", "RotErr deg/frame (all)",
            "TransErr", "CamMC", "PSNR (dB)", "pose failures"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for stage, c in evals.items():
        sa = single_action_metrics(c)
        b = c.get("baseline") or {}
        for label, d, acc, rot in ((f"**{STAGE_TITLE.get(stage, stage)}**", c, sa["direction_accuracy"],
                                    sa["rot_err_deg"]),
                                   ("  no-camera baseline", b, sa["baseline_direction_accuracy"],
                                    sa["baseline_rot_err_deg"])):
            lines.append(f"| {label} | {_f(acc, '.1%')} | {_f(rot, '.2f')} | {_f(d.get('direction_accuracy'), '.1%')} | "
                         f"{_f(d.get('rot_err_deg'), '.2f')} | {_f(d.get('trans_err'))} | {_f(d.get('cam_mc'))} | "
                         f"{_f(d.get('psnr'), '.2f')} | {_f(d.get('pose_failures'))}/{_f(d.get('num_cases'))} |")
    return lines


def render_report(summary: dict, samples: Optional[dict], stage_dirs: dict[str, Path], out: Path,
                  curves: Optional[Path]) -> str:
    wall = summary["wall_time_s"]
    given = next((c["conditioning"] for c in (summary.get("eval") or {}).values()
                  if isinstance(c, dict) and c.get("conditioning")), "first chunk")
    L = ["# minwm quickstart", "",
         f"Stages: {' -> '.join(summary['stages'])}. Total wall time of the steps: "
         f"{_f(wall.get('total'), '.0f')} s. Play the final model:", "", "```", summary["play"], "```", "",
         "## Latency (Table 1 for the toy)", "", *latency_table(summary["bench"]), "",
         "## Camera control on held-out scenes", "",
         "The camera of every generated video is estimated from its frames and compared with the commanded one; "
         f"each model's context is the held-out render's {given}. The no-camera baseline is the "
         "same model, seeds and context with its camera input held at the start camera. Full evaluation (per "
         "trajectory, error against frame, strips with the baselines): [eval/report.md](eval/report.md).", "",
         *control_table(summary["eval"]), ""]
    acc = summary.get("acceptance") or {}
    if acc:
        L += ["Acceptance (issue #8), final model:", ""]
        for k, v in acc.items():
            figures = ", ".join(f"{kk} {_f(vv)}" for kk, vv in v.items() if kk != "pass")
            L.append(f"- {k}: {figures}: **{ {True: 'pass', False: 'FAIL', None: 'not measured'}[v['pass']] }**")
        L.append("")
    if samples:
        L += ["## One held-out case through every stage", "",
              f"Case {samples['case']}: prompt \"{samples['prompt']}\", trajectory `{samples['program']}`, seed "
              f"{samples['seed']}; pixel frames 0-{samples['context_frames'] - 1} are the given context. First row: "
              f"the scene rendered along the trajectory.", "",
              "![strips](samples/strips.png)", "",
              "| " + " | ".join(samples["gifs"]) + " |", "|" + "---|" * len(samples["gifs"]),
              "| " + " | ".join(f"![{k}](samples/{v})" for k, v in samples["gifs"].items()) + " |", ""]
    L += ["## Training", ""]
    if curves is not None:
        L += [f"![training curves]({curves.name})", ""]
    for stage, d in stage_dirs.items():
        rel = Path(d).relative_to(out) if Path(d).is_relative_to(out) else Path(d)
        for png in ("loss_curve.png", "psnr_curve.png"):
            if (Path(d) / png).is_file():
                L.append(f"- {stage}: [{png}]({rel / png})")
    L += ["", "## Wall time per step", "", "| step | seconds |", "|---|---|"]
    L += [f"| {k} | {v:.1f} |" for k, v in wall.items()]
    L.append("")
    return "\n".join(L)


def write_report(qs, wall: dict) -> dict:
    """OUT/summary.json and OUT/report.md (atomic writes); returns the summary."""
    from minwm.io import write_json, write_text

    out = qs.out
    summary = build_summary(qs, wall)
    stage_dirs = {s.stage: s.out_dir for s in qs.steps_plan}
    curves = plot_training(stage_dirs, out / "training_curves.png")
    samples = read_json(out / "samples" / "samples.json")
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", render_report(summary, samples, stage_dirs, out, curves))
    return summary
