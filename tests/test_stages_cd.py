"""The `cd` stage: the consistency pair / target on hand-checkable tensors, and end to end on a tiny Wan and a
tiny latent cache: exact resume after SIGKILL (losses, the student, its EMA target and the optimiser bitwise equal
to an uninterrupted run), bad input, and the student sampling in 4 steps chunk by chunk with the KV cache.

This file is also the child process of the resume test: `python tests/test_stages_cd.py ROOT RUN [--resume]
[--kill-at N]`.
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
from stages_helpers import dcp_state as checkpoint_state, history, tiny_config  # noqa: E402
from test_stages_ode import make_teacher, sample_few_step  # noqa: E402

from minwm.errors import MinwmError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40
CKPT_EVERY = 5
torch.set_num_threads(1)


def cd_config(cache, steps=STEPS, **cd):
    # Toy scaling: an 8-step CD grid (reference 48) and lr 1e-4 (reference 2e-6) so 40 steps move the weights.
    return tiny_config(cache, steps=steps, ckpt_every=CKPT_EVERY, cd={"grid_steps": 8, "train": {"lr": 1e-4}, **cd})


# ---- pure parts ---------------------------------------------------------------------------------------------

def test_frame_sigmas_same_t_for_every_frame():
    from minwm.stages.cd import frame_sigmas

    sig = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    s_t, s_n = frame_sigmas(torch.tensor([0, 2]), sig, 3)
    assert s_t.tolist() == [[1.0] * 3, [0.5] * 3] and s_n.tolist() == [[0.75] * 3, [0.25] * 3]
    s_t, s_n = frame_sigmas(torch.tensor([1]), sig, 3, n_clean=1)  # TI2V: the condition frame stays clean
    assert s_t.tolist() == [[0.0, 0.75, 0.75]] and s_n.tolist() == [[0.0, 0.5, 0.5]]
    with pytest.raises(MinwmError):
        frame_sigmas(torch.tensor([3]), sig, 3)  # t' = t_{i+1} must exist


def test_cd_target_by_hand():
    from minwm.stages.cd import cd_loss, cd_target

    # One sample, one frame, C = H = W = 1: x_t = 2 at sigma .5, next sigma .25.
    x_t = torch.tensor(2.0).reshape(1, 1, 1, 1, 1)
    s_t, s_n = torch.tensor([[0.5]], dtype=torch.float64), torch.tensor([[0.25]], dtype=torch.float64)
    seen = {}

    def teacher_c(x, s):
        return torch.full_like(x, 3.0)

    def teacher_u(x, s):
        return torch.full_like(x, 1.0)

    def target(x, s):
        seen["x"], seen["s"] = x.clone(), s.clone()
        return x * 2  # v = 2 x at the next state

    w = torch.nn.Parameter(torch.tensor(1.0))
    out = cd_target(x_t, s_t, s_n, teacher_cond=lambda x, s: teacher_c(x, s) * w, teacher_uncond=teacher_u,
                    target=target, guidance=3.0)
    # v = 1 + 3 (3 - 1) = 7; x_t' = 2 - (0.5 - 0.25) 7 = 0.25; x0 = 0.25 - 0.25 (2 x 0.25) = 0.125
    assert seen["x"].item() == 0.25 and seen["s"].item() == 0.25
    assert out.item() == 0.125 and not out.requires_grad  # no gradient into the teacher or the target
    # guidance 1 (or no unconditional branch): the conditional teacher alone, v = 3 -> x_t' = 1.25, x0 = 0.625
    assert cd_target(x_t, s_t, s_n, teacher_cond=teacher_c, teacher_uncond=teacher_u, target=target,
                     guidance=1.0).item() == 0.625
    assert cd_target(x_t, s_t, s_n, teacher_cond=teacher_c, teacher_uncond=None, target=target,
                     guidance=3.0).item() == 0.625
    # the loss: plain MSE over the noisy frames, gradient only into the student's prediction
    pred = torch.tensor([[[[[0.0]], [[1.0]]]]], requires_grad=True)  # [1, 1, 2, 1, 1]
    tgt = torch.tensor([[[[[5.0]], [[3.0]]]]], requires_grad=True)
    loss = cd_loss(pred, tgt, n_clean=1)
    assert loss.item() == 4.0
    loss.backward()
    assert pred.grad.flatten().tolist() == [0.0, -4.0] and tgt.grad is None


# ---- the stage end to end -----------------------------------------------------------------------------------

def child(argv):
    from minwm.train.trainer import Trainer

    from minwm.stages import cd

    root, run = Path(argv[0]), Path(argv[1])
    kill_at = int(argv[argv.index("--kill-at") + 1]) if "--kill-at" in argv else -1
    real = Trainer.accumulate

    def accumulate(self, name, mbs, loss_fn):
        out = real(self, name, mbs, loss_fn)
        if self.current_step == kill_at:  # mid-step: after the optimiser and EMA updates, before the record
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    Trainer.accumulate = accumulate
    teacher = make_teacher(root)
    cd.run(cd_config(root / "cache"), run, init={"init": teacher, "teacher": teacher}, resume="--resume" in argv)


def run_child(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, __file__, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("on", [False, True])
def test_cd_teacher_uncond_branch_stands_still_under_camera_guidance(tmp_path, on):
    """inference.camera_guidance: the CFG teacher's branch on the negative prompt sees every frame at the start
    camera (as inference's CFG will), the conditional teacher, the target and the student the clip's cameras."""
    from minwm.stages import cd, common
    from minwm.train.data import MicroBatch

    teacher = make_teacher(tmp_path)
    cfg = cd_config(tmp_path / "cache")
    cfg["inference"].camera_guidance = on
    ctx = common.prepare("cd", cfg, tmp_path / "out", {"init": teacher, "teacher": teacher}, False, None)
    data = common.latent_dataset(ctx)
    student = common.build_model(ctx, "init")
    tm = common.build_model(ctx, "teacher", trainable=False)
    obj = cd.CD(student, common.build_model(ctx, "init", trainable=False), tm, ctx.params,
                common.Conditioner(ctx, student, data, need_negative=True))
    seen = []
    hook = tm.register_forward_hook(lambda m, a, kw, out: seen.append(a[3][0].clone()), with_kwargs=True)
    batch = torch.utils.data.default_collate([data[0], data[1]])
    with torch.no_grad():
        obj.loss(MicroBatch(batch, torch.tensor([0, 1]), torch.tensor([0, 1]), 0, 0))
    hook.remove()
    cond, uncond = seen
    eye = torch.eye(4, dtype=cond.dtype).expand_as(cond)
    assert not torch.allclose(cond, eye)
    assert torch.equal(uncond, eye) == on and torch.equal(uncond, cond) != on


def test_cd_resumes_exactly_after_sigkill_and_samples(tmp_path):
    from safetensors.torch import load_file

    from minwm.stages import cd
    from minwm.train.checkpoint import latest_checkpoint

    teacher = make_teacher(tmp_path)
    init = {"init": teacher, "teacher": teacher}
    ref = tmp_path / "ref"
    assert cd.run(cd_config(tmp_path / "cache"), ref, init=init) == ref
    for f in ("model.safetensors", "model_config.json", "config.yaml", "metrics.json"):
        assert (ref / f).is_file(), f
    hist = history(ref)
    assert [r["step"] for r in hist] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r["student/loss"])) for r in hist)
    assert len({r["student/t"] for r in hist}) > 5  # the grid index is drawn per sample and step
    metrics = json.loads((ref / "metrics.json").read_text())
    assert metrics["complete"] is True and metrics["weights"] == "model" and metrics["target"] == "ema"

    final = checkpoint_state(latest_checkpoint(ref))
    keys = sorted(final)
    for want in ("/modules/student/", "/ema/student/", "/optimizers/student/"):
        assert any(k.startswith(want) for k in keys), want
    name = "transformer.blocks.0.attn1.to_q.weight"
    start = load_file(str(Path(teacher) / "model.safetensors"))[name[len("transformer."):]]
    student, target = final[f"/modules/student/{name}"], final[f"/ema/student/{name}"]
    assert not torch.equal(student, start) and not torch.equal(target, start) and not torch.equal(target, student)
    # the target trails the student: an EMA with decay 0.99 has moved about 1 - 0.99^40 = 33% of the way
    assert (target - start).norm() < (student - start).norm()
    assert torch.equal(load_file(str(ref / "model.safetensors"))[name[len("transformer."):]], student)

    kill_at = random.Random().randrange(CKPT_EVERY + 1, STEPS - 1)  # a random step after the first checkpoint
    run = tmp_path / "run"
    a = run_child(tmp_path, run, "--kill-at", kill_at)
    assert a.returncode == -signal.SIGKILL, (kill_at, a.stderr[-3000:])
    assert not (run / "metrics.json").exists()
    assert int(latest_checkpoint(run).name.split("_")[1]) == kill_at // CKPT_EVERY * CKPT_EVERY
    cd.run(cd_config(tmp_path / "cache"), run, init=init, resume=True)  # in-process (one interpreter start less)

    assert history(run) == hist, f"kill_at={kill_at}"
    w_ref, w_got = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert w_ref.keys() == w_got.keys() and all(torch.equal(w_ref[k], w_got[k]) for k in w_ref), kill_at
    got = checkpoint_state(latest_checkpoint(run))
    assert sorted(got) == keys
    for k in keys:
        same = torch.equal(final[k], got[k]) if isinstance(final[k], torch.Tensor) else final[k] == got[k]
        assert same, (k, kill_at)

    sample_few_step(ref, tmp_path / "cache")


def test_cd_bad_input_fails_before_training(tmp_path):
    from minwm.stages import cd

    teacher = make_teacher(tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(MinwmError, match="input 'teacher' is required"):
        cd.run(cd_config(cache), tmp_path / "a", init={"init": teacher})
    with pytest.raises(MinwmError, match="ema_decay"):
        cd.run(cd_config(cache, train={"ema_decay": None, "lr": 1e-4}), tmp_path / "b",
               init={"init": teacher, "teacher": teacher})
    with pytest.raises(MinwmError, match="grid_steps"):
        cd_config(cache, grid_steps=1)
    cfg = cd_config(cache)
    cfg["stages"].latent_frames = 3  # not a multiple of the chunk
    with pytest.raises(MinwmError, match="chunk_frames"):
        cd.run(cfg, tmp_path / "c", init={"init": teacher, "teacher": teacher})
    assert not any((tmp_path / d / "metrics.json").exists() for d in "abc")


if __name__ == "__main__":
    torch.set_num_threads(1)
    child(sys.argv[1:])
