import math

import numpy as np
import pytest
import torch

from minwm.cameras.camera import Cameras
from minwm.worlds import render as R
from minwm.worlds import textures as tex
from minwm.worlds.render import hit_box, hit_cylinder, hit_sphere, render, render_float
from minwm.worlds.scene import Scene, SceneObject, generate_scene
from minwm.worlds.trajectories import program_cameras, random_program, square_intrinsics

torch.set_num_threads(1)
K64 = square_intrinsics(60, 64, 64)


def _rot(yaw: float, pitch: float) -> np.ndarray:
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return Ry @ Rx


def _marker_scene(points, colours=("red",), radius=0.06, ground_y=3.0):
    objs = [SceneObject("sphere", tuple(map(float, p)), (radius,) * 3, c) for p, c in zip(points, colours)]
    return Scene(ground_y=ground_y, ground_colour="grey", ground_pattern="striped", sky="grey overcast", objects=objs)


def _red_mask(frame: np.ndarray) -> np.ndarray:
    r, g, b = (frame[..., i].astype(int) for i in range(3))
    return r - np.maximum(g, b) > 30          # red whatever its shading


def test_marker_lands_on_projected_pixel():
    rng = np.random.default_rng(0)
    H, W = 48, 64
    for trial in range(6):
        K = np.array([rng.uniform(0.6, 1.0), 0, rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6)])
        K[1] = K[0] * W / H * rng.uniform(0.9, 1.1)
        c2w = np.eye(4)
        c2w[:3, :3] = _rot(rng.uniform(-math.pi, math.pi), rng.uniform(-0.3, 0.3))
        c2w[:3, 3] = rng.uniform(-1, 1, 3) * [1, 0.3, 1]
        # A point in view, 1.5-3 units ahead, in camera coordinates, then in the world.
        z = rng.uniform(1.5, 3.0)
        u, v = rng.uniform(0.2, 0.8, 2)
        pc = np.array([(u - K[2]) / K[0] * z, (v - K[3]) / K[1] * z, z])
        pw = c2w[:3, :3] @ pc + c2w[:3, 3]
        cams = Cameras.from_c2w(torch.tensor(c2w)[None], torch.tensor(K)[None])
        frame = render(_marker_scene([pw], ground_y=5.0), cams, H, W)[0]
        mask = _red_mask(frame)
        assert mask.sum() >= 2, f"trial {trial}: marker not visible"
        ys, xs = np.nonzero(mask)
        # Pixel (i, j) covers [j, j+1) x [i, i+1); its centre is at +0.5.
        got = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
        want = np.array([u * W, v * H])
        # The brief asks for one pixel; 0.6 also catches a half-pixel-centre convention slip.
        assert np.abs(got - want).max() <= 0.6, (trial, got, want)


def test_near_object_hides_far_one():
    cams = Cameras(torch.eye(4)[None], torch.tensor(K64)[None])
    far = SceneObject("sphere", (0.0, 0.0, 4.0), (0.4,) * 3, "blue")
    near = SceneObject("box", (0.0, 0.0, 2.0), (0.2, 0.2, 0.2), "yellow")
    scene = Scene(ground_y=3.0, objects=[far])
    alone = render(scene, cams, 32, 32)[0, 16, 16].astype(int)
    scene.objects = [far, near]              # the order in the scene must not matter
    both = render(scene, cams, 32, 32)[0, 16, 16].astype(int)
    scene.objects = [near, far]
    both2 = render(scene, cams, 32, 32)[0, 16, 16].astype(int)
    assert alone[2] > alone[0] + 60                  # blue
    assert both[0] > both[2] + 60 and both[1] > both[2] + 60   # yellow in front
    assert (both == both2).all()


