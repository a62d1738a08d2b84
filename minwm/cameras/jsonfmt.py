"""minwm's own per-frame camera JSON ("minwm.cameras/1").

    {
      "format": "minwm.cameras/1",
      "image_size": [H, W],                  # optional, pixels
      "source": "https://...",               # optional, where the trajectory came from (URL, DSL, file)
      "frames": [
        {"w2c": [[r, r, r, t], [r, r, r, t], [r, r, r, t], [0, 0, 0, 1]],   # OpenCV axes
         "intrinsics": [fx/W, fy/H, cx/W, cy/H],
         "timestamp_us": 0,                  # optional integer
         "file_path": "images/0001.png"}     # optional
      ]
    }

Unknown keys are errors (a typo would otherwise be dropped silently); optional fields are all-or-none
across frames.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from minwm.cameras.camera import Cameras, ORTHONORMAL_TOL, orthonormal_violation
from minwm.errors import MinwmError
from minwm.io import read_json, write_text

FORMAT = "minwm.cameras/1"
TOP_KEYS = ("format", "image_size", "source", "frames")
FRAME_KEYS = ("w2c", "intrinsics", "timestamp_us", "file_path")


def _numbers(value, shape: tuple[int, ...], where: str) -> torch.Tensor:
    what = "x".join(map(str, shape))
    ok = isinstance(value, list)
    flat = []
    if ok and len(shape) == 2:
        ok = len(value) == shape[0] and all(isinstance(r, list) and len(r) == shape[1] for r in value)
        flat = [x for r in value for x in r] if ok else []
    elif ok:
        ok = len(value) == shape[0]
        flat = value if ok else []
    if not ok or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in flat):
        raise MinwmError(f"{where}: expected a {what} list of numbers")
    if not all(math.isfinite(x) for x in flat):
        raise MinwmError(f"{where}: non-finite value")
    return torch.tensor(value, dtype=torch.float64)


def parse_json(data, where: str = "<cameras.json>") -> tuple[Cameras, dict]:
    if not isinstance(data, dict):
        raise MinwmError(f"{where}: expected a JSON object with 'format' and 'frames'")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise MinwmError(f"{where}: {unknown[0]}: unknown key (expected one of: {', '.join(TOP_KEYS)})")
    if data.get("format") != FORMAT:
        raise MinwmError(f"{where}: format: expected '{FORMAT}', got {data.get('format')!r}")
    size = data.get("image_size")
    if size is not None and not (isinstance(size, list) and len(size) == 2
                                 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in size)):
        raise MinwmError(f"{where}: image_size: expected [H, W] positive integers, got {size!r}")
    source = data.get("source")
    if source is not None and not isinstance(source, str):
        raise MinwmError(f"{where}: source: expected a string")
    frames = data.get("frames")
    if not isinstance(frames, list) or not frames:
        raise MinwmError(f"{where}: frames: expected a non-empty list")
    w2c, K, stamps, paths = [], [], [], []
    for i, fr in enumerate(frames):
        at = f"{where}: frames[{i}]"
        if not isinstance(fr, dict):
            raise MinwmError(f"{at}: expected an object with w2c and intrinsics")
        unknown = sorted(set(fr) - set(FRAME_KEYS))
        if unknown:
            raise MinwmError(f"{at}.{unknown[0]}: unknown key (expected one of: {', '.join(FRAME_KEYS)})")
        for k in ("w2c", "intrinsics"):
            if k not in fr:
                raise MinwmError(f"{at}: missing {k}")
        M = _numbers(fr["w2c"], (4, 4), f"{at}.w2c")
        if (M[3] - torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)).abs().max() > 1e-6:
            raise MinwmError(f"{at}.w2c: last row must be [0, 0, 0, 1]")
        if orthonormal_violation(M[None, :3, :3]) is not None:
            raise MinwmError(f"{at}.w2c: rotation is not orthonormal with det +1 (tolerance {ORTHONORMAL_TOL})")
        k = _numbers(fr["intrinsics"], (4,), f"{at}.intrinsics")
        if (k[:2] <= 0).any():
            raise MinwmError(f"{at}.intrinsics: focal lengths fx/W, fy/H must be positive")
        ts = fr.get("timestamp_us")
        if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int)):
            raise MinwmError(f"{at}.timestamp_us: expected an integer, got {ts!r}")
        fp = fr.get("file_path")
        if fp is not None and not isinstance(fp, str):
            raise MinwmError(f"{at}.file_path: expected a string")
        w2c.append(M)
        K.append(k)
        stamps.append(ts)
        paths.append(fp)
    for name, vals in (("timestamp_us", stamps), ("file_path", paths)):
        if any(v is None for v in vals) and any(v is not None for v in vals):
            raise MinwmError(f"{where}: frames[{vals.index(None)}]: missing {name} (given for other frames)")
    cams = Cameras(torch.stack(w2c), torch.stack(K))
    meta = {
        "format": "json",
        "source": source,
        "timestamps_us": stamps if stamps[0] is not None else None,
        "image_size": size,
        "file_paths": paths if paths[0] is not None else None,
    }
    return cams, meta


def load_json(path: str | Path) -> tuple[Cameras, dict]:
    path = Path(path)
    data = read_json(path)
    return parse_json(data, str(path))


def to_json(cams: Cameras, meta: dict | None = None) -> dict:
    """Our JSON object for `cams`; meta may carry source, image_size, timestamps_us, file_paths."""
    meta = meta or {}
    cams.validate("json export")
    out: dict = {"format": FORMAT}
    if meta.get("image_size"):
        out["image_size"] = [int(x) for x in meta["image_size"]]
    if meta.get("source"):
        out["source"] = str(meta["source"])
    stamps, paths = meta.get("timestamps_us"), meta.get("file_paths")
    frames = []
    for i, (M, k) in enumerate(zip(cams.w2c.tolist(), cams.intrinsics.tolist())):
        fr = {"w2c": M, "intrinsics": k}
        if stamps is not None and len(stamps) == len(cams):
            fr["timestamp_us"] = int(stamps[i])
        if paths is not None and len(paths) == len(cams):
            fr["file_path"] = str(paths[i])
        frames.append(fr)
    out["frames"] = frames
    return out


def dumps_json(cams: Cameras, meta: dict | None = None) -> str:
    """Our JSON as text, one frame per line: readable, diffable, and floats keep full precision."""
    obj = to_json(cams, meta)
    head = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in obj.items() if k != "frames"]
    frames = ",\n".join(f"    {json.dumps(fr)}" for fr in obj["frames"])
    return "{\n" + "\n".join(head) + ("\n" if head else "") + '  "frames": [\n' + frames + "\n  ]\n}\n"


def save_json(path: str | Path, cams: Cameras, meta: dict | None = None) -> None:
    write_text(path, dumps_json(cams, meta))
