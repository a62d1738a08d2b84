"""The `ode-data` and `ode` stages on a tiny Wan and a tiny latent cache: the teacher's trajectory math, parallel
teacher forcing equal to block-by-block integration with the ground truth in the KV cache, shards identical after
SIGKILL + resume (no duplicates), the regression's inputs, bad input, and the trained student sampling in 4 steps
chunk by chunk with the KV cache.

This file is also the child process of the kill test: `python tests/test_stages_ode.py ROOT OUT [--resume]
[--kill-at N]` (N: the teacher batch at whose start the process kills itself).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stages_helpers import make_cache, tiny_config  # noqa: E402

from minwm.errors import MinwmError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

# Toy scaling: 8 Euler steps (the warped student list [1000, 937.5, 833.3, 625] sits at [0, 2, 4, 6]), CFG as the
# reference; 2 repeats of 8 clips = 16 samples in shards of 3 (the last one partial).
ODE_DATA = {"steps": 8, "guidance": 6.0, "repeats": 2, "batch_size": 2, "shard_samples": 3}


def config(cache, steps=6, **kw):
    return tiny_config(cache, steps=steps, ckpt_every=3, ode_data=dict(ODE_DATA), **kw)


def make_teacher(root: Path) -> str:
    """A latent cache and a finished 'ar' stage output (random tiny weights, camera branch switched on)."""
    from minwm.io import write_json
    from minwm.models.backbone import build_backbone

    if not (root / "cache" / "index.json").is_file():
        make_cache(root / "cache", n=8, frames=4)
    d = root / "ar"
    if not (d / "metrics.json").is_file():
        torch.manual_seed(0)
        m = build_backbone(config(root / "cache")["model"])
        for n in m.camera_parameter_names():
            torch.nn.init.normal_(m.transformer.get_parameter(n), std=0.02)
        m.save_pretrained(d)
        write_json(d / "metrics.json", {"complete": True})
    return str(d)


def child(argv):
    from minwm.stages import ode_data

    root, out = Path(argv[0]), Path(argv[1])
    kill_at = int(argv[argv.index("--kill-at") + 1]) if "--kill-at" in argv else -1
    real, calls = ode_data.trajectory, [0]

    def dying(*a, **kw):
        if calls[0] == kill_at:  # in the middle of a shard, after earlier shards were written
            os.kill(os.getpid(), signal.SIGKILL)
        calls[0] += 1
        return real(*a, **kw)

    ode_data.trajectory = dying
    ode_data.run(config(root / "cache"), out, init={"teacher": make_teacher(root)}, resume="--resume" in argv)


def run_child(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, __file__, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


# ---- pure parts ---------------------------------------------------------------------------------------------

def test_student_states_sit_on_the_teacher_grid():
    from minwm.diffusion.schedule import warp_timesteps
    from minwm.stages.ode_data import student_indices

    ts = warp_timesteps([1000, 750, 500, 250], 5.0)
    assert student_indices(ts, 48, 5.0) == [0, 12, 24, 36]
    assert student_indices(ts, 8, 5.0) == [0, 2, 4, 6]
    with pytest.raises(MinwmError, match="stages.ode_data.steps=10"):
        student_indices(ts, 10, 5.0)


def test_trajectory_keeps_the_states_before_each_kept_step():
    from minwm.stages.ode_data import trajectory

    # v = eps - x0 of a point mass at x0 = 2: the exact flow, so the states are x_t = (1 - s) 2 + s eps.
    eps = torch.tensor([[-1.0], [3.0]], dtype=torch.float64)
    x0 = 2.0

    def velocity(x, t):
        s = t / 1000
        return (x - x0) / s  # x_t = (1 - s) x0 + s eps  =>  eps - x0 = (x_t - x0) / s

    states, end = trajectory(velocity, eps, 4, 1.0, [0, 2])  # sigmas 1, .75, .5, .25, 0
    assert states.shape == (2, 2, 1)
    assert torch.allclose(states[:, 0], eps)
    assert torch.allclose(states[:, 1], 0.5 * x0 + 0.5 * eps)
    assert torch.allclose(end, torch.full_like(end, x0))
    with pytest.raises(MinwmError):
        trajectory(velocity, eps, 4, 1.0, [4])


def test_regression_inputs_by_hand():
    from minwm.stages.ode import regression_inputs

    # states [B=2, K=3, C=1, F=2, 1, 1]: value 10 b + k
    states = (10 * torch.arange(2.0)[:, None] + torch.arange(3.0)[None]).reshape(2, 3, 1, 1, 1, 1)
    states = states.expand(2, 3, 1, 2, 1, 1)
    ts = [1000.0, 900.0, 500.0]
    x, sigma = regression_inputs(states, torch.tensor([2, 0]), ts, 2)
    assert x.flatten().tolist() == [2.0, 2.0, 10.0, 10.0]
    assert sigma.tolist() == [[0.5, 0.5], [1.0, 1.0]] and sigma.dtype == torch.float64
    clean = torch.full((2, 1, 2, 1, 1), -7.0)
    x, sigma = regression_inputs(states, torch.tensor([1, 1]), ts, 2, n_clean=1, clean=clean)
    assert x.flatten().tolist() == [-7.0, 1.0, -7.0, 11.0]
    assert sigma.tolist() == [[0.0, 0.9], [0.0, 0.9]]


def test_guided_velocity_uncond_branch_takes_its_own_cameras():
    """CFG v_u + g (v_c - v_u) with the unconditional branch on the negative text and `negative_cameras` (camera
    guidance: standing still); by default both branches see the same cameras."""
    from minwm.stages.ode_data import guided_velocity

    seen = []

    def model(x, t, text, cams, **kw):
        seen.append((text, cams))
        return torch.full_like(x, 1.0 if text == "c" else 0.0)

    x = torch.zeros(1, 1, 2, 1, 1)
    v = guided_velocity(model, "c", "u", "cams", x, 3.0, negative_cameras="still")(x, 500.0)
    assert seen == [("c", "cams"), ("u", "still")] and v.flatten().tolist() == [3.0, 3.0]
    seen.clear()
    guided_velocity(model, "c", "u", "cams", x, 3.0)(x, 500.0)
    assert seen == [("c", "cams"), ("u", "cams")]


def test_parallel_teacher_forcing_equals_block_by_block_with_ground_truth_in_cache(tmp_path):
    """RECIPE §3: integrating all blocks at once under the TF mask equals integrating block by block, writing the
    ground-truth clean block (not the generated one) into both branches' KV caches at t = 0."""
    from minwm.diffusion.losses import cfg_from_uncond
    from minwm.diffusion.samplers import euler_sample, euler_sigmas
    from minwm.stages import common
    from minwm.stages.ode_data import _prepare_text, guided_velocity, trajectory
    from minwm.train.data import MicroBatch

    teacher_dir = make_teacher(tmp_path)
    cfg = config(tmp_path / "cache")
    ctx = common.prepare("ode-data", cfg, tmp_path / "x", {"teacher": teacher_dir}, False, None)
    data = common.latent_dataset(ctx)
    m = common.build_model(ctx, "teacher", trainable=False)
    cond = common.Conditioner(ctx, m, data, need_negative=True)
    batch = torch.utils.data.default_collate([data[0], data[5]])
    mb = MicroBatch(batch, torch.tensor([0, 5]), torch.tensor([0, 1]), 0, 0)
    x0 = batch["latents"]
    B, C, F, h, w = x0.shape
    text, neg = _prepare_text(m, cond.text(mb)), _prepare_text(m, cond.negative(B, "cpu"))
    cams = cond.cameras(mb)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    steps, g = 6, 6.0
    with torch.no_grad():
        _, par = trajectory(guided_velocity(m, text, neg, cams, x0, g), noise, steps, 5.0, [0])
        caches = [m.new_cache(B, h, w), m.new_cache(B, h, w)]
        c = m.cfg.chunk_frames
        blocks = []
        for s in range(0, F, c):
            sl = slice(s, s + c)
            cs = (cams[0][:, sl], cams[1][:, sl])

            def v(x, t):
                tt = torch.full((B, c), t)
                v_c = m(x, tt, text, cs, mode="streaming", cache=caches[0])
                v_u = m(x, tt, neg, cs, mode="streaming", cache=caches[1])
                return cfg_from_uncond(cond=v_c, uncond=v_u, scale=g)

            blocks.append(euler_sample(v, noise[:, :, sl], euler_sigmas(steps, 5.0)))
            for cache, tx in zip(caches, (text, neg)):  # the ground truth, not the generated block
                m(x0[:, :, sl], torch.zeros(B, c), tx, cs, mode="streaming", cache=cache, commit=True)
    seq = torch.cat(blocks, 2)
    assert F // c == 2
    assert (par - seq).abs().max() <= 1e-4
    # teeth: the second block depends on the clean context (a different ground truth changes it)
    with torch.no_grad():
        _, other = trajectory(guided_velocity(m, text, neg, cams, x0.flip(0), g), noise, steps, 5.0, [0])
    assert (other[:, :, :c] - par[:, :, :c]).abs().max() <= 1e-5
    assert (other[:, :, c:] - par[:, :, c:]).abs().max() > 1e-3


