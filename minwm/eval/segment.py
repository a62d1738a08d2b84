"""Camera motion of one keyframe segment from its feature tracks (minwm.eval.pose, step 2-3).

Given positions [n, N, 2] of N tracks in the n frames of a segment (row 0 the keyframe), this
decides whether the segment translates at all (rotation-only guard), and if it does, solves its
poses and per-track inverse depths by bundle adjustment (minwm.eval.bundle) from several starts:
the essential-matrix solution, straight lines along each camera axis with the rotations of the
rotation-only fits, and the same straight lines without rotation (pure translations). The last
matter where the geometry is weak: a vertical move or a strafe read through a few tracks looks
much like a pitch or a yaw, and the rotation-only fits, which absorb all of the flow into
rotation, start those valleys on the wrong side. Starts only seed the solver; the tracks and the
colours decide (`minwm.eval.photometric.Consistency` picks between distinct solutions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from minwm.errors import MinwmError
from minwm.eval.bundle import bundle_adjust, pixel_rays

if TYPE_CHECKING:
    from minwm.eval.pose import PoseConfig


def bearings(x: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Unit rays [N, 3] in the camera frame through pixels x [N, 2]."""
    b = pixel_rays(x, K)
    return b / np.linalg.norm(b, axis=1, keepdims=True)


def project(X: np.ndarray, K: np.ndarray) -> np.ndarray:
    q = X @ K.T
    return q[:, :2] / q[:, 2:3]


def kabsch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rotation R minimising sum |b - R a|^2 for row vectors a, b [N, 3]."""
    U, _, Vt = np.linalg.svd(b.T @ a)
    d = np.sign(np.linalg.det(U @ Vt)) or 1.0
    return U @ np.diag([1.0, 1.0, d]) @ Vt


def fit_rotation(x0: np.ndarray, x1: np.ndarray, K: np.ndarray, thr: float, rng: np.random.Generator,
                 iters: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Rotation-only model x1 ~ K R K^-1 x0: 2-point RANSAC, then Kabsch on inliers (re-selected
    twice). Returns R and the reprojection residual [N] (pixels) of every point under it."""
    b0, b1 = bearings(x0, K), bearings(x1, K)
    n = len(x0)

    def resid(R):
        return np.linalg.norm(project(b0 @ R.T, K) - x1, axis=1)

    best = np.eye(3)
    if n >= 2:
        # All hypotheses at once: pairs (i, j != i), a Kabsch rotation per pair (batched SVD), and
        # the inlier count of each over every point; the first best wins, as in a sequential loop.
        i = rng.integers(n, size=iters)
        j = (i + rng.integers(1, n, size=iters)) % n
        H = np.einsum("hi,hj->hij", b1[i], b0[i]) + np.einsum("hi,hj->hij", b1[j], b0[j])
        U, _, Vt = np.linalg.svd(H)
        d = np.where(np.linalg.det(U @ Vt) < 0, -1.0, 1.0)
        U[:, :, 2] *= d[:, None]
        Rs = U @ Vt                                                    # [iters, 3, 3]
        X = np.einsum("hij,nj->hni", Rs, b0)
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.stack([K[0, 0] * X[..., 0] / X[..., 2] + K[0, 2], K[1, 1] * X[..., 1] / X[..., 2] + K[1, 2]], -1)
            count = (np.linalg.norm(x - x1, axis=-1) < thr).sum(1)
        best = Rs[int(np.argmax(count))]
    R = best
    for _ in range(3):
        m = resid(R) < thr
        if m.sum() < 2:
            break
        R = kabsch(b0[m], b1[m])
    return R, resid(R)


@dataclass
class Segment:
    poses: np.ndarray            # [n, 4, 4] keyframe camera -> frame camera
    tracks: np.ndarray           # [n]
    resid: np.ndarray            # [n]
    translating: bool
    points: np.ndarray | None    # [N, 3] keyframe-camera points per track (NaN where none), or None
    scale_ref: float = 1.0


