"""`minwm eval`: generate every case of a suite with each checkpoint and its fixed-camera baseline, estimate the
camera of every video, score it against the exact render.

What the model is given (the toy is T2V, so it cannot start from nothing and be compared with a render):
- T2V checkpoints (stages.ti2v false, e.g. the toy Wan): the render's FIRST CHUNK (latent frames
  0 .. chunk_frames-1, pixel frames 0 .. T(chunk_frames-1)) is encoded with the checkpoint's VAE and written into
  the streaming KV cache as clean context at t = 0 (the same refresh pass a generated chunk gets, i.e. exactly the
  clean-past condition the AR stages are trained on); the rest is generated chunk by chunk along the trajectory.
- TI2V checkpoints (stages.ti2v true, or an adapter with image channels): the render's first frame through
  WorldModel.reset(image=...).
- A `bidirectional` checkpoint is not a streaming model: the whole clip is sampled at once with the multi-step
  CFG sampler, the context frames held on the straight noising path of their real latents at every step
  (replacement conditioning: every frame shares one t, as the bidirectional model was trained), so it gets the
  same context as the streaming stages.
The sampler follows the stage recorded in the checkpoint's metrics.json: bidirectional -> bidirectional,
ar -> multi-step AR per chunk (CFG), ode / cd / dmd (or unknown) -> the few-step streaming sampler.
Every case's model and baseline videos are generated together in batches of equal length
(CheckpointRunner.generate_batch; each video draws its own seeded noise, so it does not depend on its batch).

What is scored:
- PSNR / SSIM per generated pixel frame against the render (context frames are not scored; their VAE round trip,
  `context_psnr`, is the ceiling a perfect model could reach).
- Camera: the pose estimator runs on the whole decoded video; RotErr / TransErr / CamMC (CamI2V definitions,
  eval/metrics.py) compare the estimate with the exact cameras from the last context frame on (both made relative
  to it), and direction accuracy reads the commanded sign of every generated latent step. A video the estimator
  cannot read (e.g. too flat) counts as a pose failure: left out of the camera errors, direction accuracy 0.
- The baseline is the same checkpoint, same seeds and same context with its camera input replaced by a fixed
  camera (every latent frame at the start camera): the gap to it is the control the camera gives.
- The estimator run on the render itself gives the floor of the camera errors (`reference.estimator`).
Headline numbers average the cases at the training clip length; long cases are summarised under `long`.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from minwm.cameras.camera import Cameras
from minwm.errors import MinwmError
from minwm.eval.checkpoints import SAMPLERS, CheckpointRunner, GenItem, checkpoint_names, fixed_cameras
from minwm.eval.suite import Case, Suite, check_heldout, get_suite, render_case, suite_cases, with_overrides

METRIC_KEYS = ("rot_err", "rot_err_deg", "trans_err", "cam_mc", "direction_accuracy", "psnr", "ssim")
CAMERA_KEYS = ("rot_err", "rot_err_deg", "trans_err", "cam_mc", "direction_accuracy")
FORMAT = "minwm-eval"
# Identical frames have infinite PSNR; counting them as 100 dB keeps means finite (any real difference of one
# 8-bit level over a whole frame is already 48 dB).
PSNR_CAP = 100.0


# ---- scoring ------------------------------------------------------------------------------------------------

def _nan(x) -> float:
    return float("nan") if x is None else float(x)


def score_camera(frames: np.ndarray, ref: Cameras, steps: list, start: int, temporal_factor: int) -> dict:
    """Camera metrics of a video against its exact cameras from pixel frame `start` on, plus direction accuracy
    over `steps` (the commanded latent steps from the latent frame at `start`). A video the pose estimator
    cannot read gives NaN camera errors, direction accuracy 0 and `pose_error`."""
    from minwm.eval.metrics import camera_metrics, direction_accuracy
    from minwm.eval.pose import estimate_trajectory

    F = len(frames)
    out: dict[str, Any] = {k: float("nan") for k in CAMERA_KEYS}
    out["pose_error"] = None
    out["per_frame"] = {"rot_deg": [float("nan")] * F, "trans": [float("nan")] * F}
    import cv2

    try:
        est = estimate_trajectory(frames, ref.intrinsics[0])
    except MinwmError as e:
        out["pose_error"] = str(e)
        out["direction_accuracy"] = 0.0 if any(steps) else float("nan")
        return out
    except (cv2.error, np.linalg.LinAlgError, ValueError) as e:   # degenerate geometry in a generated video
        out["pose_error"] = f"pose: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        out["direction_accuracy"] = 0.0 if any(steps) else float("nan")
        return out
    m = camera_metrics(est[start:], ref[start:])
    out.update({k: m[k] for k in ("rot_err", "rot_err_deg", "trans_err", "cam_mc")})
    out["direction_accuracy"] = direction_accuracy(est[start:], steps, temporal_factor) if steps else float("nan")
    out["per_frame"]["rot_deg"][start:] = m["per_frame"]["rot_deg"]
    out["per_frame"]["trans"][start:] = m["per_frame"]["trans"]
    out["estimated"] = est
    return out


def score_images(frames: np.ndarray, gt: np.ndarray, first: int) -> dict:
    """PSNR / SSIM per frame from pixel frame `first` on (earlier frames NaN in the per-frame lists)."""
    from minwm.eval.metrics import psnr, ssim

    F = len(gt)
    p = psnr(frames[first:], gt[first:], reduction="none").clamp(max=PSNR_CAP).tolist()
    s = ssim(frames[first:], gt[first:], reduction="none").tolist()
    pf = [float("nan")] * first
    return {"psnr": float(np.mean(p)), "ssim": float(np.mean(s)),
            "per_frame": {"psnr": pf + p, "ssim": pf + s}} if F > first else \
        {"psnr": float("nan"), "ssim": float("nan"), "per_frame": {"psnr": [float("nan")] * F,
                                                                     "ssim": [float("nan")] * F}}


class _Done:
    """A finished result with the Future interface."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _pose_worker_init() -> None:
    import cv2

    torch.set_num_threads(1)      # one core per worker: the workers are the parallelism
    cv2.setNumThreads(1)


