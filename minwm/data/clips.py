"""The clip dataset on disk, its writer and its PyTorch reader.

A clip = frames (uint8 [F, H, W, 3]), per-frame cameras (w2c [F, 4, 4] OpenCV, intrinsics [F, 4]
normalised), a caption and a source. On disk::

    DIR/index.json          {"format": "minwm-clips", "version": 1, "clips": [entry, ...]}
    DIR/shards/00000.npz    per clip: <name>.frames.npy, <name>.w2c.npy, <name>.intrinsics.npy

An index entry: {"name", "shard", "frames", "height", "width", "caption", "source", "meta"} and,
instead of a `.frames` array, optionally "video": a path (relative to DIR) to a video file holding
the frames (decoded with PyAV; lossy, for large imported data). Frames are stored losslessly.
Shards are written atomically, one at a time, and the index last, so a reader never sees a clip
whose shard is incomplete; shard bytes depend only on the content (fixed zip timestamps).
"""

from __future__ import annotations

import io
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from minwm.cameras.camera import Cameras
from minwm.errors import MinwmError
from minwm.io import atomic_path, read_json, write_json

FORMAT, VERSION = "minwm-clips", 1
INDEX = "index.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass
class DataConfig:
    """Config section `data`: procedural clip rendering."""

    num_clips: int = 256
    frames: int = 17                 # 1 + 4k pixel frames
    height: int = 64
    width: int = 64
    seed: int = 0
    hfov_deg: float = 60.0           # horizontal field of view of the rendering camera
    supersample: int = 1             # s x s rays per pixel (textures are filtered analytically anyway)
    pose_noise_rot_deg: float = 0.0  # std of the rotation noise added to STORED cameras (not the render)
    pose_noise_trans: float = 0.0    # std of the translation noise (scene units) added to stored cameras
    clips_per_shard: int = 64

    def __post_init__(self):
        if self.frames < 1 or (self.frames - 1) % 4:
            raise ValueError(f"frames must be 1 + 4k (5, 9, 17, ...), got {self.frames}")
        if min(self.num_clips, self.height, self.width, self.supersample, self.clips_per_shard) < 1:
            raise ValueError("num_clips, height, width, supersample and clips_per_shard must be >= 1")
        if not 1.0 <= self.hfov_deg <= 170.0:
            raise ValueError(f"hfov_deg must be in [1, 170], got {self.hfov_deg}")
        if self.pose_noise_rot_deg < 0 or self.pose_noise_trans < 0:
            raise ValueError("pose noise must be >= 0")


@dataclass
class Clip:
    name: str
    frames: np.ndarray               # uint8 [F, H, W, 3]
    cameras: Cameras                 # F cameras
    caption: str
    source: str
    meta: dict = field(default_factory=dict)

    def validate(self) -> "Clip":
        """Raise MinwmError "clip <name>: <reason>" unless frames, cameras and text are consistent."""
        where = f"clip {self.name}"
        f = self.frames
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3:
            shape = getattr(f, "shape", None)
            raise MinwmError(f"{where}: frames must be a uint8 array [F, H, W, 3], got "
                             f"{getattr(f, 'dtype', type(f).__name__)} {tuple(shape) if shape is not None else ''}")
        if f.shape[0] < 1 or f.shape[1] < 1 or f.shape[2] < 1:
            raise MinwmError(f"{where}: empty frames {tuple(f.shape)}")
        n_cam = self.cameras.w2c.shape[0] if self.cameras.w2c.ndim == 3 else -1
        if n_cam != f.shape[0]:
            raise MinwmError(f"{where}: {f.shape[0]} frames but {n_cam} cameras")
        self.cameras.validate(where)
        if not isinstance(self.caption, str):
            raise MinwmError(f"{where}: caption must be a string, got {type(self.caption).__name__}")
        if not isinstance(self.source, str):
            raise MinwmError(f"{where}: source must be a string, got {type(self.source).__name__}")
        return self


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise MinwmError(f"clip name {name!r}: use 1-128 letters, digits, '_', '-' or '.', starting with a letter "
                         f"or digit")
    return name


