"""minwm sets a short OpenMP spin (GOMP_SPINCOUNT) before torch loads libgomp (long spins cost 3-6x CPU time on a
loaded 2-core machine, sleeping at once costs a third of the streaming speed), unless the user chose a policy."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _policy(extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(PYTHONPATH=str(ROOT), **extra)
    code = "import os, minwm; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_import_sets_a_short_spin():
    assert _policy({}) == "None 10000"


def test_user_choice_wins():
    assert _policy({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE None"
    assert _policy({"GOMP_SPINCOUNT": "1000"}) == "None 1000"