class _Job:
    """A pose job in the pool. Asked for its result before a worker took it, it runs here instead (so once the
    videos are generated this process estimates alongside the workers); also inline if the pool broke (e.g. a
    script without an `if __name__ == "__main__":` guard, which spawned workers cannot import)."""

    def __init__(self, future, args, owner: "PoseJobs"):
        self.future, self.args, self.owner = future, args, owner

    def result(self):
        from concurrent.futures.process import BrokenProcessPool

        if self.future.cancel():
            return score_camera(*self.args)
        try:
            return self.future.result()
        except BrokenProcessPool:
            self.owner.broken()
            return score_camera(*self.args)


def default_pose_workers() -> int:
    """2 background pose processes where there are 2 cores or more (0, inline, on one core): pose estimation is
    most of an evaluation's CPU time, and with two workers it runs on both cores while videos are generated and
    after (the main process also takes jobs no worker has started); more would only queue for the same cores."""
    return 2 if (os.cpu_count() or 1) >= 2 else 0


class PoseJobs:
    """score_camera calls, run at once (workers = 0) or in `workers` background processes while the main process
    generates the next videos (on 2 cores: generation on one, pose estimation on the other)."""

    def __init__(self, workers: int = 0, echo=print):
        self._pool = None
        self._echo = echo
        if workers > 0:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                             initializer=_pose_worker_init)

    def submit(self, *args):
        if self._pool is not None:
            from concurrent.futures.process import BrokenProcessPool

            try:
                return _Job(self._pool.submit(score_camera, *args), args, self)
            except BrokenProcessPool:
                self.broken()
        return _Done(score_camera(*args))

    def broken(self) -> None:
        if self._pool is not None:
            self._echo("eval: the pose-estimation worker process died (a script calling evaluate() needs an "
                       "`if __name__ == '__main__':` guard); estimating in this process instead")
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _mean(values) -> float:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else float("nan")


