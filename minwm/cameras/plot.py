"""Trajectory plots: a top-down view (x-z plane), a side view (z against height) and a front view (x
against height), with the view direction of each camera drawn as an arrow. The front view is there
because after a 90-degree turn the side view sees the motion edge-on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minwm.cameras.camera import Cameras
from minwm.io import atomic_path

MAX_ARROWS = 40  # more arrows than this turn into a smear; draw every n-th camera instead


def plot_trajectory(cams: Cameras, out: str | Path, title: str | None = None) -> None:
    """Write a PNG of the trajectory (world frame of `cams`; OpenCV axes, so height is -y)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c2w = cams.c2w.numpy()
    pos = c2w[:, :3, 3]
    fwd = c2w[:, :3, 2]                     # camera +z, the view direction, in world coordinates
    F = len(cams)
    extent = max(float(np.ptp(pos, axis=0).max()), 1e-6)
    arrow = 0.1 * extent if extent > 1e-6 else 0.1
    every = max(1, -(-F // MAX_ARROWS))
    idx = np.arange(0, F, every)

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5), layout="constrained")
    views = [
        ("Top view", "x (right)", "z (forward)", pos[:, 0], pos[:, 2], fwd[:, 0], fwd[:, 2]),
        ("Side view", "z (forward)", "height (-y)", pos[:, 2], -pos[:, 1], fwd[:, 2], -fwd[:, 1]),
        ("Front view", "x (right)", "height (-y)", pos[:, 0], -pos[:, 1], fwd[:, 0], -fwd[:, 1]),
    ]
    for ax, (name, xl, yl, x, y, u, v) in zip(axes, views):
        ax.plot(x, y, "-", color="0.6", lw=1, zorder=1)
        sc = ax.scatter(x, y, c=np.arange(F), cmap="viridis", s=14, zorder=3)
        ax.quiver(x[idx], y[idx], u[idx] * arrow, v[idx] * arrow, angles="xy", scale_units="xy", scale=1,
                  color="tab:red", width=0.004, zorder=2)
        ax.scatter(x[:1], y[:1], marker="o", s=90, facecolors="none", edgecolors="k", lw=1.5, zorder=4,
                   label="start")
        ax.set_title(name)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(alpha=0.3)
        # Count the arrow tips as data so no arrow is cut off at the edge.
        ax.update_datalim(np.stack([x[idx] + u[idx] * arrow, y[idx] + v[idx] * arrow], 1))
        ax.margins(0.08)
        ax.autoscale_view()
        ax.legend(loc="best", fontsize=8)
    fig.colorbar(sc, ax=axes, label="frame", shrink=0.8)
    head = f"{F} frames" + (f" - {title}" if title else "")
    note = "" if every == 1 else f", 1 in {every} cameras"
    fig.suptitle(f"{head} (red arrows: view direction{note})")
    out = Path(out)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
