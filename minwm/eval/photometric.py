"""Direct (photometric) refinement of a segment's camera poses, after the feature-based solve.

Tracked corners are few on 64x64 frames and each carries a bias of a few tenths of a pixel (the
window deforms, edges slide, silhouettes are not surface points). The geometry of small,
narrow-field videos has shallow valleys (yaw against strafe, pitch against a vertical move) and
such biases slide the feature solution along them by degrees. Direct alignment uses every
textured pixel of the keyframe instead: each gets an inverse depth, and poses and depths are
adjusted together so that the keyframe's colours, carried into every frame, match what is there
(Levenberg-Marquardt, Huber loss on colour differences, the same Schur-complement solver as the
feature bundle adjustment). Its basin is about a pixel, which is why it starts from the feature
solution, first on blurred frames and then on sharp ones.

Depths start from a sweep: for each pixel, the inverse depth on a grid whose colours agree best
over the segment given the feature-based poses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from minwm.eval.bundle import depth_pose_lm


def cubic_matrix(n: int, s: int) -> np.ndarray:
    """[n*s, n] matrix upsampling a length-n signal s times with the Catmull-Rom cubic (Keys, a = -1/2),
    pixel centres mapped as cv2.resize does (output u sits at input (u + 0.5) / s - 0.5) and the
    border repeated. Catmull-Rom reproduces linear and quadratic signals exactly; OpenCV's cubic
    (a = -3/4) does not, and shifts sub-pixel positions by up to 0.04 px on a plain ramp."""
    x = (np.arange(n * s) + 0.5) / s - 0.5
    i0 = np.floor(x).astype(int)
    t = x - i0
    # Catmull-Rom weights of the taps i0-1 .. i0+2.
    w = np.stack([((-t + 2) * t - 1) * t / 2, ((3 * t - 5) * t * t + 2) / 2,
                  ((-3 * t + 4) * t + 1) * t / 2, (t - 1) * t * t / 2], -1)
    A = np.zeros((n * s, n))
    for k in range(4):
        np.add.at(A, (np.arange(n * s), np.clip(i0 - 1 + k, 0, n - 1)), w[:, k])
    return A


def upsample(img: np.ndarray, s: int) -> np.ndarray:
    """Float32 image [H*s, W*s, C] of an image [H, W, C] upsampled s times (Catmull-Rom, separable)."""
    H, W, C = img.shape
    A, B = _cubic_cached(H, s), _cubic_cached(W, s)
    # Rows then columns as two matrix products over all channels at once (an einsum over the three
    # operands went through a slow batched path: 5x the time of the whole direct alignment).
    rows = (A @ img.reshape(H, W * C).astype(np.float32)).reshape(H * s, W, C)
    out = (rows.transpose(0, 2, 1).reshape(H * s * C, W) @ B.T).reshape(H * s, C, W * s).transpose(0, 2, 1)
    return np.ascontiguousarray(out, dtype=np.float32)


_CUBIC: dict[tuple[int, int], np.ndarray] = {}


def _cubic_cached(n: int, s: int) -> np.ndarray:
    if (n, s) not in _CUBIC:
        _CUBIC[(n, s)] = cubic_matrix(n, s).astype(np.float32)
    return _CUBIC[(n, s)]


def sample(up: np.ndarray, xy: np.ndarray, s: int) -> np.ndarray:
    """Samples [..., C] at ORIGINAL pixel-index points xy [..., 2] of an image upsampled s times
    (`upsample`), bilinear between its samples (a quarter pixel apart for s = 4, so the cubic's
    smoothness is kept to well under a hundredth of a pixel); outside the image the border is
    repeated (callers mask those samples out)."""
    shp = xy.shape[:-1]
    flat = ((xy.reshape(-1, 2) + 0.5) * s - 0.5).astype(np.float32)
    n = len(flat)
    # remap wants maps under 32767 rows: lay the points out 256 to a row.
    rows = -(-n // 256)
    pad = np.zeros((rows * 256, 2), np.float32)
    pad[:n] = flat
    out = cv2.remap(up, np.ascontiguousarray(pad[:, 0].reshape(rows, 256)),
                    np.ascontiguousarray(pad[:, 1].reshape(rows, 256)), cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(rows * 256, -1)[:n].reshape(*shp, up.shape[2])


@dataclass
class PhotoConfig:
    max_pixels: int = 1200          # strongest-gradient keyframe pixels used
    min_grad: float = 6.0           # least colour gradient (grey levels per pixel) of a used pixel
    border_px: int = 2              # keyframe pixels this close to the edge are not used
    huber: float = 10.0             # Huber threshold on the colour difference norm (0-255 units)
    sweep: int = 48                 # inverse-depth samples of the initial sweep
    blur: tuple[float, ...] = (1.0, 0.0)   # coarse-to-fine Gaussian blur (original pixels); 0 = none
    iters: int = 12                 # Levenberg-Marquardt iterations per level
    upsample: int = 4               # sampling grid (see `sample`)
    loss: str = "huber"             # robust loss of the direct alignment: "huber" or "cauchy"


def select_pixels(img: np.ndarray, cfg: PhotoConfig) -> np.ndarray:
    """Pixel centres [N, 2] (x, y) of the keyframe with the strongest colour gradient."""
    f = img.astype(np.float32)
    gx = cv2.Sobel(f, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy = cv2.Sobel(f, cv2.CV_32F, 0, 1, ksize=3) / 8
    g = np.sqrt((gx ** 2 + gy ** 2).sum(-1))
    b = cfg.border_px
    g[:b], g[-b:], g[:, :b], g[:, -b:] = 0, 0, 0, 0
    idx = np.flatnonzero(g.ravel() >= cfg.min_grad)
    idx = idx[np.argsort(-g.ravel()[idx], kind="stable")[: cfg.max_pixels]]
    H, W = g.shape
    return np.stack([idx % W, idx // W], -1).astype(np.float64)


class _Frames:
    """Upsampled frames of one blur level and colour lookups at original-pixel positions."""

    def __init__(self, frames: np.ndarray, sigma: float, s: int):
        self.s = s
        self.H, self.W = frames.shape[1:3]
        self.up = [upsample(cv2.GaussianBlur(f.astype(np.float32), (0, 0), sigma) if sigma > 0
                            else f.astype(np.float32), s) for f in frames]
        self._stack = None

    def inside(self, x: np.ndarray) -> np.ndarray:
        return (x[:, 0] >= 0) & (x[:, 0] <= self.W - 1) & (x[:, 1] >= 0) & (x[:, 1] <= self.H - 1)

    def colour(self, f: int, x: np.ndarray) -> np.ndarray:
        return sample(self.up[f], x, self.s)

    def stacked(self, n: int) -> np.ndarray:
        """Upsampled frames 1..n one above the other [n*H*s, W*s, C] (one lookup for all of them; a point
        inside a frame never reaches the next one: the bilinear taps of its last row are still its own)."""
        if self._stack is None or self._stack[0] != n:
            self._stack = (n, np.concatenate(self.up[1:n + 1], 0))
        return self._stack[1]

    def colour_grad(self, f: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = 0.5
        c = sample(self.up[f], np.concatenate([x, x + [h, 0], x - [h, 0], x + [0, h], x - [0, h]]), self.s)
        c = c.reshape(5, len(x), -1)
        G = np.stack([(c[1] - c[2]) / (2 * h), (c[3] - c[4]) / (2 * h)], -1)      # [M, C, 2]
        return c[0], G


def _sweep(fr: _Frames, xy: np.ndarray, ref: np.ndarray, poses: np.ndarray, K: np.ndarray, rho_max: float,
           cfg: PhotoConfig) -> tuple[np.ndarray, np.ndarray]:
    """Robust colour cost [N, D] of every keyframe pixel at every inverse depth of the grid [D] in
    [0, rho_max], summed over frames 1.. of the segment. All frames and depths at once, in float32
    (a thousandth of a pixel is far below what a colour cost can tell): each frame's rotated rays,
    then the grid along its translation, projected straight into the sampling coordinates of the
    frames stacked one above the other (`_Frames.stacked`), one colour lookup for everything."""
    rays = np.linalg.solve(K, np.c_[xy, np.ones(len(xy))].T).T
    grid = np.linspace(0.0, rho_max, cfg.sweep)
    n, N, D, s = len(poses) - 1, len(xy), len(grid), fr.s
    if n < 1 or N == 0:
        return np.zeros((N, D)), grid
    A = (rays @ poses[1:, :3, :3].transpose(0, 2, 1)).astype(np.float32)       # [n, N, 3]
    t, g = poses[1:, :3, 3].astype(np.float32), grid.astype(np.float32)
    X, Y, Z = (A[:, :, i, None] + g * t[:, i, None, None] for i in range(3))    # each [n, N, D]
    ok = Z > 1e-9
    iz = np.float32(1) / np.where(ok, Z, np.float32(1))
    # Original pixel u sits at (u + 0.5) s - 0.5 of the upsampled grid; frame f + 1's rows start at f H s.
    u = X * iz * np.float32(K[0, 0] * s) + np.float32((K[0, 2] + 0.5) * s - 0.5)
    v = Y * iz * np.float32(K[1, 1] * s) + np.float32((K[1, 2] + 0.5) * s - 0.5)
    lo, hi = 0.5 * s - 0.5, (np.array([fr.W, fr.H]) - 0.5) * s - 0.5          # the image's pixel centres
    ok &= (u >= lo) & (u <= hi[0]) & (v >= lo) & (v <= hi[1])
    v = np.where(ok, v, lo) + (fr.H * s * np.arange(n, dtype=np.float32))[:, None, None]
    c = cv2.remap(fr.stacked(n), np.where(ok, u, lo).reshape(n * N, D), v.reshape(n * N, D),
                  cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE).reshape(n, N, D, -1)
    d = c - ref[:, None, :].astype(np.float32)
    e = np.sqrt(np.einsum("...c,...c->...", d, d))       # a sum over 3 channels: einsum, not a slow reduce
    e[~ok] = cfg.huber
    cost = np.minimum(e, cfg.huber).sum(0, dtype=np.float64)
    return cost, grid


def sweep_depths(fr: _Frames, xy: np.ndarray, ref: np.ndarray, poses: np.ndarray, K: np.ndarray,
                 rho_max: float, cfg: PhotoConfig) -> np.ndarray:
    """Inverse depth [N] per keyframe pixel: the grid value in [0, rho_max] whose projections agree
    best (robust colour difference summed over the frames) with the pixel's keyframe colour ref."""
    cost, grid = _sweep(fr, xy, ref, poses, K, rho_max, cfg)
    return grid[cost.argmin(1)]


