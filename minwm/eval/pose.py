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
3. Translating segments (minwm.eval.segment). The essential matrix between the keyframe and the
   frame with the most parallax (RANSAC, then recoverPose) fixes a rotation, a unit translation
   and, by triangulation, 3-D points in the keyframe's camera; PnP against them places every other
   frame. That start, six straight-line starts along the camera axes with the rotation-only fits'
   rotations and the same six without rotation, go through a bundle adjustment of the whole
   segment (poses + one inverse depth per track, Cauchy loss, Schur complement): a few iterations
   from each, then the `ba_keep` lowest-cost distinct ones further, gross outliers dropped and
   refined once more. The adjustment carries a weak motion-smoothness prior (`smooth_px`: the
   camera's acceleration costs like a reprojection error; a camera does not jump for one frame
   and back), which keeps late frames seen by few, biased tracks on the path. Reprojection costs
   are often close where the geometry is weak (a strafe read as a turn, a descent as a pitch:
   per-track depths absorb either), so the colours of all textured keyframe pixels pick between
   the solutions (`photo_select`, minwm.eval.photometric.Consistency), each pixel free to take
   any depth from infinity to the nearest one that moves a full image width. The tracks can also
   prefer a wrong basin outright (a few corners, most on one plane, fit a descent read as a pitch
   better than the true descent, and every final lies there), so one more candidate comes from
   direct alignment started on the straight line whose colours agree best (`align_candidate`), and
   the colours decide again (held-out seeds 10-14: 0.59 -> 0.40 deg/frame). All frames share one
   scale. Corners on straight edges are not tracked (`min_corner_ratio`): LK slides along an
   edge, and such tracks pulled whole clips into the wrong valley.
   Measured on exact renders with exact correspondences (scripts/check_pose_estimator.py): this
   geometry is exact; what remains is tracking bias (median 0.3-0.6 px at frame 20, mostly
   silhouette corners whose window straddles two depths), which is not random and which no
   threshold on the LK residual separates.
4. Long or fast videos. When fewer than `keyframe_overlap` of a keyframe's tracks survive, the last
   well-tracked frame becomes the next keyframe (its surviving tracks carry over, topped up with
   new corners). Its segment is expressed in the global frame through the keyframe's pose, and its
   scale is tied to the previous segment by the median depth ratio of the carried-over points.
   Segments are kept long (10%): a short tail segment has too little parallax to tell a vertical
   move from a pitch, and is then read as rotation only.
5. Direct refinement (`photometric`, minwm.eval.photometric). A translating segment's poses are
   refined by aligning the colours of the keyframe's strongest-gradient pixels (one inverse depth
   each) across the segment, which removes much of the slide along the yaw/strafe and
   pitch/vertical valleys that track bias causes. The carried-over points keep their feature depths.
   On some clips it slides degrees the wrong way along the same valley instead, so the refinement is
   kept only if the tracks still fit it (`photo_track_ratio`; seeds 3-9: RotErr 0.51 -> 0.45 deg/frame;
   always refining 0.51, never 0.56).

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
from minwm.eval.segment import Segment, solve_segment, track_cost

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
    keyframe_overlap: float = 0.1   # start a new keyframe when fewer of the keyframe's tracks survive
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
    ba_iters: int = 25              # LM iterations of each full solve (two per kept solution)
    ba_keep: int = 3                # distinct bundle-adjustment solutions solved fully
    photo_select: bool = True       # pick among them by photometric consistency (minwm.eval.photometric)
    smooth_px: float = 0.3          # motion-smoothness prior of the bundle adjustment, pixels (0 = none)
    translation_starts: bool = False  # also start the adjustment from pure translations along each axis
    align_candidate: bool = True    # also a direct-alignment solution from the most consistent straight line
    select_pixels: int = 1200       # keyframe pixels of the photometric selection (photo_select)
    select_sweep: int = 64          # inverse-depth samples of the photometric selection
    photo_track_ratio: float = 1.4  # keep the direct refinement only if the tracks' cost grows less than this


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
            from minwm.eval.photometric import Consistency, PhotoConfig
            cons = Consistency(frames[key:key + len(P)], K, PhotoConfig(max_pixels=cfg.select_pixels,
                                                                        sweep=cfg.select_sweep, blur=(1.0,)))
        seg = solve_segment(P, alive, K, cfg, rng, consistency=cons)
        if seg.translating and cfg.photometric:
            _refine_photometric(frames[key:key + len(P)], K, seg, cfg, P, alive)
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


def _refine_photometric(frames: np.ndarray, K: np.ndarray, seg: Segment, cfg: PoseConfig,
                        P: np.ndarray, alive: np.ndarray) -> bool:
    """Replace the segment's poses by their direct-alignment refinement (in place), unless it explains
    the feature tracks P [n, N, 2] (alive [n, N]) much worse than the feature solution did: more than
    `photo_track_ratio` times its robust reprojection cost, each track at its best depth under either
    path. Direct alignment removes the slide that small track biases cause, but on some clips (a
    few textured pixels on silhouettes or shading) it slides degrees the other way along the same
    yaw/strafe valley; a path that fits the colours and no longer fits the corners is such a slide.
    Returns whether the refinement was kept."""
    from minwm.eval.photometric import PhotoConfig, refine_segment
    z = seg.points[:, 2]
    good = np.isfinite(z) & (z > 0)
    if not good.any():
        return False
    rho_max = float(np.percentile(1.0 / z[good], 98) * 1.5)
    refined, _, _ = refine_segment(frames, K, seg.poses, rho_max, PhotoConfig(max_pixels=cfg.photo_pixels))
    if cfg.photo_track_ratio > 0:
        # Depth range of the check: from infinity to a point that moves a whole image width (paths are
        # scaled to max |t| = 1), the same for both paths so neither is favoured by its own depths.
        rho_img = max(frames.shape[1:3]) / min(K[0, 0], K[1, 1])
        before = track_cost(P, alive, K, seg.poses, rho_img, cfg.ransac_px)
        after = track_cost(P, alive, K, refined, rho_img, cfg.ransac_px)
        if after > cfg.photo_track_ratio * before:
            return False
    seg.poses = refined
    return True


def _to_world(X_key: np.ndarray, w2c_key: np.ndarray) -> np.ndarray:
    R, t = w2c_key[:3, :3], w2c_key[:3, 3]
    return (X_key - t) @ R


def _scale_ratio(carry, w2c_key, seg: Segment, n_carried: int) -> float:
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
