"""What `minwm generate --trajectory` accepts, turned into per-latent-frame inputs.

Three forms:
- an action program (DSL, e.g. "w*8,w+l*4"): S steps -> S + 1 latent frames (frame 0 at the start camera, step n
  moves frame n-1 to frame n) -> 1 + T*S pixel frames with a 1 + T*k VAE (T = 4);
- a camera file (our JSON, RealEstate10K .txt, nerfstudio transforms.json): F per-pixel-frame cameras, cut to
  the longest 1 + T*k prefix (a note says so), subsampled to latent frames (latent i = pixel frame T*i,
  cameras.latent_cameras) and made relative to the first -> the same 1 + T*k pixel frames. The file's own
  intrinsics are used (they describe the camera to imitate).

A video is generated in whole chunks; the latent frames past the trajectory's end (padding of the last chunk)
hold the last camera still and their pixel frames are dropped, so the frame count always matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from minwm.cameras.actions import ActionConfig, cameras_to_actions, format_actions, parse_actions
from minwm.cameras.camera import Cameras, latent_cameras
from minwm.cameras.formats import load_cameras
from minwm.errors import MinwmError

@dataclass
class Trajectory:
    latent_frames: int                        # L: latent frames of the video (frame 0 included)
    steps: Optional[list[frozenset]] = None   # DSL form: L - 1 steps (the move into latent frame 1, 2, ...)
    cameras: Optional[Cameras] = None         # camera form: L latent cameras relative to the first
    source: str = ""
    note: str = ""                            # something the user should be told (e.g. frames dropped)

    def pixel_frames(self, temporal_factor: int) -> int:
        return 1 + temporal_factor * (self.latent_frames - 1)

    def labels(self, cfg: ActionConfig) -> list[str]:
        """Per latent frame, the keys that moved the camera into it ("" for frame 0 and for no motion)."""
        steps = self.steps if self.steps is not None else cameras_to_actions(self.cameras, cfg)
        return [""] + [format_actions([s]).replace("_", "") for s in steps]


def is_camera_file(spec: str) -> bool:
    """Programs never contain '.' or '/' (as in `minwm camera`): such a spec is a path even when missing, so a
    typo reads "file not found", not a DSL error."""
    return Path(spec).exists() or "." in spec or "/" in spec


def load_trajectory(spec: str, cfg: ActionConfig, temporal_factor: int, max_latent_frames: int) -> Trajectory:
    """A DSL string or a camera file path -> Trajectory; more than `max_latent_frames` latent frames is an error."""
    if not isinstance(spec, str) or not spec.strip():
        raise MinwmError("trajectory: empty (expected an action program like 'w*8,l*4' or a camera file)")
    cap = f"above the cap of {max_latent_frames} latent frames (inference.max_generate_frames)"
    if is_camera_file(spec):
        cams, _ = load_cameras(spec)
        F = len(cams)
        keep = 1 + temporal_factor * ((F - 1) // temporal_factor)
        note = ""
        if keep != F:
            note = (f"{spec}: {F} camera frames is not 1 + {temporal_factor}k; using the first {keep}")
            cams = cams[:keep]
        L = 1 + (keep - 1) // temporal_factor
        if L > max_latent_frames:
            raise MinwmError(f"trajectory: {spec} has {F} frames = {L} latent frames, {cap}")
        lat = latent_cameras(cams, temporal_factor).relative_to_first()
        return Trajectory(L, cameras=lat, source=spec, note=note)
    steps = parse_actions(spec, max(cfg.max_steps, max_latent_frames))
    if len(steps) + 1 > max_latent_frames:
        raise MinwmError(f"trajectory: {len(steps)} steps = {len(steps) + 1} latent frames, {cap}")
    return Trajectory(len(steps) + 1, steps=steps, source=spec)


def chunk_actions(traj: Trajectory, chunk: int, index: int) -> list[frozenset]:
    """The actions of chunk `index` (DSL form): latent frame i gets step i-1; frame 0 and padding get none."""
    out = []
    for i in range(index * chunk, (index + 1) * chunk):
        out.append(traj.steps[i - 1] if 1 <= i < traj.latent_frames else frozenset())
    return out


def chunk_cameras(traj: Trajectory, chunk: int, index: int) -> Cameras:
    """The latent cameras of chunk `index` (camera form), the last camera repeated past the end."""
    idx = [min(i, traj.latent_frames - 1) for i in range(index * chunk, (index + 1) * chunk)]
    return Cameras(traj.cameras.w2c[idx], traj.cameras.intrinsics[idx])


def num_chunks(traj: Trajectory, chunk: int) -> int:
    return -(-traj.latent_frames // chunk)
