"""FSDP2 on CPU (gloo): 2 processes with the same global batch give the same losses as 1 process, and the
2-process checkpoint (DCP, sharded) loads into a 1-process run.

This file is also the torchrun child: `torchrun --nproc_per_node 2 tests/test_train_distributed.py RUN_DIR`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


class Data(torch.utils.data.Dataset):
    def __init__(self, n=20):
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.tanh(self.x @ torch.randn(6, 6, generator=g))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 6)])

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            x = b(x) if i == len(self.blocks) - 1 else torch.nn.functional.gelu(b(x))
        return x


def make_trainer(run_dir, world, max_steps, shard):
    from minwm.train import distributed as D
    from minwm.train.ema import EMA
    from minwm.train.trainer import TrainConfig, Trainer, seed_everything

    seed_everything(0)  # same initial weights on every rank and in every run
    model = Net()
    ema = EMA(model, 0.8)  # before sharding: sharded modules cannot be copied
    if shard:
        D.shard_model(model)
        D.shard_model(ema.module)
    cfg = TrainConfig(lr=1e-2, betas=[0.9, 0.99], batch_size=8, grad_accum=2 // world, max_steps=max_steps,
                      ckpt_every=3, seed=1, plot=False, tensorboard=False, grad_clip=0.5)
    tr = Trainer(cfg, run_dir, Data())
    tr.add("net", model, tr.adamw(model.parameters()), ema=ema)

    def loss_fn(mb):
        x, y = mb.data
        noise = mb.randn(6, salt="noise")  # per sample: independent of how the batch is split
        return {"loss": ((model(x + 0.2 * noise) - y) ** 2).mean()}

    return tr, (lambda t, mbs, i: t.accumulate("net", mbs, loss_fn))


def child(run_dir):
    torch.set_num_threads(1)
    from minwm.train import distributed as D

    info = D.init_distributed(device="cpu")
    try:
        tr, step = make_trainer(run_dir, info.world_size, 6, shard=True)
        assert type(next(tr.modules["net"].parameters())).__name__ == "DTensor"
        tr.fit(step)
        tr.write_output("net", {"world": info.world_size})
    finally:
        D.cleanup()


def metrics(run_dir):
    return json.loads((Path(run_dir) / "metrics.json").read_text())["history"]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_processes_match_one_and_checkpoint_reshards(tmp_path):
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    two = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, str(two)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    h2 = metrics(two)
    assert json.loads((two / "checkpoints" / "step_000006" / "trainer_state.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (two / "checkpoints" / "step_000006" / "rng").iterdir()) == \
        ["rank_00000.pt", "rank_00001.pt"]

    # One process, two micro-batches of 4: the same global batch of 8 per step.
    one = tmp_path / "one"
    tr1, step1 = make_trainer(one, 1, 8, shard=False)
    h1 = tr1.fit(step1)
    assert len(h2) == 6
    for a, b in zip(h1[:6], h2):
        assert a["step"] == b["step"]
        assert abs(a["net/loss"] - b["net/loss"]) <= 1e-5, (a, b)
        assert abs(a["net/grad_norm"] - b["net/grad_norm"]) <= 1e-5, (a, b)
    assert h1[0]["net/loss"] != h1[5]["net/loss"]  # it trained

    # The 2-process (sharded) checkpoint loads into a 1-process run, weights exactly, and training goes on
    # like the 1-process run.
    resumed = tmp_path / "resumed"
    shutil.copytree(two / "checkpoints", resumed / "checkpoints")
    tr3, step3 = make_trainer(resumed, 1, 8, shard=False)
    seen = {}
    original_load = tr3._load

    def load_and_capture(path):
        original_load(path)
        seen.update({k: v.clone() for k, v in tr3.full_state_dict("net").items()})
    tr3._load = load_and_capture
    h3 = tr3.fit(step3, resume=True)
    w2 = load_file(str(two / "model.safetensors"))
    assert seen.keys() == w2.keys() and all(torch.equal(seen[k], w2[k]) for k in w2)
    assert [r["step"] for r in h3] == list(range(1, 9))
    for a, b in zip(h1[6:], h3[6:]):
        assert abs(a["net/loss"] - b["net/loss"]) <= 1e-5, (a, b)
    # EMA weights travelled through the sharded checkpoint too
    e3 = tr3.full_state_dict("net", ema=True)
    e1 = tr1.full_state_dict("net", ema=True)
    assert all(torch.allclose(e3[k], e1[k], atol=1e-5) for k in e1)


if __name__ == "__main__":
    child(sys.argv[1])