# ---- the stages end to end ----------------------------------------------------------------------------------

def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard_*.safetensors"))}


def test_ode_data_kill_resume_identical_and_ode_trains_and_samples(tmp_path):
    from minwm.stages import ode, ode_data
    from minwm.stages.common import StageDataset
    from minwm.stages.ode_data import ODETrajectories

    teacher = make_teacher(tmp_path)
    cfg = config(tmp_path / "cache")
    ref = tmp_path / "ref"
    assert ode_data.run(cfg, ref, init={"teacher": teacher}) == ref
    index = json.loads((ref / "index.json").read_text())
    metrics = json.loads((ref / "metrics.json").read_text())
    assert metrics["complete"] is True and metrics["samples"] == 16 and metrics["grid_indices"] == [0, 2, 4, 6]
    assert [s["samples"] for s in index["shards"]] == [3, 3, 3, 3, 3, 1]

    # SIGKILL in the middle of shard 2 (teacher batch 4 = the first batch of shard 2), then resume.
    run = tmp_path / "run"
    a = run_child(tmp_path, run, "--kill-at", 4)
    assert a.returncode == -signal.SIGKILL, a.stderr[-3000:]
    assert sorted(shard_bytes(run)) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert not (run / "metrics.json").exists()
    with pytest.raises(MinwmError, match="--resume"):
        ode_data.run(cfg, run, init={"teacher": teacher})
    ode_data.run(cfg, run, init={"teacher": teacher}, resume=True)  # in-process: saves a second interpreter start
    assert json.loads((run / "metrics.json").read_text())["made_now"] == 10  # shards 0 and 1 (6 samples) were kept
    assert shard_bytes(run) == shard_bytes(ref)
    assert json.loads((run / "index.json").read_text()) == index

    # The dataset: each (clip, repeat) once, states / endpoint / ground truth and the clip's text and cameras.
    clips_ds = StageDataset(tmp_path / "cache")
    ds = ODETrajectories(run, clips_ds)
    assert len(ds) == 16
    from safetensors import safe_open
    samples = []
    for s in index["shards"]:
        with safe_open(str(run / s["file"]), "pt") as f:
            samples += [it["sample"] for it in json.loads(f.metadata()["minwm"])["samples"]]
    assert samples == list(range(16))
    it = ds[9]  # sample 9: clip 1, second repeat
    assert it["states"].shape == (4, 4, 4, 4, 4) and it["endpoint"].shape == (4, 4, 4, 4)
    assert torch.equal(it["latents"], clips_ds[1]["latents"]) and torch.equal(it["w2c"], clips_ds[1]["w2c"])
    assert not torch.equal(ds[1]["states"][:, 0], it["states"][:, 0])  # the repeat has its own noise
    assert torch.isfinite(it["endpoint"]).all() and not torch.equal(it["endpoint"], it["latents"])

    # Another seed gives other trajectories.
    cfg2 = config(tmp_path / "cache")
    cfg2["train"].seed = 1
    ode_data.run(cfg2, tmp_path / "seed1", init={"teacher": teacher}, max_steps=3)
    assert shard_bytes(tmp_path / "seed1")["shard_00000.safetensors"] != shard_bytes(ref)["shard_00000.safetensors"]

    # ode: regression onto the endpoints; then the student samples in 4 steps chunk by chunk.
    out = ode.run(config(tmp_path / "cache", steps=6), tmp_path / "ode", init={"init": teacher, "data": str(ref)})
    m = json.loads((out / "metrics.json").read_text())
    assert m["complete"] is True and len(m["history"]) == 6
    assert all(torch.isfinite(torch.tensor(r["model/loss"])) for r in m["history"])
    assert m["student_timesteps"] == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)
    sample_few_step(out, tmp_path / "cache")


