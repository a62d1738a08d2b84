"""minwm sets a passive OpenMP wait policy before torch loads libgomp (spinning threads cost 3-6x CPU time on a
loaded 2-core machine), unless the user chose one."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _policy(extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(PYTHONPATH=str(ROOT), **extra)
    code = "import os, minwm; print(os.environ.get('OMP_WAIT_POLICY'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_import_sets_passive_wait_policy():
    assert _policy({}) == "PASSIVE"


def test_user_choice_wins():
    assert _policy({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
    assert _policy({"GOMP_SPINCOUNT": "1000"}) == "None"