def test_primitive_distances():
    o = torch.zeros(1, 3)
    d = torch.tensor([0.0, 0.0, 1.0]).reshape(1, 1, 1, 3)
    c = torch.tensor([0.0, 0.0, 3.0])
    assert hit_sphere(o, d, c, 0.5).item() == pytest.approx(2.5, abs=1e-5)
    assert hit_box(o, d, c, torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1.0, 0.0])).item() == pytest.approx(2.5, abs=1e-5)
    yaw45 = torch.tensor([math.cos(math.pi / 4), math.sin(math.pi / 4)])
    assert hit_box(o, d, c, torch.tensor([0.5, 0.5, 0.5]), yaw45).item() == pytest.approx(3 - 0.5 * math.sqrt(2), abs=1e-5)
    assert hit_cylinder(o, d, c, 0.5, 1.0).item() == pytest.approx(2.5, abs=1e-5)
    # From above, straight down onto the top cap (y is down: the top cap is at c_y - h).
    down = torch.tensor([0.0, 1.0, 0.0]).reshape(1, 1, 1, 3)
    assert hit_cylinder(torch.tensor([[0.0, -3.0, 3.0]]), down, c, 0.5, 1.0).item() == pytest.approx(2.0, abs=1e-5)
    # Misses are inf.
    assert math.isinf(hit_sphere(o, -d, c, 0.5).item())
    assert math.isinf(hit_cylinder(o, d, torch.tensor([2.0, 0.0, 3.0]), 0.5, 1.0).item())


def test_screen_rect_culling_changes_nothing(monkeypatch):
    rng = np.random.default_rng(5)
    cams = program_cameras(random_program(rng, 2), 9, K64)
    scene = generate_scene(rng, cams.positions.numpy())
    fast = render(scene, cams, 32, 32)
    full = lambda cams, c, r, H, W: np.tile(np.array([0, H, 0, W]), (len(c), 1))  # noqa: E731
    monkeypatch.setattr(R, "screen_rects", full)
    assert np.array_equal(fast, render(scene, cams, 32, 32))


def test_render_deterministic_and_shapes():
    rng = np.random.default_rng(1)
    cams = program_cameras("w,l", 9, square_intrinsics(60, 24, 40))
    scene = generate_scene(rng, cams.positions.numpy())
    a, b = render(scene, cams, 24, 40), render(scene, cams, 24, 40)
    assert a.dtype == np.uint8 and a.shape == (9, 24, 40, 3) and np.array_equal(a, b)
    assert render(scene, cams, 24, 40, supersample=2).shape == (9, 24, 40, 3)
    assert not np.array_equal(a[0], a[-1])          # the camera moved


def test_parallax_near_moves_more_than_far():
    # Strafing right: a near marker slides left across the image by more pixels than a far one.
    K = square_intrinsics(60, 64, 64)
    cams = program_cameras("d*2", 9, K)
    scene = _marker_scene([(-0.3, 0.0, 1.5), (0.5, -0.2, 5.0)], ("red", "blue"), radius=0.08, ground_y=5.0)
    frames = render(scene, cams, 64, 64)

    def centroid(frame, which):
        r, g, b = (frame[..., i].astype(int) for i in range(3))
        m = _red_mask(frame) if which == "red" else b - np.maximum(r, g) > 30
        return np.nonzero(m)[1].mean()

    near = centroid(frames[0], "red") - centroid(frames[-1], "red")
    far = centroid(frames[0], "blue") - centroid(frames[-1], "blue")
    assert near > 2 * far > 0


def test_textures_filtered_close_to_supersampled(monkeypatch):
    cams = program_cameras("w*2", 9, K64)[::4]
    scene = Scene(ground_pattern="checkered", ground_freq=0.8)
    ref = render_float(scene, cams, 64, 64, supersample=4)
    err = float((render_float(scene, cams, 64, 64) - ref).abs().mean()) * 255
    # Point-sampled hard-edged textures, for comparison: they alias near the horizon.
    monkeypatch.setattr(tex, "square", lambda u, f, w: torch.sign(torch.sin(2 * math.pi * f * u)))
    naive = float((render_float(scene, cams, 64, 64) - ref).abs().mean()) * 255
    assert err < 1.6 and err < 0.5 * naive, (err, naive)


def test_edge_antialiasing_approaches_supersampling():
    rng = np.random.default_rng(2)
    cams = program_cameras("w", 5, K64)[::2]
    scene = generate_scene(rng, cams.positions.numpy())
    ref = render_float(scene, cams, 64, 64, supersample=4)
    aa = float((render_float(scene, cams, 64, 64) - ref).abs().mean())
    plain = float((render_float(scene, cams, 64, 64, edge_aa=False) - ref).abs().mean())
    assert aa < 0.75 * plain, (aa, plain)
