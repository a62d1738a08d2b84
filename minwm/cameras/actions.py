"""The action language: a short string that drives the camera, one step per latent frame.

Grammar (whitespace ignored, keys case-insensitive)::

    program := group ("," group)*
    group   := key ("+" key)* ["*" COUNT]      # keys joined by "+" act in the same step
    key     := w | s | a | d | q | u | e | dn | j | l | i | k | _

`w`/`s` forward/back (camera +z/-z), `a`/`d` left/right (camera -x/+x), `q`/`e` up/down (aliases
`u`/`dn`; up is camera -y in OpenCV axes), `j`/`l` yaw left/right, `i`/`k` pitch up/down, `_` a
step with no motion (a pause). `*N` repeats the group N >= 1 times. Example: "w*4,w+l*3,_*2,a*2".

A program of S steps gives S + 1 cameras: camera 0 is the start (latent frame 0) and step n moves
camera n-1 to camera n. Every motion is in the camera's own current frame: translate along its
current axes, then rotate (yaw about its y axis, pitch about its x axis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minwm.cameras.camera import Cameras, invert_rigid
from minwm.errors import MinwmError

# Canonical keys, with the aliases they accept. "_" is the explicit no-op.
ALIASES = {"u": "q", "dn": "e"}
KEYS = ("w", "s", "a", "d", "q", "e", "j", "l", "i", "k")
NOOP = "_"
# Camera-frame unit translation per key (OpenCV: x right, y down, z forward).
TRANSLATION = {"w": (0, 0, 1), "s": (0, 0, -1), "a": (-1, 0, 0), "d": (1, 0, 0), "q": (0, -1, 0), "e": (0, 1, 0)}
# Sign of the yaw (about camera y) and pitch (about camera x) per key; + yaw turns +z toward +x (right),
# + pitch turns +z toward -y (up).
YAW = {"j": -1, "l": 1}
PITCH = {"i": 1, "k": -1}
# A 90-degree horizontal field of view with square pixels on a 16:9 image, centred; used where a
# trajectory comes from actions alone and the caller gives no intrinsics.
DEFAULT_INTRINSICS = (0.5, 0.5 * 16 / 9, 0.5, 0.5)


@dataclass
class ActionConfig:
    """Config section `actions`: step sizes per latent frame and the longest program accepted."""

    translation_step: float = 0.08   # scene units per step (upstream recipe)
    rotation_step_deg: float = 3.0   # degrees per step (upstream recipe); 30 steps of `l` = 90 degrees
    max_steps: int = 4096            # cap on the total number of steps a program may expand to

    def __post_init__(self):
        if not (self.translation_step > 0 and self.rotation_step_deg > 0 and self.max_steps >= 1):
            raise ValueError("translation_step and rotation_step_deg must be > 0 and max_steps >= 1")


Step = frozenset  # one step: the set of canonical keys held during it (empty = no motion)


# ---- parsing ---------------------------------------------------------------------------------
class _Parser:
    def __init__(self, text: str, max_steps: int):
        self.text, self.pos, self.max_steps = text, 0, max_steps

    def fail(self, msg: str, pos: int | None = None):
        raise MinwmError(f"actions: position {self.pos if pos is None else pos}: {msg}")

    def skip_ws(self):
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def here(self) -> int:
        self.skip_ws()
        return self.pos

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def found(self) -> str:
        c = self.peek()
        return f"'{c}'" if c else "end of input"

    def key(self, after: str) -> str:
        start = self.here()
        low = self.text[self.pos:self.pos + 2].lower()
        if low == "dn":
            self.pos += 2
            return "e"
        c = low[:1]
        if c in KEYS or c in ALIASES or c == NOOP:
            self.pos += 1
            return ALIASES.get(c, c)
        expected = "expected a key (w s a d q e u dn j l i k _)"
        self.fail(f"{expected}{after}, got {self.found()}", start)

    def count(self) -> int:
        self.skip_ws()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos].isdigit():
            self.pos += 1
        digits = self.text[start:self.pos]
        if not digits:
            self.fail(f"expected a repeat count after '*', got {self.found()}", start)
        n = int(digits) if len(digits) <= 12 else self.max_steps + 1   # longer numbers are over the cap anyway
        if n < 1:
            self.fail("expected a repeat count of at least 1 after '*'", start)
        return n

    def program(self) -> list[frozenset[str]]:
        if not self.text.strip():
            raise MinwmError("actions: empty action string (expected e.g. 'w*4,l*2')")
        steps: list[frozenset[str]] = []
        while True:
            group_start = self.here()
            keys = [self.key(" at the start of a step" if not steps else "")]
            while self.peek() == "+":
                self.pos += 1
                kpos = self.here()
                k = self.key(" after '+'")
                if k in keys:
                    self.fail(f"key '{k}' appears twice in one step", kpos)
                keys.append(k)
            if NOOP in keys and len(keys) > 1:
                self.fail("'_' (no motion) cannot be joined with other keys", group_start)
            n = 1
            if self.peek() == "*":
                self.pos += 1
                cpos = self.here()
                n = self.count()
                if len(steps) + n > self.max_steps:
                    self.fail(f"repeat count {n} takes the program to {len(steps) + n} steps, "
                              f"above the cap of {self.max_steps} (actions.max_steps)", cpos)
            elif len(steps) + 1 > self.max_steps:
                self.fail(f"program longer than the cap of {self.max_steps} steps (actions.max_steps)", group_start)
            step = frozenset(k for k in keys if k != NOOP)
            steps.extend([step] * n)
            c = self.peek()
            if c == "":
                return steps
            if c != ",":
                self.fail(f"expected ',', '+', '*' or end of input, got '{c}'")
            self.pos += 1
            if self.peek() == "":
                self.fail("expected a key after ','")


def parse_actions(dsl: str, max_steps: int | None = None) -> list[frozenset[str]]:
    """Parse a program into one frozenset of canonical keys per step (aliases resolved, `_` -> {}).

    Bad input raises a one-line MinwmError with the 0-based character position and what was expected."""
    if not isinstance(dsl, str):
        raise MinwmError(f"actions: expected a string, got {type(dsl).__name__}")
    return _Parser(dsl, ActionConfig().max_steps if max_steps is None else max_steps).program()


def format_actions(steps: list[frozenset[str]]) -> str:
    """The shortest run-length program for `steps`; parse_actions(format_actions(s)) == s."""
    order = {k: i for i, k in enumerate(KEYS)}
    parts, i = [], 0
    while i < len(steps):
        j = i
        while j < len(steps) and steps[j] == steps[i]:
            j += 1
        group = "+".join(sorted(steps[i], key=order.__getitem__)) or NOOP
        parts.append(group if j - i == 1 else f"{group}*{j - i}")
        i = j
    return ",".join(parts)


# ---- steps -> cameras ------------------------------------------------------------------------
def _rot_y(a: float) -> torch.Tensor:
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=torch.float64)


def _rot_x(a: float) -> torch.Tensor:
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float64)


def step_motion(step: frozenset[str], cfg: ActionConfig) -> torch.Tensor:
    """The step's rigid motion M [4, 4] in the current camera's frame: new c2w = old c2w @ M.

    M = [R | t]: translate by t along the current axes, then turn by R = R_y(yaw) R_x(pitch) about
    the moved centre. Opposite keys held together cancel."""
    t = torch.zeros(3, dtype=torch.float64)
    yaw = pitch = 0.0
    for k in step:
        if k in TRANSLATION:
            t += torch.tensor(TRANSLATION[k], dtype=torch.float64)
        yaw += YAW.get(k, 0)
        pitch += PITCH.get(k, 0)
    rad = math.radians(cfg.rotation_step_deg)
    M = torch.eye(4, dtype=torch.float64)
    M[:3, :3] = _rot_y(yaw * rad) @ _rot_x(pitch * rad)
    M[:3, 3] = t * cfg.translation_step
    return M


def actions_to_cameras(steps: list[frozenset[str]] | str, cfg: ActionConfig | None = None,
                       intrinsics=DEFAULT_INTRINSICS, start: Cameras | torch.Tensor | None = None) -> Cameras:
    """The trajectory of len(steps) + 1 cameras: the start camera (identity when None), then one
    camera per step. `steps` may also be a program string. `intrinsics` ([4] normalised) is used for
    every frame; `start` is a 1-frame Cameras or a w2c [4, 4]."""
    cfg = cfg or ActionConfig()
    if isinstance(steps, str):
        steps = parse_actions(steps, cfg.max_steps)
    if len(steps) > cfg.max_steps:
        raise MinwmError(f"actions: {len(steps)} steps, above the cap of {cfg.max_steps} (actions.max_steps)")
    if start is None:
        w2c0 = torch.eye(4, dtype=torch.float64)
    elif isinstance(start, Cameras):
        w2c0 = start.w2c[0]
    else:
        w2c0 = torch.as_tensor(start, dtype=torch.float64).reshape(4, 4)
    motions = {}
    c2w = [invert_rigid(w2c0)]
    for step in steps:
        if step not in motions:
            unknown = set(step) - set(KEYS)
            if unknown:
                raise MinwmError(f"actions: unknown key '{sorted(unknown)[0]}' (expected one of {' '.join(KEYS)})")
            motions[step] = step_motion(step, cfg)
        c2w.append(c2w[-1] @ motions[step])
    K = torch.as_tensor(intrinsics, dtype=torch.float64).reshape(4)
    return Cameras.from_c2w(torch.stack(c2w), K).validate("actions")


def cameras_to_actions(cams: Cameras, cfg: ActionConfig | None = None, threshold: float = 0.5) -> list[frozenset[str]]:
    """The keys that best explain each consecutive pair of cameras (len(cams) - 1 steps).

    A translation axis (in the earlier camera's frame) or a yaw/pitch angle counts as pressed when its
    magnitude is above `threshold` times the configured step. Inverse of actions_to_cameras for
    trajectories it produced; for measured (e.g. estimated) trajectories it is a nearest reading."""
    cfg = cfg or ActionConfig()
    rel = cams.w2c[:-1] @ cams.c2w[1:]                  # motion of camera n+1 in camera n's frame
    t = rel[:, :3, 3] / cfg.translation_step
    R = rel[:, :3, :3]
    # R = R_y(yaw) R_x(pitch) sends +z to (cos p sin y, -sin p, cos p cos y).
    rad = math.radians(cfg.rotation_step_deg)
    pitch = torch.asin((-R[:, 1, 2]).clamp(-1, 1)) / rad
    yaw = torch.atan2(R[:, 0, 2], R[:, 2, 2]) / rad
    out = []
    for n in range(len(rel)):
        keys = set()
        for axis, (neg, pos) in enumerate((("a", "d"), ("q", "e"), ("s", "w"))):
            if abs(t[n, axis]) > threshold:
                keys.add(pos if t[n, axis] > 0 else neg)
        if abs(yaw[n]) > threshold:
            keys.add("l" if yaw[n] > 0 else "j")
        if abs(pitch[n]) > threshold:
            keys.add("i" if pitch[n] > 0 else "k")
        out.append(frozenset(keys))
    return out
