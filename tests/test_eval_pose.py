import math

import cv2
import numpy as np
import pytest
import torch

from minwm.cameras import Cameras
from minwm.cameras.actions import _rot_x, _rot_y
from minwm.errors import MinwmError
from minwm.eval.metrics import camera_metrics, direction_accuracy
from minwm.eval.pose import PoseConfig, estimate_poses, estimate_trajectory, pixel_matrix
from minwm.eval.segment import fit_rotation, kabsch

torch.set_num_threads(1)
KN = (0.866, 0.866, 0.5, 0.5)          # 60 degree field of view, square


def texture(size=256, seed=0) -> np.ndarray:
    """Smooth random colour texture (blurred noise at two scales)."""
    rng = np.random.default_rng(seed)
    t = sum(cv2.resize(rng.random((n, n, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
            for n in (16, 48))
    t = (t - t.min()) / (t.max() - t.min())
    return (t * 255).astype(np.uint8)


def rotating_video(angles_deg, size=64, seed=0):
    """Frames of a camera turning about its centre (yaw, pitch per frame) in front of a distant
    textured plane: a pure rotation, so frame i is frame 0 warped by K R_i K^-1."""
    tex = texture(4 * size, seed)
    K = pixel_matrix(np.array(KN), size, size)
    # The texture spans 4x the view, centred: map texture pixels to the frame-0 image plane.
    A = np.array([[1.0, 0, -1.5 * size], [0, 1.0, -1.5 * size], [0, 0, 1]])
    frames, Rs = [], []
    for yaw, pitch in angles_deg:
        R = (_rot_y(math.radians(yaw)) @ _rot_x(math.radians(pitch))).numpy()   # camera-to-world turn
        H = K @ R.T @ np.linalg.inv(K) @ A                  # texture -> frame: world ray seen by the turned camera
        frames.append(cv2.warpPerspective(tex, H, (size, size), flags=cv2.INTER_CUBIC))
        Rs.append(R)
    c2w = torch.eye(4, dtype=torch.float64).repeat(len(Rs), 1, 1)
    c2w[:, :3, :3] = torch.from_numpy(np.stack(Rs))
    return np.stack(frames), Cameras.from_c2w(c2w, KN)


def test_too_short_and_malformed_videos_get_clear_errors():
    one = np.zeros((1, 64, 64, 3), np.uint8)
    with pytest.raises(MinwmError, match="has 1 frame; camera motion needs at least 2 frames"):
        estimate_trajectory(one, KN)
    with pytest.raises(MinwmError, match=r"expected \[F, H, W, 3\]"):
        estimate_trajectory(np.zeros((4, 64, 64), np.uint8), KN)
    with pytest.raises(MinwmError, match="uint8"):
        estimate_trajectory(np.zeros((4, 64, 64, 3), np.float32), KN)
    with pytest.raises(MinwmError, match="at least 16 pixels"):
        estimate_trajectory(np.zeros((4, 8, 8, 3), np.uint8), KN)
    with pytest.raises(MinwmError, match="intrinsics"):
        estimate_trajectory(np.zeros((4, 64, 64, 3), np.uint8), (0.8, 0.8, 0.5))


def test_static_video_reports_no_motion():
    frames, _ = rotating_video([(0, 0)] * 5)
    est = estimate_poses(frames, KN)
    assert not est.translating
    assert torch.equal(est.cameras.w2c, torch.eye(4, dtype=torch.float64).expand(5, 4, 4))
    # A flat grey still video has nothing to track, and nothing moves: also no motion, no error.
    grey = np.full((5, 64, 64, 3), 128, np.uint8)
    assert torch.equal(estimate_trajectory(grey, KN).w2c, torch.eye(4, dtype=torch.float64).expand(5, 4, 4))


def test_flat_moving_video_is_rejected():
    frames = np.full((4, 64, 64, 3), 128, np.uint8)
    frames[2:] = 140                                      # changes, but no texture to follow
    with pytest.raises(MinwmError, match="trackable points"):
        estimate_trajectory(frames, KN)


def test_pure_rotation_is_recovered_without_translation():
    angles = [(1.5 * i, -0.75 * i) for i in range(9)]    # 12 deg yaw, 6 deg pitch at the end
    frames, ref = rotating_video(angles)
    est = estimate_poses(frames, KN)
    assert not est.translating
    m = camera_metrics(est.cameras, ref)
    assert m["rot_err_deg"] < 0.2
    assert m["trans_err"] == 0.0


def test_kabsch_and_rotation_fit_are_exact_on_clean_data():
    rng = np.random.default_rng(0)
    R = (_rot_y(0.3) @ _rot_x(-0.2)).numpy()
    a = rng.standard_normal((20, 3))
    assert np.allclose(kabsch(a, a @ R.T), R, atol=1e-12)
    K = pixel_matrix(np.array(KN), 64, 64)
    x0 = rng.uniform(5, 59, (40, 2))
    b = np.linalg.solve(K, np.c_[x0, np.ones(40)].T).T @ R.T
    x1 = (b @ K.T)[:, :2] / (b @ K.T)[:, 2:]
    x1[:5] += 10                                           # outliers
    Rf, res = fit_rotation(x0, x1, K, 1.0, rng)
    assert np.allclose(Rf, R, atol=1e-9)
    assert (res[5:] < 1e-6).all() and (res[:5] > 5).all()


def test_corner_ratio_tells_corners_from_edges():
    # A bright square on a dark field: its sides are edges (LK slides along them), its corners are not.
    from minwm.eval.pose import _corner_ratio
    g = np.zeros((96, 96), np.uint8)
    g[32:64, 32:64] = 200
    g = cv2.GaussianBlur(g, (0, 0), 1.0)
    r = _corner_ratio(g, np.array([[48.0, 32.0], [32.0, 48.0], [32.0, 32.0], [63.0, 63.0]]), 13)
    assert (r[:2] < 0.05).all() and (r[2:] > 0.3).all()


@pytest.fixture(scope="module")
def world():
    pytest.importorskip("minwm.worlds.render")
    from minwm.worlds.render import render
    from minwm.worlds.scene import generate_scene
    from minwm.worlds.trajectories import program_cameras, square_intrinsics

    K = square_intrinsics(60, 64, 64)

    def clip(prog, seed=0, frames=17):
        cams = program_cameras(prog, frames, K)
        scene = generate_scene(np.random.default_rng(seed), cams.positions.numpy())
        return render(scene, cams, 64, 64), cams

    return clip, K


@pytest.mark.parametrize("prog", ["l*4", "w*4", "e*4"])
def test_procedural_world_clip(world, prog):
    clip, K = world
    frames, cams = clip(prog)
    est = estimate_poses(frames, K, PoseConfig())
    m = camera_metrics(est.cameras, cams)
    assert m["rot_err_deg"] < 0.5
    assert est.translating == (prog[0] in "we")
    assert direction_accuracy(est.cameras, prog) == 1.0


def test_descent_whose_few_corners_fit_a_pitch_better_is_read_as_a_descent():
    # scripts/check_pose_estimator.py --config configs/toy.yaml --frames 21, seed 10, hold_e: a flat box
    # and bare ground leave 11-60 corners, and they fit a 14-degree pitch with a rise better than the
    # true descent, so every bundle-adjustment final lies in that basin. The colours tell, through the
    # direct-alignment candidate (PoseConfig.align_candidate).
    pytest.importorskip("minwm.worlds.render")
    from minwm.worlds.render import render
    from minwm.worlds.scene import generate_scene
    from minwm.worlds.trajectories import eval_trajectories, num_latent_frames, program_cameras, square_intrinsics

    K = square_intrinsics(60, 64, 64)
    prog = eval_trajectories(num_latent_frames(21))["hold_e"]
    cams = program_cameras(prog, 21, K)
    scene = generate_scene(np.random.default_rng([10, sum(map(ord, "hold_e"))]), cams.positions.numpy(), hfov_deg=60)
    frames = render(scene, cams, 64, 64)
    # Measured: with the candidate 1.42 deg/frame and the first four of five steps read as descents (the last
    # one, where the tracks are fewest, as no vertical motion); without it 9.5 deg/frame, every step a rise.
    est = estimate_poses(frames, K)
    assert direction_accuracy(est.cameras, prog) >= 0.8 and camera_metrics(est.cameras, cams)["rot_err_deg"] < 2.0
    wrong = estimate_poses(frames, K, PoseConfig(align_candidate=False))
    assert direction_accuracy(wrong.cameras, prog) == 0.0 and camera_metrics(wrong.cameras, cams)["rot_err_deg"] > 5


def test_segment_cap_starts_new_keyframes_and_keeps_rotation():
    # 9 frames, segments of at most 4 frames: keyframes at 0, 3, 6; chaining keeps the rotation right.
    angles = [(1.5 * i, 0.0) for i in range(9)]
    frames, ref = rotating_video(angles)
    est = estimate_poses(frames, KN, PoseConfig(max_segment=4))
    assert est.keyframes == [0, 3, 6]
    assert camera_metrics(est.cameras, ref)["rot_err_deg"] < 0.3


def test_blurred_noisy_video_degrades_to_a_result_or_a_clear_error(world):
    # Generated videos are blurrier and noisier than renders: the estimator must return finite cameras
    # (accuracy may suffer) or refuse with a one-line MinwmError, never crash.
    clip, K = world
    frames, cams = clip("w+l*4")
    rng = np.random.default_rng(0)
    for sigma, noise in ((2.0, 16.0),):
        bad = np.stack([cv2.GaussianBlur(f, (0, 0), sigma) for f in frames]).astype(np.float64)
        bad = np.clip(bad + rng.normal(0, noise, bad.shape), 0, 255).astype(np.uint8)
        try:
            est = estimate_poses(bad, K)
        except MinwmError as e:
            assert "\n" not in str(e)
            continue
        assert len(est.cameras) == len(frames) and torch.isfinite(est.cameras.w2c).all()
