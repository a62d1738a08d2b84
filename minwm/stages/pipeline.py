"""The recipe runner: an ordered list of stages, one output directory each, resumable at any point.

A recipe (YAML):

    config: ../configs/toy.yaml      # relative to the recipe file (or the working directory)
    name: toy                        # outputs go to RUNS/toy/<stage>/ (RUNS: `runs:` below, default "runs")
    overrides: {train: {seed: 1}}    # optional config overrides for every stage
    data: ../data/toy/clips          # optional: clips to encode into stages.latents before the first DiT stage
                                     # (with the VAE the recipe trained, or codec.vae; resumes shard by shard)
    stages:                          # a subsequence of: vae bidirectional ar ode-data ode cd dmd
      - bidirectional
      - ar: {train: {max_steps: 300}}          # per-stage config overrides (only for this stage)
      - cd
      - dmd: {inputs: {real: /path/to/other/bidirectional}}   # an input from outside the recipe

Each input of a stage comes from the latest earlier recipe stage that can produce it (ar's "init" <- the
bidirectional stage, dmd's "init" <- cd or ode, ...) unless `inputs:` names a stage of the recipe or a directory.
When the recipe trains the VAE, later stages get codec.vae = its output (unless the config sets one).

Everything is checked before any training starts (unknown stage or key, a config typo under any stage's
overrides, an input that nothing produces, an input checkpoint of another architecture). Then each stage runs
into RUNS/NAME/STAGE/: a stage whose metrics.json is complete is skipped, an interrupted one resumes from its
latest trainer checkpoint (exact), so re-running a killed pipeline continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from minwm.config import SECTIONS, _deep_merge, load_config
from minwm.errors import MinwmError
from minwm.stages import STAGES, producers, stage_inputs, stage_module
from minwm.stages import common

RECIPE_KEYS = ("config", "name", "runs", "overrides", "stages", "data")


@dataclass
class Step:
    stage: str
    overrides: dict = field(default_factory=dict)     # config overlay for this stage only
    inputs: dict = field(default_factory=dict)        # input name -> recipe stage name or directory (as written)
    resolved: dict = field(default_factory=dict)      # input name -> directory
    out_dir: Optional[Path] = None
    cfg: Any = None


@dataclass
class Recipe:
    path: Path
    config: Path
    name: str
    runs: Path
    overrides: dict
    steps: list[Step]
    data: Optional[Path] = None

    @property
    def run_dir(self) -> Path:
        return self.runs / self.name


def _resolve_path(value: str, base: Path) -> Path:
    p = Path(value)
    if p.is_absolute():
        return p
    return base / p if (base / p).exists() else p


def read_recipe(path: str | Path, runs: Optional[str | Path] = None) -> Recipe:
    """Parse and check a recipe file's structure (one-line errors naming the file and the key)."""
    path = Path(path)
    if not path.is_file():
        raise MinwmError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MinwmError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise MinwmError(f"{path}: expected a mapping with keys {', '.join(RECIPE_KEYS)}")
    unknown = sorted(set(raw) - set(RECIPE_KEYS))
    if unknown:
        raise MinwmError(f"{path}: {unknown[0]}: unknown key (expected one of: {', '.join(RECIPE_KEYS)})")
    for key in ("config", "name", "stages"):
        if key not in raw:
            raise MinwmError(f"{path}: {key}: required")
    if not isinstance(raw["config"], str):
        raise MinwmError(f"{path}: config: expected a path string")
    name = raw["name"]
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise MinwmError(f"{path}: name: expected a plain directory name, got {name!r}")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise MinwmError(f"{path}: overrides: expected a mapping of config sections")
    _check_sections(overrides, f"{path}: overrides")
    if not isinstance(raw["stages"], list) or not raw["stages"]:
        raise MinwmError(f"{path}: stages: expected a non-empty list of stage names")
    steps, seen = [], set()
    for i, entry in enumerate(raw["stages"]):
        where = f"{path}: stages[{i}]"
        if isinstance(entry, str):
            stage, extra = entry, {}
        elif isinstance(entry, dict) and len(entry) == 1:
            stage, extra = next(iter(entry.items()))
            extra = extra or {}
            if not isinstance(extra, dict):
                raise MinwmError(f"{where}: {stage}: expected a mapping of overrides")
        else:
            raise MinwmError(f"{where}: expected a stage name or {{stage: {{overrides}}}}")
        if stage not in STAGES:
            raise MinwmError(f"{where}: unknown stage {stage!r} (expected one of: {', '.join(STAGES)})")
        if stage in seen:
            raise MinwmError(f"{where}: stage {stage!r} listed twice")
        seen.add(stage)
        extra = dict(extra)
        inputs = extra.pop("inputs", {}) or {}
        if not isinstance(inputs, dict):
            raise MinwmError(f"{where}: {stage}.inputs: expected a mapping input -> stage or directory")
        _check_sections(extra, f"{where}: {stage}")
        steps.append(Step(stage, extra, {str(k): str(v) for k, v in inputs.items()}))
    order = list(STAGES)
    for a, b in zip(steps, steps[1:]):
        if order.index(a.stage) > order.index(b.stage):
            raise MinwmError(f"{path}: stages: {b.stage!r} cannot run after {a.stage!r} (order: {', '.join(STAGES)})")
    base = path.parent
    runs_dir = Path(runs) if runs is not None else _resolve_runs(raw.get("runs"), base)
    data = raw.get("data")
    if data is not None and not isinstance(data, str):
        raise MinwmError(f"{path}: data: expected a clip folder path, got {data!r}")
    return Recipe(path, _resolve_path(raw["config"], base), name, runs_dir, overrides, steps,
                  _resolve_path(data, base) if data else None)


