import math

import cv2
import numpy as np
import pytest
import torch

from minwm.cameras.actions import _rot_x, _rot_y
from minwm.eval.photometric import Consistency, PhotoConfig, cubic_matrix, refine_segment, sample, select_pixels, upsample
from minwm.eval.bundle import bundle_adjust, depth_pose_lm, so3_exp
from minwm.eval.pose import pixel_matrix

torch.set_num_threads(1)
KN = np.array([0.866, 0.866, 0.5, 0.5])


def test_catmull_rom_upsampling_reproduces_quadratics_at_any_offset():
    # OpenCV's cubic (a = -3/4) shifts a plain ramp by up to 0.04 px; Catmull-Rom must not.
    x = np.arange(32, dtype=np.float64)
    img = np.stack([np.tile(x, (32, 1)), np.tile(x[:, None] ** 2 / 32, (1, 32)), np.ones((32, 32))], -1)
    up = upsample(img, 4)
    assert np.allclose(cubic_matrix(8, 4).sum(1), 1.0)
    pts = np.array([[10.3, 7.0], [12.0, 13.77], [20.5, 20.12], [5.01, 9.9]])
    got = sample(up, pts, 4)
    assert np.allclose(got[:, 0], pts[:, 0], atol=2e-3)
    assert np.allclose(got[:, 1], pts[:, 1] ** 2 / 32, atol=2e-3)
    assert np.allclose(got[:, 2], 1.0, atol=1e-6)


def test_select_pixels_takes_the_strongest_gradients_away_from_the_border():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 16:] = 200                                            # one vertical edge
    img[0, :] = 255                                              # an edge inside the border band
    xy = select_pixels(img, PhotoConfig(max_pixels=1000, min_grad=5.0, border_px=2))
    assert len(xy) > 0
    assert set(np.unique(xy[:, 0])) <= {15.0, 16.0}
    assert xy[:, 1].min() >= 2 and xy[:, 1].max() <= 29
    assert len(select_pixels(img, PhotoConfig(max_pixels=10, min_grad=5.0))) == 10


def _scene(rng, n=80):
    K = pixel_matrix(KN, 64, 64)
    X = np.c_[rng.uniform(-1.5, 1.5, n), rng.uniform(-1, 1, n), rng.uniform(2, 6, n)]
    poses = np.tile(np.eye(4), (4, 1, 1))
    for r in range(1, 4):
        poses[r, :3, :3] = so3_exp(np.array([0.01 * r, -0.02 * r, 0.0]))
        poses[r, :3, 3] = np.array([0.1, 0.0, 0.05]) * r
    poses[:, :3, 3] /= np.linalg.norm(poses[:, :3, 3], axis=1).max()
    P = np.stack([((X @ T[:3, :3].T + T[:3, 3]) @ K.T)[:, :2] / ((X @ T[:3, :3].T + T[:3, 3]) @ K.T)[:, 2:]
                  for T in poses])
    return K, X, poses, P


def _noisy_scene(seed: int, n: int, sigma_px: float):
    """_scene plus tracks with Gaussian pixel noise (frame 0 exact, as the keyframe is); all alive."""
    rng = np.random.default_rng(seed)
    K, X, poses, P = _scene(rng, n)
    Pn = P + rng.normal(0, sigma_px, P.shape)
    Pn[0] = P[0]
    return rng, K, poses, P, Pn, np.ones(P.shape[:2], bool)


def test_whitened_bundle_adjustment_ignores_errors_along_the_weak_direction():
    # Every observation is off by 1.5 px along its own direction u, and its information says it is
    # known only across u (an edge): the whitened solve recovers the poses, the plain one does not.
    rng = np.random.default_rng(0)
    K, X, poses, P = _scene(rng)
    n, N = P.shape[:2]
    ang = rng.uniform(0, np.pi, (n, N))
    u = np.stack([np.cos(ang), np.sin(ang)], -1)
    nrm = np.stack([-u[..., 1], u[..., 0]], -1)
    Pn = P + 1.5 * u
    Pn[0] = P[0]
    L = np.stack([nrm, 1e-4 * u], -2)                          # rows: across (weight 1), along (1e-4)
    start = poses.copy()
    start[1:, :3, :3] = so3_exp(np.array([0.0, 0.01, 0.0])) @ poses[1:, :3, :3]
    alive = np.ones((n, N), bool)
    rho0 = np.full(N, 0.3)
    white = bundle_adjust(Pn, alive, K, start, rho0, huber_px=5.0, sqrt_info=L)[0]
    plain = bundle_adjust(Pn, alive, K, start, rho0, huber_px=5.0)[0]
    err = lambda T: max(np.linalg.norm(T[r, :3, :3] - poses[r, :3, :3]) for r in range(n))  # noqa: E731
    assert err(white) < 2e-3
    assert err(plain) > 5 * err(white)