def _curve(records: list[dict], key: str) -> list[float]:
    """Per-frame mean over records (NaN where no record has a value)."""
    rows = [r["per_frame"][key] for r in records if key in r.get("per_frame", {})]
    if not rows:
        return []
    n = max(len(r) for r in rows)
    a = np.full((len(rows), n), np.nan)
    for i, r in enumerate(rows):
        a[i, :len(r)] = r
    with np.errstate(all="ignore"):
        cnt = np.sum(~np.isnan(a), 0)
        s = np.nansum(a, 0)
        return [float(s[j] / cnt[j]) if cnt[j] else float("nan") for j in range(n)]


def summarize(records: list[dict], camera: bool = True) -> dict:
    """Means over case records (camera errors over the cases the estimator could read)."""
    out = {k: _mean(r.get(k) for r in records) for k in METRIC_KEYS}
    if not camera:
        for k in CAMERA_KEYS:
            out[k] = None
    out["num_cases"] = len(records)
    out["pose_failures"] = sum(1 for r in records if r.get("pose_error"))
    out["per_frame"] = {k: _curve(records, k) for k in (("rot_deg", "trans") if camera else ()) + ("psnr", "ssim")}
    by_traj: dict[str, list] = {}
    for r in records:
        by_traj.setdefault(r["trajectory"], []).append(r)
    out["per_trajectory"] = {t: {k: _mean(x.get(k) for x in rs) for k in METRIC_KEYS if camera or k not in CAMERA_KEYS}
                             for t, rs in by_traj.items()}
    return out


def _public(r: dict) -> dict:
    """A case record as written to metrics.json (no per-frame lists, no tensors)."""
    return {k: v for k, v in r.items() if k not in ("per_frame", "estimated")}


