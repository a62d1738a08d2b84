"""Bundle adjustment of the pose estimator (minwm.eval.pose): poses + one inverse depth per point, robust
(Huber or Cauchy) Levenberg-Marquardt with the Schur complement, and the same solver with a pluggable residual
(reprojection here, photometric in minwm.eval.photometric). Pure numpy."""

from __future__ import annotations

import numpy as np
import torch


def pixel_rays(x: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Rays [N, 3] with z = 1 through pixels x [N, 2] (a point at depth z is z * ray)."""
    return np.linalg.solve(K, np.c_[x, np.ones(len(x))].T).T


def _skew(v: np.ndarray) -> np.ndarray:
    z = np.zeros(v.shape[:-1])
    return np.stack([np.stack([z, -v[..., 2], v[..., 1]], -1), np.stack([v[..., 2], z, -v[..., 0]], -1),
                     np.stack([-v[..., 1], v[..., 0], z], -1)], -2)


def so3_exp(w: np.ndarray) -> np.ndarray:
    """Rotation matrices [..., 3, 3] of axis-angle vectors w [..., 3] (Rodrigues)."""
    th = np.linalg.norm(w, axis=-1)[..., None, None]
    Kx = _skew(w / np.maximum(th[..., 0], 1e-12))
    return np.eye(3) + np.sin(th) * Kx + (1 - np.cos(th)) * (Kx @ Kx)


def bundle_adjust(P: np.ndarray, alive: np.ndarray, K: np.ndarray, poses: np.ndarray, rho: np.ndarray,
                  huber_px: float = 1.0, iters: int = 40, sqrt_info: np.ndarray | None = None,
                  loss: str = "huber", smooth_px: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Levenberg-Marquardt over the poses of frames 1..n-1 and one inverse depth per track.

    Track k is the point rho_k^-1 * ray_k of the keyframe (row 0, exact by construction), so it
    appears in frame r at proj(R_r ray_k + rho_k t_r): linear in rho and t, and rho = 0 is a point at
    infinity, which keeps far points (pure rotation evidence) in the problem. Huber loss on pixel
    residuals. sqrt_info [n, N, 2, 2] (optional) whitens each observation's pixel residual: a track
    on an edge is known across the edge only, and its residual along the edge should not count.

    Returns poses [n, 4, 4], rho [N], the (whitened) residual norm [n, N] of every observation (NaN
    where none) and the final robust cost."""
    n, N, _ = P.shape
    fr, pt = np.nonzero(alive[1:])
    fr = fr + 1
    obs = P[fr, pt]
    L = None if sqrt_info is None else sqrt_info[fr, pt]

    def residual(x, ok):
        r = x - obs
        if L is None:
            return r, np.broadcast_to(np.eye(2), (len(r), 2, 2))
        return np.einsum("mij,mj->mi", L, r), L

    return depth_pose_lm(pixel_rays(P[0], K), fr, pt, K, poses, rho, residual, huber_px, iters, loss, smooth_px)


def depth_pose_lm(rays: np.ndarray, fr: np.ndarray, pt: np.ndarray, K: np.ndarray, poses: np.ndarray,
                  rho: np.ndarray, residual, huber: float, iters: int = 40, loss: str = "huber",
                  smooth_px: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Levenberg-Marquardt over the poses of frames 1..n-1 (poses [n, 4, 4], row 0 fixed) and an
    inverse depth per keyframe ray (rays [N, 3], z = 1), for observations (frame fr[i], ray pt[i]).

    Ray k's point rho_k^-1 * ray_k appears in frame r at x = proj(R_r ray_k + rho_k t_r): linear in
    rho and t, and rho = 0 is a point at infinity (pure rotation evidence stays in the problem).
    `residual(x [M, 2], ok [M]) -> (r [M, d], dr/dx [M, d, 2])` turns projections into residual
    vectors (reprojection errors, or colour differences for direct alignment); Huber loss on their
    norms; observations behind the camera count as gross errors. The scale gauge is fixed by
    rescaling to max |t_r| = 1 after every accepted step; the damping handles the null direction in
    between. Points are eliminated by the Schur complement (one parameter each), so each step is one
    dense (6n)x(6n) solve.

    Returns poses, rho [N], the residual norm [n, N] of every observation (NaN where none) and the
    final robust cost."""
    n, N = len(poses), len(rays)
    b = rays
    R, t, rho = poses[:, :3, :3].copy(), poses[:, :3, 3].copy(), np.maximum(rho.copy(), 0.0)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    m = n - 1
    gross = 1e3 * huber

    if len(fr) > 1 and np.any(np.diff(fr) < 0):
        raise ValueError("depth_pose_lm: observations must be sorted by frame")
    q = fr - 1
    bounds = np.searchsorted(q, np.arange(m + 1))          # observations of frame k + 1: bounds[k]:bounds[k + 1]

    def evaluate(R, t, rho):
        prior = 0.0 if smooth_px <= 0 else smoothness_prior(R, t, rho, K, smooth_px, grad=False)[0]
        Rb = (b @ R.transpose(0, 2, 1))[fr, pt]                         # R_r b_k: every frame's rays, then gathered
        X = Rb + rho[pt, None] * t[fr]
        ok = X[:, 2] > 1e-9
        Z = np.where(ok, X[:, 2], 1.0)
        x = np.stack([fx * X[:, 0] / Z + cx, fy * X[:, 1] / Z + cy], -1)
        r, G = residual(x, ok)
        e = np.sqrt(np.einsum("mi,mi->m", r, r))
        ok &= np.isfinite(e)
        e = np.where(ok, e, gross)                                      # behind the camera: a gross error
        cost = _robust_cost(e, huber, loss) + prior
        return (X, Rb), np.where(ok[:, None], r, 0.0), G, e, cost

    (X, Rb), r, G, e, cost = evaluate(R, t, rho)
    mu, done = 1e-3, False
    for _ in range(iters if len(fr) else 0):
        w = _robust_weight(e, huber, loss) * (e < gross)
        Z = X[:, 2]
        Jp = np.zeros((len(fr), 2, 3))
        Jp[:, 0, 0], Jp[:, 0, 2] = fx / Z, -fx * X[:, 0] / Z ** 2
        Jp[:, 1, 1], Jp[:, 1, 2] = fy / Z, -fy * X[:, 1] / Z ** 2
        Jp = G @ Jp
        # d(R b)/d(left rotation increment) = -[R b]x, so the rotation block is -Jp [R b]x: row by row a cross
        # product (-a^T [v]x = (v x a)^T).
        Jc = np.concatenate([np.cross(Rb[:, None, :], Jp), Jp * rho[pt, None, None]], -1)
        Jr = np.einsum("mij,mj->mi", Jp, t[fr])
        Jc, Jr = np.where(np.isfinite(Jc), Jc, 0.0), np.where(np.isfinite(Jr), Jr, 0.0)
        Jw = w[:, None, None] * Jc
        # Per-frame normal blocks as one matrix product per frame (observations are sorted by frame).
        U = np.stack([Jw[a:z].reshape(-1, 6).T @ Jc[a:z].reshape(-1, 6) for a, z in zip(bounds[:-1], bounds[1:])])
        Jg = np.einsum("mki,mk->mi", Jw, r)
        gU = np.stack([Jg[a:z].sum(0) for a, z in zip(bounds[:-1], bounds[1:])])
        V = np.bincount(pt, w * (Jr * Jr).sum(1), N)
        gV = np.bincount(pt, w * (Jr * r).sum(1), N)
        Wm = np.zeros((m, N, 6))
        Wm[q, pt] = np.einsum("mki,mk->mi", Jw, Jr)
        Wf = Wm.transpose(0, 2, 1).reshape(6 * m, N)
        if smooth_px > 0:
            _, Hp, gp = smoothness_prior(R, t, rho, K, smooth_px)
        else:
            Hp, gp = 0.0, 0.0
        improved = False
        while mu < 1e8:
            Ud = U + mu * np.einsum("nii->ni", U)[:, :, None] * np.eye(6) + 1e-9 * np.eye(6)
            Vd = V * (1 + mu) + 1e-9
            # Dense products go through torch (follows torch.set_num_threads; numpy's BLAS may spawn a
            # thread per core and thrash on a shared machine).
            S = -(torch.from_numpy(Wf / Vd) @ torch.from_numpy(Wf).T).numpy()
            for k in range(m):
                S[6 * k:6 * k + 6, 6 * k:6 * k + 6] += Ud[k]
            S += Hp
            g = gU.reshape(-1) + gp - Wf @ (gV / Vd)
            dp = torch.linalg.solve(torch.from_numpy(S), torch.from_numpy(-g)).numpy()
            dr = (-gV - Wf.T @ dp) / Vd
            dp = dp.reshape(m, 6)
            R2, t2 = R.copy(), t.copy()
            R2[1:] = so3_exp(dp[:, :3]) @ R[1:]
            t2[1:] = t[1:] + dp[:, 3:]
            rho2 = np.maximum(rho + dr, 0.0)
            scale = np.linalg.norm(t2, axis=1).max()
            if scale > 1e-12:
                t2, rho2 = t2 / scale, rho2 * scale
            (X2, Rb2), r2, G2, e2, cost2 = evaluate(R2, t2, rho2)
            if cost2 < cost:
                done = cost - cost2 < 1e-5 * cost      # tighter only spends iterations: no pose moves visibly
                R, t, rho, X, Rb, r, G, e, cost = R2, t2, rho2, X2, Rb2, r2, G2, e2, cost2
                mu = max(mu / 3, 1e-9)
                improved = True
                break
            mu *= 4
        if not improved or done:
            break
    out = np.tile(np.eye(4), (n, 1, 1))
    out[:, :3, :3], out[:, :3, 3] = R, t
    err = np.full((n, N), np.nan)
    err[fr, pt] = e
    return out, rho, err, float(cost)


def so3_log(R: np.ndarray) -> np.ndarray:
    """Axis-angle vectors [..., 3] of rotation matrices [..., 3, 3] (angles below pi)."""
    c = np.clip((np.trace(R, axis1=-2, axis2=-1) - 1) / 2, -1.0, 1.0)
    th = np.arccos(c)
    v = np.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    k = np.where(th > 1e-8, th / np.maximum(2 * np.sin(th), 1e-12), 0.5)
    return v * k[..., None]


def smoothness_prior(R: np.ndarray, t: np.ndarray, rho: np.ndarray, K: np.ndarray, sigma_px: float,
                     grad: bool = True) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """Quadratic prior on the camera's acceleration over a segment (poses R [n, 3, 3], t [n, 3], row 0
    fixed): the second differences of the rotation vectors and of the translations, each converted to
    the pixels it would move the image (rotation: focal length; translation: focal length times the
    median inverse depth, so the prior does not depend on the scale gauge), over sigma_px.

    A camera is a physical body: it does not jump for one frame and back. Frames seen by few tracks are
    otherwise free to follow a handful of biased tracks far off the path; a genuine change of motion
    costs about (change per frame / sigma_px)^2 / 2 once. The frames are never told which motion.

    Returns the cost, its Gauss-Newton Hessian [6(n-1), 6(n-1)] and gradient [6(n-1)] in the solver's
    (left rotation increment, translation increment) parameters of frames 1..n-1 (the rotation
    Jacobian taken as identity, exact for small rotations); None for both when grad is False."""
    n = len(R)
    m = 6 * (n - 1)
    if n < 3:
        return 0.0, (np.zeros((m, m)) if grad else None), (np.zeros(m) if grad else None)
    f = float(np.sqrt(K[0, 0] * K[1, 1]))
    good = rho[rho > 0]
    rho_typ = float(np.median(good)) if len(good) else 0.0
    w = np.repeat([f / sigma_px, f * rho_typ / sigma_px], 3)                    # per parameter [6]
    x = np.concatenate([so3_log(R), t], 1)                                      # [n, 6]
    D = np.zeros((n - 2, n))
    idx = np.arange(n - 2)
    D[idx, idx], D[idx, idx + 1], D[idx, idx + 2] = 1.0, -2.0, 1.0
    r = (D @ x) * w                                                             # [n-2, 6]
    if not grad:
        return 0.5 * float((r * r).sum()), None, None
    Dm = D[:, 1:]
    H = np.kron(Dm.T @ Dm, np.diag(w * w))
    g = ((Dm.T @ r) * w).reshape(-1)
    return 0.5 * float((r * r).sum()), H, g


def _robust_cost(e: np.ndarray, c: float, loss: str) -> float:
    """Sum of the robust loss of residual norms e at scale c: "huber" (quadratic, then linear) or
    "cauchy" (c^2/2 log(1 + (e/c)^2): a gross error's pull fades instead of staying constant)."""
    if loss == "cauchy":
        return float(np.sum(0.5 * c * c * np.log1p((e / c) ** 2)))
    return float(np.sum(np.where(e < c, 0.5 * e * e, c * (e - 0.5 * c))))


def _robust_weight(e: np.ndarray, c: float, loss: str) -> np.ndarray:
    """IRLS weight loss'(e) / e of `_robust_cost`."""
    if loss == "cauchy":
        return 1.0 / (1.0 + (e / c) ** 2)
    return np.where(e < c, 1.0, c / np.maximum(e, 1e-12))
