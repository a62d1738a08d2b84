"""Camera motion from a video with known intrinsics (OpenCV, CPU, no learned parts).

The evaluation question is "did the generated video move the way it was told to?", so what is
needed is the camera of every frame relative to frame 0, up to one global scale (monocular video
cannot tell scale). Videos are small (toy: 64x64, 17-33 frames) and weakly textured, so the
pipeline favours sub-pixel accuracy over feature richness:

1. Tracking. Frames go to grey and are upsampled (cubic) until the shorter side is >= `min_side`,
   because pyramidal Lucas-Kanade is more precise when its window spans several original pixels.
   Corners are detected in a keyframe and tracked to every later frame twice: chained frame to
   frame (robust to large total motion) and then directly from the keyframe with the chained
   position as the initial guess (no drift). A track counts in a frame only if tracking back to
   the keyframe lands within `fb_tol_px` of where it started. (Dense DIS flow was tried and lost
   large rotations on these images; LK tracks were 3-10x more accurate.)
2. Static / pure-rotation guard. With known intrinsics a rotation-only motion maps bearing
   vectors by one rotation, fitted robustly (2-point RANSAC + Kabsch). What is left after the
   rotation is parallax, which only translation makes. If the median parallax of the frame with
   the most of it is below `parallax_px`, the segment is reported as rotation only (translation
   exactly 0): the essential matrix is degenerate there and its translation would be noise that
   the per-trajectory normalisation of TransErr blows up. Frames whose tracks did not move at all
   get the identity, so a static video reports no motion.
3. Translating segments. The essential matrix between the keyframe and the frame with the most
   parallax (RANSAC, then recoverPose) fixes a rotation, a unit translation and, by triangulation,
   3-D points in the keyframe's camera; PnP against them places every other frame. That start,
   and six straight-line starts along the camera axes, go through a bundle adjustment of the whole
   segment (poses + one inverse depth per track, Cauchy loss, Schur complement): a few iterations
   from each, then the `ba_keep` lowest-cost distinct ones to convergence, gross outliers dropped
   and refined once more. Their reprojection costs are often close where the geometry is weak (a
   strafe read as a turn, a descent as a pitch: per-track depths absorb either), so the colours of
   all textured keyframe pixels pick between them (`photo_select`, minwm.eval.photometric). All
   frames share one scale. Corners on straight edges are not tracked (`min_corner_ratio`): LK
   slides along an edge, and such tracks pulled whole clips into the wrong valley.
4. Long or fast videos. When fewer than `keyframe_overlap` of a keyframe's tracks survive, the last
   well-tracked frame becomes the next keyframe (its surviving tracks carry over, topped up with
   new corners). Its segment is expressed in the global frame through the keyframe's pose, and its
   scale is tied to the previous segment by the median depth ratio of the carried-over points.
5. Direct refinement (`photometric`, minwm.eval.photometric). A translating segment's poses are
   refined by aligning the colours of the keyframe's strongest-gradient pixels (one inverse depth
   each) across the segment, which removes much of the slide along the yaw/strafe and
   pitch/vertical valleys that track bias causes. The carried-over points keep their feature depths.

The result is a `Cameras` (OpenCV w2c, frame 0 = identity) that `minwm.eval.metrics` compares
with the commanded trajectory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from minwm.cameras.camera import Cameras
from minwm.errors import MinwmError
from minwm.eval.bundle import bundle_adjust, pixel_rays

MIN_FRAMES = 2
MIN_SIDE_PX = 16


@dataclass
class PoseConfig:
    """Knobs of the estimator; distances are in pixels of the ORIGINAL video."""

    min_side: int = 256             # upsample until the shorter side is at least this
    max_points: int = 800           # corners per keyframe
    min_distance_px: float = 1.0    # between corners
    fb_tol_px: float = 0.25         # forward-backward tracking tolerance
    ransac_px: float = 1.0          # inlier threshold of every robust fit
    static_px: float = 0.02         # a frame whose tracks all moved less than this is the keyframe's view
    parallax_px: float = 0.5        # median rotation-compensated motion under which a segment is rotation-only
    min_tracks: int = 8             # fewest tracks a frame may be estimated from
    keyframe_overlap: float = 0.25  # start a new keyframe when fewer of the keyframe's tracks survive
    min_triangulation_deg: float = 0.5  # points seen under a smaller angle carry no usable depth
    window_px: int = 6              # Lucas-Kanade window side (original pixels)
    max_segment: int = 0            # most frames per keyframe segment (0 = until the tracks run out)
    outlier_px: float = 2.0         # BA observations with a larger residual are dropped
    seed: int = 0                   # RANSAC sampling (results are reproducible)
    photometric: bool = True        # refine translating segments by direct alignment (minwm.eval.photometric)
    photo_pixels: int = 500         # keyframe pixels the direct alignment uses
    min_corner_ratio: float = 0.05  # new corners need this smaller/larger structure-tensor eigenvalue ratio
    ba_loss: str = "cauchy"         # robust loss of the bundle adjustment: "huber" or "cauchy"
    ba_probe_iters: int = 5         # LM iterations from every start before the most promising are kept
    ba_keep: int = 3                # distinct bundle-adjustment solutions solved fully
    photo_select: bool = True       # pick among them by photometric consistency (minwm.eval.photometric)


@dataclass
class PoseEstimate:
    """cameras: w2c relative to frame 0 (identity), translations up to one global scale.
    translating: False when the whole video was explained by rotation alone (all t = 0).
    tracks [F]: tracks each frame was estimated from; residual_px [F]: median reprojection error
    of the fitted model in each frame; keyframes: frames that started a tracking segment."""

    cameras: Cameras
    translating: bool
    tracks: np.ndarray
    residual_px: np.ndarray
    keyframes: list[int] = field(default_factory=list)


# ---- public entry points ---------------------------------------------------------------------
def estimate_trajectory(frames, intrinsics, cfg: PoseConfig | None = None) -> Cameras:
    """Cameras of a video relative to its first frame (translation up to scale).

    frames: uint8 [F, H, W, 3] (numpy or torch, RGB); intrinsics: normalised (fx/W, fy/H, cx/W, cy/H),
    [4] or [F, 4] with equal rows."""
    return estimate_poses(frames, intrinsics, cfg).cameras


def estimate_poses(frames, intrinsics, cfg: PoseConfig | None = None) -> PoseEstimate:
    """Like estimate_trajectory, with the diagnostics of PoseEstimate."""
    cfg = cfg or PoseConfig()
    frames = _check_frames(frames)
    Kn = _check_intrinsics(intrinsics, len(frames))
    F, H, W, _ = frames.shape
    K = pixel_matrix(Kn, H, W)
    grey, s = _upsampled_grey(frames, cfg.min_side)
    rng = np.random.default_rng(cfg.seed)

    w2c = np.tile(np.eye(4), (F, 1, 1))
    tracks = np.zeros(F, dtype=np.int64)
    resid = np.zeros(F)
    keyframes: list[int] = []
    translating = False
    key, carry = 0, None        # carry: (points [N, 2] in the keyframe, their world points [N, 3] or NaN)
    have_scale = False          # has an earlier segment fixed the global scale?
    while key < F - 1:
        keyframes.append(key)
        pts = _seed_points(grey[key], s, cfg, None if carry is None else carry[0])
        if len(pts) < cfg.min_tracks:
            if _all_static(frames[key:]):
                break                                    # nothing to track and nothing moves: identity
            raise MinwmError(f"pose: frame {key}: only {len(pts)} trackable points (need {cfg.min_tracks}); "
                             f"the video is too flat to estimate camera motion from")
        P, alive = _track(grey, key, pts, s, cfg)       # [n, N, 2] original pixels, [n, N]; row 0 = key
        n = len(P)
        cons = None
        if cfg.photo_select:
            from minwm.eval.photometric import Consistency
            cons = Consistency(frames[key:key + len(P)], K)
        seg = _solve_segment(P, alive, K, cfg, rng, consistency=cons)
        if seg.translating and cfg.photometric:
            _refine_photometric(frames[key:key + len(P)], K, seg, cfg)
        # Bring the segment into the world frame: local poses map keyframe camera -> frame camera.
        lam = 1.0
        if seg.translating:
            if have_scale and carry is not None:
                lam = _scale_ratio(carry, w2c[key], seg, len(carry[0]))
            have_scale = True
            translating = True
        for r in range(1, n):
            T = seg.poses[r].copy()
            T[:3, 3] *= lam
            w2c[key + r] = T @ w2c[key]
            tracks[key + r] = seg.tracks[r]
            resid[key + r] = seg.resid[r]
        tracks[key] = alive[0].sum()
        end = key + n - 1
        if end >= F - 1:
            break
        # Next keyframe: the last frame of this segment; carry its surviving tracks (and their world points).
        world = np.full((P.shape[1], 3), np.nan)
        if seg.points is not None:
            X = seg.points.copy()
            X[:, :] *= lam
            world = _to_world(X, w2c[key])
        keep = alive[-1]
        carry = (P[-1][keep], world[keep])
        key = end
    cams = Cameras(torch.from_numpy(w2c), torch.as_tensor(Kn, dtype=torch.float64))
    return PoseEstimate(cams, translating, tracks, resid, keyframes)


# ---- input checks ----------------------------------------------------------------------------
def _check_frames(frames) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise MinwmError(f"pose: frames have shape {tuple(frames.shape)}, expected [F, H, W, 3] RGB")
    if frames.dtype != np.uint8:
        raise MinwmError(f"pose: frames have dtype {frames.dtype}, expected uint8")
    F, H, W, _ = frames.shape
    if F < MIN_FRAMES:
        raise MinwmError(f"pose: the video has {F} frame{'s' if F != 1 else ''}; camera motion needs at least "
                         f"{MIN_FRAMES} frames")
    if min(H, W) < MIN_SIDE_PX:
        raise MinwmError(f"pose: frames are {H}x{W}; camera motion needs at least {MIN_SIDE_PX} pixels a side")
    return np.ascontiguousarray(frames)


def _check_intrinsics(intrinsics, F: int) -> np.ndarray:
    K = np.asarray(intrinsics.detach().cpu() if isinstance(intrinsics, torch.Tensor) else intrinsics, dtype=np.float64)
    if K.ndim == 2:
        if K.shape[1] != 4 or len(K) not in (1, F):
            raise MinwmError(f"pose: intrinsics have shape {K.shape}, expected [4] or [{F}, 4]")
        if np.abs(K - K[:1]).max() > 1e-9:
            raise MinwmError("pose: intrinsics change over the video; the estimator needs one fixed camera")
        K = K[0]
    if K.shape != (4,) or not np.isfinite(K).all() or K[0] <= 0 or K[1] <= 0:
        raise MinwmError(f"pose: intrinsics {K.tolist()} must be 4 finite numbers (fx/W, fy/H, cx/W, cy/H) "
                         "with positive focal lengths")
    return K


def pixel_matrix(Kn: np.ndarray, H: int, W: int) -> np.ndarray:
    """3x3 K for pixel-index coordinates (pixel centres at integers), from normalised intrinsics
    measured from the image corner (pixel i spans [i, i+1] / size), hence the half-pixel shift."""
    fx, fy, cx, cy = (float(v) for v in Kn)
    return np.array([[fx * W, 0, cx * W - 0.5], [0, fy * H, cy * H - 0.5], [0, 0, 1.0]])


def _upsampled_grey(frames: np.ndarray, min_side: int) -> tuple[list[np.ndarray], int]:
    s = max(1, math.ceil(min_side / min(frames.shape[1:3])))
    out = []
    for f in frames:
        g = cv2.cvtColor(f, cv2.COLOR_RGB2GRAY)
        out.append(cv2.resize(g, None, fx=s, fy=s, interpolation=cv2.INTER_CUBIC) if s > 1 else g)
    return out, s


def _to_up(x: np.ndarray, s: int) -> np.ndarray:
    """Original pixel coordinates -> upsampled ones (cv2.resize maps centres x -> (x + 0.5) s - 0.5)."""
    return ((x + 0.5) * s - 0.5).astype(np.float32)


def _from_up(x: np.ndarray, s: int) -> np.ndarray:
    return (x.astype(np.float64) + 0.5) / s - 0.5


def _all_static(frames: np.ndarray) -> bool:
    return bool(np.abs(frames.astype(np.int16) - frames[:1].astype(np.int16)).max() <= 2)


# ---- tracking --------------------------------------------------------------------------------
def _seed_points(g: np.ndarray, s: int, cfg: PoseConfig, carried: np.ndarray | None) -> np.ndarray:
    """Carried tracks first, then new corners away from them, up to max_points (original pixels)."""
    mask = np.full(g.shape, 255, np.uint8)
    base = np.zeros((0, 2))
    if carried is not None and len(carried):
        base = carried[: cfg.max_points]
        for x, y in _to_up(base, s):
            cv2.circle(mask, (int(round(x)), int(round(y))), int(round(cfg.min_distance_px * s)), 0, -1)
    want = cfg.max_points - len(base)
    if want <= 0:
        return base
    block = 2 * s + 1
    new = cv2.goodFeaturesToTrack(g, want, 0.001, cfg.min_distance_px * s, mask=mask, blockSize=block)
    new = np.zeros((0, 2)) if new is None else new.reshape(-1, 2)
    if cfg.min_corner_ratio > 0 and len(new):
        # Edges out, but never below a few times min_tracks (a view of little but stripes keeps its
        # most corner-like points: weak tracks beat none).
        ratio = _corner_ratio(g, new, cfg.window_px * s + 1)
        keep = max(int((ratio >= cfg.min_corner_ratio).sum()), min(len(new), 4 * cfg.min_tracks - len(base)))
        new = new[np.sort(np.argsort(-ratio, kind="stable")[:keep])]
    return np.concatenate([base, _from_up(new, s)])


def _corner_ratio(g: np.ndarray, x: np.ndarray, win: int) -> np.ndarray:
    """Smaller over larger eigenvalue [N] of the gradient structure tensor over a Lucas-Kanade window
    around upsampled-image points x [N, 2]. Near 0 is an edge: LK is free to slide along it (the
    aperture problem), and a point that slides with the motion looks like a wrong depth or, along a
    line that is not an epipolar line, like a different camera motion."""
    ev = cv2.cornerEigenValsAndVecs(g, win, 3)[..., :2]
    h, w = g.shape
    xi = np.clip(np.round(x).astype(int), 0, [w - 1, h - 1])
    lam = ev[xi[:, 1], xi[:, 0]]
    return np.min(lam, 1) / np.maximum(np.max(lam, 1), 1e-12)


def _track(grey: list[np.ndarray], key: int, pts: np.ndarray, s: int, cfg: PoseConfig):
    """Positions [n, N, 2] (original pixels) and validity [n, N] of pts (in frame `key`) in frames
    key .. key+n-1; stops after the last frame where enough of them survive."""
    win = cfg.window_px * s + 1
    lk = dict(winSize=(win, win), maxLevel=3,
              criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 40, 0.005))
    h, w = grey[key].shape
    p0 = _to_up(pts, s).reshape(-1, 1, 2)
    N = len(pts)
    P, A = [pts.astype(np.float64)], [np.ones(N, bool)]
    prev = p0
    need = max(cfg.min_tracks, int(math.ceil(cfg.keyframe_overlap * N)))
    for i in range(key + 1, len(grey)):
        chained, _, _ = cv2.calcOpticalFlowPyrLK(grey[i - 1], grey[i], prev, None, **lk)
        p, st, _ = cv2.calcOpticalFlowPyrLK(grey[key], grey[i], p0, chained.copy(),
                                            flags=cv2.OPTFLOW_USE_INITIAL_FLOW, **lk)
        back, st2, _ = cv2.calcOpticalFlowPyrLK(grey[i], grey[key], p, p0.copy(),
                                                flags=cv2.OPTFLOW_USE_INITIAL_FLOW, **lk)
        q = p.reshape(-1, 2)
        ok = (st.ravel() == 1) & (st2.ravel() == 1) \
            & (np.linalg.norm((back - p0).reshape(-1, 2), axis=1) < cfg.fb_tol_px * s) \
            & (q[:, 0] >= 0) & (q[:, 0] <= w - 1) & (q[:, 1] >= 0) & (q[:, 1] <= h - 1)
        if (ok.sum() < need or (cfg.max_segment and len(P) >= cfg.max_segment)) and len(P) > 1:
            break                                           # hand over to a new keyframe at frame i-1
        P.append(_from_up(q, s))
        A.append(ok)
        prev = np.where(ok[:, None, None], p, chained)
    return np.stack(P), np.stack(A)


# ---- geometry --------------------------------------------------------------------------------
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
class _Segment:
    poses: np.ndarray            # [n, 4, 4] keyframe camera -> frame camera
    tracks: np.ndarray           # [n]
    resid: np.ndarray            # [n]
    translating: bool
    points: np.ndarray | None    # [N, 3] keyframe-camera points per track (NaN where none), or None
    scale_ref: float = 1.0


def _solve_segment(P: np.ndarray, alive: np.ndarray, K: np.ndarray, cfg: PoseConfig,
                   rng: np.random.Generator, sqrt_info: np.ndarray | None = None,
                   strong: np.ndarray | None = None, consistency=None) -> _Segment:
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
        return _Segment(poses, tracks, resid, False, None)

    # Essential matrix on the pair with the most parallax fixes rotation, unit translation and structure.
    m = fit_alive[j] if fit_alive[j].sum() >= cfg.min_tracks else alive[j]
    x0, xj = P[0][m], P[j][m]
    E, inl = cv2.findEssentialMat(x0, xj, K, cv2.RANSAC, 0.9999, cfg.ransac_px)
    if E is None or E.shape != (3, 3):
        return _Segment(poses, tracks, resid, False, None)
    _, R, t, inl = cv2.recoverPose(E, x0, xj, K, mask=inl.copy())
    Tj = np.eye(4)
    Tj[:3, :3], Tj[:3, 3] = R, t.ravel()
    idx = np.flatnonzero(m)[inl.ravel() > 0]
    X = _triangulate_pair(P[0][idx], P[j][idx], Tj, K, cfg)
    points = np.full((N, 3), np.nan)
    points[idx] = X
    poses[j] = Tj                                       # first guesses: Tj, elsewhere rotation only
    for r in range(1, n):
        if moving[r] and r != j:
            poses[r], _ = _pnp(points, P[r], alive[r], K, poses[r], cfg)
    # Bundle adjustment over the whole segment (two rounds; the second without gross outliers).
    z = points[:, 2]
    rho = np.where(np.isfinite(z) & (z > 0), 1.0 / np.where(np.isfinite(z) & (z > 0), z, 1.0), 0.0)
    # LM is local and the geometry of small, narrow-field videos has shallow valleys (yaw vs strafe,
    # bas-relief), so besides the essential-matrix start try straight-line starts along each camera
    # axis (rotations from the rotation-only fits).
    starts = [(poses, rho)]
    for axis in range(3):
        for sign in (1.0, -1.0):
            T0 = poses.copy()
            T0[:, :3, :3] = np.stack(rots)
            T0[:, :3, 3] = 0.0
            T0[:, axis, 3] = sign * np.arange(n) / (n - 1)
            starts.append((T0, np.full(N, 0.3)))
    use = alive.copy()
    ba = dict(huber_px=cfg.ransac_px, sqrt_info=sqrt_info, loss=cfg.ba_loss)
    # A few iterations from every start separate the basins; only the lowest-cost few are solved
    # fully (this adjustment is most of the estimator's time), each twice, the second time without
    # its gross outliers. Starts that end in the same basin are solved once.
    probes = [bundle_adjust(P, use, K, T0, rho0, iters=cfg.ba_probe_iters, **ba) for T0, rho0 in starts]
    finals = []
    for i in np.argsort([c[3] for c in probes], kind="stable"):
        if len(finals) == cfg.ba_keep:
            break
        cand = bundle_adjust(P, use, K, probes[i][0], probes[i][1], **ba)
        if any(_path_angle(cand[0], f[0][0]) < 0.5 for f in finals):
            continue
        u = use & ~(cand[2] > cfg.outlier_px)
        finals.append((bundle_adjust(P, u, K, cand[0], cand[1], **ba), u, cand[3]))
    best = min(range(len(finals)), key=lambda k: finals[k][2])
    if consistency is not None and len(finals) > 1:
        # The reprojection costs of different basins are close where the geometry is weak (yaw vs
        # strafe, pitch vs vertical move); the colours of all textured pixels decide between them.
        scores = [consistency(f[0][0], _rho_max(f[0][1])) for f in finals]
        best = int(np.argmin(scores))
    (poses, rho, err, _), use, _ = finals[best]
    use = use & ~(err > cfg.outlier_px)
    for r in range(1, n):
        e = err[r][use[r]]
        resid[r] = float(np.median(e)) if len(e) else float("nan")
    points = pixel_rays(P[0], K) / np.where(rho > 0, rho, np.nan)[:, None]
    return _Segment(poses, tracks, resid, True, points)


def _path_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Largest rotation angle (degrees) between two camera paths [n, 4, 4], frame by frame."""
    R = np.einsum("nij,nkj->nik", a[:, :3, :3], b[:, :3, :3])
    c = (np.trace(R, axis1=1, axis2=2) - 1) / 2
    return float(np.degrees(np.arccos(np.clip(c, -1, 1))).max())


