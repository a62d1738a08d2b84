"""Contact sheet of a clip dataset (`minwm data show`): one row per clip with evenly spaced frames
(first to last, so parallax and objects entering/leaving view are visible side by side) and a
top-down plot of the camera path with its viewing direction."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from minwm.data.clips import ClipDataset
from minwm.errors import MinwmError
from minwm.io import atomic_path


def pick_frames(num_frames: int, count: int) -> list[int]:
    """`count` evenly spaced frame indices from first to last (all frames if fewer)."""
    if num_frames <= count:
        return list(range(num_frames))
    return [int(round(x)) for x in np.linspace(0, num_frames - 1, count)]


def make_contact_sheet(root: str | Path, out: str | Path, max_clips: int = 6, frames_per_clip: int = 5,
                       start: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = ClipDataset(root)
    if len(ds) == 0:
        raise MinwmError(f"{root}: the dataset has no clips")
    if max_clips < 1 or frames_per_clip < 1:
        raise MinwmError("show: --clips and --frames must be >= 1")
    ids = list(range(start, min(len(ds), start + max_clips)))
    if not ids:
        raise MinwmError(f"{root}: --start {start} is past the last clip ({len(ds)} clips)")
    clips = [ds[i] for i in ids]
    cols = frames_per_clip + 1
    fig, axes = plt.subplots(len(clips), cols, figsize=(1.6 * cols, 1.95 * len(clips) + 0.2), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * frames_per_clip + [1.1]})
    fig.subplots_adjust(left=0.02, right=0.97, top=1 - 0.45 / (1.95 * len(clips) + 0.2), bottom=0.03,
                        wspace=0.08, hspace=0.55)
    for row, clip in zip(axes, clips):
        picks = pick_frames(len(clip.frames), frames_per_clip)
        for ax in row[:-1]:
            ax.axis("off")
        for ax, f in zip(row, picks):
            ax.imshow(clip.frames[f], interpolation="nearest")
            ax.set_title(f"frame {f}", fontsize=7, pad=2)
        row[0].text(0, 1.2, textwrap.shorten(f"{clip.name}: {clip.caption}", 24 * cols), transform=row[0].transAxes,
                    fontsize=6.5, va="bottom", ha="left")
        _plot_path(row[-1], clip.cameras, picks)
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    return out


def _plot_path(ax, cams, picks: list[int]) -> None:
    """Top-down (x right, z forward = up the plot) camera path; arrows show where the camera looks at
    the frames on the row."""
    c2w = cams.c2w.numpy()
    pos = c2w[:, :3, 3]
    fwd = c2w[:, :3, 2]
    ax.plot(pos[:, 0], pos[:, 2], "-", color="0.4", lw=1)
    ax.plot(pos[0, 0], pos[0, 2], "o", color="tab:green", ms=4)
    span = max(float(np.ptp(pos[:, 0])), float(np.ptp(pos[:, 2])), 0.2)
    L = 0.35 * span
    colours = matplotlib_cmap(len(picks))
    for k, f in enumerate(picks):
        d = fwd[f, [0, 2]]
        n = np.linalg.norm(d)
        d = d / n if n > 1e-6 else np.array([0.0, 1.0])
        ax.annotate("", xy=(pos[f, 0] + L * d[0], pos[f, 2] + L * d[1]), xytext=(pos[f, 0], pos[f, 2]),
                    arrowprops={"arrowstyle": "->", "color": colours[k], "lw": 1})
    cx, cz = (pos[:, 0].max() + pos[:, 0].min()) / 2, (pos[:, 2].max() + pos[:, 2].min()) / 2
    half = span * 0.5 + L + 0.05
    ax.set_xlim(cx - half, cx + half)
    ax.set_ylim(cz - half, cz + half)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=5, length=2)
    ax.set_title("path, top view (x, z)", fontsize=7, pad=2)


def matplotlib_cmap(n: int):
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(n - 1, 1)) for i in range(n)]
