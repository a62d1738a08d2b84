"""RealEstate10K camera files (.txt).

Line 1 is the source video URL; then one line per frame with 19 columns:
`timestamp_us fx fy cx cy 0 0` and the 3x4 world-to-camera matrix row-major (OpenCV axes), with
fx, fy, cx, cy normalised by the image width/height. The URL and timestamps are kept in `meta` so
that an export reproduces the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from minwm.cameras.camera import Cameras, ORTHONORMAL_TOL, orthonormal_violation
from minwm.errors import MinwmError
from minwm.io import write_text

NCOLS = 19
DEFAULT_FPS = 30  # only used to invent timestamps when a trajectory has none


def _numbers(tokens: list[str], where: str) -> list[float]:
    out = []
    for c, tok in enumerate(tokens, start=1):
        try:
            x = float(tok)
        except ValueError:
            raise MinwmError(f"{where}: column {c}: expected a number, got '{tok}'") from None
        if not math.isfinite(x):
            raise MinwmError(f"{where}: column {c}: non-finite value '{tok}'")
        out.append(x)
    return out


def _is_camera_line(line: str) -> bool:
    tokens = line.split()
    if len(tokens) != NCOLS:
        return False
    try:
        [float(t) for t in tokens]
    except ValueError:
        return False
    return True


def parse_re10k(text: str, where: str = "<re10k>") -> tuple[Cameras, dict]:
    """Parse RealEstate10K text; errors name `where` and the 1-based line number."""
    lines = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
    if not lines:
        raise MinwmError(f"{where}: empty file (expected a URL line, then one camera per line)")
    source = None
    if not _is_camera_line(lines[0][1]):
        source = lines[0][1]
        lines = lines[1:]
    if not lines:
        raise MinwmError(f"{where}: no camera lines after the URL line")
    stamps, K, w2c = [], [], []
    for n, line in lines:
        at = f"{where}:{n}"
        tokens = line.split()
        if len(tokens) != NCOLS:
            raise MinwmError(f"{at}: expected {NCOLS} columns (timestamp fx fy cx cy 0 0 and a 3x4 w2c "
                             f"row-major), got {len(tokens)}")
        vals = _numbers(tokens, at)
        if vals[0] != int(vals[0]):
            raise MinwmError(f"{at}: column 1: expected an integer timestamp in microseconds, got '{tokens[0]}'")
        if vals[1] <= 0 or vals[2] <= 0:
            raise MinwmError(f"{at}: focal lengths (columns 2-3) must be positive")
        M = torch.eye(4, dtype=torch.float64)
        M[:3] = torch.tensor(vals[7:], dtype=torch.float64).reshape(3, 4)
        if orthonormal_violation(M[None, :3, :3]) is not None:
            raise MinwmError(f"{at}: rotation (columns 8-10, 12-14, 16-18) is not orthonormal with det +1 "
                             f"(tolerance {ORTHONORMAL_TOL})")
        stamps.append(int(vals[0]))
        K.append(vals[1:5])
        w2c.append(M)
    cams = Cameras(torch.stack(w2c), torch.tensor(K, dtype=torch.float64))
    return cams, {"format": "re10k", "source": source, "timestamps_us": stamps}


def load_re10k(path: str | Path) -> tuple[Cameras, dict]:
    path = Path(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise MinwmError(f"{path}: not a text file (expected RealEstate10K camera lines)") from None
    return parse_re10k(text, str(path))


def format_re10k(cams: Cameras, meta: dict | None = None) -> str:
    """RealEstate10K text for `cams`. Uses meta['source'] as the URL line and meta['timestamps_us'];
    missing timestamps are frame times at DEFAULT_FPS."""
    meta = meta or {}
    cams.validate("re10k export")
    stamps = meta.get("timestamps_us")
    if stamps is None or len(stamps) != len(cams):
        stamps = [round(i * 1e6 / DEFAULT_FPS) for i in range(len(cams))]
    # The URL line is mandatory in the format; "unknown" marks a trajectory with no video behind it.
    out = [str(meta.get("source") or "unknown").splitlines()[0]]
    for ts, k, m in zip(stamps, cams.intrinsics.tolist(), cams.w2c[:, :3].reshape(-1, 12).tolist()):
        out.append(" ".join([str(int(ts))] + [f"{x:.9f}" for x in k + [0.0, 0.0] + m]))
    return "\n".join(out) + "\n"


def save_re10k(path: str | Path, cams: Cameras, meta: dict | None = None) -> None:
    write_text(path, format_re10k(cams, meta))
