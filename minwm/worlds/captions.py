"""Captions from a scene's contents: "a red box, a striped blue sphere and two green cylinders on a
grey checkered floor under a pale blue sky". The objects named are those in the first view, nearest
first (at most three kinds), so the caption describes what the clip opens on."""

from __future__ import annotations

import math

import numpy as np

from minwm.worlds.scene import Scene, SceneObject

NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}
GROUND_NOUN = {"checkered": "checkered floor", "striped": "striped floor", "mottled": "mottled ground"}


def describe(obj: SceneObject) -> str:
    """'striped blue sphere', 'red box' (no article)."""
    pattern = "" if obj.pattern == "plain" else obj.pattern + " "
    return f"{pattern}{obj.colour} {obj.kind}"


def _plural(noun_phrase: str) -> str:
    return noun_phrase + ("es" if noun_phrase.endswith("x") else "s")


def _a(noun_phrase: str) -> str:
    return ("an " if noun_phrase[:1] in "aeiou" else "a ") + noun_phrase


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def visible_objects(scene: Scene, w2c: np.ndarray | None = None, intrinsics=None) -> list[SceneObject]:
    """Objects whose centre is in front of the camera and inside its view, nearest first; with no
    camera, the start camera (identity, 60-degree view) is assumed."""
    w2c = np.eye(4) if w2c is None else np.asarray(w2c, dtype=np.float64).reshape(4, 4)
    fx, fy, cx, cy = intrinsics if intrinsics is not None else (0.5 / math.tan(math.radians(30)),) * 2 + (0.5, 0.5)
    found = []
    for o in scene.objects:
        p = w2c[:3, :3] @ np.asarray(o.center) + w2c[:3, 3]
        if p[2] <= 0.05:
            continue
        u, v = fx * p[0] / p[2] + cx, fy * p[1] / p[2] + cy
        if 0 <= u <= 1 and 0 <= v <= 1:
            found.append((float(np.linalg.norm(p)), o))
    return [o for _, o in sorted(found, key=lambda x: x[0])]


def caption(scene: Scene, w2c: np.ndarray | None = None, intrinsics=None, max_kinds: int = 3) -> str:
    objs = visible_objects(scene, w2c, intrinsics)
    counts: dict[str, int] = {}
    for o in objs:
        key = describe(o)
        if key in counts or len(counts) < max_kinds:
            counts[key] = counts.get(key, 0) + 1
    parts = [_a(k) if n == 1 else f"{NUMBERS.get(n, 'several')} {_plural(k)}" for k, n in counts.items()]
    ground = f"{scene.ground_colour} {GROUND_NOUN[scene.ground_pattern]}"
    where = f"{_a(ground)} under {_a(scene.sky)} sky"
    return f"{_join(parts)} on {where}" if parts else where
