"""`minwm quickstart` (what `make quickstart` runs): the toy end to end in one command.

    render clips -> train the toy VAE -> encode the clips -> Phase 1 bidirectional + camera -> Stage 1 AR
    -> Stage 2 (causal CD, or --stage2 ode: ODE data + causal ODE) -> Stage 3 DMD -> evaluate every stage
    -> sample videos -> latency benchmark -> OUT/report.md and OUT/summary.json

Everything comes from one recipe (default configs/quickstart.yaml, the pipeline's format: a config plus the
ordered stages) and goes under OUT (default runs/quickstart): OUT/clips, OUT/latents, OUT/<stage>/,
OUT/eval/<stage>/, OUT/samples/, OUT/bench/. The stages are planned and checked by minwm.stages.pipeline
before anything runs; this module only orders the steps, times them and shows an estimate of what is left.

Resume: each step has a completion marker (a stage's complete metrics.json, the clip folder renamed into
place, the latent cache's index.json, the eval's metrics.json, bench.json), so a re-run skips finished steps
and an interrupted training stage continues from its last checkpoint. Steps form a chain (each may read any
earlier output), so once a step has run, a later step's earlier output is stale: it is deleted and made again. The settings a run was started with
(recipe, --stage2, --budget-scale) are kept in OUT/quickstart_state.json with the wall time of every step; a
re-run with other settings is refused (use --fresh, or another --out). --fresh deletes OUT first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from minwm.errors import MinwmError

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
STATE = "quickstart_state.json"
STAGE2 = ("cd", "ode")

# Seconds per unit of work on a 2-core CPU (measured with the toy of configs/toy.yaml, unloaded), used only for
# the time estimates shown before each step. DiT stages are per optimiser step of the toy's reference work
# (batch 8 x 6 latent frames x 64 tokens, 4 layers of width 128) and scale with it; once steps have run, the
# remaining estimates are multiplied by how much slower or faster the finished ones went (the "pace").
REF_WORK = 8 * 6 * 64 * 4 * 128 ** 2
# Measured by `make quickstart` on the quiet 2-core machine (2026-11-25, 15m26s with the install): render 4.8 s
# for 256 clips, vae 177 s / 600 steps, encode 29.5 s / 256 clips, bidirectional 181 s / 900 steps, ar 65 s / 160,
# cd 39 s / 50, dmd 27 s / 50, eval 357 s for 4 stages, samples 3.9 s, bench 5.5 s. ode-data / ode were not
# re-measured at these settings: scaled from the older figures by the bidirectional step's speed-up.
REF_S = {"render": 0.02, "vae": 0.30, "encode": 0.12, "bidirectional": 0.20, "ar": 0.41, "ode-data": 0.25,
         "ode": 0.41, "cd": 0.78, "dmd": 0.54, "eval": 90.0, "samples": 1.0, "bench": 6.0, "report": 0.5}


# ---- small pure helpers (unit-tested) -----------------------------------------------------------------------
def scaled_steps(n: int, scale: float) -> int:
    """A step count times --budget-scale, at least 1."""
    return max(1, int(round(n * scale)))


def fmt_duration(s: Optional[float]) -> str:
    """Seconds -> '45s', '3m05s', '1h02m'."""
    if s is None:
        return "?"
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def pace(done: list[tuple[float, float]], min_estimate: float = 5.0) -> float:
    """Actual / estimated seconds over the steps run so far (pairs (estimate, actual)); 1 until steps with at
    least `min_estimate` estimated seconds have run, so a few tiny steps do not swing the forecast."""
    est = sum(e for e, _ in done if e >= min_estimate)
    act = sum(a for e, a in done if e >= min_estimate)
    return act / est if est > 0 else 1.0


def stage_list(stages: list[str], stage2: str) -> list[str]:
    """The recipe's stages with Stage 2 set to `stage2`: 'cd' -> cd, 'ode' -> ode-data, ode (in place of
    whichever Stage 2 the recipe lists)."""
    if stage2 not in STAGE2:
        raise MinwmError(f"--stage2: expected one of {', '.join(STAGE2)}, got {stage2!r}")
    out, placed = [], False
    for s in stages:
        if s in ("cd", "ode-data", "ode"):
            if not placed:
                out += ["cd"] if stage2 == "cd" else ["ode-data", "ode"]
                placed = True
        else:
            out.append(s)
    if not placed:
        raise MinwmError("quickstart recipe: no Stage 2 (cd or ode) in its stages")
    return out


def shown(path: Path) -> str:
    """A path as a person would type it here: relative to the working directory when it is inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def dit_work(cfg: Any, batch: int) -> float:
    """Relative cost of one training step of a DiT stage: batch x frames x tokens x layers x width^2."""
    d = dict(cfg["model"].diffusers)
    width = d.get("num_attention_heads", 4) * d.get("attention_head_dim", 32)
    patch = d.get("patch_size", [1, 2, 2])
    ph, pw = (patch[1], patch[2]) if isinstance(patch, (list, tuple)) else (patch, patch)
    data = cfg["data"]
    lat_h, lat_w = data.height // 4, data.width // 4      # the toy VAE's spatial factor
    tokens = max(1, (lat_h // ph) * (lat_w // pw))
    frames = cfg["stages"].latent_frames or (1 + (data.frames - 1) // 4)
    return batch * frames * tokens * d.get("num_layers", 4) * width ** 2


# ---- state --------------------------------------------------------------------------------------------------
@dataclass
class State:
    """OUT/quickstart_state.json: the settings the run was started with and the wall time of each step."""
    path: Path
    settings: dict
    wall_time_s: dict = field(default_factory=dict)
    partial_s: dict = field(default_factory=dict)     # time spent in attempts that were interrupted

    @classmethod
    def open(cls, out: Path, settings: dict) -> "State":
        p = out / STATE
        if not p.is_file():
            return cls(p, settings)
        try:
            raw = json.loads(p.read_text())
        except (OSError, ValueError):
            raise MinwmError(f"{p}: unreadable quickstart state (delete it, or run with --fresh)") from None
        if raw.get("settings") != settings:
            diff = sorted(k for k in set(settings) | set(raw.get("settings", {}))
                          if settings.get(k) != raw.get("settings", {}).get(k))
            have = ", ".join(f"{k}={raw.get('settings', {}).get(k)!r}" for k in diff)
            raise MinwmError(f"{out}: made with other settings ({have}); re-run with --fresh to start over, or "
                             f"give another --out")
        return cls(p, settings, dict(raw.get("wall_time_s", {})), dict(raw.get("partial_s", {})))

    def save(self) -> None:
        from minwm.io import write_json

        write_json(self.path, {"settings": self.settings, "wall_time_s": self.wall_time_s,
                               "partial_s": self.partial_s})


# ---- steps --------------------------------------------------------------------------------------------------
@dataclass
class QStep:
    name: str                              # the key of summary.json's wall_time_s
    what: str                              # one line shown before it runs
    done: Callable[[], bool]               # its output is complete (the resume marker)
    run: Callable[[], Any]
    estimate_s: float
    outputs: list = field(default_factory=list)   # what it writes: deleted when an earlier step has re-run


class Quickstart:
    """Plan the steps for a recipe and an output folder, then run those that are not done."""

    def __init__(self, out: str | Path = "runs/quickstart", recipe: str | Path = DEFAULT_RECIPE,
                 stage2: str = "cd", budget_scale: float = 1.0, echo: Callable[[str], None] = print,
                 progress: bool = True, device: str = "cpu", suite: str = "quickstart"):
        if not budget_scale > 0:
            raise MinwmError(f"--budget-scale: expected > 0, got {budget_scale}")
        # Absolute: the stage configs record the VAE's path, and a checkpoint must load from any directory.
        self.out = Path(out).resolve()
        self.recipe_path = Path(recipe)
        self.stage2 = stage2
        self.scale = float(budget_scale)
        self.echo = echo
        self.progress = progress
        self.device = device
        from minwm.quickstart_report import resolve_suite

        resolve_suite(suite)      # an unknown suite fails here, before any work
        self.suite = suite
        self._planned: Optional[list] = None

    @property
    def steps_plan(self) -> list:
        """The pipeline's planned stages (planned on first use: after --fresh has cleared OUT, whose old outputs
        the plan would otherwise check against the config)."""
        if self._planned is None:
            self._planned = self._plan_stages()
        return self._planned

    # -- planning ------------------------------------------------------------------------------------------
    def _plan_stages(self):
        """The pipeline's plan (every stage's strict config and resolved inputs) for OUT."""
        from minwm.config import _deep_merge
        from minwm.stages.pipeline import Step, plan, read_recipe

        recipe = read_recipe(self.recipe_path)
        names = stage_list([s.stage for s in recipe.steps], self.stage2)
        by_name = {s.stage: s for s in recipe.steps}
        recipe.steps = [by_name.get(n) or Step(n) for n in names]
        recipe.runs, recipe.name = self.out.parent, self.out.name
        # The data of this run live under OUT, whatever paths the config names.
        recipe.overrides = _deep_merge(recipe.overrides, {"stages": {"latents": str(self.out / "latents"),
                                                                     "vae": {"data": str(self.out / "clips")}}})
        self.recipe = recipe
        planned = plan(recipe)
        if planned[0].stage != "vae":
            raise MinwmError(f"{self.recipe_path}: stages: the quickstart trains its VAE first (start with vae)")
        return planned

    def settings(self) -> dict:
        """What a run's outputs depend on beyond its code: a re-run with other settings is refused."""
        import hashlib

        texts = [self.recipe_path.read_bytes(), Path(self.recipe.config).read_bytes()]
        return {"recipe": str(self.recipe_path.resolve()), "stage2": self.stage2, "budget_scale": self.scale,
                "suite": self.suite, "config_digest": hashlib.sha256(b"\0".join(texts)).hexdigest()[:16]}

    def max_steps(self, stage: str, cfg: Any) -> int:
        from minwm.stages.config import stage_train_config

        return scaled_steps(stage_train_config(cfg, stage).max_steps, self.scale)

    @property
    def dit_stages(self) -> list:
        return [s for s in self.steps_plan if s.stage != "vae"]

    @property
    def eval_stages(self) -> list[str]:
        """Stages with a model to evaluate (ode-data makes data, not a model)."""
        return [s.stage for s in self.dit_stages if s.stage != "ode-data"]

    def data_config(self):
        data = self.steps_plan[0].cfg["data"]
        heldout = self.steps_plan[0].cfg["stages"].vae.heldout_clips
        # Enough clips for the VAE's held-out set and one training batch, however small the scale.
        n = max(heldout + 8, int(round(data.num_clips * self.scale)))
        return dataclasses.replace(data, num_clips=n)

    def steps(self) -> list[QStep]:
        from minwm.stages import common
        from minwm.stages.config import stage_train_config

        out = self.out
        first_dit = self.dit_stages[0].cfg
        data = self.data_config()
        steps = [QStep("render", f"render {data.num_clips} procedural clips ({data.frames} frames, "
                                 f"{data.height}x{data.width}) into {out / 'clips'}",
                       lambda: (out / "clips").is_dir(), self.render, REF_S["render"] * data.num_clips,
                       [out / "clips"])]
        for s in self.steps_plan:
            if s.stage == "ode-data":
                # ode-data's max_steps caps the samples it generates (clips x repeats).
                n = min(self.max_steps(s.stage, s.cfg), data.num_clips * s.cfg["stages"].ode_data.repeats)
                est = REF_S["ode-data"] * n * dit_work(s.cfg, 1) / REF_WORK * 8
                what = f"ode-data: {n} teacher trajectories"
            else:
                n = self.max_steps(s.stage, s.cfg)
                batch = stage_train_config(s.cfg, s.stage).batch_size
                ref = REF_S[s.stage] * n
                est = ref * batch / 8 if s.stage == "vae" else ref * dit_work(s.cfg, batch) / REF_WORK
                what = f"{s.stage}: {n} steps, batch {batch}"
            verb = "make" if s.stage == "ode-data" else "train"
            steps.append(QStep(s.stage, f"{verb} {what} -> {s.out_dir}", lambda d=s.out_dir: common.is_complete(d),
                               lambda st=s: self.train(st), est, [s.out_dir]))
            if s.stage == "vae":
                steps.append(QStep("encode", f"encode the clips with the trained VAE into {out / 'latents'}",
                                   lambda: (out / "latents" / "index.json").is_file(),
                                   lambda: self.encode(first_dit), REF_S["encode"] * data.num_clips,
                                   [out / "latents"]))
        n_eval = len(self.eval_stages)
        steps.append(QStep("eval", f"evaluate {', '.join(self.eval_stages)} on held-out scenes (suite {self.suite}, "
                                   f"each with its no-camera baseline)",
                           lambda: (out / "eval" / "metrics.json").is_file(), self.evaluate,
                           REF_S["eval"] * n_eval * self.eval_scale(), [out / "eval"]))
        steps.append(QStep("samples", "one held-out case through every stage (strips, GIFs)",
                           lambda: (out / "samples" / "samples.json").is_file(), self.samples,
                           REF_S["samples"] * n_eval, [out / "samples"]))
        steps.append(QStep("bench", "latency benchmark (Table 1 for the toy)",
                           lambda: (out / "bench" / "bench.json").is_file(), self.bench, REF_S["bench"],
                           [out / "bench"]))
        steps.append(QStep("report", f"write {out / 'report.md'} and {out / 'summary.json'}",
                           lambda: False, self.report, REF_S["report"]))
        return steps

    # -- the steps' work -------------------------------------------------------------------------------------
    def render(self) -> None:
        from minwm.data.procedural import render_dataset
        from minwm.io import atomic_path

        cfg = self.steps_plan[0].cfg
        workers = max(1, min(4, os.cpu_count() or 1))
        # Rendered beside and renamed into place: the clip folder exists only when complete.
        with atomic_path(self.out / "clips") as tmp:
            render_dataset(self.data_config(), tmp, actions=cfg["actions"], progress=self.progress,
                           workers=workers)

    def train(self, step) -> None:
        from minwm.stages.pipeline import run_stage

        run_stage(step.stage, step.cfg, step.out_dir, step.resolved, resume=True,
                  max_steps=self.max_steps(step.stage, step.cfg))

    def encode(self, cfg: Any) -> None:
        from tqdm import tqdm

        from minwm.codecs.cli import open_clips
        from minwm.codecs.text import TextEncoder
        from minwm.codecs.vae import VideoCodec
        from minwm.data.latent_cache import build_cache

        cc = cfg["codec"]
        codec = VideoCodec.from_pretrained(cc.vae)
        names, load = open_clips(self.out / "clips")
        n_shards = -(-len(names) // cc.shard_clips)
        with tqdm(total=n_shards, desc="encode", unit="shard", disable=not self.progress) as bar:
            build_cache(load, names, codec, TextEncoder.from_config(cc.text), cfg["stages"].latents,
                        cc.shard_clips, progress=lambda done, total: bar.update(done - bar.n))

    def stage_dir(self, stage: str) -> Path:
        return next(s.out_dir for s in self.steps_plan if s.stage == stage)

    def eval_scale(self) -> float:
        """The suite's cost relative to the quickstart suite's 20 cases (for the estimate)."""
        from minwm.quickstart_report import resolve_suite

        s = resolve_suite(self.suite)
        return s.scenes * (len(s.trajectories) + s.long_factor * len(s.long)) / 20

    def evaluate(self) -> dict:
        from minwm.quickstart_report import evaluate_all

        return evaluate_all({s: self.stage_dir(s) for s in self.eval_stages}, self.out / "eval", self.suite,
                            device=self.device, progress=self.progress, echo=self.echo)

    def samples(self) -> None:
        from minwm.quickstart_report import make_samples

        make_samples({s: self.stage_dir(s) for s in self.eval_stages}, self.out / "samples", self.suite,
                     device=self.device, progress=self.progress)

    def bench(self) -> None:
        from minwm.bench.latency import run_latency
        from minwm.config import load_config

        final = self.stage_dir(self.eval_stages[-1])
        cfg = load_config(final / "config.yaml")
        run_latency(cfg, out_dir=self.out / "bench", device=self.device, with_codec=True, log=self.echo)

    def report(self) -> None:
        from minwm.quickstart_report import write_report

        write_report(self, self.state.wall_time_s)

    # -- running ---------------------------------------------------------------------------------------------
    def run(self, fresh: bool = False) -> dict:
        """Run every step not done yet; returns summary.json's content."""
        if fresh and self.out.exists():
            shutil.rmtree(self.out)
        _ = self.steps_plan   # plan (and check) everything before anything is written
        self.out.mkdir(parents=True, exist_ok=True)
        self.state = State.open(self.out, self.settings())
        self.state.save()
        steps = self.steps()
        done_pairs: list[tuple[float, float]] = []
        t_start = time.monotonic()
        upstream_ran = False
        for i, st in enumerate(steps):
            tag = f"[{i + 1}/{len(steps)}] {st.name}"
            if st.done() and not upstream_ran:
                self.echo(f"{tag}: done already ({fmt_duration(self.state.wall_time_s.get(st.name))}); skipped")
                continue
            if st.done():
                # Made from outputs that have just been re-made: stale, so made again from scratch.
                self.echo(f"{tag}: made before an earlier step re-ran; redoing it")
                for p in st.outputs:
                    if Path(p).exists():
                        shutil.rmtree(p)
            upstream_ran = True
            p = pace(done_pairs)
            left = sum(s.estimate_s for s in steps[i:]) * p     # once one step runs, every later one does
            self.echo(f"{tag}: {st.what}\n{' ' * len(tag)}  est. {fmt_duration(st.estimate_s * p)} for this step, "
                      f"about {fmt_duration(left)} left in all (elapsed {fmt_duration(time.monotonic() - t_start)})")
            t0 = time.monotonic()
            try:
                st.run()
            except BaseException:
                # Time of an interrupted attempt counts towards the step when it is resumed.
                self.state.partial_s[st.name] = self.state.partial_s.get(st.name, 0.0) + time.monotonic() - t0
                self.state.save()
                raise
            took = time.monotonic() - t0
            done_pairs.append((st.estimate_s, took))
            wall = self.state.wall_time_s
            wall.pop("total", None)
            wall[st.name] = round(self.state.partial_s.pop(st.name, 0.0) + took, 2)
            wall["total"] = round(sum(wall.values()), 2)
            self.state.save()
            if st.name == "report":   # the report's own time goes into the next report; rewrite it once more
                self.report()
        self.echo(f"quickstart: done in {fmt_duration(time.monotonic() - t_start)} (this run); report "
                  f"{shown(self.out / 'report.md')}; play the final model with: minwm play --ckpt "
                  f"{shown(self.stage_dir(self.eval_stages[-1]))}")
        return json.loads((self.out / "summary.json").read_text())


# ---- CLI ----------------------------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("quickstart", help="the toy end to end: data, VAE, all stages, eval, bench, report",
                       description="Render the procedural world, train the toy VAE, encode, train Phase 1 "
                                   "(bidirectional + camera), Stage 1 (AR), Stage 2 (CD or ODE), Stage 3 (DMD), "
                                   "evaluate every stage, benchmark latency and write OUT/report.md and "
                                   "OUT/summary.json. Re-running resumes where it stopped.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/quickstart", help="output folder")
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe YAML (config + stages)")
    p.add_argument("--stage2", choices=STAGE2, default="cd", help="Stage 2: causal consistency distillation (cd) "
                                                                 "or causal ODE distillation (ode)")
    p.add_argument("--fresh", action="store_true", help="delete OUT first and start over")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiply every stage's steps and the number of clips (e.g. 0.1 for a quick look)")
    p.add_argument("--suite", default="quickstart",
                   help="evaluation suite: quickstart (2 held-out scenes x the ten single actions) or one of "
                        "`minwm eval`'s (e.g. toy-heldout, about 3x longer)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars of its own")
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args) -> int:
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt   # a `kill` is an interruption too: the step's time so far is kept for the resume

    signal.signal(signal.SIGTERM, stop)
    qs = Quickstart(args.out, args.recipe, args.stage2, args.budget_scale, progress=not args.quiet,
                    device=args.device, suite=args.suite)
    qs.run(fresh=args.fresh)
    return 0