def sample_few_step(ckpt: Path, cache: Path) -> torch.Tensor:
    """Load a stage output as inference does and sample 2 chunks x 4 steps with the consistency sampler and the KV
    cache (K + 1 passes per chunk); returns the latents [1, C, F, h, w]."""
    from minwm.inference.checkpoint import load_checkpoint
    from minwm.inference.sampling import Conditioning, fewstep_chunk
    from minwm.inference.text import prepare_text
    from minwm.stages.common import StageDataset, relative_cameras, text_dict

    backbone, cfg, _, _ = load_checkpoint(ckpt)
    item = StageDataset(cache)[0]
    lat = item["latents"][None]
    _, C, F, h, w = lat.shape
    text = prepare_text(backbone, text_dict("wan", {k: item[k][None] for k in ("embeds", "mask")}), "cpu",
                        torch.float32)
    w2c, K = relative_cameras(item["w2c"][None], item["intrinsics"][None])
    ts = cfg["inference"].timesteps()
    assert ts == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)
    c = backbone.cfg.chunk_frames

    def rollout(seed):
        g = torch.Generator().manual_seed(seed)
        cache_ = backbone.new_cache(1, h, w)
        chunks = []
        with torch.inference_mode():
            for s in range(0, F, c):
                cond = Conditioning(text, (w2c[:, s:s + c], K[:, s:s + c]))
                noise = torch.randn(1, C, c, h, w, generator=g)
                x0, _ = fewstep_chunk(backbone, noise, ts, cond, cache_, lambda r: torch.randn(r.shape, generator=g))
                chunks.append(x0)
        return torch.cat(chunks, 2), cache_

    out, cache_ = rollout(0)
    assert out.shape == lat.shape and torch.isfinite(out).all()
    assert cache_.total_frames == F  # every chunk committed its clean keys/values
    again, _ = rollout(0)
    assert torch.equal(out, again)
    return out


