"""Latency benchmark: the paper's Table 1 on any backbone config.

Measured, each as the minimum over `runs` repeats after a warm-up pass with another prompt:
- first-frame latency of the few-step AR model: the first chunk's denoising passes (K steps), excluding the
  clean KV refresh and the VAE, as the papers report it;
- first-frame latency of the multi-step AR baseline: the first chunk, inference.baseline_steps steps with CFG
  (two passes per step, conditional and unconditional caches);
- first-frame latency of the multi-step bidirectional baseline: the whole clip (bench.frames latent frames),
  baseline_steps steps with CFG -- no frame exists before all of it is done.
  With --baseline-steps n (bench.baseline_steps) each baseline runs only n steps and its time is extrapolated
  linearly (every step costs the same: two passes over the same tokens); the report labels such figures.
- then a streamed rollout of `chunks` chunks (actions cycle through a fixed program): wall and CPU time per chunk
  (K steps + refresh), current RSS per chunk, steady-state FPS over the chunks with the window full, and the
  flat-cost ratio (median of the last five over the first five full-window chunks).
Each figure is also given with VAE decode when a codec is there (--with-codec): + the streaming decode of the
chunk's latents (for first-frame figures: of the first chunk).

Writes bench.json, bench.md and bench.png (per-chunk latency and memory against chunk index) to the output
folder, atomically.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ACTION_CYCLE = "w*3,w+l*2,l*2,a*2,w+j*3,s,d*2,i,k,_*2"


@dataclass
class BenchConfig:
    """Config section `bench`."""

    frames: int = 20                     # latent frames of the bidirectional baseline's clip
    chunks: int = 10                     # streamed chunks timed
    threads: int = 2                     # torch CPU threads
    runs: int = 3                        # repeats of each first-frame measurement (min reported)
    baseline_steps: Optional[int] = None  # measure only this many baseline steps and extrapolate (None: all)
    prompt: str = "a walk down a quiet street"
    warmup_prompt: str = "warm-up"

    def __post_init__(self):
        for name in ("frames", "chunks", "threads", "runs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.baseline_steps is not None and self.baseline_steps < 1:
            raise ValueError(f"baseline_steps: expected >= 1 or null, got {self.baseline_steps}")


# ---- memory ------------------------------------------------------------------------------------------
def rss_mb() -> float:
    """Current resident set size of this process, MiB (Linux /proc; else the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if platform.system() != "Darwin" else kb / 2**20


def peak_memory_mb(device) -> float:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


# ---- pure summaries (unit-tested) ------------------------------------------------------------------
def full_window_start(window_frames: Optional[int], sink_frames: int, chunk_frames: int) -> int:
    """Index of the first chunk that starts with the cache full (window + sinks held); with no window
    (keep everything) the cache never fills: 0."""
    if window_frames is None:
        return 0
    return math.ceil((window_frames + sink_frames) / chunk_frames)


def flat_cost_ratio(chunk_s: list[float], start: int, n: int = 5) -> Optional[float]:
    """median(last n) / median(first n) over the full-window chunks [start:]; None with fewer than 2n."""
    full = chunk_s[start:]
    if len(full) < 2 * n:
        return None
    return statistics.median(full[-n:]) / statistics.median(full[:n])


def extrapolate(measured_s: float, measured_steps: int, total_steps: int) -> float:
    """Linear extrapolation of a sampler's time: every step is the same passes over the same tokens."""
    return measured_s / measured_steps * total_steps


# ---- measurements ------------------------------------------------------------------------------------
def _cycle_actions(n_chunks: int, chunk: int) -> list[list[frozenset]]:
    from minwm.cameras.actions import parse_actions

    prog = parse_actions(ACTION_CYCLE)
    flat = [prog[i % len(prog)] for i in range(n_chunks * chunk)]
    return [flat[i * chunk:(i + 1) * chunk] for i in range(n_chunks)]


def _min_of(runs: int, fn) -> dict[str, float]:
    """fn() -> dict of timings; the run with the smallest 'wall_s' is kept."""
    best = None
    for _ in range(runs):
        r = fn()
        if best is None or r["wall_s"] < best["wall_s"]:
            best = r
    return best


def start(wm, prompt: str) -> None:
    """reset for a timed rollout; an image-to-video checkpoint starts from a render of its procedural world."""
    if wm.needs_image and wm.codec is None:
        from minwm.errors import MinwmError

        raise MinwmError("bench: this config is image-to-video (stages.ti2v), so its first frame is VAE-encoded: "
                         "run with --with-codec")
    wm.reset(prompt, image=wm.procedural_image(0)[0] if wm.needs_image else None, seed=0)


def measure_fewstep_first(wm, prompt: str, runs: int) -> dict[str, float]:
    actions = _cycle_actions(1, wm.chunk_frames)[0]

    def once():
        start(wm, prompt)
        wm.step_latents(actions)
        t = wm.last_timings
        return {"wall_s": t["denoise_s"], "cpu_s": t["denoise_cpu_s"], "refresh_s": t["refresh_s"]}

    return _min_of(runs, once)


def measure_multistep_first(wm, prompt: str, runs: int, steps: int, total_steps: int) -> dict[str, float]:
    """The multi-step AR baseline's first chunk (wm in mode multistep), `steps` of `total_steps` measured."""
    import dataclasses

    wm.inference = dataclasses.replace(wm.inference, baseline_steps=steps)
    actions = _cycle_actions(1, wm.chunk_frames)[0]

    def once():
        start(wm, prompt)
        wm.step_latents(actions)
        t = wm.last_timings
        return {"wall_s": extrapolate(t["denoise_s"], steps, total_steps),
                "cpu_s": extrapolate(t["denoise_cpu_s"], steps, total_steps),
                "measured_s": t["denoise_s"]}

    return _min_of(runs, once)


def measure_bidirectional(wm, prompt: str, frames: int, runs: int, steps: int, total_steps: int) -> dict[str, float]:
    """The bidirectional baseline over `frames` latent frames, `steps` of `total_steps` measured."""
    import torch

    from minwm.cameras.actions import actions_to_cameras
    from minwm.inference.sampling import Conditioning, Clock, bidirectional_sample
    from minwm.inference.text import encode_prompt

    inf = wm.inference
    steps_list = [a for chunk in _cycle_actions(-(-frames // wm.chunk_frames), wm.chunk_frames) for a in chunk]
    cams = actions_to_cameras(steps_list[:frames - 1], wm.actions_cfg, wm.intrinsics)
    w2c, K = cams.to(wm.dtype, wm.device)
    text_c = encode_prompt(wm.backbone, wm.text_encoder, prompt, inf.text_tokens, wm.device, wm.dtype)
    text_u = encode_prompt(wm.backbone, wm.text_encoder, inf.negative_prompt, inf.text_tokens, wm.device, wm.dtype)
    cond_c, cond_u = Conditioning(text_c, (w2c[None], K[None])), Conditioning(text_u, (w2c[None], K[None]))
    g = torch.Generator().manual_seed(0)
    shape = (1, wm.latent_channels, frames, wm.latent_height, wm.latent_width)

    def once():
        noise = torch.randn(shape, generator=g).to(wm.device, wm.dtype)
        clock = Clock(wm.device)
        with torch.inference_mode():
            bidirectional_sample(wm.backbone, noise, cond_c, cond_u, steps, inf.shift, inf.guidance, inf.sampler)
        clock.lap("sample")
        t = clock.timings
        return {"wall_s": extrapolate(t["sample_s"], steps, total_steps),
                "cpu_s": extrapolate(t["sample_cpu_s"], steps, total_steps), "measured_s": t["sample_s"]}

    return _min_of(runs, once)


def measure_decode_first(wm) -> Optional[float]:
    """Streaming VAE decode of one chunk's latents from a fresh decoder (the first chunk), seconds."""
    import torch

    from minwm.inference.sampling import Clock

    if wm.codec is None:
        return None
    lat = torch.randn(1, wm.latent_channels, wm.chunk_frames, wm.latent_height, wm.latent_width,
                      generator=torch.Generator().manual_seed(0)).to(wm.device, wm.dtype)
    dec = wm.codec.streaming_decoder()
    best = math.inf
    for _ in range(2):
        dec.reset()
        clock = Clock(wm.device)
        with torch.inference_mode():
            dec(lat)
        clock.lap("decode")
        best = min(best, clock.timings["decode_s"])
    return best


def measure_rollout(wm, prompt: str, chunks: int, progress=None) -> dict[str, list[float]]:
    """Stream `chunks` chunks; per chunk: wall and CPU seconds of the K steps + refresh, decode seconds, RSS."""
    start(wm, prompt)
    per = {"chunk_s": [], "chunk_cpu_s": [], "denoise_s": [], "refresh_s": [], "decode_s": [], "rss_mb": []}
    decode = wm.codec is not None
    for i, actions in enumerate(_iter_actions(chunks, wm.chunk_frames)):
        if decode:
            wm.step(actions)
        else:
            wm.step_latents(actions)
        t = wm.last_timings
        per["chunk_s"].append(t["denoise_s"] + t["refresh_s"])
        per["chunk_cpu_s"].append(t["denoise_cpu_s"] + t["refresh_cpu_s"])
        per["denoise_s"].append(t["denoise_s"])
        per["refresh_s"].append(t["refresh_s"])
        per["decode_s"].append(t.get("decode_s", 0.0))
        per["rss_mb"].append(rss_mb())
        if progress is not None:
            progress(i + 1, chunks)
    return per


def _iter_actions(chunks: int, chunk: int):
    cycle = _cycle_actions(8, chunk)
    for i in range(chunks):
        yield cycle[i % len(cycle)]


# ---- the whole benchmark ---------------------------------------------------------------------------
def run_latency(cfg, *, out_dir: str | Path, device: str = "cpu", with_codec: bool = False,
                chunks: Optional[int] = None,
                threads: Optional[int] = None, runs: Optional[int] = None, baseline_steps: Optional[int] = None,
                baselines: bool = True, log=print) -> dict[str, Any]:
    """Run the benchmark for a parsed Config; returns (and writes) the bench.json dict."""
    import torch

    from minwm.world import WorldModel

    bench: BenchConfig = cfg["bench"]
    chunks = chunks or bench.chunks
    threads = threads or bench.threads
    runs = runs or bench.runs
    measure_steps = baseline_steps or bench.baseline_steps
    torch.set_num_threads(threads)
    load_before = os.getloadavg()

    wm = WorldModel.from_config(cfg, random_weights=True, with_codec=with_codec, device=device, mode="fewstep")
    inf = wm.inference
    total_steps = inf.baseline_steps
    measure_steps = min(measure_steps or total_steps, total_steps)
    extrapolated = measure_steps < total_steps
    params = sum(p.numel() for p in wm.backbone.parameters())
    log(f"bench: {wm.arch}, {params / 1e6:.2f}M parameters, latent {wm.latent_height}x{wm.latent_width}, "
        f"chunk {wm.chunk_frames}, {len(wm.timesteps)} steps, {threads} threads, device {device}")

    # Few-step AR: warm-up with another prompt, then the first chunk.
    measure_fewstep_first(wm, bench.warmup_prompt, 1)
    few = measure_fewstep_first(wm, bench.prompt, runs)
    log(f"bench: few-step first chunk {few['wall_s'] * 1e3:.1f} ms (cpu {few['cpu_s'] * 1e3:.1f} ms)")

    # Streamed rollout: per-chunk cost and memory.
    t0 = time.perf_counter()
    last_log = [t0]

    def progress(done, total):
        if time.perf_counter() - last_log[0] > 30 or done == total:
            last_log[0] = time.perf_counter()
            log(f"bench: rollout chunk {done}/{total} ({time.perf_counter() - t0:.0f} s)")

    roll = measure_rollout(wm, bench.prompt, chunks, progress)
    rollout_s = time.perf_counter() - t0
    peak_stream = peak_memory_mb(device)
    cache_mb = wm.cache_nbytes / 2**20
    decode_first = measure_decode_first(wm)

    window = inf.window_frames if inf.window_frames is not None else wm.backbone.cfg.window_frames
    sinks = inf.sink_frames if inf.sink_frames is not None else wm.backbone.cfg.sink_frames
    start = full_window_start(window, sinks, wm.chunk_frames)
    steady = roll["chunk_s"][start:] or roll["chunk_s"][-1:]
    steady_cpu = roll["chunk_cpu_s"][start:] or roll["chunk_cpu_s"][-1:]
    steady_chunk_s = statistics.median(steady)
    steady_chunk_min_s = min(steady)
    pix_per_chunk = wm.frames_per_chunk
    steady_dec = None
    if decode_first is not None:
        steady_dec = statistics.median(roll["decode_s"][start:] or roll["decode_s"][-1:])

    result: dict[str, Any] = {
        "config": cfg.path, "arch": wm.arch, "parameters": params, "device": device, "threads": threads,
        "dtype": str(wm.dtype).replace("torch.", ""),
        "shape": {"latent_height": wm.latent_height, "latent_width": wm.latent_width,
                  "tokens_per_frame": wm.backbone.tokens_per_frame(wm.latent_height, wm.latent_width),
                  "chunk_frames": wm.chunk_frames, "window_frames": window, "sink_frames": sinks,
                  "steps": wm.timesteps, "bidirectional_frames": bench.frames},
        "codec": None if wm.codec is None else wm.codec.source,
        "first_frame_latency_s": {"ar_fewstep": few["wall_s"]},
        "first_frame_cpu_s": {"ar_fewstep": few["cpu_s"]},
        "steady_chunk_s": steady_chunk_s, "steady_chunk_min_s": steady_chunk_min_s,
        "steady_chunk_cpu_s": statistics.median(steady_cpu),
        "steady_fps": pix_per_chunk / steady_chunk_s,
        "steady_latent_fps": wm.chunk_frames / steady_chunk_s,
        "chunk_latency_s": roll["chunk_s"], "chunk_cpu_s": roll["chunk_cpu_s"],
        "chunk_rss_mb": roll["rss_mb"], "full_window_from_chunk": start,
        "flat_cost_ratio": flat_cost_ratio(roll["chunk_s"], start),
        "flat_cost_ratio_cpu": flat_cost_ratio(roll["chunk_cpu_s"], start),
        "rollout": {"chunks": chunks, "latent_frames": chunks * wm.chunk_frames, "seconds": rollout_s,
                    "rss_first_full_window_mb": roll["rss_mb"][min(start, len(roll["rss_mb"]) - 1)],
                    "rss_last_mb": roll["rss_mb"][-1], "kv_cache_mb": cache_mb},
        "peak_memory_mb": peak_stream, "peak_memory_streaming_mb": peak_stream,
        "with_decode": None,
        "baselines": {"total_steps": total_steps, "measured_steps": measure_steps, "extrapolated": extrapolated,
                      "guidance": inf.guidance, "sampler": inf.sampler},
        "load_average": {"before": list(load_before)}, "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
    }

    if baselines:
        ar = WorldModel(wm.backbone, _with_mode(cfg, "multistep"), wm.codec, wm.text_encoder,
                        device=device, dtype=wm.dtype)
        measure_multistep_first(ar, bench.warmup_prompt, 1, 1, total_steps)
        ms = measure_multistep_first(ar, bench.prompt, runs, measure_steps, total_steps)
        log(f"bench: multi-step AR first chunk {ms['wall_s']:.2f} s" + (" (extrapolated)" if extrapolated else ""))
        measure_bidirectional(wm, bench.warmup_prompt, bench.frames, 1, 1, total_steps)
        bi = measure_bidirectional(wm, bench.prompt, bench.frames, runs, measure_steps, total_steps)
        log(f"bench: bidirectional first frame {bi['wall_s']:.2f} s" + (" (extrapolated)" if extrapolated else ""))
        result["first_frame_latency_s"].update(bidirectional=bi["wall_s"], ar_multistep=ms["wall_s"])
        result["first_frame_cpu_s"].update(bidirectional=bi["cpu_s"], ar_multistep=ms["cpu_s"])
        result["baselines"]["measured_s"] = {"bidirectional": bi["measured_s"], "ar_multistep": ms["measured_s"]}
        result["first_frame_speedup"] = bi["wall_s"] / few["wall_s"]
        result["first_frame_speedup_cpu"] = bi["cpu_s"] / few["cpu_s"]
        result["first_frame_speedup_vs_ar_multistep"] = ms["wall_s"] / few["wall_s"]
        result["peak_memory_mb"] = peak_memory_mb(device)
    else:
        result["first_frame_latency_s"].update(bidirectional=None, ar_multistep=None)
        result["first_frame_speedup"] = None

    if decode_first is not None:
        ff = result["first_frame_latency_s"]
        result["with_decode"] = {
            "decode_first_chunk_s": decode_first, "steady_decode_s": steady_dec,
            "first_frame_latency_s": {k: (v + decode_first if v is not None else None) for k, v in ff.items()},
            "steady_fps": pix_per_chunk / (steady_chunk_s + steady_dec),
            "chunk_latency_s": [a + b for a, b in zip(roll["chunk_s"], roll["decode_s"])],
        }
    result["load_average"]["after"] = list(os.getloadavg())
    write_report(result, Path(out_dir))
    return result


def _with_mode(cfg, mode: str):
    import dataclasses

    from minwm.config import Config

    c = Config(cfg)
    c.path = cfg.path
    c["inference"] = dataclasses.replace(cfg["inference"], mode=mode)
    return c


# ---- report -------------------------------------------------------------------------------------------
def _fmt_s(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"


def render_markdown(r: dict[str, Any]) -> str:
    ff, cpu = r["first_frame_latency_s"], r["first_frame_cpu_s"]
    b = r["baselines"]
    ex = f" (extrapolated from {b['measured_steps']} measured steps)" if b["extrapolated"] else ""
    s = r["shape"]
    lines = [
        f"# Latency: {r['config']}", "",
        f"{r['arch']}, {r['parameters'] / 1e6:.2f}M parameters, {r['dtype']}, {r['device']}, {r['threads']} threads; "
        f"latent {s['latent_height']}x{s['latent_width']} ({s['tokens_per_frame']} tokens/frame), chunk "
        f"{s['chunk_frames']}, window {s['window_frames']} (+{s['sink_frames']} sinks), few-step t = "
        f"{', '.join(f'{t:.1f}' for t in s['steps'])}. Load average before/after: "
        f"{', '.join(f'{x:.2f}' for x in r['load_average']['before'])} / "
        f"{', '.join(f'{x:.2f}' for x in r['load_average']['after'])}.", "",
        "Wall times are the minimum of the runs. CPU time (summed over this process's threads) leaves out the time "
        "spent waiting for cores other processes hold, so on shared cores it is the steadier figure; CPU time / "
        "threads is the wall time the same work takes when every thread has a core of its own.", "",
        "| first frame | wall | CPU |", "|---|---|---|",
        f"| bidirectional, {b['total_steps']} {b['sampler']} steps, CFG {b['guidance']:g}, {s['bidirectional_frames']} "
        f"latent frames{ex} | {_fmt_s(ff.get('bidirectional'))} | {_fmt_s(cpu.get('bidirectional'))} |",
        f"| AR multi-step, first chunk, {b['total_steps']} steps, CFG {b['guidance']:g}{ex} | "
        f"{_fmt_s(ff.get('ar_multistep'))} | {_fmt_s(cpu.get('ar_multistep'))} |",
        f"| AR few-step, first chunk, {len(s['steps'])} steps (no refresh, no VAE) | {_fmt_s(ff['ar_fewstep'])} | "
        f"{_fmt_s(cpu['ar_fewstep'])} |", "",
    ]
    if r.get("first_frame_speedup") is not None:
        lines += [f"First-frame speed-up over bidirectional: **{r['first_frame_speedup']:.0f}x** (CPU time "
                  f"{r['first_frame_speedup_cpu']:.0f}x); over multi-step AR: "
                  f"{r['first_frame_speedup_vs_ar_multistep']:.0f}x.", ""]
    ro = r["rollout"]
    fc = r["flat_cost_ratio"]
    lines += [
        f"Streaming ({ro['chunks']} chunks = {ro['latent_frames']} latent frames in {ro['seconds']:.1f} s): steady "
        f"chunk ({len(s['steps'])} steps + refresh, window full from chunk {r['full_window_from_chunk']}) median "
        f"{_fmt_s(r['steady_chunk_s'])}, min {_fmt_s(r['steady_chunk_min_s'])}, CPU {_fmt_s(r['steady_chunk_cpu_s'])}; "
        f"steady {r['steady_fps']:.1f} pixel frames/s ({r['steady_latent_fps']:.2f} latent frames/s).",
        f"Flat cost: last five / first five full-window chunks = "
        f"{'n/a (too few chunks)' if fc is None else f'{fc:.3f}'} (CPU "
        f"{'n/a' if r['flat_cost_ratio_cpu'] is None else format(r['flat_cost_ratio_cpu'], '.3f')}). "
        f"RSS at the first full-window chunk {ro['rss_first_full_window_mb']:.0f} MiB, at the last "
        f"{ro['rss_last_mb']:.0f} MiB; KV cache {ro['kv_cache_mb']:.2f} MiB.",
        f"Peak memory: {r['peak_memory_mb']:.0f} MiB (streaming part {r['peak_memory_streaming_mb']:.0f} MiB).", "",
    ]
    wd = r.get("with_decode")
    if wd is None:
        lines.append("No codec configured (or --with-codec not given): every figure is without VAE decode.")
    else:
        f2 = wd["first_frame_latency_s"]
        lines += ["With VAE decode (" + str(r["codec"]) + "): first chunk decode "
                  f"{_fmt_s(wd['decode_first_chunk_s'])}; first frame bidirectional {_fmt_s(f2.get('bidirectional'))}, "
                  f"AR multi-step {_fmt_s(f2.get('ar_multistep'))}, AR few-step {_fmt_s(f2['ar_fewstep'])}; steady "
                  f"{wd['steady_fps']:.1f} pixel frames/s."]
    lines += ["", "![per-chunk latency](bench.png)", ""]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minwm.io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 3.6))
    idx = list(range(len(r["chunk_latency_s"])))
    ax.plot(idx, [v * 1e3 for v in r["chunk_latency_s"]], label="chunk wall (steps + refresh)", lw=1)
    ax.plot(idx, [v * 1e3 for v in r["chunk_cpu_s"]], label="chunk CPU time", lw=1, alpha=0.7)
    if r.get("with_decode"):
        ax.plot(idx, [v * 1e3 for v in r["with_decode"]["chunk_latency_s"]], label="+ VAE decode", lw=1)
    ax.axvline(r["full_window_from_chunk"], color="grey", ls=":", lw=1, label="window full")
    ax.set_xlabel("chunk index")
    ax.set_ylabel("ms")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(idx, r["chunk_rss_mb"], color="tab:red", lw=1, ls="--", label="RSS")
    ax2.set_ylabel("RSS (MiB)")
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left", framealpha=0.8)
    ax.set_title(f"{r['config']}: latency per chunk", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def write_report(r: dict[str, Any], out_dir: Path) -> None:
    from minwm.io import write_json, write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    plot(r, out_dir / "bench.png")
    write_text(out_dir / "bench.md", render_markdown(r))
    write_json(out_dir / "bench.json", r)


def run_latency_cli(args) -> int:
    from minwm.config import load_config
    from minwm.errors import MinwmError

    cfg = load_config(args.config)
    loaded = os.getloadavg()[0] > (os.cpu_count() or 1)
    if args.device == "cpu" and loaded:
        print("minwm: note: the machine is loaded (load average above the core count): wall times measure the "
              "competition for the cores too; the CPU-time figures are the steadier ones.")
    if not args.random_weights and cfg["model"].pretrained:
        raise MinwmError("bench latency: loading pretrained weights is not supported yet; pass --random-weights "
                         "(latency does not depend on the weights)")
    r = run_latency(cfg, out_dir=args.out, device=args.device, with_codec=args.with_codec, chunks=args.chunks,
                    threads=args.threads, runs=args.runs, baseline_steps=args.baseline_steps,
                    baselines=not args.no_baselines)
    print(render_markdown(r))
    print(f"wrote {Path(args.out) / 'bench.md'}, bench.json, bench.png")
    return 0