def _resolve_runs(value: Any, base: Path) -> Path:
    if value is None:
        return Path("runs")
    if not isinstance(value, str):
        raise MinwmError(f"runs: expected a directory path, got {value!r}")
    return Path(value)


def _check_sections(overlay: dict, where: str) -> None:
    unknown = sorted(set(overlay) - set(SECTIONS))
    if unknown:
        raise MinwmError(f"{where}: {unknown[0]}: unknown key (expected inputs or a config section: "
                         f"{', '.join(sorted(SECTIONS))})")


def plan(recipe: Recipe) -> list[Step]:
    """Resolve every stage's config (strictly) and inputs before anything runs."""
    done: dict[str, Path] = {}
    vae_dir: Optional[Path] = None
    for step in recipe.steps:
        stage_module(step.stage)  # a stage not implemented in this version fails here, before training
        step.out_dir = recipe.run_dir / step.stage
        overlay = _deep_merge(recipe.overrides, step.overrides)
        cfg = load_config(recipe.config, overlay)
        if vae_dir is not None and cfg["codec"].vae is None:  # the VAE this recipe trains
            cfg["codec"] = dataclasses.replace(cfg["codec"], vae=str(vae_dir))
        step.cfg = cfg
        wanted = stage_inputs(step.stage)
        unknown = sorted(set(step.inputs) - set(wanted))
        if unknown:
            raise MinwmError(f"{recipe.path}: {step.stage}.inputs.{unknown[0]}: unknown input (expected one of: "
                             f"{', '.join(wanted) or 'none'})")
        for key, spec in wanted.items():
            given = step.inputs.get(key)
            if given is not None and given in STAGES:
                if given not in done:
                    raise MinwmError(f"{recipe.path}: {step.stage}.inputs.{key}: stage {given!r} does not run "
                                     f"before {step.stage!r} in this recipe")
                step.resolved[key] = done[given]
            elif given is not None:
                p = _resolve_path(given, recipe.path.parent)
                if not common.is_complete(p):
                    raise MinwmError(f"{p}: {step.stage}.inputs.{key}: not a finished stage output")
                step.resolved[key] = p
            else:
                src = next((s for s in reversed(list(done)) if s in producers(spec)), None)
                if src is None:
                    raise MinwmError(f"{recipe.path}: stage {step.stage!r} needs input {key!r} from "
                                     f"{' or '.join(producers(spec))}, which no earlier stage of the recipe "
                                     f"produces (add it, or set {step.stage}: {{inputs: {{{key}: DIR}}}})")
                step.resolved[key] = done[src]
        # The architecture of inputs that exist already (from outside, or earlier finished runs).
        for key in common.model_inputs(step.stage):
            p = step.resolved[key]
            if common.is_complete(p) or p not in done.values():
                common.check_checkpoint_matches(p, cfg["model"], f"input {key!r} of stage {step.stage}")
        from minwm.stages.config import stage_train_config
        stage_train_config(cfg, step.stage)
        done[step.stage] = step.out_dir
        if step.stage == "vae":
            vae_dir = step.out_dir
    return recipe.steps