# ---- writing ---------------------------------------------------------------------------------
def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def write_shard(path: Path, clips: list[Clip]) -> None:
    """One atomic .npz holding the clips' arrays; deterministic bytes for the same content."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w") as zf:
            for c in clips:
                for key, arr in (("frames", c.frames), ("w2c", c.cameras.w2c.numpy()),
                                 ("intrinsics", c.cameras.intrinsics.numpy())):
                    info = zipfile.ZipInfo(f"{c.name}.{key}.npy", date_time=ZIP_TIME)
                    info.external_attr = 0o644 << 16
                    # Level 1 deflate: renders compress several-fold and decode fast.
                    zf.writestr(info, _npy_bytes(arr), compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)


def _entry(c: Clip, shard: str) -> dict:
    return {"name": c.name, "shard": shard, "frames": int(c.frames.shape[0]), "height": int(c.frames.shape[1]),
            "width": int(c.frames.shape[2]), "caption": c.caption, "source": c.source, "meta": c.meta}


def read_index(root: str | Path) -> dict:
    root = Path(root)
    path = root / INDEX
    if not path.is_file():
        raise MinwmError(f"{root}: not a clip dataset (no {INDEX})")
    index = read_json(path)
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("clips"), list):
        raise MinwmError(f"{path}: expected {{'format': '{FORMAT}', 'version': {VERSION}, 'clips': [...]}}")
    if index.get("version") != VERSION:
        raise MinwmError(f"{path}: version {index.get('version')!r}, this minwm reads version {VERSION}")
    return index


class ClipWriter:
    """Append clips to a dataset directory, `clips_per_shard` to a shard.

    Use as a context manager: shards are written as they fill, the index once at the end (and only
    on success), so an interrupted run leaves the previous index untouched. With `append`, an
    existing dataset is extended; otherwise the directory must not hold one already."""

    def __init__(self, root: str | Path, clips_per_shard: int = 64, append: bool = False):
        self.root = Path(root)
        self.clips_per_shard = clips_per_shard
        if (self.root / INDEX).exists():
            if not append:
                raise MinwmError(f"{self.root}: already holds a clip dataset ({INDEX}); choose an empty --out")
            self.entries = list(read_index(self.root)["clips"])
        else:
            if self.root.exists() and not self.root.is_dir():
                raise MinwmError(f"{self.root}: exists and is not a directory")
            self.entries = []
        self.names = {e.get("name") for e in self.entries}
        existing = sorted(self.root.glob("shards/*.npz")) if self.root.is_dir() else []
        self.next_shard = 1 + max([int(p.stem) for p in existing if p.stem.isdigit()], default=-1)
        self.pending: list[Clip] = []

    def add(self, clip: Clip) -> None:
        check_name(clip.name)
        clip.validate()
        if clip.name in self.names:
            raise MinwmError(f"clip {clip.name}: a clip of that name is already in {self.root}")
        self.names.add(clip.name)
        self.pending.append(clip)
        if len(self.pending) >= self.clips_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        rel = f"shards/{self.next_shard:05d}.npz"
        write_shard(self.root / rel, self.pending)
        self.entries.extend(_entry(c, rel) for c in self.pending)
        self.next_shard += 1
        self.pending = []

    def close(self) -> None:
        self.flush()
        write_json(self.root / INDEX, {"format": FORMAT, "version": VERSION, "clips": self.entries}, indent=None)

    def __enter__(self) -> "ClipWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


# ---- reading ---------------------------------------------------------------------------------
def _check_entry(e, i: int, root: Path) -> str:
    """The clip's name, after checking the index fields a reader relies on."""
    if not isinstance(e, dict):
        raise MinwmError(f"{root / INDEX}: clips[{i}] is not a mapping")
    name = e.get("name")
    where = f"clip {name}" if isinstance(name, str) else f"{root / INDEX}: clips[{i}]"
    if not isinstance(name, str):
        raise MinwmError(f"{where}: missing field 'name'")
    for key in ("shard", "frames", "height", "width", "caption", "source"):
        if key not in e:
            raise MinwmError(f"{where}: missing field '{key}'")
    for key in ("frames", "height", "width"):
        if isinstance(e[key], bool) or not isinstance(e[key], int) or e[key] < 1:
            raise MinwmError(f"{where}: field '{key}' must be a positive integer, got {e[key]!r}")
    for key in ("caption", "source", "shard"):
        if not isinstance(e[key], str):
            raise MinwmError(f"{where}: field '{key}' must be a string, got {e[key]!r}")
    if "video" in e and not isinstance(e["video"], str):
        raise MinwmError(f"{where}: field 'video' must be a path string, got {e['video']!r}")
    return name


