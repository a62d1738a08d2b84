"""Seeded procedural scenes: a textured ground plane, a gradient sky and a scatter of boxes, spheres
and cylinders standing on the ground.

World frame = the start camera's OpenCV frame: x right, y DOWN, z forward, the start camera at the
origin looking along +z. The ground is the plane y = ground_y (> 0, i.e. below the eye). Scenes are
built around a camera path so the camera never walks through an object, and a few objects are put in
the first view so every clip starts with something to look at.

Textures are deliberately large-scale and are filtered analytically by the renderer (see
textures.py): a tiny VAE at 64x64 has to reconstruct them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

from minwm.errors import MinwmError

EYE_HEIGHT = 0.7          # start camera height above the ground (scene units; a step is 0.08)
MIN_CLEARANCE = 0.12      # lowest the camera may go above the ground
PATH_CLEARANCE = 0.35     # free space kept between any camera position and an object's footprint

# Object colours (linear-ish RGB in [0, 1]); the names go into captions.
COLOURS = {
    "red": (0.85, 0.18, 0.14), "orange": (0.95, 0.52, 0.10), "yellow": (0.95, 0.84, 0.20),
    "green": (0.22, 0.68, 0.25), "blue": (0.18, 0.36, 0.90), "purple": (0.58, 0.28, 0.78),
    "white": (0.93, 0.93, 0.90), "pink": (0.96, 0.52, 0.70), "teal": (0.10, 0.62, 0.64),
    "brown": (0.50, 0.31, 0.16),
}
PATTERNS = ("plain", "striped", "checkered")
KINDS = ("sphere", "box", "cylinder")
# Ground: (name, colour a, colour b) and the pattern kinds; sky: (name, zenith, horizon).
GROUND_COLOURS = {
    "grey": ((0.62, 0.62, 0.60), (0.36, 0.36, 0.36)),
    "green": ((0.42, 0.62, 0.30), (0.24, 0.42, 0.18)),
    "sandy": ((0.86, 0.76, 0.55), (0.66, 0.55, 0.36)),
    "brown": ((0.58, 0.42, 0.28), (0.36, 0.25, 0.16)),
    "blue-grey": ((0.60, 0.66, 0.74), (0.34, 0.40, 0.50)),
}
GROUND_PATTERNS = ("checkered", "striped", "mottled")
SKIES = {
    "pale blue": ((0.42, 0.62, 0.92), (0.82, 0.89, 0.96)),
    "deep blue": ((0.12, 0.28, 0.72), (0.55, 0.70, 0.92)),
    "orange sunset": ((0.32, 0.28, 0.55), (0.98, 0.64, 0.34)),
    "grey overcast": ((0.52, 0.54, 0.58), (0.80, 0.80, 0.80)),
    "pink dusk": ((0.40, 0.36, 0.62), (0.95, 0.72, 0.78)),
}


@dataclass
class SceneObject:
    """One solid standing on the ground.

    kind: sphere | box | cylinder. center: world xyz (y down). size: sphere (r, r, r); box half
    extents (hx, hy, hz); cylinder (r, half_height, r). yaw: rotation about the vertical (boxes).
    pattern: plain | striped | checkered, in `colour` and `colour2`; freq: pattern cycles per scene
    unit along the two texture coordinates (u around / across, v up)."""

    kind: str
    center: tuple[float, float, float]
    size: tuple[float, float, float]
    colour: str
    pattern: str = "plain"
    colour2: str = "white"
    yaw: float = 0.0
    freq: tuple[float, float] = (1.0, 1.0)

    @property
    def footprint(self) -> float:
        """Radius of the object's footprint on the ground (xz)."""
        hx, _, hz = self.size
        return math.hypot(hx, hz) if self.kind == "box" else hx

    @property
    def bounding_radius(self) -> float:
        return float(np.linalg.norm(self.size)) if self.kind != "sphere" else self.size[0]


@dataclass
class Scene:
    ground_y: float = EYE_HEIGHT
    ground_pattern: str = "checkered"
    ground_colour: str = "grey"
    ground_freq: float = 0.8            # cycles per unit
    ground_angle: float = 0.0           # stripe direction / noise phase (radians)
    ground_noise: list = field(default_factory=list)   # mottled: [[freq, angle, phase, weight], ...]
    sky: str = "pale blue"
    objects: list[SceneObject] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain (JSON-able) form; shallow on purpose: dataclasses.asdict's deep copy was a tenth of
        the time to make a clip."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["ground_noise"] = [list(x) for x in self.ground_noise]
        d["objects"] = [dict(vars(o)) for o in self.objects]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        d = dict(d)
        d["objects"] = [SceneObject(**{k: tuple(v) if isinstance(v, list) else v for k, v in o.items()})
                        for o in d.get("objects", [])]
        return cls(**d)


def _segments_distance(points: np.ndarray, p: np.ndarray) -> float:
    """Smallest distance from 2-D point p to the polyline through `points` [P, 2]."""
    if len(points) == 1:
        return float(np.linalg.norm(points[0] - p))
    a, b = points[:-1], points[1:]
    ab = b - a
    denom = np.maximum((ab * ab).sum(1), 1e-12)
    s = np.clip(((p - a) * ab).sum(1) / denom, 0.0, 1.0)
    return float(np.linalg.norm(a + s[:, None] * ab - p, axis=1).min())