def test_generic_solver_with_reprojection_residual_matches_bundle_adjust():
    rng, K, poses, P, Pn, alive = _noisy_scene(1, 40, 0.2)
    n, N = P.shape[:2]
    a = bundle_adjust(Pn, alive, K, poses, np.full(N, 0.3))
    fr, pt = np.nonzero(alive[1:])
    fr = fr + 1
    rays = np.linalg.solve(K, np.c_[Pn[0], np.ones(N)].T).T
    b = depth_pose_lm(rays, fr, pt, K, poses, np.full(N, 0.3),
                      lambda x, ok: (x - Pn[fr, pt], np.broadcast_to(np.eye(2), (len(x), 2, 2))), 1.0)
    assert np.allclose(a[0], b[0]) and np.allclose(a[1], b[1]) and a[3] == b[3]


def _texture(size, seed=0):
    rng = np.random.default_rng(seed)
    t = sum(cv2.resize(rng.random((k, k, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
            for k in (12, 30))
    return ((t - t.min()) / (t.max() - t.min()) * 255).astype(np.float32)


def _plane_video(size=48, n=5):
    """A textured ground plane (y = 1 below the camera, tilted so depth varies) seen by a camera that
    walks forward and right while turning: frame r is frame 0 warped by the plane's homography.
    Returns frames [n, size, size, 3] uint8, K and the poses (max |t| = 1)."""
    K = pixel_matrix(KN, size, size)
    tex = _texture(4 * size)
    nvec, dist = np.array([0.0, math.sin(0.5), math.cos(0.5)]), 1.2    # plane n.X = dist in camera 0
    # The texture is painted on the plane through camera 0's view: image-0 px -> texture px (4x, centred).
    A = np.array([[1.0, 0, 1.5 * size], [0, 1.0, 1.5 * size], [0, 0, 1.0]])
    frame0 = cv2.warpPerspective(tex, A, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    poses = np.tile(np.eye(4), (n, 1, 1))
    frames = [frame0]
    for r in range(1, n):
        R = (_rot_y(math.radians(-0.8 * r)) @ _rot_x(math.radians(0.3 * r))).numpy()
        t = np.array([0.03, 0.0, -0.05]) * r
        poses[r, :3, :3], poses[r, :3, 3] = R, t
        Hh = K @ (R + np.outer(t, nvec) / dist) @ np.linalg.inv(K)      # image 0 -> image r
        frames.append(cv2.warpPerspective(tex, A @ np.linalg.inv(Hh), (size, size),
                                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP))
    frames = np.clip(np.stack(frames), 0, 255).astype(np.uint8)
    poses[:, :3, 3] /= np.linalg.norm(poses[:, :3, 3], axis=1).max()
    return frames, K, poses


def test_direct_refinement_pulls_perturbed_poses_back_to_a_plane_scene():
    frames, K, poses = _plane_video()
    start = poses.copy()
    start[1:, :3, :3] = so3_exp(np.array([0.0, math.radians(0.6), 0.0])) @ poses[1:, :3, :3]
    got, xy, rho = refine_segment(frames, K, start, 2.0, PhotoConfig(max_pixels=400))
    angle = lambda T: max(math.degrees(math.acos(np.clip((np.trace(T[r, :3, :3].T @ poses[r, :3, :3]) - 1) / 2,  # noqa: E731
                                                         -1, 1))) for r in range(1, 5))
    assert len(xy) > 100
    assert angle(got) < angle(start) / 3


def test_consistency_scores_the_true_path_below_a_turned_one():
    # The valley the feature solve can slide along: the same path turned by a growing yaw. The colours
    # of all textured pixels (each at its best depth) must prefer the true path.
    frames, K, poses = _plane_video()
    score = Consistency(frames, K)
    turned = poses.copy()
    for r in range(1, len(poses)):
        turned[r, :3, :3] = so3_exp(np.array([0.0, math.radians(1.0 * r), 0.0])) @ poses[r, :3, :3]
    assert score(poses, 2.0) < 0.85 * score(turned, 2.0)


def test_cauchy_loss_shrugs_off_gross_outliers_that_bend_huber():
    rng, K, poses, P, Pn, alive = _noisy_scene(2, 60, 0.05)
    n, N = P.shape[:2]
    bad = rng.random((n, N)) < 0.2
    bad[0] = False
    Pn[bad] += rng.uniform(3, 8, (bad.sum(), 2)) * rng.choice([-1, 1], (bad.sum(), 2))
    err = lambda T: max(np.linalg.norm(T[r, :3, :3] - poses[r, :3, :3]) for r in range(n))  # noqa: E731
    cauchy = bundle_adjust(Pn, alive, K, poses, np.full(N, 0.3), loss="cauchy")[0]
    huber = bundle_adjust(Pn, alive, K, poses, np.full(N, 0.3), loss="huber")[0]
    assert err(cauchy) < 0.5 * err(huber)
    # The IRLS weight is the loss's derivative over the residual.
    from minwm.eval.bundle import _robust_cost, _robust_weight
    e = np.array([0.3, 1.0, 4.0])
    d = (np.array([_robust_cost(np.array([v + 1e-6]), 1.0, "cauchy") for v in e])
         - np.array([_robust_cost(np.array([v - 1e-6]), 1.0, "cauchy") for v in e])) / 2e-6
    assert np.allclose(_robust_weight(e, 1.0, "cauchy"), d / e, rtol=1e-5)


def test_one_pass_sweep_matches_a_frame_by_frame_depth_by_depth_reference():
    # The sweep runs every frame and depth at once in float32; the reference projects each (frame, depth)
    # separately in float64 and looks colours up frame by frame.
    from minwm.eval.photometric import _Frames, _sweep

    rng = np.random.default_rng(3)
    frames = np.stack([cv2.GaussianBlur(f, (0, 0), 1.2) for f in rng.integers(0, 255, (6, 24, 32, 3)).astype(np.uint8)])
    K = pixel_matrix(np.array([0.8, 1.0, 0.5, 0.5]), 24, 32)
    poses = np.tile(np.eye(4), (6, 1, 1))
    for f in range(1, 6):
        poses[f, :3, :3] = _rot_y(0.02 * f).numpy() @ _rot_x(-0.01 * f).numpy()
        poses[f, :3, 3] = [0.1 * f, -0.05 * f, 0.2 * f]
    cfg = PhotoConfig(max_pixels=80, sweep=9, min_grad=1.0)
    fr = _Frames(frames, 1.0, cfg.upsample)
    xy = select_pixels(frames[0], cfg)
    ref = fr.colour(0, xy)
    cost, grid = _sweep(fr, xy, ref, poses, K, 2.0, cfg)
    rays = np.linalg.solve(K, np.c_[xy, np.ones(len(xy))].T).T
    want = np.zeros((len(xy), len(grid)))
    for f in range(1, 6):
        for d, rho in enumerate(grid):
            X = rays @ poses[f, :3, :3].T + rho * poses[f, :3, 3]
            x = np.stack([K[0, 0] * X[:, 0] / X[:, 2] + K[0, 2], K[1, 1] * X[:, 1] / X[:, 2] + K[1, 2]], -1)
            ok = (X[:, 2] > 1e-9) & fr.inside(x)
            e = np.linalg.norm(fr.colour(f, np.where(ok[:, None], x, 0.0)) - ref, axis=1)
            want[:, d] += np.where(ok, np.minimum(e, cfg.huber), cfg.huber)
    assert cost.shape == want.shape and 0 < (want < len(poses[1:]) * cfg.huber).mean() < 1   # in view and out
    np.testing.assert_allclose(cost, want, atol=2e-3)


def test_solver_wants_observations_sorted_by_frame():
    rays = np.array([[0.0, 0.0, 1.0], [0.1, 0.0, 1.0]])
    poses = np.tile(np.eye(4), (3, 1, 1))

    def residual(x, ok):
        return x, np.broadcast_to(np.eye(2), (len(x), 2, 2))

    with pytest.raises(ValueError, match="sorted by frame"):
        depth_pose_lm(rays, np.array([2, 1]), np.array([0, 1]), np.eye(3), poses, np.zeros(2), residual, 1.0)
