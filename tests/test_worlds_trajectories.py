import math

import numpy as np
import pytest
import torch

from minwm.cameras.actions import KEYS, parse_actions
from minwm.cameras.camera import Cameras
from minwm.errors import MinwmError
from minwm.worlds.captions import visible_objects
from minwm.worlds.scene import generate_scene, path_collision
from minwm.worlds.trajectories import (eval_trajectories, interpolate_cameras, matrix_to_quaternion, num_latent_frames,
                                       program_cameras, quaternion_to_matrix, random_program, slerp, square_intrinsics)

torch.set_num_threads(1)


def _random_rotations(rng, n):
    q = torch.tensor(rng.normal(size=(n, 4)))
    return quaternion_to_matrix(q / q.norm(dim=-1, keepdim=True))


def _angle(Ra, Rb):
    c = ((Ra.transpose(-1, -2) @ Rb).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.acos(c.clamp(-1, 1))


def test_quaternion_round_trip_including_half_turns():
    rng = np.random.default_rng(0)
    R = torch.cat([_random_rotations(rng, 50), torch.diag(torch.tensor([1.0, -1, -1], dtype=torch.float64))[None],
                   torch.diag(torch.tensor([-1.0, -1, 1], dtype=torch.float64))[None]])
    assert torch.allclose(quaternion_to_matrix(matrix_to_quaternion(R)), R, atol=1e-10)


def test_slerp_halfway_and_endpoints():
    rng = np.random.default_rng(1)
    R0, R1 = _random_rotations(rng, 8), _random_rotations(rng, 8)
    q0, q1 = matrix_to_quaternion(R0), matrix_to_quaternion(R1)
    mid = quaternion_to_matrix(slerp(q0, q1, torch.full((8,), 0.5, dtype=torch.float64)))
    assert torch.allclose(_angle(R0, mid), _angle(R0, R1) / 2, atol=1e-9)
    assert torch.allclose(_angle(mid, R1), _angle(R0, R1) / 2, atol=1e-9)
    ends = slerp(q0, q1, torch.zeros(8, dtype=torch.float64))
    assert torch.allclose(quaternion_to_matrix(ends), R0, atol=1e-10)


def test_interpolate_cameras_keeps_latent_frames_and_moves_smoothly():
    rng = np.random.default_rng(2)
    L = 4
    c2w = torch.eye(4, dtype=torch.float64).repeat(L, 1, 1)
    c2w[:, :3, :3] = _random_rotations(rng, L)
    c2w[:, :3, 3] = torch.tensor(rng.normal(size=(L, 3)))
    K = torch.tensor([[0.8, 0.8, 0.5, 0.5], [0.9, 0.9, 0.5, 0.5], [0.8, 0.8, 0.5, 0.5], [0.8, 0.8, 0.4, 0.5]],
                     dtype=torch.float64)
    latent = Cameras.from_c2w(c2w, K)
    pix = interpolate_cameras(latent)
    assert len(pix) == 1 + 4 * (L - 1)
    pix.validate()
    assert torch.allclose(pix.w2c[::4], latent.w2c, atol=1e-12)
    pos = pix.positions
    # Centres on the straight segment: pixel frame 4i + 2 is the midpoint of latent i and i + 1.
    assert torch.allclose(pos[2], (latent.positions[0] + latent.positions[1]) / 2, atol=1e-12)
    assert torch.allclose(pos[5], 0.75 * latent.positions[1] + 0.25 * latent.positions[2], atol=1e-12)
    # Rotation: equal angular steps inside each latent interval (constant angular velocity).
    R = pix.c2w[:, :3, :3]
    steps = _angle(R[:-1], R[1:]).reshape(L - 1, 4)
    assert torch.allclose(steps, steps[:, :1].expand(-1, 4), atol=1e-9)
    assert torch.allclose(pix.intrinsics[1], K[0] + 0.25 * (K[1] - K[0]))


def test_num_latent_frames_rejects_non_1_plus_4k():
    assert num_latent_frames(17) == 5 and num_latent_frames(1) == 1
    for bad in (0, 6, 16):
        with pytest.raises(MinwmError, match="1 \\+ 4\\*k"):
            num_latent_frames(bad)


def test_random_programs_have_exact_length_and_cover_every_action():
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(200):
        prog = random_program(rng, 6)
        steps = parse_actions(prog)
        assert len(steps) == 6
        for s in steps:
            seen |= s
            seen.add("+".join(sorted(s)) if len(s) > 1 else "")
    assert set(KEYS) <= seen
    assert {"l+w", "j+w"} <= seen                      # walking while turning
    assert random_program(rng, 0) == ""


def test_eval_trajectories():
    progs = eval_trajectories(6)
    for name, prog in progs.items():
        assert len(parse_actions(prog)) == 5, name
    for k in KEYS:
        assert progs[f"hold_{k}"] == f"{k}*5"
    assert "hold_w_l" in progs and progs["pause"] == "_*5"
    assert len(eval_trajectories(2)) == len(progs)   # still well-formed with a single step
    with pytest.raises(MinwmError):
        eval_trajectories(1)


def test_program_cameras_step_count_checked():
    K = square_intrinsics(60, 32, 32)
    cams = program_cameras("w*2", 9, K)
    assert len(cams) == 9 and cams.positions[-1, 2] == pytest.approx(0.16)
    with pytest.raises(MinwmError, match="3 steps, expected 2"):
        program_cameras("w*3", 9, K)


def test_scenes_keep_the_path_clear_and_start_with_objects_in_view():
    rng = np.random.default_rng(4)
    K = square_intrinsics(60, 64, 64)
    for _ in range(12):
        cams = program_cameras(random_program(rng, 8), 33, K)
        scene = generate_scene(rng, cams.positions.numpy())
        assert path_collision(scene, cams.positions.numpy()) is None
        assert len(visible_objects(scene)) >= 2
    # Long walks and descents: the scene grows with the path, the ground stays below the camera.
    for prog in ("w*40", "e*20"):
        cams = program_cameras(prog, 1 + 4 * 40 if prog == "w*40" else 81, K)
        scene = generate_scene(rng, cams.positions.numpy())
        assert path_collision(scene, cams.positions.numpy()) is None
        assert max(o.center[2] for o in scene.objects) > 3.2 or prog == "e*20"


def test_path_collision_detects_objects_and_ground():
    scene = generate_scene(np.random.default_rng(0))
    o = scene.objects[0]
    through = np.array([[0.0, 0.0, 0.0], [o.center[0], 0.0, o.center[2]]])
    assert "passes through" in path_collision(scene, through)
    assert "below the ground" in path_collision(scene, np.array([[0.0, scene.ground_y + 0.1, 0.0]]))


def test_square_intrinsics():
    fx, fy, cx, cy = square_intrinsics(90, 32, 64)
    assert fx == pytest.approx(0.5) and fy == pytest.approx(1.0) and (cx, cy) == (0.5, 0.5)
    assert math.isclose(fx * 64, fy * 32)            # square pixels