def _random_object(rng: np.random.Generator, x: float, z: float, ground_y: float) -> SceneObject:
    kind = KINDS[rng.integers(len(KINDS))]
    names = list(COLOURS)
    colour = names[rng.integers(len(names))]
    pattern = PATTERNS[rng.choice(3, p=[0.4, 0.3, 0.3])]
    others = [c for c in names if c != colour]
    colour2 = "white" if colour != "white" and rng.random() < 0.5 else others[rng.integers(len(others))]
    yaw = 0.0
    if kind == "sphere":
        r = rng.uniform(0.18, 0.45)
        size = (r, r, r)
        # Around-the-equator frequency must tile the full turn: an even number of cells.
        around = 2 * rng.integers(2, 4)
        freq = (around / 2 / (2 * math.pi * r), rng.uniform(1.2, 2.0) / (2 * r))
        cy = ground_y - r
    elif kind == "box":
        hx, hy, hz = rng.uniform(0.15, 0.45), rng.uniform(0.15, 0.6), rng.uniform(0.15, 0.45)
        size = (hx, hy, hz)
        yaw = rng.uniform(-math.pi / 4, math.pi / 4)
        f = rng.uniform(0.9, 1.6) / (2 * min(hx, hz))
        freq = (f, rng.uniform(1.2, 2.2) / (2 * hy))
        cy = ground_y - hy
    else:
        r, hh = rng.uniform(0.12, 0.3), rng.uniform(0.25, 0.75)
        size = (r, hh, r)
        around = 2 * rng.integers(2, 4)
        freq = (around / 2 / (2 * math.pi * r), rng.uniform(1.5, 2.5) / (2 * hh))
        cy = ground_y - hh
    return SceneObject(kind=kind, center=(float(x), float(cy), float(z)), size=tuple(float(s) for s in size),
                       colour=colour, pattern=pattern, colour2=colour2, yaw=float(yaw),
                       freq=(float(freq[0]), float(freq[1])))


def generate_scene(rng: np.random.Generator, path: np.ndarray | None = None, hfov_deg: float = 60.0,
                   density: float = 0.16, min_objects: int = 6, max_objects: int = 24) -> Scene:
    """A random scene around a camera path.

    path: camera centres [P, 3] in world coordinates (start camera at the origin); objects keep
    PATH_CLEARANCE from every segment of it (in xz), and the ground is lowered if the path would go
    below MIN_CLEARANCE. 2-3 objects are placed inside the start camera's view; the rest are scattered
    over the path's bounding box grown by 3.5 units, at `density` objects per square unit."""
    path = np.zeros((1, 3)) if path is None else np.asarray(path, dtype=np.float64).reshape(-1, 3)
    if not np.isfinite(path).all():
        raise MinwmError("scene: camera path has non-finite positions")
    ground_y = max(EYE_HEIGHT, float(path[:, 1].max()) + MIN_CLEARANCE)
    ground_colour = list(GROUND_COLOURS)[rng.integers(len(GROUND_COLOURS))]
    ground_pattern = GROUND_PATTERNS[rng.integers(len(GROUND_PATTERNS))]
    scene = Scene(ground_y=ground_y, ground_pattern=ground_pattern, ground_colour=ground_colour,
                  ground_freq=float(rng.uniform(0.5, 0.9)) if ground_pattern == "checkered" else float(rng.uniform(0.6, 1.0)),
                  ground_angle=float(rng.uniform(0, math.pi)),
                  ground_noise=[[float(rng.uniform(0.45, 1.1)), float(rng.uniform(0, 2 * math.pi)),
                                 float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0.5, 1.0))]
                                for _ in range(4)],
                  sky=list(SKIES)[rng.integers(len(SKIES))])

    xz = path[:, [0, 2]]
    lo = np.minimum(xz.min(0), [0.0, 0.0]) - 3.5
    hi = np.maximum(xz.max(0), [0.0, 5.0]) + 3.5
    area = float(np.prod(hi - lo))
    n_total = int(np.clip(round(area * density), min_objects, max_objects))
    n_early = int(rng.integers(2, 4))
    half = math.radians(hfov_deg) / 2

    placed: list[SceneObject] = []

    def fits(obj: SceneObject) -> bool:
        p = np.array([obj.center[0], obj.center[2]])
        if _segments_distance(xz, p) < obj.footprint + PATH_CLEARANCE:
            return False
        return all(np.hypot(o.center[0] - p[0], o.center[2] - p[1]) > o.footprint + obj.footprint + 0.1
                   for o in placed)

    for i in range(n_total):
        for _ in range(60):
            if i < n_early:
                # In the first view: a bearing inside the field of view, 1.5-4.5 units away.
                ang, dist = rng.uniform(-0.75 * half, 0.75 * half), rng.uniform(1.5, 4.5)
                x, z = dist * math.sin(ang), dist * math.cos(ang)
            else:
                x, z = rng.uniform(lo[0], hi[0]), rng.uniform(lo[1], hi[1])
            obj = _random_object(rng, x, z, ground_y)
            if fits(obj):
                placed.append(obj)
                break
    scene.objects = placed
    return scene


def path_collision(scene: Scene, positions: np.ndarray) -> str | None:
    """Why a camera path [P, 3] is not walkable in `scene` (None if it is): below ground, or within
    PATH_CLEARANCE/2 of an object's footprint."""
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    low = int(np.argmax(positions[:, 1]))
    if positions[low, 1] > scene.ground_y - MIN_CLEARANCE / 2:
        return f"frame {low}: camera below the ground"
    xz = positions[:, [0, 2]]
    for o in scene.objects:
        d = _segments_distance(xz, np.array([o.center[0], o.center[2]]))
        if d < o.footprint + PATH_CLEARANCE / 2:
            return f"camera passes through a {o.kind} at ({o.center[0]:.2f}, {o.center[2]:.2f})"
    return None
