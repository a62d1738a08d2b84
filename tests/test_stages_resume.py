"""Exact resume of a stage: `bidirectional` trained 40 steps uninterrupted equals a run SIGKILLed at a random step
after a checkpoint and resumed to 40 (losses of every step and the final weights, bitwise on the CPU).

This file is also the child process: `python tests/test_stages_resume.py CACHE OUT [--resume] [--kill-at N]`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, CKPT = 40, 5


def child(argv: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from stages_helpers import tiny_config

    from minwm.stages import bidirectional
    from minwm.train.trainer import Trainer

    cache, out = Path(argv[0]), Path(argv[1])
    kill_at = int(argv[argv.index("--kill-at") + 1]) if "--kill-at" in argv else -1
    if kill_at >= 0:
        original = Trainer.accumulate

        def accumulate(self, *a, **kw):
            values = original(self, *a, **kw)
            if self.current_step == kill_at:  # after the optimiser step, before the step is recorded
                os.kill(os.getpid(), signal.SIGKILL)
            return values
        Trainer.accumulate = accumulate
    cfg = tiny_config(cache, steps=STEPS, ckpt_every=CKPT, bidirectional={"text_dropout": 0.2})
    bidirectional.run(cfg, out, resume="--resume" in argv)


def run_child(cache: Path, out: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    return subprocess.run([sys.executable, __file__, str(cache), str(out), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bidirectional_kill_and_resume_is_exact(tmp_path):
    import torch
    from safetensors.torch import load_file
    from stages_helpers import make_cache

    from minwm.train.checkpoint import latest_checkpoint

    cache = make_cache(tmp_path / "cache")
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = run_child(cache, ref)
    assert r.returncode == 0, r.stderr[-3000:]
    kill_at = random.Random().randrange(CKPT + 1, STEPS - 2)  # a random step after the first checkpoint
    a = run_child(cache, run, "--kill-at", kill_at)
    assert a.returncode == -signal.SIGKILL, (kill_at, a.stderr[-3000:])
    assert not (run / "metrics.json").exists()
    ck = latest_checkpoint(run)
    assert ck is not None and int(ck.name.split("_")[1]) == kill_at // CKPT * CKPT, (kill_at, ck)
    b = run_child(cache, run, "--resume")
    assert b.returncode == 0, (kill_at, b.stderr[-3000:])

    h_ref = json.loads((ref / "metrics.json").read_text())["history"]
    h_got = json.loads((run / "metrics.json").read_text())["history"]
    assert len(h_ref) == len(h_got) == STEPS
    assert [h["model/loss"] for h in h_got] == [h["model/loss"] for h in h_ref], f"kill_at={kill_at}"
    assert len({h["model/loss"] for h in h_ref}) > STEPS // 2  # the losses really differ step to step
    w_ref, w_got = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert w_ref.keys() == w_got.keys()
    for k in w_ref:
        assert torch.equal(w_ref[k], w_got[k]), (k, kill_at)


if __name__ == "__main__":
    child(sys.argv[1:])
