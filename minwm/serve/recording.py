"""Record a play session to mp4 frame by frame (H.264 via PyAV), so a long session never sits in memory."""

from __future__ import annotations

import os
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from minwm.errors import MinwmError


class Mp4Recorder:
    """Append uint8 RGB frames [H, W, 3] (or [N, H, W, 3]); close() moves the finished file onto `path`.

    The file is written beside `path` under a temporary name and renamed only when complete, so a
    reader never sees half an mp4. H.264 with yuv420p needs even sides: odd ones are padded by
    repeating the last row/column (a toy model may well make odd-sized frames)."""

    def __init__(self, path: str | os.PathLike, fps: float, crf: int = 20):
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
        self._tmp = self._tmpdir / self.path.name
        self._container = av.open(str(self._tmp), mode="w")
        # A rational rate keeps timestamps exact for non-integer fps such as 12.5.
        self._stream = self._container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(crf), "preset": "veryfast"}
        self._size: tuple[int, int] | None = None
        self.frames = 0

    def append(self, frames: np.ndarray) -> None:
        import av

        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise MinwmError(f"recording {self.path}: expected uint8 frames [N, H, W, 3], got "
                             f"{frames.dtype} {tuple(frames.shape)}")
        h, w = frames.shape[1:3]
        if self._size is None:
            self._size = (h, w)
            self._stream.height, self._stream.width = h + h % 2, w + w % 2
        elif self._size != (h, w):
            raise MinwmError(f"recording {self.path}: frame size {h}x{w} differs from the first frame's "
                             f"{self._size[0]}x{self._size[1]}")
        if h % 2 or w % 2:
            frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        for f in frames:
            self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
            self.frames += 1

    def close(self) -> Path | None:
        """Finish the file and return its path; with no frames appended nothing is written (None)."""
        try:
            if self.frames:
                self._container.mux(self._stream.encode(None))   # flush the encoder's delayed frames
            self._container.close()
            if not self.frames:
                return None
            os.replace(self._tmp, self.path)
            return self.path
        finally:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def abort(self) -> None:
        """Drop the recording (the session ended abnormally); nothing is left on disk."""
        try:
            self._container.close()
        except Exception:   # the file is being thrown away; a codec error while closing it changes nothing
            pass
        shutil.rmtree(self._tmpdir, ignore_errors=True)