class Consistency:
    """Photometric score of candidate camera paths for one segment: the mean over keyframe pixels of
    the lowest robust colour cost any inverse depth in [0, rho_max] reaches (lower: the frames are
    better explained). Feature tracks leave valleys where a wrong motion fits the tracks better than
    the true one (a strafe read as a turn, a descent as a pitch); every textured pixel, each with its
    own depth but none beyond infinity, tells those apart far more often. Frames are prepared once
    and shared by all candidates.

    rho_max (None: from the image) bounds the sweep. Candidates are scaled to max |t| = 1, so the
    default, the longer image side over the focal length, admits every depth from infinity down to
    one whose point moves a whole image width; a bound taken from one candidate's own feature depths
    cut off the true path's nearest ground and scored it worse than a wrong one."""

    def __init__(self, frames: np.ndarray, K: np.ndarray, cfg: PhotoConfig | None = None):
        self.cfg = cfg or PhotoConfig(max_pixels=300, sweep=24, blur=(1.0,))
        self.K, self.frames, self.fr = K, frames, None
        self.rho_max = max(frames.shape[1:3]) / min(K[0, 0], K[1, 1])

    def _prepare(self) -> _Frames:
        if self.fr is None:                 # prepared on first use: most segments never need it
            self.xy = select_pixels(self.frames[0], self.cfg)
            self.fr = _Frames(self.frames, self.cfg.blur[0], self.cfg.upsample)
            self.ref = self.fr.colour(0, self.xy)
        return self.fr

    def __call__(self, poses: np.ndarray, rho_max: float | None = None) -> float:
        self._prepare()
        if len(self.xy) == 0:
            return 0.0
        cost, _ = _sweep(self.fr, self.xy, self.ref, poses, self.K, rho_max or self.rho_max, self.cfg)
        return float(cost.min(1).mean() / max(len(poses) - 1, 1))

    def align(self, poses: np.ndarray) -> np.ndarray:
        """Poses [n, 4, 4] refined by direct alignment from `poses` on this score's own pixels and blur,
        with a Cauchy loss: the truncated cost the score sums ignores occluded pixels outright, and a
        Huber alignment, still pulled by them, ended measurably less consistent than where it began."""
        return refine_segment(self.frames, self.K, poses, self.rho_max, replace(self.cfg, loss="cauchy"),
                              prepared={self.cfg.blur[0]: self._prepare()})[0]