def solve_segment(P: np.ndarray, alive: np.ndarray, K: np.ndarray, cfg: PoseConfig,
                   rng: np.random.Generator, sqrt_info: np.ndarray | None = None,
                   strong: np.ndarray | None = None, consistency=None) -> Segment:
    """sqrt_info [n, N, 2, 2]: per-observation whitening for the bundle adjustment (None: isotropic);
    strong [N]: tracks well localised in both directions, the only ones the robust fits sample;
    consistency: `minwm.eval.photometric.Consistency` of the segment's frames, which then picks
    between the bundle adjustment's distinct solutions (None: the lowest reprojection cost)."""
    n, N, _ = P.shape
    fit_alive = alive if strong is None else alive & strong[None]
    poses = np.tile(np.eye(4), (n, 1, 1))
    tracks = alive.sum(1)
    resid = np.zeros(n)
    rots = [np.eye(3)] * n
    parallax = np.zeros(n)
    moving = np.zeros(n, bool)
    for r in range(1, n):
        m = fit_alive[r] if fit_alive[r].sum() >= cfg.min_tracks else alive[r]
        if m.sum() < cfg.min_tracks:
            raise MinwmError(f"pose: only {int(m.sum())} tracks survive into frame {r} of a segment "
                             f"(need {cfg.min_tracks}); the video changes too much between frames")
        x0, x1 = P[0][m], P[r][m]
        if np.abs(x1 - x0).max() < cfg.static_px:
            continue                                    # nothing moved: the keyframe's view exactly
        moving[r] = True
        R, res = fit_rotation(x0, x1, K, cfg.ransac_px, rng)
        rots[r] = R
        parallax[r] = float(np.median(res))
        resid[r] = parallax[r]
        poses[r, :3, :3] = R
    j = int(np.argmax(parallax))
    if parallax[j] < cfg.parallax_px:
        return Segment(poses, tracks, resid, False, None)

    # Essential matrix on the pair with the most parallax fixes rotation, unit translation and structure.
    m = fit_alive[j] if fit_alive[j].sum() >= cfg.min_tracks else alive[j]
    x0, xj = P[0][m], P[j][m]
    E, inl = cv2.findEssentialMat(x0, xj, K, cv2.RANSAC, 0.9999, cfg.ransac_px)
    if E is None or E.shape != (3, 3):
        return Segment(poses, tracks, resid, False, None)
    _, R, t, inl = cv2.recoverPose(E, x0, xj, K, mask=inl.copy())
    Tj = np.eye(4)
    Tj[:3, :3], Tj[:3, 3] = R, t.ravel()
    idx = np.flatnonzero(m)[inl.ravel() > 0]
    points = np.full((N, 3), np.nan)
    if len(idx):               # no inlier left (cv2 would return None): the line starts below still seed the solver
        points[idx] = _triangulate_pair(P[0][idx], P[j][idx], Tj, K, cfg)
    poses[j] = Tj                                       # first guesses: Tj, elsewhere rotation only
    for r in range(1, n):
        if moving[r] and r != j:
            poses[r], _ = _pnp(points, P[r], alive[r], K, poses[r], cfg)
    # Bundle adjustment over the whole segment (two rounds; the second without gross outliers).
    z = points[:, 2]
    rho = np.where(np.isfinite(z) & (z > 0), 1.0 / np.where(np.isfinite(z) & (z > 0), z, 1.0), 0.0)
    starts = [(poses, rho)] + [(T, np.full(N, 0.3)) for T in _line_starts(np.stack(rots), cfg.translation_starts)]
    use = alive.copy()
    ba = dict(huber_px=cfg.ransac_px, sqrt_info=sqrt_info, loss=cfg.ba_loss, smooth_px=cfg.smooth_px)
    # A few iterations from every start separate the basins; only the lowest-cost few are solved
    # fully (this adjustment is most of the estimator's time), each twice, the second time without
    # its gross outliers. Starts that end in the same basin are solved once.
    probes = [bundle_adjust(P, use, K, T0, rho0, iters=cfg.ba_probe_iters, **ba) for T0, rho0 in starts]
    finals = []
    for i in np.argsort([c[3] for c in probes], kind="stable"):
        if len(finals) == cfg.ba_keep:
            break
        cand = bundle_adjust(P, use, K, probes[i][0], probes[i][1], iters=cfg.ba_iters, **ba)
        if any(_path_angle(cand[0], f[0][0]) < 0.5 for f in finals):
            continue
        u = use & ~(cand[2] > cfg.outlier_px)
        finals.append((bundle_adjust(P, u, K, cand[0], cand[1], iters=cfg.ba_iters, **ba), u, cand[3]))
    best = min(range(len(finals)), key=lambda k: finals[k][2])
    if consistency is not None and (len(finals) > 1 or cfg.align_candidate):
        # The reprojection costs of different basins are close where the geometry is weak (yaw vs
        # strafe, pitch vs vertical move); the colours of all textured pixels decide between them.
        scores = [consistency(f[0][0]) for f in finals]
        best = int(np.argmin(scores))
    (poses, rho, err, _), use, _ = finals[best]
    if consistency is not None and cfg.align_candidate:
        # The tracks can also prefer a wrong basin outright: a few corners, most on one plane or on
        # silhouettes, fit a descent read as a pitch with a roll better than the true descent, and
        # every final lies in that basin. Direct alignment from the straight line (with or without the
        # rotation-only fits' rotations) whose colours agree best is one more candidate, one the tracks
        # did not propose; the colours decide again.
        aligned = consistency.align(min(_line_starts(np.stack(rots), free=True), key=consistency))
        if consistency(aligned) < scores[best]:
            rho, _ = track_depths(P, alive, K, aligned, consistency.rho_max, cfg.ransac_px)
            poses, rho, err, _ = bundle_adjust(P, use, K, aligned, rho, iters=0, **ba)
            use = alive.copy()
    use = use & ~(err > cfg.outlier_px)
    for r in range(1, n):
        e = err[r][use[r]]
        resid[r] = float(np.median(e)) if len(e) else float("nan")
    points = pixel_rays(P[0], K) / np.where(rho > 0, rho, np.nan)[:, None]
    return Segment(poses, tracks, resid, True, points)