def jsonable(x: Any) -> Any:
    """NaN / inf -> None (JSON has no NaN), tensors and numpy scalars -> plain numbers."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ---- the suite ----------------------------------------------------------------------------------------------

@dataclass
class GroundTruth:
    case: Case
    frames: np.ndarray            # uint8 [F, H, W, 3]
    cameras: Cameras              # per pixel frame, exact
    caption: str
    steps: list                   # the commanded latent steps
    context: dict = field(default_factory=dict)   # VAE key -> encoded context latents
    reference: Any = None                        # the estimator on the render itself (a pending PoseJobs result)
    # VAE directory -> the render through that VAE (encode + decode): what a PERFECT model would output, so its
    # scores are the best any model decoded by that VAE can get: (image scores, pending PoseJobs result).
    roundtrip: dict = field(default_factory=dict)


# Renders and the estimator's reading of them, kept across evaluate() calls in one process (the quickstart
# evaluates stage after stage): the render and its camera estimate depend only on the case and the render settings.
_GT_MEMO: dict[tuple, GroundTruth] = {}
_GT_MEMO_MAX = 512


def _remember(gts: dict[tuple, GroundTruth]) -> None:
    for key, gt in gts.items():
        if gt.reference is not None and not isinstance(gt.reference, _Done):
            gt.reference = _Done(gt.reference.result())
        gt.context = {}                      # latents depend on a checkpoint's VAE: not kept
        _GT_MEMO[key] = gt
    while len(_GT_MEMO) > _GT_MEMO_MAX:
        _GT_MEMO.pop(next(iter(_GT_MEMO)))


def case_seed(seed: int, case: Case) -> int:
    return (zlib.crc32(case.name.encode()) ^ (seed * 2654435761)) & 0x7FFFFFFF


def _check_length(runner: CheckpointRunner, L: int, suite: Suite) -> None:
    n = runner.context_frames
    if L <= n:
        raise MinwmError(f"suite {suite.name}: clips of {L} latent frames leave nothing to generate after the "
                         f"{n}-frame context of {runner.path} ({runner.conditioning.split(' (')[0]}); the pose "
                         f"estimator needs generated motion: use --latent-frames {n + 1} or more")


def evaluate(ckpts: dict | Sequence, suite: str | Suite = "toy-heldout", out_dir: Optional[str | Path] = None, *,
             sampler: str = "auto", device: str = "cpu", threads: int = 1, seed: int = 0,
             latent_frames: Optional[int] = None, multistep_steps: Optional[int] = None,
             pose_workers: Optional[int] = None, batch_size: int = 16, progress: bool = True, echo=print) -> dict:
    """Run `suite` on each checkpoint and its fixed-camera baseline; returns the metrics.json content and, with
    out_dir, writes report.md, metrics.json and the PNGs there (atomically: all or nothing).

    ckpts: {name: dir} or a list of dirs (named by their directory name). The result's "checkpoints" maps each
    name to {rot_err, rot_err_deg, trans_err, cam_mc, direction_accuracy, psnr, ssim, ..., "baseline": {same}}.
    threads: torch / OpenCV threads of the generating process (1 is fastest on a shared machine: more threads
    contend for the cores); pose_workers: background processes estimating cameras meanwhile (0: inline; None:
    default_pose_workers()); batch_size: videos generated together (items of equal length, see
    CheckpointRunner.iter_generate)."""
    import cv2

    names = checkpoint_names(ckpts)
    suite_obj = get_suite(suite) if isinstance(suite, str) else suite
    if latent_frames is not None and latent_frames < 2:
        raise MinwmError(f"--latent-frames: expected >= 2, got {latent_frames}")
    suite_obj = with_overrides(suite_obj, latent_frames=latent_frames, multistep_steps=multistep_steps)
    if sampler not in SAMPLERS:
        raise MinwmError(f"--sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if pose_workers is None:
        pose_workers = default_pose_workers()
    if pose_workers < 0:
        raise MinwmError(f"pose_workers: expected >= 0, got {pose_workers}")
    if batch_size < 1:
        raise MinwmError(f"batch_size: expected >= 1, got {batch_size}")
    old_threads, old_cv = torch.get_num_threads(), cv2.getNumThreads()
    if threads:
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
    t_start = time.perf_counter()
    gts: dict[tuple, GroundTruth] = {}
    results: dict[str, dict] = {}
    showcase: dict[str, dict] = {}      # case name -> {"gt": frames, "<ckpt>": frames, "<ckpt>/baseline": ...}
    context_psnr: list[float] = []
    vae_dirs: list[str] = []
    jobs = None
    try:
        for name, path in names.items():
            t0 = time.perf_counter()
            runner = CheckpointRunner(name, path, sampler, device, suite_obj.multistep_steps)
            if runner.has_camera:
                vae_dirs.append(runner.vae_dir)
            if jobs is None:   # started after the first checkpoint loaded, so a bad one fails fast
                jobs = PoseJobs(pose_workers, echo)
            try:
                results[name] = _run_checkpoint(runner, suite_obj, seed, gts, showcase, context_psnr, progress, jobs,
                                                batch_size)
            finally:
                runner.close()
            results[name]["time_s"] = round(time.perf_counter() - t0, 1)
            echo(f"eval: {name}: {results[name]['time_s']} s")
        _remember(gts)
        refs = [{"name": g.case.name, "trajectory": g.case.trajectory, "group": g.case.group, **g.reference.result()}
                for g in gts.values() if g.reference is not None]
        main_refs = [r for r in refs if r["group"] != "long"]
        rts = []       # the first checkpoint's VAE (a quickstart's stages share one)
        for g in gts.values():
            if suite_obj.vae_floor and vae_dirs and vae_dirs[0] in g.roundtrip and g.case.group != "long":
                images, pose = g.roundtrip[vae_dirs[0]]
                rts.append({"name": g.case.name, "trajectory": g.case.trajectory, "group": g.case.group, **images,
                            **{k: v for k, v in pose.result().items() if k != "per_frame"}})
        result = {
            "format": FORMAT, "version": 1,
            "suite": {"name": suite_obj.name, "description": suite_obj.description, "scenes": suite_obj.scenes,
                      "trajectories": list(suite_obj.trajectories), "long": list(suite_obj.long),
                      "long_factor": suite_obj.long_factor, "seed": suite_obj.seed,
                      "multistep_steps": suite_obj.multistep_steps, "cases": len({k[0] for k in gts})},
            "checkpoints": results,
            "reference": {"estimator": summarize(main_refs) if main_refs else None,
                          "estimator_long": summarize([r for r in refs if r["group"] == "long"])
                          if len(main_refs) < len(refs) else None,
                          "vae_roundtrip": summarize(rts) if rts else None,
                          "context_psnr": _mean(context_psnr)},
            "seed": seed, "threads": threads, "time_s": round(time.perf_counter() - t_start, 1),
        }
        result = jsonable(result)
        if out_dir is not None:
            from minwm.eval.report import write_report

            write_report(result, out_dir, showcase)
        return result
    finally:
        if jobs is not None:
            jobs.close()
        torch.set_num_threads(old_threads)
        cv2.setNumThreads(old_cv)


def _run_checkpoint(runner: CheckpointRunner, suite: Suite, seed: int, gts: dict, showcase: dict,
                    context_psnr: list, progress: bool, jobs: PoseJobs, batch_size: int = 16) -> dict:
    from tqdm import tqdm

    from minwm.cameras.actions import parse_actions
    from minwm.eval.metrics import psnr

    wm = runner.wm
    T = wm.temporal_factor
    check_heldout(suite, runner.config["data"].seed, str(runner.path / "config.yaml"))
    L = suite.latent_frames or runner.training_latent_frames()
    _check_length(runner, L, suite)
    cases = suite_cases(suite, L)
    n_ctx = runner.context_frames
    start = T * (n_ctx - 1)          # last context pixel frame: camera metrics start here
    first_scored = start + 1         # first generated pixel frame
    vae_key = (str(runner.path), n_ctx)
    # 1. Ground truth of every case (render, the estimator's reading of it in the pose workers, context latents).
    prepared = []                    # (case, gt, context, latent cameras, seed, showcase entry or None)
    for case in cases:
        key = (case.name, case.latent_frames, suite.seed, runner.render_key())
        gt = gts.get(key) or _GT_MEMO.get(key)
        if gt is not None:
            gts[key] = gt
        else:
            clip = render_case(case, suite, wm.height, wm.width, runner.config["data"].hfov_deg, wm.actions_cfg, T)
            steps = parse_actions(case.program, max(wm.actions_cfg.max_steps, case.latent_frames))
            gt = gts[key] = GroundTruth(case, clip.frames, clip.cameras, clip.caption, steps)
        if gt.reference is None and runner.has_camera:
            gt.reference = jobs.submit(gt.frames, gt.cameras, gt.steps[n_ctx - 1:], start, T)
        if vae_key not in gt.context:
            gt.context[vae_key] = runner.encode_context(gt.frames)
        if suite.vae_floor and runner.has_camera and runner.vae_dir not in gt.roundtrip:
            rt = runner.roundtrip(gt.frames)
            gt.roundtrip[runner.vae_dir] = (score_images(rt, gt.frames, first_scored),
                                            jobs.submit(rt, gt.cameras, gt.steps[n_ctx - 1:], start, T))
        sc = None
        if case.trajectory in suite.strips and case.scene == 0 and not case.long:
            sc = showcase.setdefault(case.name, {"gt": gt.frames, "gt_cameras": gt.cameras, "first": first_scored,
                                                 "start": start, "program": case.program})
            if runner.has_camera:
                sc["reference"] = gt.reference
        prepared.append((case, gt, gt.context[vae_key], gt.cameras[::T], case_seed(seed, case), sc))
    # 2. Every video (the model's and its fixed-camera baseline's are two items of the same batches), scored as
    # each batch comes out: images here, cameras in the pose workers while the next batch is generated.
    items, owners = [], []           # owners[i]: (index into prepared, "model" | "baseline")
    for j, (case, gt, context, lat, s, sc) in enumerate(prepared):
        runs = [("model", lat)] + ([("baseline", fixed_cameras(lat))] if runner.has_camera else [])
        for which, cams in runs:
            items.append(GenItem(gt.frames, cams, gt.caption, s, context))
            owners.append((j, which))
    recs: list[Optional[dict]] = [None] * len(items)
    ctx_psnr: dict[int, float] = {}
    pending = []                     # (record, pose result, showcase entry or None, label)
    bar = tqdm(total=len(items), desc=f"eval {runner.name}", unit="video", disable=not progress)
    for idx, videos in runner.iter_generate(items, batch_size):
        for i, frames in zip(idx, videos):
            j, which = owners[i]
            case, gt, _, _, _, sc = prepared[j]
            rec = dict({"name": case.name, "trajectory": case.trajectory, "group": case.group},
                       **score_images(frames, gt.frames, first_scored))
            if which == "model" and first_scored > 1:
                ctx_psnr[j] = min(psnr(frames[1:first_scored], gt.frames[1:first_scored]), PSNR_CAP)
            label = runner.name if which == "model" else f"{runner.name} (baseline)"
            if sc is not None:
                sc[label] = frames
            if runner.has_camera:
                pending.append((rec, jobs.submit(frames, gt.cameras, gt.steps[n_ctx - 1:], start, T), sc, label))
            recs[i] = rec
        bar.update(len(idx))
    bar.close()
    context_psnr.extend(ctx_psnr[j] for j in sorted(ctx_psnr))      # case order, as the mean was summed before
    model_recs = [r for r, (_, w) in zip(recs, owners) if w == "model"]
    base_recs = [r for r, (_, w) in zip(recs, owners) if w == "baseline"]
    for rec, fut, sc, label in tqdm(pending, desc=f"poses {runner.name}", unit="video",
                                    disable=not progress or not pending):
        cam = fut.result()
        rec["per_frame"] = {**rec["per_frame"], **cam.pop("per_frame")}
        rec.update(cam)
        if sc is not None and cam.get("estimated") is not None:
            sc.setdefault("estimated", {})[label] = cam["estimated"]
    for sc in showcase.values():
        ref = sc.pop("reference", None)
        if ref is not None and ref.result().get("estimated") is not None:
            sc.setdefault("estimated", {})["render (estimator)"] = ref.result()["estimated"]
    main = [r for r in model_recs if r["group"] != "long"]
    out = summarize(main, runner.has_camera)
    out.update({"path": str(runner.path), "stage": runner.stage, "sampler": runner.sampler,
                "camera_kind": runner.camera_kind, "camera": runner.has_camera, "conditioning": runner.conditioning,
                "context_latent_frames": n_ctx, "latent_frames": L, "temporal_factor": T,
                "camera_from_frame": start, "scored_from_frame": first_scored,
                "steps": (wm.inference.baseline_steps if runner.sampler != "fewstep" else len(wm.timesteps)),
                "note": None})
    long_recs = [r for r in model_recs if r["group"] == "long"]
    out["long"] = summarize(long_recs, runner.has_camera) if long_recs else None
    if runner.has_camera:
        b_main = [r for r in base_recs if r["group"] != "long"]
        out["baseline"] = summarize(b_main)
        b_long = [r for r in base_recs if r["group"] == "long"]
        out["baseline"]["long"] = summarize(b_long) if b_long else None
        out["baseline"]["kind"] = "fixed camera (every latent frame at the start camera)"
    else:
        out["note"] = ("no camera injection (model.camera.kind: none): camera metrics skipped; the fixed-camera "
                       "baseline would be this same model, so it is not run")
        out["baseline"] = {**{k: None for k in METRIC_KEYS}, "kind": "none (the model takes no camera)"}
    out["cases"] = [_public(r) for r in model_recs]
    if runner.has_camera:
        out["baseline"]["cases"] = [_public(r) for r in base_recs]
    return out
