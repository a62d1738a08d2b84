import json

import pytest
import torch
from torch import nn

from minwm.config import parse_config
from minwm.errors import MinwmError
from minwm.train.checkpoint import (capture_rng, latest_checkpoint, read_stage_weights, restore_rng,
                                    write_stage_output)
from minwm.train.data import MicroBatch, StepBatchSampler, epoch_permutation, step_loader
from minwm.train.ema import EMA
from minwm.train.logging import plot_curves
from minwm.train.trainer import TrainConfig, Trainer, resolve_precision

torch.set_num_threads(1)


def test_ema_by_hand():
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema = EMA(m, decay=0.9, start_step=2)
    with torch.no_grad():
        m.weight.fill_(3.0)
    ema.update(m, step=0)  # before start: a copy
    assert ema.module.weight.item() == 3.0
    with torch.no_grad():
        m.weight.fill_(13.0)
    ema.update(m, step=2)  # 0.9 * 3 + 0.1 * 13
    assert ema.module.weight.item() == pytest.approx(4.0)
    assert not ema.module.weight.requires_grad and ema.meta()["num_updates"] == 2
    with pytest.raises(MinwmError):
        EMA(m, decay=1.0)


def test_data_order_is_a_function_of_seed_and_epoch():
    assert torch.equal(epoch_permutation(10, 3, 1), epoch_permutation(10, 3, 1))
    assert not torch.equal(epoch_permutation(10, 3, 1), epoch_permutation(10, 3, 2))
    # 1 rank x 4 micro-batches and 2 ranks x 2 micro-batches cover the same global positions per step
    one = list(StepBatchSampler(8, 4, 0, 1, start_step=3, max_steps=5))
    r0 = list(StepBatchSampler(8, 2, 0, 2, start_step=3, max_steps=5))
    r1 = list(StepBatchSampler(8, 2, 1, 2, start_step=3, max_steps=5))
    assert one[0] == [24, 25] and len(one) == 8
    assert sorted(sum(one[:4], [])) == sorted(sum(r0[:2] + r1[:2], [])) == list(range(24, 32))
    with pytest.raises(MinwmError, match="not divisible"):
        StepBatchSampler(8, 3, 0, 1, 0, 1)
    # resuming at step 3 yields exactly what a run from step 0 yields at step 3
    full = list(StepBatchSampler(8, 4, 0, 1, start_step=0, max_steps=5))
    assert full[12:] == one


def test_loader_maps_positions_through_epoch_permutations():
    data = list(range(5))
    loader = step_loader(data, seed=2, batch_size=4, grad_accum=2, rank=0, world_size=1, start_step=0, max_steps=3)
    got = [(p.tolist(), i.tolist(), d.tolist()) for p, i, d in loader]
    assert [p for p, _, _ in got] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    flat = sum((i for _, i, _ in got), [])
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))  # epochs without repeats
    assert flat[:5] == epoch_permutation(5, 2, 0).tolist() and flat[5:10] == epoch_permutation(5, 2, 1).tolist()


def test_microbatch_randomness_is_per_sample():
    a = MicroBatch(None, torch.tensor([0, 1]), torch.tensor([10, 11]), step=0, seed=4)
    b = MicroBatch(None, torch.tensor([1]), torch.tensor([11]), step=5, seed=4)
    assert torch.equal(a.randn(3)[1], b.randn(3)[0])
    assert not torch.equal(a.randn(3, salt="x")[1], b.randn(3)[0])
    assert a.randint(1000).shape == (2,) and ((a.rand() >= 0) & (a.rand() < 1)).all()
    assert a.randint(1000, 5).shape == (2, 5) and torch.equal(a.randint(1000, 5)[1], b.randint(1000, 5)[0])


def test_rng_capture_restore_roundtrip():
    import random

    import numpy as np
    g = torch.Generator().manual_seed(1)
    st = capture_rng({"g": g})
    first = (torch.rand(2), np.random.rand(), random.random(), torch.rand(1, generator=g))
    restore_rng(st, {"g": g})
    again = (torch.rand(2), np.random.rand(), random.random(), torch.rand(1, generator=g))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and first[2] == again[2]
    assert torch.equal(first[3], again[3])


def test_train_config_section_is_strict():
    cfg = parse_config({"train": {"lr": 1e-4, "batch_size": 16, "grad_accum": 4, "betas": [0.9, 0.999]}})
    assert cfg.train.lr == 1e-4 and cfg.train.betas == [0.9, 0.999]
    with pytest.raises(MinwmError, match="train.lrr"):
        parse_config({"train": {"lrr": 1}})
    with pytest.raises(MinwmError, match="not divisible by grad_accum"):
        parse_config({"train": {"batch_size": 6, "grad_accum": 4}})
    with pytest.raises(MinwmError, match="mixed_precision"):
        parse_config({"train": {"mixed_precision": "fp8"}})
    assert resolve_precision("auto", torch.device("cpu")) == "no"


