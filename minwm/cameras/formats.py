"""Load and save camera trajectories in any supported format, detecting the format when not given.

Formats: "re10k" (RealEstate10K .txt), "nerfstudio" (transforms.json, also DL3DV and NeRF-synthetic;
a folder holding transforms.json works too) and "json" (ours, see jsonfmt.py). `meta` is a dict with
format, source, timestamps_us, image_size [H, W], file_paths (each may be None) so that a conversion
keeps what the target format can hold.
"""

from __future__ import annotations

from pathlib import Path

from minwm.cameras.camera import Cameras
from minwm.cameras.jsonfmt import FORMAT as JSON_FORMAT, load_json, save_json
from minwm.cameras.nerfstudio import load_nerfstudio, save_nerfstudio
from minwm.cameras.re10k import load_re10k, save_re10k
from minwm.errors import MinwmError
from minwm.io import read_json

FORMATS = ("json", "re10k", "nerfstudio")
_LOADERS = {"json": load_json, "re10k": load_re10k, "nerfstudio": load_nerfstudio}


def detect_format(path: str | Path) -> str:
    """Format of an existing camera file, from its suffix and (for .json) its content."""
    path = Path(path)
    if path.is_dir():
        if (path / "transforms.json").is_file():
            return "nerfstudio"
        raise MinwmError(f"{path}: a folder without transforms.json (expected a camera file)")
    if not path.is_file():
        raise MinwmError(f"{path}: file not found")
    if path.suffix.lower() == ".txt":
        return "re10k"
    if path.suffix.lower() == ".json":
        data = read_json(path)
        if isinstance(data, dict):
            fmt = data.get("format")
            if isinstance(fmt, str) and fmt.startswith("minwm.cameras/"):
                return "json"
            if isinstance(data.get("frames"), list) and data["frames"] and isinstance(data["frames"][0], dict) \
                    and "transform_matrix" in data["frames"][0]:
                return "nerfstudio"
    raise MinwmError(f"{path}: cannot tell the camera format (expected a RealEstate10K .txt, a nerfstudio "
                     f"transforms.json or a '{JSON_FORMAT}' .json); name it with --from")


def _check_fmt(fmt: str) -> str:
    if fmt not in FORMATS:
        raise MinwmError(f"camera format '{fmt}' is not one of: {', '.join(FORMATS)}")
    return fmt


def load_cameras(path: str | Path, fmt: str | None = None) -> tuple[Cameras, dict]:
    """Read a trajectory; returns (validated Cameras, meta)."""
    path = Path(path)
    if fmt is None:
        fmt = detect_format(path)
    elif not path.exists():
        raise MinwmError(f"{path}: file not found")
    cams, meta = _LOADERS[_check_fmt(fmt)](path)
    meta["path"] = str(path)
    return cams.validate(str(path)), meta


def format_for_output(path: str | Path) -> str:
    """Default format for writing `path`: .txt is RealEstate10K, transforms.json nerfstudio, other .json ours."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        return "re10k"
    if path.name.lower() == "transforms.json":
        return "nerfstudio"
    if path.suffix.lower() == ".json":
        return "json"
    raise MinwmError(f"{path}: cannot tell which camera format to write (use .txt, .json or give the format)")


def save_cameras(path: str | Path, cams: Cameras, fmt: str | None = None, meta: dict | None = None,
                 image_size: tuple[int, int] | None = None) -> None:
    """Write atomically. `image_size` (H, W) overrides meta['image_size'] (nerfstudio needs one)."""
    fmt = _check_fmt(fmt or format_for_output(path))
    meta = dict(meta or {})
    if image_size is not None:
        meta["image_size"] = [int(image_size[0]), int(image_size[1])]
    if fmt == "re10k":
        save_re10k(path, cams, meta)
    elif fmt == "nerfstudio":
        save_nerfstudio(path, cams, meta)
    else:
        save_json(path, cams, meta)