def read_video(path: Path, where: str) -> np.ndarray:
    """All frames of a video as uint8 [F, H, W, 3] (PyAV); a one-line error if it cannot be read."""
    import av

    if not path.is_file():
        raise MinwmError(f"{where}: video {path} not found")
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError, IndexError, OSError) as e:
        raise MinwmError(f"{where}: cannot read video {path} ({type(e).__name__}: {e})") from None
    if not frames:
        raise MinwmError(f"{where}: video {path} has no frames")
    return np.stack(frames)


class ClipDataset(torch.utils.data.Dataset):
    """Clips of a dataset directory; `ds[i]` is a validated Clip.

    The index is checked when the dataset is opened; each clip's arrays are checked when read (frame
    count = camera count = index count, sizes, finite poses, orthonormal rotations). A bad clip raises
    MinwmError "clip <name>: <reason>"; with skip_bad=True every clip is read once up front and the bad
    ones are dropped with a warning naming each (see `rejected`)."""

    def __init__(self, root: str | Path, skip_bad: bool = False):
        self.root = Path(root)
        index = read_index(self.root)
        self.entries: list[dict] = []
        self.rejected: list[tuple[str, str]] = []
        seen = set()
        for i, e in enumerate(index["clips"]):
            try:
                name = _check_entry(e, i, self.root)
                if name in seen:
                    raise MinwmError(f"clip {name}: appears twice in {self.root / INDEX}")
                seen.add(name)
            except MinwmError as err:
                if not skip_bad:
                    raise
                self._reject(e.get("name") if isinstance(e, dict) else f"clips[{i}]", err)
                continue
            self.entries.append(e)
        if skip_bad:
            good = []
            for e in self.entries:
                try:
                    self._load(e)
                    good.append(e)
                except MinwmError as err:
                    self._reject(e["name"], err)
            self.entries = good

    def _reject(self, name, err: MinwmError) -> None:
        self.rejected.append((str(name), str(err)))
        warnings.warn(f"skipping {err}", stacklevel=3)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        return [e["name"] for e in self.entries]

    def __getitem__(self, i: int) -> Clip:
        return self._load(self.entries[i])

    def _load(self, e: dict) -> Clip:
        name = e["name"]
        where = f"clip {name}"
        shard = self.root / e["shard"]
        keys = ["w2c", "intrinsics"] + ([] if "video" in e else ["frames"])
        arrays = {}
        try:
            with np.load(shard, allow_pickle=False) as z:
                for k in keys:
                    member = f"{name}.{k}"
                    if member not in z.files:
                        raise MinwmError(f"{where}: '{member}' missing from shard {shard}")
                    arrays[k] = z[member]
        except MinwmError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise MinwmError(f"{where}: cannot read shard {shard} ({type(err).__name__}: {err})") from None
        frames = read_video(self.root / e["video"], where) if "video" in e else arrays["frames"]
        w2c, K = arrays["w2c"], arrays["intrinsics"]
        if w2c.ndim != 3 or w2c.shape[1:] != (4, 4) or K.ndim != 2 or K.shape[1] != 4:
            raise MinwmError(f"{where}: cameras have shapes w2c {w2c.shape}, intrinsics {K.shape}; expected "
                             f"[F, 4, 4] and [F, 4]")
        if frames.ndim == 4 and frames.shape[0] != w2c.shape[0]:
            raise MinwmError(f"{where}: {frames.shape[0]} frames but {w2c.shape[0]} cameras")
        if K.shape[0] != w2c.shape[0]:
            raise MinwmError(f"{where}: {w2c.shape[0]} w2c matrices but {K.shape[0]} intrinsics")
        if not (np.isfinite(w2c).all() and np.isfinite(K).all()):
            bad = int(np.nonzero(~(np.isfinite(w2c).reshape(len(w2c), -1).all(1) & np.isfinite(K).all(1)))[0][0])
            raise MinwmError(f"{where}: frame {bad}: non-finite camera pose or intrinsics")
        clip = Clip(name, frames, Cameras(torch.from_numpy(w2c.astype(np.float64)),
                                          torch.from_numpy(K.astype(np.float64))),
                    e["caption"], e["source"], dict(e.get("meta") or {}))
        clip.validate()
        expect = (e["frames"], e["height"], e["width"])
        if tuple(frames.shape[:3]) != expect:
            raise MinwmError(f"{where}: frames have shape {tuple(frames.shape[:3])} but the index says "
                             f"[frames, height, width] = {list(expect)}")
        return clip