def test_ode_bad_input_fails_before_work(tmp_path):
    from minwm.stages import ode, ode_data

    teacher = make_teacher(tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(MinwmError, match="Euler grid"):
        ode_data.run(tiny_config(cache, ode_data={"steps": 6}), tmp_path / "a", init={"teacher": teacher})
    assert not (tmp_path / "a" / "metrics.json").exists() and not list((tmp_path).glob("a/shard_*"))
    with pytest.raises(MinwmError, match="input 'teacher' is required"):
        ode_data.run(config(cache), tmp_path / "b", init={})
    with pytest.raises(MinwmError, match="shard_samples"):
        tiny_config(cache, ode_data={"shard_samples": 0})
    data = tmp_path / "data"
    ode_data.run(config(cache), data, init={"teacher": teacher}, max_steps=2)
    cfg = config(cache)
    cfg["inference"].steps = [1000.0, 500.0]
    with pytest.raises(MinwmError, match="the student must train on the steps it samples with"):
        ode.run(cfg, tmp_path / "c", init={"init": teacher, "data": str(data)})
    cfg = config(cache)
    cfg["stages"].latent_frames = 2
    with pytest.raises(MinwmError, match="stored ground truth does not match"):
        ode.run(cfg, tmp_path / "d", init={"init": teacher, "data": str(data)})
    assert not (tmp_path / "c" / "metrics.json").exists() and not (tmp_path / "d" / "metrics.json").exists()


if __name__ == "__main__":
    torch.set_num_threads(1)
    child(sys.argv[1:])
