"""Config section `stages`: the settings all stages share plus one strict subsection per stage.

    stages:
      latents: data/toy/latents        # the latent cache every DiT stage trains on (`minwm data encode`)
      latent_frames: 6                 # use the first N latent frames of each clip (null: all)
      bidirectional:                   # = that stage's Params fields ...
        text_dropout: 0.1
        train: {max_steps: 300, lr: 1.0e-4}   # ... plus overrides of the global `train` section
      ar:
        train: {max_steps: 300}

Each subsection's class is built from the registry: the stage module's `Params` dataclass plus a `train` field
whose class has every TrainConfig field as optional. So a stage author adds hyper-parameters to their own Params
and never edits this file. The effective training settings of stage S are

    TrainConfig defaults < the global `train` section < S's TRAIN_DEFAULTS (reference values that differ,
    e.g. ode's betas (0.9, 0.999)) < `stages.S.train` in the YAML

(`stage_train_config`); an unknown key anywhere is a one-line error at load time.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from minwm.errors import MinwmError
from minwm.stages import STAGES, is_available, stage_module


def _optional(tp: Any) -> Any:
    return tp if type(None) in typing.get_args(tp) else Optional[tp]


def _train_overrides_class(stage: str, defaults: dict[str, Any]) -> type:
    """A dataclass with every TrainConfig field optional (None: keep the global value), defaulting to the
    stage's reference values."""
    from minwm.train.trainer import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(defaults) - names)
    if unknown:
        raise MinwmError(f"stage {stage!r}: TRAIN_DEFAULTS names unknown train setting {unknown[0]!r}")
    fields = []
    for f in dataclasses.fields(TrainConfig):
        d = defaults.get(f.name)
        dflt = field(default_factory=lambda d=d: list(d)) if isinstance(d, (list, tuple)) else field(default=d)
        fields.append((f.name, _optional(hints[f.name]), dflt))
    cls_name = "".join(p.capitalize() for p in stage.replace("-", "_").split("_")) + "TrainOverrides"
    return dataclasses.make_dataclass(cls_name, fields, namespace={"__module__": __name__})


def _stage_section_class(stage: str, module) -> Optional[type]:
    params = getattr(module, "Params", None)
    if params is None:
        return None
    if not dataclasses.is_dataclass(params):
        raise MinwmError(f"stage {stage!r}: Params must be a dataclass")
    if "train" in {f.name for f in dataclasses.fields(params)}:
        raise MinwmError(f"stage {stage!r}: Params may not define 'train' (reserved for train overrides)")
    overrides = _train_overrides_class(stage, dict(getattr(module, "TRAIN_DEFAULTS", {}) or {}))
    cls_name = "".join(p.capitalize() for p in stage.replace("-", "_").split("_")) + "StageConfig"
    # A subclass of Params (so isinstance and its methods / __post_init__ still work) with `train` added.
    return dataclasses.make_dataclass(cls_name, [("train", overrides, field(default_factory=overrides))],
                                      bases=(params,), namespace={"__module__": __name__})


@dataclass
class _Shared:
    # The latent cache folder the DiT stages train on (written by `minwm data encode`).
    latents: Optional[str] = None
    # Train on the first N latent frames of every clip (null: all of them). Ar-style stages need a multiple
    # of model.chunk_frames.
    latent_frames: Optional[int] = None
    # Image-to-video training (HunyuanVideo-1.5 TI2V): latent frame 0 is the condition, held clean at t = 0,
    # given as image_latents to adapters with condition channels, and left out of every loss.
    ti2v: bool = False
    # torch CPU threads for training (0: leave torch's default).
    threads: int = 0

    def __post_init__(self):
        if self.latent_frames is not None and self.latent_frames < 1:
            raise ValueError(f"latent_frames: expected >= 1 or null, got {self.latent_frames}")
        if self.threads < 0:
            raise ValueError(f"threads: expected >= 0, got {self.threads}")


def _build() -> type:
    fields = []
    for name in STAGES:
        if not is_available(name):
            continue  # not written yet: `stages.<name>` is then an unknown key
        cls = _stage_section_class(name, stage_module(name))
        if cls is not None:
            fields.append((name.replace("-", "_"), cls, field(default_factory=cls)))
    return dataclasses.make_dataclass("StagesConfig", fields, bases=(_Shared,), namespace={"__module__": __name__})


StagesConfig = _build()


def attr_name(stage: str) -> str:
    """The field of StagesConfig for a stage ('ode-data' -> 'ode_data'); YAML uses the same spelling."""
    return stage.replace("-", "_")


def stage_params(cfg, stage: str):
    """The stage's section (its Params plus `.train` overrides), or None for a stage without Params."""
    return getattr(cfg["stages"], attr_name(stage), None)


def stage_train_config(cfg, stage: str, max_steps: Optional[int] = None):
    """The TrainConfig stage `stage` runs with (precedence in the module docstring); one-line error on a
    combination TrainConfig rejects."""
    params = stage_params(cfg, stage)
    over = {} if params is None else {k: v for k, v in dataclasses.asdict(params.train).items() if v is not None}
    if max_steps is not None:
        over["max_steps"] = max_steps
    try:
        return dataclasses.replace(cfg["train"], **over)
    except (TypeError, ValueError) as e:
        raise MinwmError(f"{getattr(cfg, 'path', '<config>')}: stages.{attr_name(stage)}.train: {e}") from None
