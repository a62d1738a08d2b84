"""Camera-control and image metrics (pure functions).

Camera metrics follow CamI2V's evaluation (its `glomap_evaluation.py`, which CameraCtrl's RotErr /
TransErr also use). Both trajectories are first made relative to their first frame and written as
camera-to-world matrices c2w_i = [R_i | t_i] (t_i = the camera centre in frame 0's camera axes):

    RotErr   = sum_i arccos((tr(R_est_i^T R_ref_i) - 1) / 2)            (radians, as CamI2V sums them)
    TransErr = sum_i || t^_ref_i - t^_est_i ||_2
    CamMC    = sum_i || [R_ref_i | t^_ref_i] - [R_est_i | t^_est_i] ||_F  (3x4 matrices)

where t^ = t / (max_j ||t_j|| + 1e-9) normalises EACH trajectory by its own largest translation
(CamI2V's "relative" variant), because a camera estimated from video has no scale. Sums run over
all frames (frame 0 contributes 0), so the totals grow with clip length; `rot_err_deg` is the
mean geodesic angle over frames 1.. in degrees, the figure our acceptance thresholds use. A
trajectory that does not translate stays at t^ = 0, so an estimator that correctly reports "no
translation" scores TransErr 0 on a pure rotation.

Direction accuracy reads the commanded action of every latent step: for each axis the step
commands (yaw, pitch, forward/back, strafe, up/down), the estimated motion over that step (in the
camera's own frame at the step's start, the frame the action language moves in) must have the
commanded sign. Translation signs survive the unknown positive scale.

PSNR / SSIM compare frames [..., H, W, C] (uint8 with range 255, or floats in [0, 1]). SSIM is
Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, per channel,
averaged over the valid (unpadded) window positions: the common "gaussian_weights" convention.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from minwm.cameras.actions import PITCH, TRANSLATION, YAW, parse_actions
from minwm.cameras.camera import Cameras
from minwm.errors import MinwmError

EPS = 1e-9
# Direction axes: name -> how to read the commanded sign from a step's keys.
AXES = ("strafe", "vertical", "forward", "yaw", "pitch")


# ---- camera metrics --------------------------------------------------------------------------
def geodesic_angle(Ra: torch.Tensor, Rb: torch.Tensor) -> torch.Tensor:
    """Angle (radians) of Ra^T Rb for rotations [..., 3, 3]."""
    c = ((Ra.transpose(-1, -2) @ Rb).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.arccos(c.clamp(-1.0, 1.0))


def relative_c2w(cams: Cameras) -> torch.Tensor:
    """c2w [F, 4, 4] of the trajectory expressed in its first camera's frame."""
    return cams.relative_to_first().c2w


def normalize_translation(c2w: torch.Tensor) -> torch.Tensor:
    """c2w with translations divided by the trajectory's largest translation norm (+1e-9)."""
    out = c2w.clone()
    out[:, :3, 3] = c2w[:, :3, 3] / (c2w[:, :3, 3].norm(dim=-1).amax() + EPS)
    return out


def camera_metrics(est: Cameras, ref: Cameras) -> dict:
    """RotErr, TransErr, CamMC (CamI2V definitions, see module doc) of `est` against `ref`.

    Returns rot_err (radians, summed), rot_err_deg (mean over frames 1.. in degrees), trans_err,
    cam_mc (summed), frames, and per_frame lists rot_deg, trans, cam_mc."""
    if len(est) != len(ref):
        raise MinwmError(f"camera metrics: estimated trajectory has {len(est)} frames, reference has {len(ref)}")
    if len(est) < 2:
        raise MinwmError(f"camera metrics: {len(est)} frame(s); a trajectory needs at least 2")
    a = normalize_translation(relative_c2w(ref))
    b = normalize_translation(relative_c2w(est))
    rot = geodesic_angle(a[:, :3, :3], b[:, :3, :3])
    trans = (a[:, :3, 3] - b[:, :3, 3]).norm(dim=-1)
    mc = (a[:, :3, :4] - b[:, :3, :4]).flatten(1).norm(dim=-1)
    return {
        "rot_err": float(rot.sum()),
        "rot_err_deg": float(torch.rad2deg(rot[1:]).mean()),
        "trans_err": float(trans.sum()),
        "cam_mc": float(mc.sum()),
        "frames": len(est),
        "per_frame": {"rot_deg": torch.rad2deg(rot).tolist(), "trans": trans.tolist(), "cam_mc": mc.tolist()},
    }


# ---- direction accuracy ----------------------------------------------------------------------
def commanded_signs(step: frozenset[str]) -> dict[str, int]:
    """Commanded sign per axis for one step (axes the step does not command are absent)."""
    t = [0, 0, 0]
    yaw = pitch = 0
    for k in step:
        for ax, v in enumerate(TRANSLATION.get(k, (0, 0, 0))):
            t[ax] += v
        yaw += YAW.get(k, 0)
        pitch += PITCH.get(k, 0)
    vals = dict(zip(AXES, (*t, yaw, pitch)))
    return {ax: int(np.sign(v)) for ax, v in vals.items() if v != 0}


