"""The `dmd` stage end to end on a tiny Wan and a tiny latent cache: outputs and schedule, the DMD gradient
vanishing when the fake score equals the real one, bad input, and exact resume after SIGKILL (losses, the
generator, its EMA, the critic and both optimisers bitwise equal to an uninterrupted run).

This file is also the child process of the resume test: `python tests/test_stages_dmd.py ROOT RUN [--resume]
[--kill-at N]` (ROOT holds the cache and the input checkpoints made by the test).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stages_helpers import dcp_state, history, make_cache, tiny_config  # noqa: E402

from minwm.errors import MinwmError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40
CKPT_EVERY = 5
torch.set_num_threads(1)


def dmd_config(cache, steps=STEPS, **dmd):
    # The toy scaling used here: lrs x50 / x500 of the reference so 40 steps move the weights visibly,
    # EMA from step 10 (reference 200) so the EMA really averages within the run.
    params = {"critic_lr": 2e-4, "train": {"lr": 1e-4, "ema_start": 10}, **dmd}
    return tiny_config(cache, steps=steps, ckpt_every=CKPT_EVERY, dmd=params)


def make_inputs(root: Path) -> dict[str, str]:
    """A latent cache and three finished 'stage outputs' (bidirectional = real and fake, cd = generator)."""
    from minwm.io import write_json
    from minwm.models.backbone import build_backbone

    if not (root / "cache" / "index.json").is_file():
        make_cache(root / "cache", n=8, frames=4)
    cfg = dmd_config(root / "cache")
    out = {}
    for name, seed in (("bidirectional", 0), ("cd", 1)):
        d = root / name
        if not (d / "metrics.json").is_file():
            torch.manual_seed(seed)
            m = build_backbone(cfg["model"])
            for n in m.camera_parameter_names():  # a camera branch that matters (it starts at zero)
                torch.nn.init.normal_(m.transformer.get_parameter(n), std=0.02)
            m.save_pretrained(d)
            write_json(d / "metrics.json", {"complete": True})
        out[name] = str(d)
    return {"init": out["cd"], "real": out["bidirectional"], "fake": out["bidirectional"]}


def child(argv):
    from minwm.stages import dmd

    root, run = Path(argv[0]), Path(argv[1])
    kill_at = int(argv[argv.index("--kill-at") + 1]) if "--kill-at" in argv else -1
    real_step = dmd.DMD.step

    def step(self, trainer, mbs, i):
        out = real_step(self, trainer, mbs, i)
        if i == kill_at:  # mid-step: after both optimiser steps, before the record and any checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    dmd.DMD.step = step
    dmd.run(dmd_config(root / "cache"), run, init=make_inputs(root), resume="--resume" in argv)


def run_child(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, __file__, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_dmd_runs_and_resumes_exactly_after_sigkill(tmp_path):
    from safetensors.torch import load_file

    from minwm.stages import dmd
    from minwm.train.checkpoint import latest_checkpoint

    init = make_inputs(tmp_path)
    ref = tmp_path / "ref"
    out = dmd.run(dmd_config(tmp_path / "cache"), ref, init=init)
    assert out == ref
    for f in ("model.safetensors", "model_config.json", "config.yaml", "metrics.json"):
        assert (ref / f).is_file(), f
    hist = history(ref)
    assert [r["step"] for r in hist] == list(range(1, STEPS + 1))
    gen_steps = [r["step"] - 1 for r in hist if "generator/loss" in r]
    assert gen_steps == list(range(0, STEPS, 5))  # generator every 5th step, critic every step
    assert all("critic/loss" in r for r in hist)
    assert all(torch.isfinite(torch.tensor(v)) for r in hist for v in r.values())
    assert len({r["generator/exit_index"] for r in hist if "generator/exit_index" in r}) > 1
    metrics = json.loads((ref / "metrics.json").read_text())
    assert metrics["weights"] == "ema" and metrics["complete"] is True
    assert metrics["student_timesteps"] == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)

    final_ref = dcp_state(latest_checkpoint(ref))
    keys = sorted(final_ref)
    for want in ("/modules/generator", "/modules/critic", "/ema/generator", "/optimizers/generator",
                 "/optimizers/critic"):
        assert any(k.startswith(want) for k in keys), want
    # the generator, its EMA and the critic all moved from their inputs, and the EMA is not the generator
    gen_w = {k.split("/")[-1]: v for k, v in final_ref.items() if k.startswith("/modules/generator/")}
    ema_w = {k.split("/")[-1]: v for k, v in final_ref.items() if k.startswith("/ema/generator/")}
    critic_w = {k.split("/")[-1]: v for k, v in final_ref.items() if k.startswith("/modules/critic/")}
    name = "transformer.blocks.0.attn1.to_q.weight"
    cd = load_file(str(Path(init["init"]) / "model.safetensors"))
    bi = load_file(str(Path(init["real"]) / "model.safetensors"))
    short = name[len("transformer."):]
    assert not torch.equal(gen_w[name], cd[short]) and not torch.equal(ema_w[name], gen_w[name])
    assert not torch.equal(critic_w[name], bi[short])
    assert torch.equal(load_file(str(ref / "model.safetensors"))[short], ema_w[name])  # output = EMA weights

    kill_at = random.Random().randrange(CKPT_EVERY + 1, STEPS - 1)  # a random step after the first checkpoint
    run = tmp_path / "run"
    a = run_child(tmp_path, run, "--kill-at", kill_at)
    assert a.returncode == -signal.SIGKILL, (kill_at, a.stderr[-3000:])
    assert not (run / "metrics.json").exists()
    assert int(latest_checkpoint(run).name.split("_")[1]) == kill_at // CKPT_EVERY * CKPT_EVERY
    b = run_child(tmp_path, run, "--resume")
    assert b.returncode == 0, (kill_at, b.stderr[-3000:])

    assert history(run) == hist, f"kill_at={kill_at}"
    w_ref, w_got = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert w_ref.keys() == w_got.keys() and all(torch.equal(w_ref[k], w_got[k]) for k in w_ref), kill_at
    final_got = dcp_state(latest_checkpoint(run))
    assert sorted(final_got) == keys
    for k in keys:
        r, g = final_ref[k], final_got[k]
        same = torch.equal(r, g) if isinstance(r, torch.Tensor) else r == g
        assert same, (k, kill_at)


def make_dmd(tmp_path, ti2v=False, **params):
    """The DMD object of a prepared stage and a micro-batch of two clips (no trainer)."""
    from minwm.stages import common, dmd
    from minwm.train.data import MicroBatch

    init = make_inputs(tmp_path)
    cfg = dmd_config(tmp_path / "cache", **params)
    cfg["stages"].ti2v = ti2v
    ctx = common.prepare("dmd", cfg, tmp_path / "out", init, False, None)
    data = common.latent_dataset(ctx)
    gen = common.build_model(ctx, "init")
    real = common.build_model(ctx, "real", trainable=False)
    fake = common.build_model(ctx, "fake")
    d = dmd.DMD(gen, real, fake, ctx.params, cfg["inference"].timesteps(), common.Conditioner(ctx, gen, data))
    batch = torch.utils.data.default_collate([data[0], data[1]])
    return d, MicroBatch(batch, torch.tensor([0, 1]), torch.tensor([0, 1]), 0, 0)


def test_dmd_gradient_vanishes_when_fake_equals_real(tmp_path):
    """With the fake score a copy of the real one and no guidance, g = x0_fake - x0_real = 0: the generator's
    loss and gradient are exactly zero, while the critic still gets a flow-matching gradient."""
    d, mb = make_dmd(tmp_path, real_guidance=0.0)
    out = d.generator_loss(mb, 1)
    out["loss"].backward()
    assert float(out["loss"].detach()) == 0.0 and float(out["g_abs"]) == 0.0
    assert any(p.grad is not None for p in d.generator.parameters())  # the exit steps were on the graph ...
    assert all(p.grad is None or not p.grad.any() for p in d.generator.parameters())  # ... with a zero gradient
    c = d.critic_loss(mb, 0)
    c["loss"].backward()
    assert float(c["loss"].detach()) > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.fake.parameters())
    assert all(p.grad is None or not p.grad.any() for p in d.generator.parameters())  # critic rollout: no grad
    # With CFG 3 on the real score the gradient is not zero.
    d.p.real_guidance = 3.0
    assert float(d.generator_loss(mb, 1)["g_abs"]) > 0
    # the same micro-batch gives the same rollout (all noise from its per-sample streams)
    with torch.no_grad():
        assert torch.equal(d.rollout(mb, 2, "x"), d.rollout(mb, 2, "x"))
        assert not torch.equal(d.rollout(mb, 2, "x"), d.rollout(mb, 2, "y"))


@pytest.mark.parametrize("on", [False, True])
def test_dmd_real_score_uncond_branch_stands_still_under_camera_guidance(tmp_path, on):
    """inference.camera_guidance: the real score's CFG branch on the negative prompt sees every frame at the start
    camera (what inference's CFG will do, so the generator learns it); the conditional branch the clip's cameras."""
    d, mb = make_dmd(tmp_path, real_guidance=3.0)
    d.cond.ctx.cfg["inference"].camera_guidance = on
    seen = []
    hook = d.real.register_forward_hook(lambda m, a, kw, out: seen.append(a[3][0].clone()), with_kwargs=True)
    with torch.no_grad():
        d.generator_loss(mb, 1)
    hook.remove()
    cond, uncond = seen
    eye = torch.eye(4, dtype=cond.dtype).expand_as(cond)
    assert not torch.allclose(cond, eye)
    assert torch.equal(uncond, eye) == on and torch.equal(uncond, cond) != on


def test_dmd_image_to_video_holds_the_first_frame(tmp_path):
    d, mb = make_dmd(tmp_path, ti2v=True)
    lat = mb.data["latents"]
    with torch.no_grad():
        x = d.rollout(mb, 3, "x")
    assert torch.equal(x[:, :, :1], lat[:, :, :1]) and not torch.equal(x[:, :, 1:], lat[:, :, 1:])
    out = d.generator_loss(mb, 2)
    out["loss"].backward()
    assert torch.isfinite(out["loss"].detach()) and float(out["g_abs"]) > 0
    assert any(p.grad is not None and p.grad.any() for p in d.generator.parameters())
    assert torch.isfinite(d.critic_loss(mb, 0)["loss"].detach())


def test_dmd_bad_input_fails_before_training(tmp_path):
    from minwm.stages import dmd

    init = make_inputs(tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(MinwmError, match="input 'real' is required"):
        dmd.run(dmd_config(cache), tmp_path / "a", init={"init": init["init"], "fake": init["fake"]})
    with pytest.raises(MinwmError, match="generator_every"):
        dmd_config(cache, generator_every=0)
    with pytest.raises(MinwmError, match="t_min, t_max"):
        dmd_config(cache, t_min=990.0)
    assert not (tmp_path / "a").exists()


if __name__ == "__main__":
    torch.set_num_threads(1)
    child(sys.argv[1:])