def _rho_max(rho: np.ndarray) -> float:
    """Upper end of a depth sweep: the nearest feature points' inverse depth, with margin."""
    good = rho[np.isfinite(rho) & (rho > 0)]
    return float(np.percentile(good, 98) * 1.5) if len(good) else 1.0


def _refine_photometric(frames: np.ndarray, K: np.ndarray, seg: _Segment, cfg: PoseConfig) -> None:
    """Replace the segment's poses by their direct-alignment refinement (in place)."""
    from minwm.eval.photometric import PhotoConfig, refine_segment
    z = seg.points[:, 2]
    good = np.isfinite(z) & (z > 0)
    if not good.any():
        return
    rho_max = float(np.percentile(1.0 / z[good], 98) * 1.5)
    seg.poses, _, _ = refine_segment(frames, K, seg.poses, rho_max, PhotoConfig(max_pixels=cfg.photo_pixels))


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


def _to_world(X_key: np.ndarray, w2c_key: np.ndarray) -> np.ndarray:
    R, t = w2c_key[:3, :3], w2c_key[:3, 3]
    return (X_key - t) @ R


def _scale_ratio(carry, w2c_key, seg: _Segment, n_carried: int) -> float:
    """Factor taking the new segment's scale to the global one: median ratio of the depths (in the
    keyframe) of carried-over points known in both; the ratio of median depths when none are."""
    world = carry[1]
    R, t = w2c_key[:3, :3], w2c_key[:3, 3]
    d_old = (world @ R.T + t)[:, 2]
    d_new = seg.points[:n_carried, 2]
    both = np.isfinite(d_old) & np.isfinite(d_new) & (d_old > 0) & (d_new > 0)
    if both.sum() >= 5:
        return float(np.median(d_old[both] / d_new[both]))
    old_ok = np.isfinite(d_old) & (d_old > 0)
    new_ok = np.isfinite(seg.points[:, 2]) & (seg.points[:, 2] > 0)
    if old_ok.sum() and new_ok.sum():
        return float(np.median(d_old[old_ok]) / np.median(seg.points[new_ok, 2]))
    return 1.0