def iter_clips(root: str | Path, skip_bad: bool = False) -> Iterator[Clip]:
    ds = ClipDataset(root, skip_bad=skip_bad)
    for i in range(len(ds)):
        yield ds[i]


def collate_clips(clips: list[Clip]) -> dict:
    """A batch from clips of one shape: frames uint8 [B, F, H, W, 3], w2c [B, F, 4, 4] and
    intrinsics [B, F, 4] float64, captions, names, sources (for a DataLoader's collate_fn)."""
    shapes = {c.frames.shape for c in clips}
    if len(shapes) != 1:
        raise MinwmError(f"collate: clips of different shapes {sorted(shapes)} cannot share a batch "
                         f"({', '.join(c.name for c in clips)})")
    return {"frames": torch.from_numpy(np.stack([c.frames for c in clips])),
            "w2c": torch.stack([c.cameras.w2c for c in clips]),
            "intrinsics": torch.stack([c.cameras.intrinsics for c in clips]),
            "captions": [c.caption for c in clips], "names": [c.name for c in clips],
            "sources": [c.source for c in clips]}


def perturb_cameras(cams: Cameras, rng: np.random.Generator, rot_deg: float, trans: float) -> Cameras:
    """Cameras with independent per-frame pose noise: a rotation about a random axis by an angle
    ~ N(0, rot_deg) and a camera-centre shift ~ N(0, trans) per axis. Models imperfect pose labels
    (e.g. SfM on real video); the frames are rendered from the clean poses."""
    F = len(cams)
    axis = rng.normal(size=(F, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    ang = np.radians(rng.normal(scale=rot_deg, size=F)) if rot_deg > 0 else np.zeros(F)
    shift = rng.normal(scale=trans, size=(F, 3)) if trans > 0 else np.zeros((F, 3))
    Kx = np.zeros((F, 3, 3))
    Kx[:, 0, 1], Kx[:, 0, 2], Kx[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    Kx = Kx - Kx.transpose(0, 2, 1)
    s, c = np.sin(ang)[:, None, None], np.cos(ang)[:, None, None]
    dR = np.eye(3)[None] + s * Kx + (1 - c) * (Kx @ Kx)                     # Rodrigues
    c2w = cams.c2w.numpy().copy()
    c2w[:, :3, :3] = dR @ c2w[:, :3, :3]
    c2w[:, :3, 3] += shift
    return Cameras.from_c2w(torch.from_numpy(c2w), cams.intrinsics.clone())

