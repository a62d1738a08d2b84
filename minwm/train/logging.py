"""Training logs: console lines, optional TensorBoard / W&B (used only when installed), loss curves.

Only rank 0 logs. TensorBoard needs the `tensorboard` package and W&B needs `wandb` plus a project name;
neither is a dependency, so a missing one is silently skipped.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm


def format_record(rec: dict) -> str:
    parts = [f"step {rec['step']}"]
    for k, v in rec.items():
        if k in ("step", "time"):
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return "  ".join(parts)


class RunLogger:
    def __init__(self, run_dir: str | Path, enabled: bool = True, log_every: int = 10, tensorboard: bool = True,
                 wandb_project: str | None = None, run_config: dict | None = None):
        self.enabled, self.log_every = enabled, max(1, log_every)
        self.tb = self.wandb = None
        if not enabled:
            return
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb_project and importlib.util.find_spec("wandb") is not None:
            import wandb
            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=run_config or {},
                                    name=Path(run_dir).name, resume="allow")

    def log(self, rec: dict, force: bool = False) -> None:
        if not self.enabled:
            return
        step = int(rec["step"])
        scalars = {k: float(v) for k, v in rec.items() if k != "step" and _is_number(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if force or step % self.log_every == 0:
            tqdm.write(format_record(rec))

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_curves(metrics: Sequence[dict] | dict, out_png: str | Path, keys: Sequence[str] | None = None,
                smooth: int = 0) -> Path | None:
    """One panel per metric over `step` (matplotlib Agg), written atomically; None when there is nothing.

    metrics: the history list (or a dict with a "history" list). smooth > 1 overlays a moving average.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minwm.io import atomic_path

    history = metrics.get("history", []) if isinstance(metrics, dict) else list(metrics)
    if not history:
        return None
    skip = {"step", "time", "step_time"}
    names = list(keys) if keys else sorted({k for r in history for k, v in r.items() if k not in skip and _is_number(v)})
    if not names:
        return None
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pts = [(r["step"], r[name]) for r in history if _is_number(r.get(name))]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, lw=0.8, alpha=0.5 if smooth > 1 else 1.0)
        if smooth > 1 and len(ys) >= smooth:
            avg = [sum(ys[i - smooth + 1:i + 1]) / smooth for i in range(smooth - 1, len(ys))]
            ax.plot(xs[smooth - 1:], avg, lw=1.5)
        if ys and min(ys) > 0 and max(ys) / max(min(ys), 1e-30) > 100:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
