"""Stage 0 of the toy: train its tiny AutoencoderKLWan on rendered clips (`minwm train vae`).

A random VAE encodes to noise and decodes to noise, so nothing a DiT learns on its latents could be
seen in pixels (DESIGN.md §1). This stage trains the toy's VAE (4x temporal, 4x spatial, the Wan
architecture at a tiny width) with L1 + L2 + a small KL, measures per-channel latent statistics on the
training clips and writes them as the config's latents_mean / latents_std, so the toy's latents are
normalised exactly as the real Wan VAE's are.

The held-out PSNR is measured over whole clips (21 frames for the toy, the length its DiT works at).
The VAE is causal, its first chunk is zero-padded in time and its temporal receptive field is longer
than a short crop: a model trained only on short crops leans on that padding and falls apart on the
frames past the crop length. Trained 800 steps on 9-frame crops, the toy held out 25-27 dB on frames
0-8 but 17-19 dB on frames 9-20 (20.5 dB over whole clips); 25 more steps on 21-frame crops brought it
to 24.4 dB. Whole-length crops from the start learn more slowly per CPU-second (19.5 vs 20.7 dB at 300
steps), so training runs in two phases: short crops (clip_frames, crop_size) learn the spatial code
cheaply, then the last long_steps steps use whole-length crops (long_crop_size). Spatial crops of the
64x64 clips make each sample cheaper; the VAE is convolutional and whole held-out frames reconstruct as
well as crops or better.
The posterior mean is decoded (no sampling): at a KL weight of 1e-6 sampling only slows learning.
The learning rate warms up (the trainer's linear warm-up), then follows a cosine to 5%.

Output (OUT): config.json + diffusion_pytorch_model.safetensors (diffusers format, what
`VideoCodec.from_pretrained` and `codec.vae` read), model.safetensors + config.yaml + metrics.json
(the stage contract; metrics.json last), psnr_curve.png (held-out PSNR vs training time), and the
trainer's checkpoints/ for exact resume.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dataclasses import dataclass
from typing import Optional

from minwm.codecs.quality import psnr
from minwm.codecs.vae import VideoCodec, use_fast_rms_norms
from minwm.errors import MinwmError

INPUTS: dict[str, str] = {}

# The VAE's optimiser settings (they differ from the DiT stages'; `stages.vae.train` overrides them): a cosine
# from lr to 5% of it after the warm-up.
TRAIN_DEFAULTS = {"lr": 3.0e-3, "betas": [0.9, 0.99], "weight_decay": 0.0, "grad_clip": 1.0, "batch_size": 8,
                  "max_steps": 600, "lr_warmup_steps": 20, "lr_decay": "cosine", "lr_min_ratio": 0.05,
                  "ckpt_every": 100, "keep_checkpoints": 2,
                  "mixed_precision": "no", "tensorboard": False, "plot": False}


@dataclass
class Params:
    """Config section stages.vae (plus stages.vae.train)."""
    data: Optional[str] = None          # clip folder (minwm data render --out); required
    heldout_clips: int = 8              # the last N clips (sorted by name) are held out for PSNR
    # Phase 1: crops of clip_frames = 1 + 4k frames (0: whole clips, cut to 1 + 4k, for every step) and
    # crop_size x crop_size pixels (0: whole frames; 32x32 of 64x64 clips is a quarter of the cost).
    clip_frames: int = 9
    crop_size: int = 32
    # Phase 2: the last long_steps steps train on whole-length clips in long_crop_size crops.
    long_steps: int = 150
    long_crop_size: int = 24
    kl_weight: float = 1.0e-6
    l2_weight: float = 1.0
    eval_every: int = 200               # steps between held-out PSNR evaluations (the last step always)
    # Training clips (evenly spread) the latent statistics are measured on (0: all). For the toy, all 184
    # cost 9 CPU-s; 48 cost 2.3 but put the normalised channel means up to 0.06 std off zero.
    stats_clips: int = 0

    def __post_init__(self):
        if self.clip_frames < 0 or (self.clip_frames and (self.clip_frames - 1) % 4):
            raise ValueError(f"clip_frames: expected 0 (whole clips) or 1 + 4k, got {self.clip_frames}")
        if min(self.crop_size, self.long_crop_size, self.long_steps, self.stats_clips) < 0:
            raise ValueError("crop_size, long_crop_size, long_steps and stats_clips must be >= 0")
        if self.heldout_clips < 1 or self.eval_every < 1:
            raise ValueError("heldout_clips and eval_every must be >= 1")


class FramesDataset(torch.utils.data.Dataset):
    """Clips held in memory as uint8 [F, H, W, 3] tensors (the toy's data set is small)."""

    def __init__(self, frames: list[torch.Tensor]):
        self.frames = frames

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.frames[i]


def load_frames(data: str | Path, heldout: int, temporal_factor: int, spatial_factor: int
                ) -> tuple[list[str], list[torch.Tensor], list[str], list[torch.Tensor]]:
    """Training and held-out clips (names sorted; the last `heldout` are held out), all the same size."""
    from minwm.codecs.cli import open_clips
    names, load = open_clips(data)
    order = sorted(range(len(names)), key=lambda i: names[i])
    frames, kept = [], []
    for i in order:
        clip = load(i)
        f = torch.from_numpy(np.ascontiguousarray(clip.frames))
        if frames and f.shape != frames[0].shape:
            raise MinwmError(f"{data}: clip {names[i]} has frames {tuple(f.shape)}, expected "
                             f"{tuple(frames[0].shape)} like the others (render the VAE's clips at one size)")
        frames.append(f)
        kept.append(names[i])
    if not frames:
        raise MinwmError(f"{data}: no clips found")
    F, H, W = frames[0].shape[:3]
    if H % spatial_factor or W % spatial_factor:
        raise MinwmError(f"{data}: clip size {H}x{W} is not divisible by the VAE's spatial factor {spatial_factor}")
    if len(frames) <= heldout:
        raise MinwmError(f"{data}: {len(frames)} clips, need more than stages.vae.heldout_clips={heldout}")
    n = len(frames) - heldout
    return kept[:n], frames[:n], kept[n:], frames[n:]


def to_video(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] -> float [B, 3, F, H, W] in [-1, 1]."""
    return frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def crop_length(frames: int, clip_frames: int, temporal_factor: int, where: str) -> int:
    """Frames per training crop: clip_frames, or for 0 the whole clip cut to 1 + t*k frames."""
    if frames < clip_frames:
        raise MinwmError(f"{where}: clips have {frames} frames, fewer than stages.vae.clip_frames={clip_frames}")
    return clip_frames or 1 + (frames - 1) // temporal_factor * temporal_factor


def crop_batch(frames: torch.Tensor, starts: torch.Tensor, flips: torch.Tensor, length: int,
               ys: torch.Tensor | None = None, xs: torch.Tensor | None = None, size: int = 0) -> torch.Tensor:
    """Per-sample crops (frames [start, start + length), and when size > 0 the size x size window at
    (y, x)) with horizontal flips, as VAE input."""
    out = []
    for i, f in enumerate(frames):
        s = int(starts[i])
        c = f[s:s + length]
        if size:
            y, x = int(ys[i]), int(xs[i])
            c = c[:, y:y + size, x:x + size]
        out.append(c.flip(2) if flips[i] else c)
    return to_video(torch.stack(out))


def vae_loss(vae, x: torch.Tensor, l2_weight: float, kl_weight: float) -> dict[str, torch.Tensor]:
    """L1 + l2_weight * L2 on the reconstruction of the posterior mean, + kl_weight * KL per input value."""
    post = vae.encode(x).latent_dist
    y = vae.decode(post.mode()).sample
    l1 = (y - x).abs().mean()
    l2 = (y - x).pow(2).mean()
    kl = post.kl().sum() / x.numel()
    return {"loss": l1 + l2_weight * l2 + kl_weight * kl, "l1": l1.detach(), "l2": l2.detach(), "kl": kl.detach()}


def heldout_videos(frames: list[torch.Tensor], temporal_factor: int, batch: int = 8) -> list[torch.Tensor]:
    """Held-out clips as VAE input batches [b, 3, F', H, W] at their full length (cut to 1 + t*k frames),
    converted once for all evaluations."""
    out = []
    for i in range(0, len(frames), batch):
        f = torch.stack(frames[i:i + batch])
        keep = 1 + (f.shape[1] - 1) // temporal_factor * temporal_factor
        out.append(to_video(f[:, :keep]))
    return out


@torch.no_grad()
def heldout_psnr(vae, videos: list[torch.Tensor]) -> float:
    """Mean PSNR over held-out clips (batches from heldout_videos)."""
    was = vae.training
    vae.eval()
    vals = []
    for x in videos:
        vals += psnr(x, vae.decode(vae.encode(x).latent_dist.mode()).sample).tolist()
    vae.train(was)
    return float(np.mean(vals))


def spread(items: list, n: int) -> list:
    """n items evenly spaced over the list (all of them when n is 0 or >= its length)."""
    if n <= 0 or n >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


@torch.no_grad()
def latent_stats(vae, frames: list[torch.Tensor], temporal_factor: int, batch: int = 8
                 ) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the raw posterior means over all given clips (float64 sums)."""
    vae.eval()
    s = s2 = None
    n = 0
    for i in range(0, len(frames), batch):
        f = torch.stack(frames[i:i + batch])
        keep = 1 + (f.shape[1] - 1) // temporal_factor * temporal_factor
        z = vae.encode(to_video(f[:, :keep])).latent_dist.mode().double()
        z = z.transpose(0, 1).reshape(z.shape[1], -1)
        s = z.sum(1) if s is None else s + z.sum(1)
        s2 = (z * z).sum(1) if s2 is None else s2 + (z * z).sum(1)
        n += z.shape[1]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def plot_psnr(points: list[tuple[float, float]], out_png: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minwm.io import atomic_path
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    ax.axhline(25.0, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("training time (s, excluding evaluation)")
    ax.set_ylabel("held-out PSNR (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(str(tmp), format="png")
    plt.close(fig)


def run(cfg, out_dir: str | Path, *, init: dict | None = None, resume: bool = False,
        max_steps: int | None = None) -> Path:
    """Train the toy VAE (architecture codec.vae_tiny, settings stages.vae) into out_dir; returns it."""
    from minwm.stages import common

    ctx = common.prepare("vae", cfg, out_dir, init, resume, max_steps)
    tc, cc = ctx.params, cfg["codec"]
    steps = ctx.train.max_steps
    if cc.vae_kind != "wan":
        raise MinwmError(f"codec.vae_kind: training is implemented for the Wan VAE, got {cc.vae_kind!r}")
    if not tc.data:
        raise MinwmError("stages.vae.data: no clip folder set (render one with `minwm data render`)")
    out = ctx.out_dir

    codec = VideoCodec.from_config(cc.vae_tiny, "wan", seed=ctx.train.seed)
    vae = codec.vae.train().requires_grad_(True)
    use_fast_rms_norms(vae)
    t, s = codec.temporal_factor, codec.spatial_factor
    train_names, train_frames, held_names, held_frames = load_frames(tc.data, tc.heldout_clips, t, s)
    F, H, W = train_frames[0].shape[:3]
    crops = {}
    for name in ("crop_size", "long_crop_size"):
        c = getattr(tc, name)
        crops[name] = c if c and c < min(H, W) else 0
        if crops[name] % s:
            raise MinwmError(f"stages.vae.{name}: {c} is not divisible by the VAE's spatial factor {s}")
    length, full = crop_length(F, tc.clip_frames, t, str(tc.data)), crop_length(F, 0, t, str(tc.data))
    long_from = steps - tc.long_steps if tc.clip_frames else steps
    held_videos = heldout_videos(held_frames, t)

    trainer = common.make_trainer(ctx, FramesDataset(train_frames))
    trainer.add("vae", vae, trainer.adamw(vae.parameters()))
    # Evaluation seconds, kept out of the PSNR curve's training-time axis; continued from the history
    # on resume.
    eval_time: list[float | None] = [None]

    def step_fn(tr, mbs, step):
        n, crop = (full, crops["long_crop_size"]) if step >= long_from else (length, crops["crop_size"])

        def loss_fn(mb):
            starts = mb.randint(F - n + 1, salt="start")
            flips = mb.rand(salt="flip") < 0.5
            ys = mb.randint(H - crop + 1, salt="y") if crop else None
            xs = mb.randint(W - crop + 1, salt="x") if crop else None
            x = crop_batch(mb.data, starts, flips, n, ys, xs, crop)
            return vae_loss(vae, x, tc.l2_weight, tc.kl_weight)

        out_v = tr.accumulate("vae", mbs, loss_fn)
        if (step + 1) % tc.eval_every == 0 or step + 1 == steps:
            if eval_time[0] is None:
                done = [h for h in tr.history if "eval_time" in h]
                eval_time[0] = done[-1]["eval_time"] if done else 0.0
            t0 = time.monotonic()
            out_v["psnr"] = heldout_psnr(vae, held_videos)
            eval_time[0] += time.monotonic() - t0
            out_v["eval_time"] = eval_time[0]
        return out_v

    history = trainer.fit(step_fn, resume=resume)
    evals = [h for h in history if "psnr" in h]

    # The last step always evaluates: its PSNR is that of the final weights.
    last = history[-1] if history else {}
    final_psnr = last["psnr"] if last.get("step") == steps and "psnr" in last else heldout_psnr(vae, held_videos)
    mean, std = latent_stats(vae, spread(train_frames, tc.stats_clips), t)
    codec.set_latent_stats(mean, std)
    vae.eval().requires_grad_(False)
    _save_diffusers(codec, out)
    curve = [(h["time"] - h.get("eval_time", 0.0), h["psnr"]) for h in evals]
    params = sum(p.numel() for p in vae.parameters())
    if curve:
        plot_psnr(curve, out / "psnr_curve.png",
                  f"toy VAE {params / 1e6:.2f}M params, {H}x{W}, final {final_psnr:.2f} dB")
    metrics = {"heldout_psnr": round(final_psnr, 3), "params": params, "size": [H, W],
               "train_clips": len(train_names), "heldout_clips": held_names,
               "train_seconds": round(curve[-1][0], 1) if curve else None,
               "psnr_curve": [[round(a, 2), round(b, 3)] for a, b in curve],
               "latents_mean": mean, "latents_std": std, "complete": True}
    trainer.write_output("vae", cfg, extra_metrics=metrics)
    print(f"toy VAE: held-out PSNR {final_psnr:.2f} dB after {trainer.step} steps; wrote {out}")
    return out


def _save_diffusers(codec: VideoCodec, out: Path) -> None:
    """config.json + diffusion_pytorch_model.safetensors directly in `out` (beside the trainer's files),
    each replaced atomically."""
    import tempfile

    from minwm.io import atomic_path
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".vae.") as tmp:
        codec.vae.save_pretrained(tmp, safe_serialization=True)
        for name in ("diffusion_pytorch_model.safetensors", "config.json"):
            with atomic_path(out / name) as dst:
                Path(tmp, name).replace(dst)