def _path_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Largest rotation angle (degrees) between two camera paths [n, 4, 4], frame by frame."""
    R = np.einsum("nij,nkj->nik", a[:, :3, :3], b[:, :3, :3])
    c = (np.trace(R, axis1=1, axis2=2) - 1) / 2
    return float(np.degrees(np.arccos(np.clip(c, -1, 1))).max())


def _triangulate_pair(x0, x1, T, K, cfg) -> np.ndarray:
    P0 = K @ np.eye(4)[:3]
    P1 = K @ T[:3]
    Xh = cv2.triangulatePoints(P0, P1, x0.T.astype(np.float64), x1.T.astype(np.float64))
    X = (Xh[:3] / Xh[3]).T
    return _filter_points(X, [(np.eye(4), x0), (T, x1)], K, cfg)


def _filter_points(X, views, K, cfg) -> np.ndarray:
    """NaN out points behind a camera, badly reprojected, or seen under too small an angle."""
    X = X.copy()
    bad = ~np.isfinite(X).all(1)
    centres = []
    for T, x in views:
        Xc = X @ T[:3, :3].T + T[:3, 3]
        bad |= Xc[:, 2] <= 1e-6
        with np.errstate(invalid="ignore", divide="ignore"):
            bad |= ~(np.linalg.norm(project(Xc, K) - x, axis=1) < cfg.ransac_px)
        centres.append(-T[:3, :3].T @ T[:3, 3])
    # Largest angle between the rays from any two centres (first vs farthest is enough here).
    c0 = centres[0]
    far = max(centres, key=lambda c: np.linalg.norm(c - c0))
    a, b = X - c0, X - far
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    bad |= ~(np.degrees(np.arccos(np.clip(cos, -1, 1))) >= cfg.min_triangulation_deg)
    X[bad] = np.nan
    return X


def _pnp(points, x, alive, K, init, cfg) -> tuple[np.ndarray, float]:
    m = alive & np.isfinite(points).all(1)
    if m.sum() < 6:
        return init, float("nan")
    X, u = points[m].astype(np.float64), x[m].astype(np.float64)
    rvec0, _ = cv2.Rodrigues(init[:3, :3])
    tvec0 = init[:3, 3].reshape(3, 1).copy()
    ok, rvec, tvec, inl = cv2.solvePnPRansac(X, u, K, None, rvec0.copy(), tvec0, useExtrinsicGuess=True,
                                             iterationsCount=200, reprojectionError=cfg.ransac_px,
                                             confidence=0.999, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok or inl is None or len(inl) < 6:
        return init, float("nan")
    inl = inl.ravel()
    rvec, tvec = cv2.solvePnPRefineLM(X[inl], u[inl], K, None, rvec, tvec)
    T = np.eye(4)
    T[:3, :3] = cv2.Rodrigues(rvec)[0]
    T[:3, 3] = tvec.ravel()
    res = np.linalg.norm(project(X[inl] @ T[:3, :3].T + T[:3, 3], K) - u[inl], axis=1)
    return T, float(np.median(res))




def _line_starts(rots: np.ndarray, free: bool) -> list[np.ndarray]:
    """Straight-line camera paths [n, 4, 4]: constant-speed translation along each camera axis, both
    signs, with the rotations rots [n, 3, 3] of the rotation-only fits and (free) without rotation.
    LM is local and the geometry of small, narrow-field videos has shallow valleys (yaw vs strafe,
    pitch vs vertical move, bas-relief); the rotation-only fits put all of a vertical move's flow
    into pitch, so only the rotation-free line sits on the right side of that valley."""
    out = []
    for T1 in _translation_lines(len(rots)):
        T0 = T1.copy()
        T0[:, :3, :3] = rots
        out.append(T0)
        if free:
            out.append(T1)
    return out


def _translation_lines(n: int) -> list[np.ndarray]:
    """Camera paths [n, 4, 4] without rotation, translating at constant speed along each camera axis,
    both signs (+x, -x, +y, -y, +z, -z), scaled to max |t| = 1."""
    out = []
    for axis in range(3):
        for sign in (1.0, -1.0):
            T = np.tile(np.eye(4), (n, 1, 1))
            T[:, axis, 3] = sign * np.arange(n) / (n - 1)
            out.append(T)
    return out


def track_depths(P: np.ndarray, alive: np.ndarray, K: np.ndarray, poses: np.ndarray, rho_max: float,
                 c: float = 1.0, sweep: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Best inverse depth [N] of every track P [n, N, 2] (alive [n, N]) under fixed camera poses
    [n, 4, 4], on a grid in [0, rho_max], and its robust (Cauchy, scale c pixels) reprojection cost
    [N] summed over the track's frames."""
    n, N, _ = P.shape
    rays = pixel_rays(P[0], K)
    grid = np.linspace(0.0, rho_max, sweep)
    cost = np.zeros((N, sweep))
    for r in range(1, n):
        m = alive[r]
        if not m.any():
            continue
        X = (rays[m] @ poses[r, :3, :3].T)[:, None, :] + grid[None, :, None] * poses[r, :3, 3]
        Z = np.maximum(X[..., 2], 1e-9)
        x = np.stack([K[0, 0] * X[..., 0] / Z + K[0, 2], K[1, 1] * X[..., 1] / Z + K[1, 2]], -1)
        e2 = ((x - P[r][m][:, None, :]) ** 2).sum(-1)
        e2 = np.where(X[..., 2] > 1e-9, e2, 1e6)
        cost[m] += 0.5 * c * c * np.log1p(e2 / (c * c))
    best = cost.argmin(1)
    return grid[best], cost[np.arange(N), best]


def track_cost(P: np.ndarray, alive: np.ndarray, K: np.ndarray, poses: np.ndarray, rho_max: float,
               c: float = 1.0, sweep: int = 64) -> float:
    """Mean robust (Cauchy, scale c pixels) reprojection cost per observation of tracks P [n, N, 2]
    (alive [n, N]) under fixed camera poses [n, 4, 4], each track at its best inverse depth on a grid
    in [0, rho_max]: how well a camera path explains the tracks, whatever produced it."""
    _, cost = track_depths(P, alive, K, poses, rho_max, c, sweep)
    obs = max(int(alive[1:].sum()), 1)
    return float(cost.sum() / obs)
