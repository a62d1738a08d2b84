"""Render procedural clips into a clip dataset (`minwm data render`).

Clip i of seed S draws everything from numpy SeedSequence([S, i]): one child stream for the
trajectory and the scene, another for pose noise, so adding pose noise never changes the frames and
every clip is reproducible on its own (same bytes for the same seed and settings).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minwm.cameras.actions import ActionConfig, parse_actions
from minwm.data.clips import Clip, ClipWriter, DataConfig, perturb_cameras
from minwm.errors import MinwmError
from minwm.worlds.captions import caption
from minwm.worlds.render import render
from minwm.worlds.scene import generate_scene
from minwm.worlds.trajectories import num_latent_frames, program_cameras, random_program, square_intrinsics


def load_programs(path: str | Path, frames: int, actions: ActionConfig | None = None) -> list[tuple[str, str]]:
    """(name, program) pairs from a trajectory file: JSON (a list of programs, a {name: program}
    mapping such as eval_trajectories() gives, or a list of {"name", "actions"}) or text (one
    program per line; blank lines and '#' comments skipped). Each program must have exactly the
    number of steps a `frames`-frame clip needs."""
    path = Path(path)
    if not path.is_file():
        raise MinwmError(f"{path}: trajectory file not found")
    text = path.read_text()
    items: list[tuple[str, str, str]] = []          # (where, name, program)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MinwmError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict):
            items = [(f"{path}: {k}", str(k), v) for k, v in data.items()]
        elif isinstance(data, list):
            for i, v in enumerate(data):
                if isinstance(v, dict):
                    items.append((f"{path}: [{i}]", str(v.get("name", "")), v.get("actions")))
                else:
                    items.append((f"{path}: [{i}]", "", v))
        else:
            raise MinwmError(f"{path}: expected a list of programs or a {{name: program}} mapping")
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if line:
                items.append((f"{path}: line {n}", "", line))
    if not items:
        raise MinwmError(f"{path}: no trajectories")
    need = num_latent_frames(frames) - 1
    out = []
    for where, name, prog in items:
        if not isinstance(prog, str):
            raise MinwmError(f"{where}: expected an action program string, got {prog!r}")
        try:
            steps = parse_actions(prog, (actions or ActionConfig()).max_steps) if prog.strip() else []
        except MinwmError as e:
            raise MinwmError(f"{where}: {e}") from None
        if len(steps) != need:
            raise MinwmError(f"{where}: '{prog}' has {len(steps)} steps, expected {need} for {frames} frames")
        safe = "".join(ch if ch.isalnum() or ch in "_-." else "-" for ch in name)[:64]
        out.append((safe, prog))
    return out


def render_clip(cfg: DataConfig, index: int, program: str | None = None, program_name: str = "",
                actions: ActionConfig | None = None) -> Clip:
    """Clip `index` of the dataset described by cfg (program None: a random one)."""
    walk_ss, noise_ss = np.random.SeedSequence([cfg.seed, index]).spawn(2)
    rng = np.random.default_rng(walk_ss)
    K = square_intrinsics(cfg.hfov_deg, cfg.height, cfg.width)
    if program is None:
        program = random_program(rng, num_latent_frames(cfg.frames) - 1)
    cams = program_cameras(program, cfg.frames, K, actions)
    scene = generate_scene(rng, cams.positions.numpy(), hfov_deg=cfg.hfov_deg)
    frames = render(scene, cams, cfg.height, cfg.width, cfg.supersample)
    stored = cams
    if cfg.pose_noise_rot_deg > 0 or cfg.pose_noise_trans > 0:
        stored = perturb_cameras(cams, np.random.default_rng(noise_ss), cfg.pose_noise_rot_deg, cfg.pose_noise_trans)
    name = f"clip-{index:06d}" + (f"-{program_name}" if program_name else "")
    meta = {"actions": program, "scene": scene.to_dict(),
            "pose_noise": [cfg.pose_noise_rot_deg, cfg.pose_noise_trans]}
    return Clip(name, frames, stored, caption(scene, cams.w2c[0].numpy(), K),
                f"procedural:seed={cfg.seed}:clip={index}", meta)


def _render_job(job) -> Clip:
    cfg, i, prog, name, actions = job
    return render_clip(cfg, i, prog, name, actions)


def _worker_init() -> None:
    import torch

    from minwm.worlds.render import keep_freed_memory

    torch.set_num_threads(1)       # one core per worker process: the workers are the parallelism
    keep_freed_memory()


def render_dataset(cfg: DataConfig, out: str | Path, programs: list[tuple[str, str]] | None = None,
                   actions: ActionConfig | None = None, progress: bool = True, workers: int = 1) -> Path:
    """Render cfg.num_clips clips into `out` (which must not hold a dataset). With `programs`, clip i
    follows programs[i % len(programs)]; otherwise each clip gets a random program. `workers` > 1
    renders in that many processes; the output is the same bytes either way (clips are seeded
    independently and written in order)."""
    out = Path(out)
    jobs = ((cfg, i, *(programs[i % len(programs)][::-1] if programs else (None, "")), actions)
            for i in range(cfg.num_clips))
    with ClipWriter(out, cfg.clips_per_shard) as writer:
        if workers > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
                clips = pool.imap(_render_job, jobs, chunksize=2)
                for clip in tqdm(clips, total=cfg.num_clips, desc="render", unit="clip", disable=not progress):
                    writer.add(clip)
        else:
            for job in tqdm(jobs, total=cfg.num_clips, desc="render", unit="clip", disable=not progress):
                writer.add(_render_job(job))
    return out
