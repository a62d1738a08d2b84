"""Training stages: one module per stage, each turning (config, input checkpoints) into a checkpoint directory.

STAGES maps a stage name (what `minwm train STAGE` and a recipe's `stages:` list take) to its module. Every
stage module exposes

    INPUTS: dict[str, str]       input name -> the stage(s) whose output it takes ("cd|ode": either); {} for none
    Params                       a dataclass of the stage's own hyper-parameters (all fields with defaults);
                                 it becomes config section `stages.<name>` (see stages/config.py)
    TRAIN_DEFAULTS: dict         optional: reference `train` values that differ from the global train section
    run(cfg, out_dir, *, init: dict[str, str] | None, resume: bool, max_steps: int | None) -> Path

How to write one: see the docstring of minwm/stages/common.py.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from minwm.errors import MinwmError

# Pipeline order (a recipe lists a subsequence of it; ode and cd are the two Stage-2 paths).
STAGES: dict[str, str] = {
    "vae": "minwm.stages.vae",
    "bidirectional": "minwm.stages.bidirectional",
    "ar": "minwm.stages.ar",
    "ode-data": "minwm.stages.ode_data",
    "ode": "minwm.stages.ode",
    "cd": "minwm.stages.cd",
    "dmd": "minwm.stages.dmd",
}


def check_name(name: str, where: str = "stage") -> str:
    if name not in STAGES:
        raise MinwmError(f"{where}: unknown stage {name!r} (expected one of: {', '.join(STAGES)})")
    return name


def is_available(name: str) -> bool:
    """Whether the stage's module exists (stages are written by different people; a missing one is reported
    when it is used, never when the config is parsed)."""
    return importlib.util.find_spec(STAGES[check_name(name)]) is not None


def stage_module(name: str) -> ModuleType:
    check_name(name)
    if not is_available(name):
        raise MinwmError(f"stage {name!r}: not implemented in this version ({STAGES[name]} is missing)")
    return importlib.import_module(STAGES[name])


def stage_inputs(name: str) -> dict[str, str]:
    """Input name -> accepted producing stages, e.g. {"init": "ar", "teacher": "ar"} (empty for none)."""
    return dict(getattr(stage_module(name), "INPUTS", {}) or {})


def producers(spec: str) -> list[str]:
    """'cd|ode' -> ['cd', 'ode']."""
    return [s.strip() for s in spec.split("|") if s.strip()]