def run_stage(stage: str, cfg: Any, out_dir: Path, init: Optional[dict[str, str]] = None, resume: bool = False,
              max_steps: Optional[int] = None) -> Path:
    """Call a stage module's run(); stages without inputs (vae) may not take `init`."""
    module = stage_module(stage)
    kw: dict[str, Any] = {"resume": resume, "max_steps": max_steps}
    if "init" in inspect.signature(module.run).parameters:
        kw["init"] = {k: str(v) for k, v in (init or {}).items()} or None
    elif init:
        raise MinwmError(f"stage {stage}: takes no input checkpoints")
    return Path(module.run(cfg, out_dir, **kw))


def run_pipeline(recipe_path: str | Path, *, start: Optional[str] = None, until: Optional[str] = None,
                 fresh: bool = False, runs: Optional[str | Path] = None, echo=print) -> list[Path]:
    recipe = read_recipe(recipe_path, runs)
    names = [s.stage for s in recipe.steps]
    for flag, value in (("--from", start), ("--until", until)):
        if value is not None and value not in names:
            raise MinwmError(f"{flag} {value}: not a stage of {recipe.path} ({', '.join(names)})")
    steps = plan(recipe)
    i0 = names.index(start) if start else 0
    i1 = names.index(until) + 1 if until else len(names)
    if i0 >= i1:
        raise MinwmError(f"--from {start} comes after --until {until}")
    selected = steps[i0:i1]
    for step in steps[:i0]:
        if not common.is_complete(step.out_dir):
            raise MinwmError(f"{step.out_dir}: stage {step.stage} has not finished; run it first (or drop --from)")
    for step in selected:
        for key, p in step.resolved.items():
            if p not in [s.out_dir for s in selected] and not common.is_complete(p):
                raise MinwmError(f"{p}: input {key!r} of stage {step.stage} has not finished")
    if fresh:
        for step in selected:
            if step.out_dir.exists():
                shutil.rmtree(step.out_dir)
    if recipe.data is not None and not recipe.data.is_dir():
        raise MinwmError(f"{recipe.path}: data: {recipe.data} is not a clip folder")
    encoded = False
    outputs = []
    for step in steps[:i0]:
        outputs.append(step.out_dir)
    for step in selected:
        if common.is_complete(step.out_dir):
            echo(f"{step.stage}: done already ({step.out_dir}); skipped")
            outputs.append(step.out_dir)
            continue
        if recipe.data is not None and step.stage != "vae" and not encoded:
            encode_latents(recipe.data, step.cfg, echo)
            encoded = True
        echo(f"{step.stage}: training into {step.out_dir}")
        outputs.append(run_stage(step.stage, step.cfg, step.out_dir, step.resolved, resume=True))
    return outputs


def encode_latents(clips: Path, cfg: Any, echo=print) -> Path:
    """Encode a clip folder into cfg.stages.latents with cfg.codec (resumes from complete shards; a cache made
    with another codec or clip list is refused by build_cache)."""
    from minwm.codecs.cli import open_clips
    from minwm.codecs.text import TextEncoder
    from minwm.codecs.vae import VideoCodec
    from minwm.data.latent_cache import build_cache

    out, cc = cfg["stages"].latents, cfg["codec"]
    if not out:
        raise MinwmError(f"{cfg.path}: stages.latents: where to encode the recipe's data is not set")
    if not cc.vae:
        raise MinwmError(f"{cfg.path}: codec.vae: no VAE to encode the recipe's data with (add the vae stage)")
    echo(f"encoding {clips} into {out}")
    codec = VideoCodec.from_pretrained(cc.vae)
    names, load = open_clips(clips)
    build_cache(load, names, codec, TextEncoder.from_config(cc.text), out, cc.shard_clips)
    return Path(out)