def step_motion_readout(cams: Cameras) -> dict[str, torch.Tensor]:
    """Per consecutive pair: translation of the later camera in the earlier one's axes (strafe x,
    vertical y, forward z) and the yaw / pitch of the relative rotation R = R_y(yaw) R_x(pitch)."""
    rel = cams.w2c[:-1] @ cams.c2w[1:]
    R, t = rel[:, :3, :3], rel[:, :3, 3]
    return {"strafe": t[:, 0], "vertical": t[:, 1], "forward": t[:, 2],
            "yaw": torch.atan2(R[:, 0, 2], R[:, 2, 2]), "pitch": torch.asin((-R[:, 1, 2]).clamp(-1, 1))}


def direction_checks(est: Cameras, steps: list[frozenset[str]] | str,
                     frames_per_step: int | None = None) -> list[dict]:
    """One record per (step, commanded axis): step, axis, commanded (+1/-1), estimated value
    (radians or scene units up to scale) over the step, agree (sign matches; 0 never agrees).

    `est` has one camera per pixel frame; step n runs from frame n*k to (n+1)*k, k = frames_per_step
    (inferred as (F - 1) / len(steps) when None)."""
    steps = parse_actions(steps) if isinstance(steps, str) else list(steps)
    if not steps:
        raise MinwmError("direction accuracy: no commanded steps")
    k = frames_per_step
    if k is None:
        if (len(est) - 1) % len(steps):
            raise MinwmError(f"direction accuracy: {len(est)} frames do not split into {len(steps)} steps "
                             "(expected 1 + k * steps frames)")
        k = (len(est) - 1) // len(steps)
    if k < 1 or len(steps) * k + 1 > len(est):
        raise MinwmError(f"direction accuracy: {len(steps)} steps of {k} frames need {len(steps) * k + 1} "
                         f"frames, the trajectory has {len(est)}")
    read = step_motion_readout(est[:: k][: len(steps) + 1])
    out = []
    for n, step in enumerate(steps):
        for axis, sign in commanded_signs(step).items():
            v = float(read[axis][n])
            out.append({"step": n, "axis": axis, "commanded": sign, "estimated": v,
                        "agree": bool(v != 0 and math.copysign(1, v) == sign)})
    return out


def direction_accuracy(est: Cameras, steps: list[frozenset[str]] | str,
                       frames_per_step: int | None = None) -> float:
    """Fraction of commanded (step, axis) pairs whose estimated motion has the commanded sign;
    NaN when no step commands any motion (e.g. a pause)."""
    checks = direction_checks(est, steps, frames_per_step)
    return float(np.mean([c["agree"] for c in checks])) if checks else float("nan")


# ---- image metrics ---------------------------------------------------------------------------
def _as_float(a, b) -> tuple[torch.Tensor, torch.Tensor, float]:
    ta, tb = (torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x for x in (a, b))
    if ta.shape != tb.shape:
        raise MinwmError(f"image metrics: shapes differ: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    if ta.ndim < 3:
        raise MinwmError(f"image metrics: shape {tuple(ta.shape)}, expected [..., H, W, C]")
    if ta.dtype != tb.dtype:
        raise MinwmError(f"image metrics: dtypes differ: {ta.dtype} vs {tb.dtype}")
    rng = 255.0 if ta.dtype == torch.uint8 else 1.0
    return ta.to(torch.float64), tb.to(torch.float64), rng


def psnr(a, b, reduction: str = "mean") -> float | torch.Tensor:
    """PSNR (dB) per image over its last three dims [H, W, C], averaged unless reduction="none".
    Identical images give inf."""
    x, y, rng = _as_float(a, b)
    mse = ((x - y) ** 2).flatten(-3).mean(-1)
    out = 10 * torch.log10(rng ** 2 / mse)          # mse 0 -> inf, as it should
    return out if reduction == "none" else float(out.mean())


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a, b, reduction: str = "mean", win: int = 11, sigma: float = 1.5) -> float | torch.Tensor:
    """SSIM per image [..., H, W, C] (see module doc), averaged unless reduction="none"."""
    x, y, rng = _as_float(a, b)
    H, W, C = x.shape[-3:]
    if min(H, W) < win:
        raise MinwmError(f"ssim: images are {H}x{W}, smaller than the {win}x{win} window")
    lead = x.shape[:-3]
    to_nchw = lambda t: t.reshape(-1, H, W, C).permute(0, 3, 1, 2).reshape(-1, 1, H, W)  # noqa: E731
    x, y = to_nchw(x), to_nchw(y)
    g = gaussian_window(win, sigma)
    kx, ky = g.view(1, 1, 1, win), g.view(1, 1, win, 1)
    blur = lambda t: torch.nn.functional.conv2d(torch.nn.functional.conv2d(t, kx), ky)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    per_image = s.reshape(-1, C, *s.shape[-2:]).mean((1, 2, 3)).reshape(lead)
    return per_image if reduction == "none" else float(per_image.mean())
