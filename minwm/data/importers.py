"""Bring real clips (a folder of images or a video, plus a camera file in any format minwm.cameras
reads) into the clip dataset format (`minwm data import`).

Everything is read, matched and checked in memory first; only a complete, valid clip is written (one
atomic shard, then the index), so a failed import never leaves half a clip behind.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import torch

from minwm.cameras import Cameras, crop_intrinsics, load_cameras
from minwm.data.clips import Clip, ClipWriter, check_name, read_video
from minwm.errors import MinwmError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _to_rgb8(img: np.ndarray, where: str) -> np.ndarray:
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise MinwmError(f"{where}: expected an RGB image, got shape {img.shape}")
    img = img[..., :3]
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise MinwmError(f"{where}: unsupported pixel type {img.dtype}")
    return np.ascontiguousarray(img)


def read_image(path: Path, where: str) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise MinwmError(f"{where}: cannot read image {path}")
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA if img.shape[-1] == 4 else cv2.COLOR_BGR2RGB)
    return _to_rgb8(img, f"{where}: {path}")


def image_files(folder: Path, meta: dict, cameras_path: Path, where: str) -> list[Path]:
    """The frame images in camera order: the camera file's own file_paths when it has them (resolved
    next to the camera file, then inside the folder), else the folder's images in natural order."""
    paths = meta.get("file_paths")
    if paths:
        out = []
        for p in paths:
            cands = [cameras_path.parent / p, folder / p, folder / Path(p).name]
            hit = next((c for c in cands if c.is_file()), None)
            if hit is None:
                # nerfstudio paths often omit the extension.
                hit = next((c.with_suffix(s) for c in cands for s in IMAGE_SUFFIXES if c.with_suffix(s).is_file()), None)
            if hit is None:
                raise MinwmError(f"{where}: frame '{p}' named by {cameras_path} not found in {folder}")
            out.append(hit)
        return out
    files = sorted((f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
    if not files:
        raise MinwmError(f"{where}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return files


def read_video_at(path: Path, timestamps_us: list[int], where: str) -> np.ndarray:
    """The video frames nearest to each timestamp (microseconds from the video's start); an error if a
    timestamp is more than one frame interval away from every frame."""
    import av

    try:
        with av.open(str(path)) as container:
            decoded = [(float(f.time), f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError, IndexError, OSError) as e:
        raise MinwmError(f"{where}: cannot read video {path} ({type(e).__name__}: {e})") from None
    if not decoded:
        raise MinwmError(f"{where}: video {path} has no frames")
    times = np.array([t for t, _ in decoded])
    step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0
    want = np.asarray(timestamps_us, dtype=np.float64) / 1e6
    idx = np.abs(times[None, :] - want[:, None]).argmin(1)
    far = np.abs(times[idx] - want) > step
    if far.any():
        k = int(np.nonzero(far)[0][0])
        raise MinwmError(f"{where}: camera {k} is at {want[k]:.3f} s but {path} has frames only from "
                         f"{times[0]:.3f} to {times[-1]:.3f} s")
    return np.stack([decoded[i][1] for i in idx])


def resize_center_crop(frames: np.ndarray, cams: Cameras, size: tuple[int, int]) -> tuple[np.ndarray, Cameras]:
    """Centre-crop to the target aspect (an integer pixel window, so the intrinsics are exact), then
    resize to `size` (area filter when shrinking). Normalised intrinsics change only with the crop."""
    H, W = frames.shape[1:3]
    h, w = size
    if H * w > W * h:          # too tall: keep the width
        ch, cw = max(1, round(W * h / w)), W
    else:
        ch, cw = H, max(1, round(H * w / h))
    oy, ox = (H - ch) // 2, (W - cw) // 2
    K = crop_intrinsics(cams.intrinsics, (H, W), (ch, cw), offset_yx=(oy, ox))
    interp = cv2.INTER_AREA if ch >= h and cw >= w else cv2.INTER_LINEAR
    out = np.stack([cv2.resize(f[oy:oy + ch, ox:ox + cw], (w, h), interpolation=interp) for f in frames])
    return out, Cameras(cams.w2c, K)


def _default_name(frames_src: Path) -> str:
    base = frames_src.stem if frames_src.is_file() else frames_src.resolve().name
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or "clip"
    return name[:128]


def load_real_clip(frames_src: str | Path, cameras_path: str | Path, fmt: str | None = None,
                   size: tuple[int, int] | None = None, name: str | None = None, caption: str = "") -> Clip:
    """A validated Clip from a folder of images or a video and a camera file (nothing written)."""
    frames_src, cameras_path = Path(frames_src), Path(cameras_path)
    name = check_name(name or _default_name(frames_src))
    where = f"clip {name}"
    cams, meta = load_cameras(cameras_path, fmt)
    if frames_src.is_dir():
        files = image_files(frames_src, meta, cameras_path, where)
        if len(files) != len(cams):
            raise MinwmError(f"{where}: {len(files)} images in {frames_src} but {len(cams)} cameras in {cameras_path}")
        imgs = [read_image(f, where) for f in files]
        shapes = {im.shape for im in imgs}
        if len(shapes) != 1:
            raise MinwmError(f"{where}: images in {frames_src} have different sizes {sorted(shapes)}")
        frames = np.stack(imgs)
    elif frames_src.is_file():
        frames = read_video(frames_src, where)
        stamps = meta.get("timestamps_us")
        if len(frames) != len(cams) and stamps:
            frames = read_video_at(frames_src, stamps, where)
        if len(frames) != len(cams):
            raise MinwmError(f"{where}: {len(frames)} frames in {frames_src} but {len(cams)} cameras in {cameras_path}")
    else:
        raise MinwmError(f"{where}: {frames_src} is neither a folder of images nor a video file")

    H, W = frames.shape[1:3]
    known = meta.get("image_size")
    if known and abs(known[0] / known[1] - H / W) > 0.01 * H / W:
        raise MinwmError(f"{where}: {cameras_path} describes {known[0]}x{known[1]} images but the frames are "
                         f"{H}x{W} (a different aspect ratio, so the intrinsics would not fit)")
    if size is not None and tuple(size) != (H, W):
        frames, cams = resize_center_crop(frames, cams, size)
    clip = Clip(name, frames, Cameras(cams.w2c.to(torch.float64), cams.intrinsics.to(torch.float64)),
                caption, str(meta.get("source") or frames_src),
                {"import": {"format": meta.get("format"), "cameras": str(cameras_path), "frames": str(frames_src),
                            "original_size": [int(H), int(W)]}})
    return clip.validate()


def import_clip(frames_src: str | Path, cameras_path: str | Path, out: str | Path, fmt: str | None = None,
                size: tuple[int, int] | None = None, name: str | None = None, caption: str = "") -> Clip:
    """Import one clip into the dataset at `out` (created if needed, appended to otherwise)."""
    clip = load_real_clip(frames_src, cameras_path, fmt, size, name, caption)
    with ClipWriter(out, clips_per_shard=1, append=True) as writer:
        writer.add(clip)
    return clip
