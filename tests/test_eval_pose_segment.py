"""The segment solver's motion-smoothness prior and starts (minwm.eval.bundle, minwm.eval.segment)."""

import numpy as np
import torch

from minwm.eval.bundle import bundle_adjust, smoothness_prior, so3_exp, so3_log
from minwm.eval import photometric
from minwm.eval.pose import PoseConfig, _refine_photometric, pixel_matrix
from minwm.eval.segment import Segment, _line_starts, solve_segment, track_cost, track_depths

torch.set_num_threads(1)
KN = np.array([0.866, 0.866, 0.5, 0.5])


def _path(n=9, jump=None):
    """Constant-velocity camera (turning and moving), poses [n, 4, 4]; `jump` = (frame, offset [3])
    displaces one frame's translation."""
    poses = np.tile(np.eye(4), (n, 1, 1))
    for r in range(n):
        poses[r, :3, :3] = so3_exp(np.array([0.004, -0.01, 0.002]) * r)
        poses[r, :3, 3] = np.array([0.05, -0.02, 0.1]) * r
    if jump is not None:
        poses[jump[0], :3, 3] += jump[1]
    poses[:, :3, 3] /= np.linalg.norm(poses[:, :3, 3], axis=1).max()
    return poses


def _project(X, T, K):
    Xc = X @ T[:3, :3].T + T[:3, 3]
    return (Xc @ K.T)[:, :2] / (Xc @ K.T)[:, 2:]


def test_so3_log_inverts_so3_exp():
    w = np.array([[0.0, 0.0, 0.0], [1e-9, 0, 0], [0.3, -0.2, 0.1], [0.0, 2.5, 0.0]])
    assert np.allclose(so3_log(so3_exp(w)), w, atol=1e-9)


def test_smoothness_prior_is_zero_on_a_steady_camera_and_its_gradient_is_right():
    K = pixel_matrix(KN, 64, 64)
    rho = np.full(10, 0.4)
    steady = _path()
    # A constant-axis rotation growing linearly and a linear translation: no acceleration at all.
    cost, H, g = smoothness_prior(steady[:, :3, :3], steady[:, :3, 3], rho, K, 0.3)
    assert cost < 1e-18 and np.abs(g).max() < 1e-6
    bent = _path(jump=(4, np.array([0.0, 0.1, 0.0])))
    c1, H, g = smoothness_prior(bent[:, :3, :3], bent[:, :3, 3], rho, K, 0.3)
    assert c1 > 1.0 and H.shape == (6 * 8, 6 * 8) and np.allclose(H, H.T)
    # The translation part of the gradient is exact (the prior is quadratic in t); check frame 4's.
    for i in range(3):
        d = np.zeros(3)
        d[i] = 1e-6
        up, dn = bent[:, :3, 3].copy(), bent[:, :3, 3].copy()
        up[4] += d
        dn[4] -= d
        num = (smoothness_prior(bent[:, :3, :3], up, rho, K, 0.3, grad=False)[0]
               - smoothness_prior(bent[:, :3, :3], dn, rho, K, 0.3, grad=False)[0]) / 2e-6
        assert np.isclose(g[6 * 3 + 3 + i], num, rtol=1e-4)
    # The prior does not depend on the scale gauge: t * s with rho / s costs the same.
    c2 = smoothness_prior(bent[:, :3, :3], 3 * bent[:, :3, 3], rho / 3, K, 0.3, grad=False)[0]
    assert np.isclose(c1, c2)