def test_stage_output_and_plot(tmp_path):
    lin = nn.Linear(2, 2)
    sd = {"w": lin.weight, "tied": lin.weight, "b": lin.bias}  # shared storage must not break safetensors
    hist = [{"step": i + 1, "model/loss": 1.0 / (i + 1), "time": i} for i in range(5)]
    write_stage_output(tmp_path / "out", sd, {"train": TrainConfig(lr=0.5)}, {"history": hist})
    w = read_stage_weights(tmp_path / "out")
    assert torch.equal(w["tied"], lin.weight.detach()) and set(w) == {"w", "tied", "b"}
    assert "lr: 0.5" in (tmp_path / "out" / "config.yaml").read_text()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["history"][4]["step"] == 5
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.yaml", "metrics.json", "model.safetensors"]
    png = plot_curves({"history": hist}, tmp_path / "c.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert plot_curves([], tmp_path / "none.png") is None
    with pytest.raises(MinwmError, match="not found"):
        read_stage_weights(tmp_path / "missing")


class Flat(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.full((2,), float(i))


def test_two_optimisers_dmd_schedule_and_checkpoint_layout(tmp_path):
    gen, critic = nn.Linear(2, 2), nn.Linear(2, 2)
    cfg = TrainConfig(lr=1e-2, batch_size=4, grad_accum=2, max_steps=10, ckpt_every=4, keep_checkpoints=2,
                      ema_decay=0.5, ema_start=3, plot=True, tensorboard=False)
    tr = Trainer(cfg, tmp_path, Flat())
    tr.add("generator", gen, tr.adamw(gen.parameters()), ema=True)
    tr.add("critic", critic, tr.adamw(critic.parameters(), lr=1e-3))
    assert tr.optimizers["critic"].param_groups[0]["lr"] == 1e-3 and tr.micro_batch_size == 2

    def critic_loss(mb):
        with torch.no_grad():
            fake = gen(mb.data)
        return ((critic(fake) - 1) ** 2).mean()

    def gen_loss(mb):
        return {"loss": critic(gen(mb.data)).pow(2).mean(), "extra": torch.tensor(1.0)}

    def step(t, mbs, i):
        out = t.accumulate("critic", mbs, critic_loss)
        if i % 3 == 0:
            out |= t.accumulate("generator", mbs, gen_loss)
        return out

    hist = tr.fit(step)
    steps_g = [r["step"] for r in hist if "generator/loss" in r]
    assert steps_g == [1, 4, 7, 10] and all("critic/loss" in r for r in hist)
    assert hist[0]["generator/extra"] == 1.0
    assert int(tr.optimizers["critic"].state[critic.weight]["step"]) == 10
    assert int(tr.optimizers["generator"].state[gen.weight]["step"]) == 4
    assert tr.emas["generator"].num_updates == 4
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000008", "step_000010"]  # keep 2, final step always saved
    assert latest_checkpoint(tmp_path).name == "step_000010"
    assert (tmp_path / "train_curves.png").is_file()
    meta = json.loads((tmp_path / "checkpoints" / "step_000010" / "trainer_state.json").read_text())
    assert meta["step"] == 10 and meta["epoch"] == 2 and meta["ema"]["generator"]["num_updates"] == 4


def test_forced_bf16_autocast_runs_loss_under_autocast(tmp_path):
    net = nn.Linear(2, 1)
    tr = Trainer(TrainConfig(lr=1e-2, batch_size=4, max_steps=2, ckpt_every=10, mixed_precision="bf16", plot=False,
                             tensorboard=False), tmp_path, Flat())
    tr.add("model", net, tr.adamw(net.parameters()))
    seen = []

    def loss_fn(mb):
        y = net(mb.data)
        seen.append((torch.is_autocast_enabled("cpu"), y.dtype))
        return y.float().pow(2).mean()

    tr.fit(lambda t, mbs, i: t.accumulate("model", mbs, loss_fn))
    assert seen == [(True, torch.bfloat16)] * 2
    assert net.weight.dtype == torch.float32  # master weights stay float32


def test_lr_factor_warmup_then_cosine():
    from minwm.train.trainer import lr_factor

    assert [lr_factor(s, 100, 4) for s in (0, 1, 3, 4, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 100, 4, "cosine", 0.05) == 0.75                          # warm-up first
    assert lr_factor(4, 100, 4, "cosine", 0.05) == pytest.approx(1.0)            # the cosine starts at 1
    assert lr_factor(52, 100, 4, "cosine", 0.05) == pytest.approx(0.525)         # half way: the mean
    assert lr_factor(100, 100, 4, "cosine", 0.05) == pytest.approx(0.05)
    assert lr_factor(500, 100, 4, "cosine", 0.0) == pytest.approx(0.0)           # past the end: the floor
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(lr_decay="linear")
    with pytest.raises(ValueError, match="lr_min_ratio"):
        TrainConfig(lr_min_ratio=1.5)
