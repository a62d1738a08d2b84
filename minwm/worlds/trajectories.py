"""Camera trajectories for procedural clips.

The action language moves the camera once per LATENT frame. With a causal 1+4k temporal VAE, pixel
frame 4i carries latent i's camera and the 3 pixel frames in between are interpolated (centres
linearly, rotations by slerp) so the rendered video moves smoothly rather than in jumps.

`random_program` composes training trajectories from every action, alone and combined, with pauses;
`eval_trajectories` gives the prescribed evaluation set.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from minwm.cameras.actions import ActionConfig, actions_to_cameras, parse_actions
from minwm.cameras.camera import Cameras
from minwm.errors import MinwmError

TEMPORAL_FACTOR = 4

# Training moves: (program for one step, relative weight). Every key of the action language is here
# alone; compounds cover walking while turning/strafing/looking; "_" is a pause.
MOVES: tuple[tuple[str, float], ...] = (
    ("w", 3.0), ("s", 1.0), ("a", 1.0), ("d", 1.0), ("q", 0.7), ("e", 0.7),
    ("j", 1.5), ("l", 1.5), ("i", 0.7), ("k", 0.7),
    ("w+j", 1.2), ("w+l", 1.2), ("w+a", 0.6), ("w+d", 0.6), ("s+j", 0.4), ("s+l", 0.4),
    ("a+l", 0.4), ("d+j", 0.4), ("w+i", 0.3), ("w+k", 0.3), ("j+i", 0.3), ("l+k", 0.3),
    ("_", 0.8),
)


def num_latent_frames(frames: int, temporal_factor: int = TEMPORAL_FACTOR) -> int:
    """Latent frames of a 1 + t*k pixel clip (error otherwise)."""
    if frames < 1 or (frames - 1) % temporal_factor:
        raise MinwmError(f"frames: {frames} is not 1 + {temporal_factor}*k (e.g. 5, 9, 17, 33, 77)")
    return 1 + (frames - 1) // temporal_factor


def random_program(rng: np.random.Generator, steps: int, max_segment: int = 4) -> str:
    """A random action program of exactly `steps` steps: segments of 1..max_segment repeats of a move
    drawn from MOVES by weight. steps == 0 gives "" (a still, single-latent clip)."""
    if steps < 0:
        raise MinwmError(f"trajectory: steps must be >= 0, got {steps}")
    names = [m for m, _ in MOVES]
    p = np.array([w for _, w in MOVES])
    p = p / p.sum()
    parts, left = [], steps
    while left > 0:
        move = names[rng.choice(len(names), p=p)]
        n = int(min(left, rng.integers(1, max_segment + 1)))
        parts.append(move if n == 1 else f"{move}*{n}")
        left -= n
    return ",".join(parts)


def eval_trajectories(num_latent_frames: int) -> dict[str, str]:
    """Prescribed evaluation programs, each exactly num_latent_frames - 1 steps: every single action
    held for the whole clip, compound moves held, a pause, and longer compositions (walk then turn,
    zig-zag walk, look around, a loop)."""
    S = num_latent_frames - 1
    if S < 1:
        raise MinwmError(f"eval trajectories: need at least 2 latent frames, got {num_latent_frames}")
    out = {f"hold_{k}": f"{k}*{S}" for k in ("w", "s", "a", "d", "q", "e", "j", "l", "i", "k")}
    for combo in ("w+l", "w+j", "w+a", "w+d", "s+l", "w+i"):
        out[f"hold_{combo.replace('+', '_')}"] = f"{combo}*{S}"
    out["pause"] = f"_*{S}"

    def seq(*parts: tuple[str, int]) -> str:
        return ",".join(m if n == 1 else f"{m}*{n}" for m, n in parts if n > 0)

    h = S // 2
    out["walk_then_turn"] = seq(("w", S - h), ("l", h))
    out["turn_then_walk"] = seq(("j", h), ("w", S - h))
    out["long_walk"] = seq(("w", S))
    third = S // 3
    out["walk_strafe_walk"] = seq(("w", third), ("d", third), ("w", S - 2 * third))
    # Zig-zag: walking while turning alternately left and right, in runs of 2.
    zig = [("w+l" if (i // 2) % 2 == 0 else "w+j", 1) for i in range(S)]
    out["zigzag_walk"] = ",".join(m for m, _ in zig)
    q = S // 4
    out["look_around"] = seq(("i", q), ("l", q), ("k", q), ("j", S - 3 * q))
    return out


# ---- rotations -------------------------------------------------------------------------------
def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Unit quaternions [..., 4] (w, x, y, z), w >= 0, of rotation matrices [..., 3, 3] (float64).
    Uses the largest of the four candidate denominators for accuracy (Shepperd)."""
    R = torch.as_tensor(R, dtype=torch.float64)
    m = R
    tr = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    cands = torch.stack([
        torch.stack([1 + tr, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
        torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
                     m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
        torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0],
                     1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], m[..., 1, 2] + m[..., 2, 1]], -1),
        torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1],
                     1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1),
    ], -2)                                                            # [..., 4, 4]
    diag = torch.stack([tr, m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]], -1)
    best = diag.argmax(-1)
    q = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def slerp(q0: torch.Tensor, q1: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of unit quaternions [..., 4] at fractions s [...] (shortest arc)."""
    dot = (q0 * q1).sum(-1, keepdim=True)
    q1 = torch.where(dot < 0, -q1, q1)
    dot = dot.abs().clamp(max=1.0)
    theta = torch.acos(dot)
    s = s[..., None]
    small = theta < 1e-6
    sin_t = torch.sin(theta).clamp_min(1e-12)
    a = torch.where(small, 1 - s, torch.sin((1 - s) * theta) / sin_t)
    b = torch.where(small, s, torch.sin(s * theta) / sin_t)
    q = a * q0 + b * q1
    return q / q.norm(dim=-1, keepdim=True)


def interpolate_cameras(latent: Cameras, temporal_factor: int = TEMPORAL_FACTOR) -> Cameras:
    """Pixel-frame cameras 1 + t*(L-1) for L latent-frame cameras: pixel frame t*i is latent camera i
    exactly; in between, camera centres move linearly, camera orientations by slerp and intrinsics
    linearly."""
    L = len(latent)
    if L == 1 or temporal_factor == 1:
        return Cameras(latent.w2c.clone(), latent.intrinsics.clone())
    c2w = latent.c2w
    q = matrix_to_quaternion(c2w[:, :3, :3])
    pos = c2w[:, :3, 3]
    s = torch.arange(temporal_factor, dtype=torch.float64) / temporal_factor        # [t]
    q_all = slerp(q[:-1, None].expand(-1, temporal_factor, 4), q[1:, None].expand(-1, temporal_factor, 4),
                  s[None].expand(L - 1, -1)).reshape(-1, 4)
    lerp = lambda a: (a[:-1, None] + (a[1:, None] - a[:-1, None]) * s[None, :, None]).reshape(-1, a.shape[-1])  # noqa: E731
    out = torch.zeros(len(q_all) + 1, 4, 4, dtype=torch.float64)
    out[:-1, :3, :3] = quaternion_to_matrix(q_all)
    out[:-1, :3, 3] = lerp(pos)
    out[-1] = c2w[-1]
    out[:, 3, 3] = 1.0
    # Latent frames themselves are copied exactly (no round trip through quaternions).
    out[::temporal_factor] = c2w
    K = torch.cat([lerp(latent.intrinsics), latent.intrinsics[-1:]])
    return Cameras.from_c2w(out, K)


def program_cameras(dsl: str, frames: int, intrinsics, cfg: ActionConfig | None = None,
                    temporal_factor: int = TEMPORAL_FACTOR) -> Cameras:
    """Pixel-frame cameras for a program driving a `frames`-frame clip (frames = 1 + t*k; the program
    must have exactly k steps), starting at the world origin (identity w2c)."""
    L = num_latent_frames(frames, temporal_factor)
    cfg = cfg or ActionConfig()
    steps = parse_actions(dsl, cfg.max_steps) if dsl.strip() else []
    if len(steps) != L - 1:
        raise MinwmError(f"trajectory '{dsl}': {len(steps)} steps, expected {L - 1} for {frames} frames "
                         f"({L} latent frames)")
    latent = actions_to_cameras(steps, cfg, intrinsics)
    return interpolate_cameras(latent, temporal_factor)


def square_intrinsics(hfov_deg: float, height: int, width: int) -> tuple[float, float, float, float]:
    """Normalised intrinsics (fx/W, fy/H, cx/W, cy/H) for a horizontal field of view, square pixels,
    centred principal point."""
    fx = 0.5 / math.tan(math.radians(hfov_deg) / 2)
    return (fx, fx * width / height, 0.5, 0.5)