def test_smoothness_prior_keeps_a_frame_seen_by_few_biased_tracks_on_the_path():
    # One late frame keeps only 6 tracks, all biased by 2 px the same way (what silhouette corners do).
    # Without the prior that frame follows them off the path; with it, it stays near its neighbours.
    rng = np.random.default_rng(0)
    K = pixel_matrix(KN, 64, 64)
    poses = _path()
    n, N = len(poses), 80
    X = np.c_[rng.uniform(-1.5, 1.5, N), rng.uniform(-1, 1, N), rng.uniform(2, 6, N)] * 0.3
    P = np.stack([_project(X, T, K) for T in poses])
    alive = np.ones((n, N), bool)
    alive[7, 6:] = False
    P[7, :6] += np.array([2.0, 0.0])
    rho0 = 1.0 / X[:, 2]

    def err(T):
        dR = so3_log(T[7, :3, :3] @ poses[7, :3, :3].T)
        return np.linalg.norm(T[7, :3, 3] - poses[7, :3, 3]) + np.linalg.norm(dR)

    plain = bundle_adjust(P, alive, K, poses, rho0, loss="cauchy")[0]
    smooth = bundle_adjust(P, alive, K, poses, rho0, loss="cauchy", smooth_px=0.3)[0]
    assert err(smooth) < 0.3 * err(plain)
    # On clean tracks the prior costs nothing: the true path is still the solution.
    clean = bundle_adjust(np.stack([_project(X, T, K) for T in poses]), np.ones((n, N), bool), K, poses, rho0,
                          smooth_px=0.3)[0]
    assert np.abs(clean - poses).max() < 1e-6


def test_line_starts_include_rotation_free_translations_only_when_asked():
    n = 5
    rots = np.stack([so3_exp(np.array([0.02 * r, 0, 0])) for r in range(n)])
    both = _line_starts(rots, free=True)
    only = _line_starts(rots, free=False)
    assert len(both) == 12 and len(only) == 6
    assert all(np.allclose(T[:, :3, :3], rots) for T in only)
    free = [T for T in both if np.allclose(T[:, :3, :3], np.eye(3))]
    assert len(free) == 6
    assert all(np.isclose(np.abs(T[-1, :3, 3]).max(), 1.0) for T in both)
    ends = {tuple(np.round(T[-1, :3, 3]).astype(int)) for T in free}
    assert ends == {(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)}


def test_vertical_move_is_not_read_as_a_pitch():
    # A camera moving straight down past points at several depths: exact tracks must give a pure
    # vertical translation, not a pitch, through the whole segment solve (all starts, the prior and
    # the selection). Exact tracks pin the answer; biased ones are scripts/check_pose_estimator.py's.
    rng = np.random.default_rng(3)
    K = pixel_matrix(KN, 64, 64)
    n, N = 9, 60
    X = np.c_[rng.uniform(-1.2, 1.2, N), rng.uniform(-0.8, 0.8, N), rng.uniform(2, 8, N)]
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, 1, 3] = -np.linspace(0, 1, n)             # w2c t = -R c, camera centre moving +y (down)
    P = np.stack([_project(X, T, K) for T in poses])
    seg = solve_segment(P, np.ones((n, N), bool), K, PoseConfig(), np.random.default_rng(0))
    assert seg.translating
    t = seg.poses[-1, :3, 3]
    assert t[1] < 0 and abs(t[1]) > 10 * np.abs(t[[0, 2]]).max()
    assert np.linalg.norm(so3_log(seg.poses[-1, :3, :3])) < 1e-3


def _strafe_scene(n=9, N=60, seed=5):
    """Camera strafing right past points at several depths: points [N, 3], true poses, exact tracks."""
    rng = np.random.default_rng(seed)
    K = pixel_matrix(KN, 64, 64)
    X = np.c_[rng.uniform(-1.5, 1.5, N), rng.uniform(-0.8, 0.8, N), rng.uniform(2, 8, N)]
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, 0, 3] = -np.linspace(0, 1, n)
    return X, poses, np.stack([_project(X, T, K) for T in poses]), K


def _turned(poses, deg_per_frame):
    out = poses.copy()
    for r in range(len(out)):
        out[r, :3, :3] = so3_exp(np.array([0.0, np.radians(deg_per_frame) * r, 0.0]))
    return out


def test_track_cost_is_near_zero_on_the_true_path_and_grows_along_the_yaw_strafe_valley():
    X, poses, P, K = _strafe_scene()
    alive = np.ones(P.shape[:2], bool)
    rho_max = 64 / K[0, 0]
    true = track_cost(P, alive, K, poses, rho_max, sweep=256)
    assert true < 5e-3                                   # only the depth grid's spacing is left
    costs = [track_cost(P, alive, K, _turned(poses, d), rho_max, sweep=256) for d in (0.5, 1.0, 2.0)]
    assert true < costs[0] < costs[1] < costs[2]
    # Dead observations do not count, and a track seen nowhere costs nothing.
    alive[3:, :10] = False
    assert track_cost(P, alive, K, poses, rho_max, sweep=256) < 5e-3