def refine_segment(frames: np.ndarray, K: np.ndarray, poses: np.ndarray, rho_max: float,
                   cfg: PhotoConfig | None = None, prepared: dict[float, _Frames] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poses [n, 4, 4] (keyframe camera -> frame camera, max |t| = 1) of frames [n, H, W, 3] (row 0 the
    keyframe) refined by direct alignment from the feature-based `poses`; rho_max bounds the
    inverse depths of the sweep (the nearest feature point's, with margin); solved by
    minwm.eval.bundle.depth_pose_lm.

    prepared: frames already upsampled at some blur levels ({sigma: _Frames}), reused instead of made again.

    Returns poses, the keyframe pixels used [N, 2] and their inverse depths [N]."""
    cfg = cfg or PhotoConfig()
    xy = select_pixels(frames[0], cfg)
    n = len(poses)
    if len(xy) < 16 or n < 2:
        return poses, xy, np.zeros(len(xy))
    rays = np.linalg.solve(K, np.c_[xy, np.ones(len(xy))].T).T
    fr_idx = np.repeat(np.arange(1, n), len(xy))
    pt_idx = np.tile(np.arange(len(xy)), n - 1)
    rho = None
    for sigma in cfg.blur:
        F = (prepared or {}).get(sigma) or _Frames(frames, sigma, cfg.upsample)
        ref = F.colour(0, xy)
        if rho is None:
            rho = sweep_depths(F, xy, ref, poses, K, rho_max, cfg)
        starts = np.searchsorted(fr_idx, np.arange(1, n + 1))
        out_r = np.full(ref.shape[1], cfg.huber / np.sqrt(ref.shape[1]))

        def residual(x, ok, F=F, ref=ref, starts=starts, out_r=out_r):
            r = np.empty((len(x), ref.shape[1]))
            G = np.zeros((len(x), ref.shape[1], 2))
            for f in range(1, n):
                a, b = starts[f - 1], starts[f]
                xf = x[a:b]
                vis = ok[a:b] & F.inside(xf)
                c, g = F.colour_grad(f, np.where(vis[:, None], xf, 0.0))
                # Out of view: a fixed residual with no gradient (moving a point out costs, never pays).
                r[a:b] = np.where(vis[:, None], c - ref[pt_idx[a:b]], out_r)
                G[a:b] = np.where(vis[:, None, None], g, 0.0)
            return r, G

        poses, rho, _, _ = depth_pose_lm(rays, fr_idx, pt_idx, K, poses, rho, residual, cfg.huber, cfg.iters,
                                         loss=cfg.loss)
    return poses, xy, rho
