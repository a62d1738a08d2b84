"""Batched generation in `minwm eval` (CheckpointRunner.generate_batch) against the per-item path (`generate`:
WorldModel sessions for the streaming samplers), for every sampler, T2V and TI2V: the same videos whatever the
batch composition, in the order given, items of different lengths included."""

import numpy as np
import pytest
import torch
import yaml

from minwm.cameras.actions import actions_to_cameras
from minwm.errors import MinwmError
from minwm.cameras.camera import Cameras
from minwm.eval.checkpoints import CheckpointRunner, GenItem, batches, fixed_cameras, stack_text

from test_eval_suite import SIZE, make_ckpt

torch.set_num_threads(1)

K = (0.85, 0.85, 0.5, 0.5)
STAGES = {"fewstep": "dmd", "multistep": "ar", "bidirectional": "bidirectional"}


def ckpt(root, sampler, ti2v):
    d = make_ckpt(root / f"{sampler}_{ti2v}", stage=STAGES[sampler], seed=3)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["stages"] = {"ti2v": ti2v}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    return d


def items(runner):
    """Three items: two of 5 latent frames (one with the fixed-camera baseline's cameras) around one of 4, with
    their own prompts, seeds and renders."""
    T = runner.wm.temporal_factor
    rng = np.random.default_rng(0)
    out = []
    for L, prog, prompt, seed, fixed in ((5, "w,w,l,l", "a street", 11, False), (4, "d,d,d", "a room", 5, False),
                                         (5, "w,w,l,l", "a street", 11, True)):
        frames = rng.integers(0, 256, (1 + T * (L - 1), SIZE, SIZE, 3), dtype=np.uint8)
        cams = actions_to_cameras(prog, runner.wm.actions_cfg, K)
        out.append(GenItem(frames, fixed_cameras(cams) if fixed else cams, prompt, seed,
                           runner.encode_context(frames)))
    return out


@pytest.mark.parametrize("ti2v", [False, True], ids=["t2v", "ti2v"])
@pytest.mark.parametrize("sampler", ["fewstep", "multistep", "bidirectional"])
def test_generate_batch_equals_generate(tmp_path, sampler, ti2v):
    runner = CheckpointRunner("c", ckpt(tmp_path, sampler, ti2v))
    try:
        assert runner.sampler == sampler and runner.ti2v == ti2v
        its = items(runner)
        batched = runner.generate_batch(its, batch_size=2)
        T = runner.wm.temporal_factor
        for it, video in zip(its, batched):
            alone = runner.generate(it.frames, it.cameras, it.prompt, it.seed, it.context)
            assert video.dtype == np.uint8 and video.shape == alone.shape
            assert video.shape[0] == 1 + T * (len(it.cameras) - 1)
            diff = np.abs(video.astype(int) - alone.astype(int)).max()
            assert diff <= 1, f"item of {len(it.cameras)} latent frames differs by {diff} levels"
            if ti2v and sampler != "bidirectional":
                assert np.array_equal(video[0], it.frames[0])   # the image itself, as WorldModel.reset returns
        # The cameras reach the model (the test would pass trivially if every video were the same).
        n = len(batched[2])
        assert np.abs(batched[0][1:n].astype(int) - batched[2][1:n].astype(int)).max() > 8
    finally:
        runner.close()


def test_batch_size_and_text_stacking(tmp_path):
    runner = CheckpointRunner("c", ckpt(tmp_path, "fewstep", False))
    try:
        a, b = runner._text("x"), runner._text("y")
        assert runner._text("x") is a     # one prepared text per prompt
        s = stack_text([a, b, a])
        assert s.batch == 3 and torch.equal(s.keys[0][2], a.keys[0][0]) and torch.equal(s.values[1][1], b.values[1][0])
        d = stack_text([{"e": torch.zeros(1, 2), "n": None}, {"e": torch.ones(1, 2), "n": None}])
        assert d["e"].shape == (2, 2) and d["n"] is None
    finally:
        runner.close()


def test_batches_group_equal_lengths_in_order():
    def item(L):
        return GenItem(None, Cameras(torch.eye(4).repeat(L, 1, 1), torch.tensor(K)), "p", 0, torch.zeros(1))

    its = [item(L) for L in (5, 4, 5, 5, 9, 4, 5)]
    assert batches(its, 3) == [[0, 2, 3], [6], [1, 5], [4]]
    assert batches(its, 16) == [[0, 2, 3, 6], [1, 5], [4]]
    with pytest.raises(MinwmError, match="batch_size: expected >= 1"):
        batches(its, 0)