def test_direct_refinement_that_no_longer_fits_the_tracks_is_rejected(monkeypatch):
    X, poses, P, K = _strafe_scene()
    alive = np.ones(P.shape[:2], bool)
    frames = np.zeros((len(P), 64, 64, 3), np.uint8)    # refine_segment is replaced: colours unused
    seg = Segment(poses.copy(), alive.sum(1), np.zeros(len(P)), True, X.copy())
    for deg, kept in ((0.02, True), (2.0, False)):
        offered = _turned(poses, deg)
        monkeypatch.setattr(photometric, "refine_segment", lambda *a, T=offered, **k: (T, None, None))
        seg.poses = poses.copy()
        assert _refine_photometric(frames, K, seg, PoseConfig(), P, alive) is kept
        assert np.allclose(seg.poses, offered if kept else poses)
    # photo_track_ratio = 0 keeps whatever the direct alignment returns.
    assert _refine_photometric(frames, K, seg, PoseConfig(photo_track_ratio=0.0), P, alive)


class _Colours:
    """Stand-in for photometric.Consistency: scores a path by its rotation distance from `best`
    (the path the colours prefer) and aligns any start to `aligned`."""

    def __init__(self, best, aligned):
        self.best, self.aligned, self.rho_max, self.starts = best, aligned, 64 / 55.4, []

    def __call__(self, poses):
        R = np.einsum("nij,nkj->nik", poses[:, :3, :3], self.best[:, :3, :3])
        return float(np.linalg.norm(so3_log(R), axis=1).sum() + np.abs(poses[:, :3, 3] - self.best[:, :3, 3]).sum())

    def align(self, start):
        self.starts.append(start)
        return self.aligned


def test_aligned_candidate_replaces_the_track_basin_only_when_the_colours_prefer_it():
    # Exact tracks of a strafe put every bundle-adjustment final on the true path. If the colours
    # prefer another path (as they do when a few biased corners mislead the tracks, see
    # scripts/check_pose_estimator.py), direct alignment's answer replaces it, with depths and
    # residuals under it; if they prefer the tracks' answer, it stays; off, alignment never runs.
    X, poses, P, K = _strafe_scene()
    alive = np.ones(P.shape[:2], bool)
    other = _turned(poses, 1.5)
    for prefer, expect in ((other, other), (poses, poses)):
        colours = _Colours(best=prefer, aligned=other)
        seg = solve_segment(P, alive, K, PoseConfig(), np.random.default_rng(0), consistency=colours)
        assert np.allclose(seg.poses, expect, atol=1e-4)
        assert len(colours.starts) == 1 and np.allclose(colours.starts[0][:, :3, :3], np.eye(3))
        assert np.isfinite(seg.points).any() and np.isfinite(seg.resid[1:]).all()
    # Under the turned path the exact tracks no longer fit: the residuals say so.
    colours = _Colours(best=other, aligned=other)
    seg = solve_segment(P, alive, K, PoseConfig(), np.random.default_rng(0), consistency=colours)
    assert seg.resid[-1] > 0.1
    colours = _Colours(best=other, aligned=other)
    seg = solve_segment(P, alive, K, PoseConfig(align_candidate=False), np.random.default_rng(0), consistency=colours)
    assert not colours.starts and np.allclose(seg.poses, poses, atol=1e-4)


def test_track_depths_find_each_tracks_depth_under_the_true_path():
    X, poses, P, K = _strafe_scene()
    alive = np.ones(P.shape[:2], bool)
    rho, cost = track_depths(P, alive, K, poses, 1.0, sweep=1001)
    # Inverse depths in the scale of the path (max |t| = 1 is the whole strafe of length 1 here).
    assert np.abs(rho - 1 / X[:, 2]).max() <= 0.5e-3 + 1e-9 and cost.max() < 5e-3   # half a grid step
