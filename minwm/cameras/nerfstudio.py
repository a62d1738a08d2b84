"""nerfstudio / DL3DV / NeRF-synthetic transforms.json.

Each frame has `transform_matrix`, a camera-to-world 4x4 in OpenGL axes (x right, y up, z backward).
Intrinsics come from `fl_x, fl_y, cx, cy, w, h` (pixels; per frame or top-level, per frame wins) or
from `camera_angle_x` (+ optional `camera_angle_y`), the NeRF-synthetic form. Other keys are kept in
meta['nerfstudio'] so that an export gives them back.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from minwm.cameras.camera import Cameras, ORTHONORMAL_TOL, orthonormal_violation
from minwm.errors import MinwmError
from minwm.io import read_json, write_json

INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x", "camera_angle_y")
# OpenGL camera axes -> OpenCV camera axes: flip the camera's y and z (right-multiply the c2w).
GL_TO_CV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))


def _number(value, where: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MinwmError(f"{where}: expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise MinwmError(f"{where}: expected a positive number, got {value!r}")
    return float(value)


def _intrinsics(frame: dict, top: dict, where: str, file: str) -> tuple[list[float], tuple[int, int] | None]:
    """Normalised (fx/W, fy/H, cx/W, cy/H) and (H, W) when known, for one frame."""
    def get(k):
        positive = k not in ("cx", "cy")
        if k in frame:
            return _number(frame[k], f"{where}.{k}", positive)
        if k in top:
            return _number(top[k], f"{file}: {k}", positive)
        return None

    fl_x, fl_y, cx, cy, w, h, ax, ay = (get(k) for k in INTRINSIC_KEYS)
    size = (int(h), int(w)) if w is not None and h is not None else None
    if fl_x is not None:
        if size is None:
            raise MinwmError(f"{where}: fl_x needs the image size w and h (pixels) to be normalised")
        fl_y = fl_x if fl_y is None else fl_y          # nerfstudio's own default
        cx = w / 2 if cx is None else cx
        cy = h / 2 if cy is None else cy
        return [fl_x / w, fl_y / h, cx / w, cy / h], size
    if ax is not None:
        fx = 0.5 / math.tan(ax / 2)
        if ay is not None:
            fy = 0.5 / math.tan(ay / 2)
        else:
            # Square pixels: fy/H = (fx/W) * W/H. Without w, h the NeRF-synthetic convention is square images.
            fy = fx * (w / h) if size else fx
        return [fx, fy, cx / w if cx is not None and w else 0.5, cy / h if cy is not None and h else 0.5], size
    raise MinwmError(f"{where}: no intrinsics (expected fl_x, fl_y, cx, cy, w, h or camera_angle_x, "
                     f"per frame or at the top level)")


def _matrix(value, where: str) -> torch.Tensor:
    try:
        M = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise MinwmError(f"{where}: expected a 4x4 (or 3x4) list of numbers") from None
    if M.shape not in ((4, 4), (3, 4)):
        raise MinwmError(f"{where}: expected a 4x4 (or 3x4) list of numbers, got shape {list(M.shape)}")
    if not torch.isfinite(M).all():
        raise MinwmError(f"{where}: non-finite value")
    if M.shape == (3, 4):
        M = torch.cat([M, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)])
    if (M[3] - torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)).abs().max() > 1e-6:
        raise MinwmError(f"{where}: last row must be [0, 0, 0, 1]")
    if orthonormal_violation(M[None, :3, :3]) is not None:
        raise MinwmError(f"{where}: rotation is not orthonormal with det +1 (tolerance {ORTHONORMAL_TOL})")
    return M


def parse_nerfstudio(data, where: str = "<transforms.json>") -> tuple[Cameras, dict]:
    if not isinstance(data, dict):
        raise MinwmError(f"{where}: expected a JSON object with 'frames'")
    frames = data.get("frames")
    if not isinstance(frames, list) or not frames:
        raise MinwmError(f"{where}: frames: expected a non-empty list")
    K, c2w, sizes, paths, extra_frames = [], [], [], [], []
    for i, fr in enumerate(frames):
        at = f"{where}: frames[{i}]"
        if not isinstance(fr, dict):
            raise MinwmError(f"{at}: expected an object")
        if "transform_matrix" not in fr:
            raise MinwmError(f"{at}: missing transform_matrix")
        c2w.append(_matrix(fr["transform_matrix"], f"{at}.transform_matrix") @ GL_TO_CV)
        k, size = _intrinsics(fr, data, at, where)
        K.append(k)
        sizes.append(size)
        paths.append(fr.get("file_path"))
        extra_frames.append({k: v for k, v in fr.items()
                             if k not in INTRINSIC_KEYS and k not in ("transform_matrix", "file_path")})
    cams = Cameras.from_c2w(torch.stack(c2w), torch.tensor(K, dtype=torch.float64))
    top = {k: v for k, v in data.items() if k not in INTRINSIC_KEYS and k != "frames"}
    meta = {
        "format": "nerfstudio",
        "source": None,
        "timestamps_us": None,
        "image_size": list(sizes[0]) if sizes[0] is not None and all(s == sizes[0] for s in sizes) else None,
        "file_paths": paths if all(isinstance(p, str) for p in paths) else None,
        "nerfstudio": {"top": top, "frames": extra_frames},
    }
    return cams, meta


def load_nerfstudio(path: str | Path) -> tuple[Cameras, dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "transforms.json"
        if not path.is_file():
            raise MinwmError(f"{path}: not found (a nerfstudio scene folder holds transforms.json)")
    data = read_json(path)
    return parse_nerfstudio(data, str(path))


def to_nerfstudio(cams: Cameras, meta: dict | None = None, image_size: tuple[int, int] | None = None) -> dict:
    """The transforms.json object. Pixel intrinsics need the image size: `image_size` (H, W) or
    meta['image_size']. Intrinsics are written at the top level when every frame shares them."""
    meta = meta or {}
    cams.validate("nerfstudio export")
    size = image_size or meta.get("image_size")
    if not size:
        raise MinwmError("nerfstudio export: the image size is unknown (give image_size / --image-size H W)")
    H, W = (int(x) for x in size)
    extra = meta.get("nerfstudio") or {}
    out = dict(extra.get("top") or {"camera_model": "OPENCV"})
    Kpix = cams.intrinsics * torch.tensor([W, H, W, H], dtype=torch.float64)
    shared = bool((cams.intrinsics == cams.intrinsics[:1]).all())
    intr = [{"fl_x": k[0], "fl_y": k[1], "cx": k[2], "cy": k[3], "w": W, "h": H} for k in Kpix.tolist()]
    if shared:
        out.update(intr[0])
    paths = meta.get("file_paths") or [f"images/frame_{i + 1:05d}.png" for i in range(len(cams))]
    extra_frames = extra.get("frames") or [{} for _ in range(len(cams))]
    if len(paths) != len(cams) or len(extra_frames) != len(cams):
        paths = [f"images/frame_{i + 1:05d}.png" for i in range(len(cams))]
        extra_frames = [{} for _ in range(len(cams))]
    c2w_gl = cams.c2w @ GL_TO_CV          # GL_TO_CV is its own inverse
    frames = []
    for i in range(len(cams)):
        fr = {"file_path": paths[i], "transform_matrix": c2w_gl[i].tolist()}
        if not shared:
            fr.update(intr[i])
        fr.update(extra_frames[i])
        frames.append(fr)
    out["frames"] = frames
    return out


def save_nerfstudio(path: str | Path, cams: Cameras, meta: dict | None = None,
                    image_size: tuple[int, int] | None = None) -> None:
    write_json(path, to_nerfstudio(cams, meta, image_size))
