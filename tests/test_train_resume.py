"""Exact resume: a run killed with SIGKILL (mid-step, and inside a checkpoint write) and resumed ends with the
same losses and bitwise-identical weights (model, EMA) as an uninterrupted run. Also the NaN guard.

This file is also the child process: `python tests/test_train_resume.py RUN_DIR [--resume] [--kill-at N]
[--kill-in-save N]`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n=24):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.sin(self.x @ torch.randn(8, 3, generator=g))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def toy_model():
    # dropout draws from the global torch RNG, so an unrestored RNG state would change the losses
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 3))


def toy_cfg(**kw):
    from minwm.train.trainer import TrainConfig
    base = dict(lr=3e-3, betas=[0.9, 0.99], batch_size=8, grad_accum=2, max_steps=STEPS, ckpt_every=5,
                keep_checkpoints=2, log_every=1000, ema_decay=0.9, ema_start=5, seed=7, plot=False,
                tensorboard=False, grad_clip=1.0)
    base.update(kw)
    return TrainConfig(**base)


def child(argv):
    torch.set_num_threads(1)
    import minwm.train.checkpoint as C
    from minwm.train.trainer import Trainer, seed_everything

    run_dir = Path(argv[0])
    resume = "--resume" in argv
    kill_at = int(argv[argv.index("--kill-at") + 1]) if "--kill-at" in argv else -1
    kill_in_save = int(argv[argv.index("--kill-in-save") + 1]) if "--kill-in-save" in argv else -1
    if kill_in_save >= 0:
        real = C.write_json

        def dying_write_json(path, obj, indent=2):
            # trainer_state.json is the last file of a checkpoint, written before the rename
            if Path(path).name == "trainer_state.json" and obj["step"] == kill_in_save:
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, obj, indent)
        C.write_json = dying_write_json

    seed_everything(0)
    model = toy_model()
    trainer = Trainer(toy_cfg(), run_dir, ToyData())
    trainer.add("model", model, trainer.adamw(model.parameters()), ema=True)
    aug = torch.Generator().manual_seed(99)
    trainer.register_generator("aug", aug)

    def loss_fn(mb):
        x = mb.data["x"] + 0.1 * mb.randn(8, salt="noise")
        # every RNG family the checkpoint must restore: a registered generator, numpy, python random
        scale = 1.0 + 0.01 * float(torch.rand((), generator=aug)) + 0.01 * float(np.random.rand()) \
            + 0.01 * random.random()
        return {"loss": ((model(x) * scale - mb.data["y"]) ** 2).mean()}

    def step_fn(tr, mbs, i):
        out = tr.accumulate("model", mbs, loss_fn)
        if i == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-step: after the optimiser step, before the record
        return out

    trainer.fit(step_fn, resume=resume)
    trainer.write_output("model", {"toy": True})
    from safetensors.torch import save_file
    save_file(trainer.full_state_dict("model", ema=True), str(run_dir / "ema.safetensors"))


def run_child(run_dir, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, __file__, str(run_dir), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def losses(run_dir):
    hist = json.loads((Path(run_dir) / "metrics.json").read_text())["history"]
    return [(r["step"], r["model/loss"], r["model/grad_norm"]) for r in hist]


def weights(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def test_kill_and_resume_is_exact(tmp_path):
    from minwm.train.checkpoint import latest_checkpoint, list_checkpoints

    ref = run_child(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]

    kill_at = random.Random().randrange(6, STEPS - 2)  # a random step after the first checkpoint (step 5)
    run = tmp_path / "run"
    a = run_child(run, "--kill-at", kill_at)
    assert a.returncode == -signal.SIGKILL, (kill_at, a.stderr[-3000:])
    assert not (run / "model.safetensors").exists()
    ck = latest_checkpoint(run)
    assert ck is not None and int(ck.name.split("_")[1]) == kill_at // 5 * 5, (kill_at, ck)
    assert len(list_checkpoints(run)) <= 2  # keep_checkpoints

    # Second kill: inside the next checkpoint write (after the DCP files, before the rename).
    save_step = kill_at // 5 * 5 + 5
    b = run_child(run, "--resume", "--kill-in-save", save_step)
    assert b.returncode == -signal.SIGKILL, (kill_at, b.stderr[-3000:])
    assert (run / "checkpoints" / f".step_{save_step:06d}.tmp").is_dir()  # the half-written one
    assert latest_checkpoint(run) == ck  # ... is ignored

    c = run_child(run, "--resume")
    assert c.returncode == 0, (kill_at, c.stderr[-3000:])
    assert "resumed from" in c.stdout
    assert not (run / "checkpoints" / f".step_{save_step:06d}.tmp").exists()

    ref_l, got_l = losses(tmp_path / "ref"), losses(run)
    assert [s for s, _, _ in got_l] == list(range(1, STEPS + 1))
    assert got_l == ref_l, f"kill_at={kill_at}"
    for name in ("model.safetensors", "ema.safetensors"):
        w_ref, w_got = weights(tmp_path / "ref" / name), weights(run / name)
        assert w_ref.keys() == w_got.keys()
        for k in w_ref:
            assert torch.equal(w_ref[k], w_got[k]), (name, k, kill_at)
    # the EMA really differs from the model (it is a separate, checkpointed state)
    assert not torch.equal(weights(run / "ema.safetensors")["0.weight"], weights(run / "model.safetensors")["0.weight"])


def test_resume_refuses_a_changed_batch_and_a_reused_dir(tmp_path):
    from minwm.errors import MinwmError
    from minwm.train.trainer import Trainer

    torch.set_num_threads(1)
    model = toy_model()
    tr = Trainer(toy_cfg(max_steps=5, grad_accum=1), tmp_path, ToyData())
    tr.add("model", model, tr.adamw(model.parameters()))
    tr.fit(lambda t, mbs, i: t.accumulate("model", mbs, lambda mb: (model(mb.data["x"]) ** 2).mean()))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000005"
    tr2 = Trainer(toy_cfg(max_steps=5, grad_accum=1), tmp_path, ToyData())
    tr2.add("model", model, tr2.adamw(model.parameters()))
    with pytest.raises(MinwmError, match="already holds checkpoints"):
        tr2.fit(lambda t, mbs, i: {})
    tr3 = Trainer(toy_cfg(max_steps=8, batch_size=4, grad_accum=1), tmp_path, ToyData())
    tr3.add("model", model, tr3.adamw(model.parameters()))
    with pytest.raises(MinwmError, match="batch_size was 8 and is now 4"):
        tr3.fit(lambda t, mbs, i: {}, resume=True)


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    from minwm.train.checkpoint import latest_checkpoint
    from minwm.train.trainer import NonFiniteError, Trainer

    torch.set_num_threads(1)
    model = toy_model()
    tr = Trainer(toy_cfg(max_steps=20, ckpt_every=4, ema_decay=None), tmp_path, ToyData())
    tr.add("model", model, tr.adamw(model.parameters()))

    def loss_fn(mb):
        loss = ((model(mb.data["x"]) - mb.data["y"]) ** 2).mean()
        return {"loss": loss * float("nan") if tr.current_step == 9 else loss, "aux": loss.detach()}

    with pytest.raises(NonFiniteError) as err:
        tr.fit(lambda t, mbs, i: t.accumulate("model", mbs, loss_fn))
    msg = str(err.value)
    assert "step 10" in msg and "'model/loss'" in msg and "nan" in msg and "step_000008" in msg
    assert "\n" not in msg
    good = latest_checkpoint(tmp_path)
    assert good.name == "step_000008"
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step never reached the weights

    # An inf gradient with a finite loss is caught too (by the gradient norm), naming the module.
    model2 = toy_model()
    tr2 = Trainer(toy_cfg(max_steps=3, ema_decay=None), tmp_path / "b", ToyData())
    tr2.add("net", model2, tr2.adamw(model2.parameters()))
    w_before = [p.detach().clone() for p in model2.parameters()]
    # a hook that turns the first layer's gradient into inf while the loss stays finite
    model2[0].weight.register_hook(lambda g: g * float("inf"))

    def step_fn(t, mbs, i):
        return t.accumulate("net", mbs, lambda mb: (model2(mb.data["x"]) ** 2).mean())
    with pytest.raises(NonFiniteError, match="step 1: gradient norm of 'net' is (inf|nan)"):
        tr2.fit(step_fn)
    assert all(torch.equal(a, b) for a, b in zip(w_before, model2.parameters()))


if __name__ == "__main__":
    child(sys.argv[1:])
