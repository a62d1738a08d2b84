"""`minwm generate`: a checkpoint, a prompt and a trajectory -> an mp4.

Frame count: a trajectory of L latent frames gives 1 + 4(L - 1) pixel frames (VAE temporal factor 4): an action
program of S steps gives 1 + 4S frames, a camera file of 1 + 4k frames gives exactly those frames (see
inference/trajectory.py). Longer than inference.max_generate_frames latent frames is refused before any work.
The mp4 is written atomically: on any error nothing is left at --out.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from minwm.errors import MinwmError
from minwm.inference.trajectory import Trajectory, chunk_actions, chunk_cameras, num_chunks


def rollout(wm, prompt: str, traj: Trajectory, image: Optional[np.ndarray] = None, seed: Optional[int] = None,
            progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """All frames of the trajectory, uint8 [1 + T(L-1), H, W, 3]."""
    first = wm.reset(prompt, image=image, seed=seed)
    parts = [first] if first is not None else []
    n = num_chunks(traj, wm.chunk_frames)
    for c in range(n):
        if traj.steps is not None:
            parts.append(wm.step(chunk_actions(traj, wm.chunk_frames, c)))
        else:
            parts.append(wm.step(cameras=chunk_cameras(traj, wm.chunk_frames, c)))
        if progress is not None:
            progress(c + 1, n)
    frames = np.concatenate(parts)
    return frames[:traj.pixel_frames(wm.temporal_factor)]  # padding of the last chunk


def overlay_keys(frames: np.ndarray, labels: list[str], temporal_factor: int) -> np.ndarray:
    """Draw the keys held for each frame's latent frame (pixel frame p belongs to latent ceil(p / T))."""
    import cv2

    out = frames.copy()
    H = out.shape[1]
    scale = max(0.3, H / 256)
    thick = max(1, int(round(scale * 2)))
    for p in range(len(out)):
        text = labels[min(-(-p // temporal_factor), len(labels) - 1)]
        if not text:
            continue
        org = (max(2, int(4 * scale)), H - max(3, int(6 * scale)))
        img = np.ascontiguousarray(out[p])
        cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
        cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
        out[p] = img
    return out


def write_mp4(path: str | Path, frames: np.ndarray, fps: int) -> None:
    """H.264 mp4 (yuv420p, so frames are padded to even sizes), written atomically."""
    import av

    from minwm.io import atomic_path

    n, H, W, _ = frames.shape
    if H % 2 or W % 2:
        frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=int(fps))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "18"}
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def read_image(path: str | Path) -> np.ndarray:
    import cv2

    p = Path(path)
    if not p.is_file():
        raise MinwmError(f"{p}: image not found")
    img = cv2.imread(str(p), cv2.IMREAD_COLOR)
    if img is None:
        raise MinwmError(f"{p}: not a readable image (expected PNG or JPEG)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def run_generate(args) -> int:
    import torch

    from minwm.inference.trajectory import load_trajectory
    from minwm.world import WorldModel

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise MinwmError(f"--out: {out} must end in .mp4")
    image = read_image(args.image) if args.image else None
    overrides = {}
    if args.mode:
        overrides["mode"] = args.mode
    if args.camera_guidance is not None:
        overrides["camera_guidance"] = args.camera_guidance
    if args.steps:
        try:
            overrides["steps"] = [float(s) for s in args.steps.split(",")]
        except ValueError:
            raise MinwmError(f"--steps: expected comma-separated timesteps like 1000,750,500,250, "
                             f"got {args.steps!r}") from None
    wm = WorldModel.from_checkpoint(args.ckpt, device=args.device, **overrides)
    traj = load_trajectory(args.trajectory, wm.actions_cfg, wm.temporal_factor, wm.inference.max_generate_frames)
    if traj.note:
        print(f"minwm: note: {traj.note}", file=sys.stderr)
    if image is None and wm.needs_image:
        image, caption = wm.procedural_image(args.seed)
        print(f"minwm: note: this checkpoint is image-to-video and no --image was given: starting from a render of "
              f"its procedural world (seed {wm.inference.seed if args.seed is None else args.seed}: {caption})",
              file=sys.stderr)
    elif image is not None and image.shape[:2] != (wm.height, wm.width):
        print(f"minwm: note: resizing {args.image} from {image.shape[1]}x{image.shape[0]} to the model's "
              f"{wm.width}x{wm.height}", file=sys.stderr)

    from tqdm import tqdm

    bar = tqdm(total=num_chunks(traj, wm.chunk_frames), unit="chunk", disable=args.quiet, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    try:
        frames = rollout(wm, args.prompt, traj, image=image, seed=args.seed, progress=progress)
    finally:
        bar.close()
    if args.overlay_keys:
        frames = overlay_keys(frames, traj.labels(wm.actions_cfg), wm.temporal_factor)
    write_mp4(out, frames, wm.fps)
    print(f"wrote {out} ({len(frames)} frames, {wm.width}x{wm.height}, {wm.fps} fps)")
    return 0
