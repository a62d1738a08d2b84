"""Evaluation suites: seeded held-out procedural scenes x prescribed trajectories, rendered exactly.

A suite names how many scenes and which of `worlds.trajectories.eval_trajectories` it runs. Every (scene,
trajectory) pair is one `Case`; its ground truth is the procedural world rendered along exactly the commanded
trajectory (`data.procedural.render_clip`, the code that renders training clips, so size, field of view, step
sizes and captions match the training data of the checkpoint).

Held-out scenes. Training clip i of a dataset with data.seed S draws its trajectory and scene from
numpy SeedSequence([S, i]); evaluation scene i draws from SeedSequence([HELDOUT_SEED, i]). Different entropy
words give independent streams, so no evaluated scene is a training scene as long as the checkpoint's data.seed
is not HELDOUT_SEED (checked: `check_heldout`). Objects are placed clear of each trajectory's path (as in
training), so scene i keeps its ground, sky and palette across trajectories while its object layout adapts.

Clip length. A suite's clips have the checkpoint's training length (stages.latent_frames, else data.frames)
unless the suite fixes it; cases in `long` run `long_factor` times longer (the long walks: streaming past the
attention window, or a bidirectional model beyond its training length).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from minwm.errors import MinwmError

# Never used as a data.seed by any config we ship (toy: 0); see the module docstring.
HELDOUT_SEED = 7_000_003

SINGLE_KEYS = ("w", "s", "a", "d", "q", "e", "j", "l", "i", "k")


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    scenes: int                              # held-out scenes 0 .. scenes-1
    trajectories: tuple[str, ...]            # names from eval_trajectories, at the clip length
    long: tuple[str, ...] = ()               # names evaluated at long_factor x the clip length
    long_factor: int = 2
    long_scenes: int = 1                     # long cases run on the first long_scenes scenes only (time)
    latent_frames: Optional[int] = None      # None: the checkpoint's training clip length
    multistep_steps: Optional[int] = None    # multi-step samplers (ar, bidirectional): steps; None: the ckpt's
    strips: tuple[str, ...] = ()             # trajectories shown as frame strips in the report (scene 0)
    vae_floor: bool = True                   # also score each render through the VAE (a perfect model's output)
    seed: int = HELDOUT_SEED


_SINGLES = tuple(f"hold_{k}" for k in SINGLE_KEYS)

SUITES: dict[str, Suite] = {
    "toy-heldout": Suite(
        name="toy-heldout",
        description="2 held-out scenes x every single action, four compound moves, a pause and three sequences "
                    "at the training clip length, plus two long walks at twice that length in the first scene",
        scenes=2,
        trajectories=_SINGLES + ("hold_w_l", "hold_w_j", "hold_w_d", "hold_s_l", "pause",
                                 "walk_then_turn", "zigzag_walk", "look_around"),
        long=("long_walk", "zigzag_walk"),
        # 20 UniPC steps instead of the checkpoint's 50 keeps a bidirectional / AR checkpoint inside the
        # 5-minute budget on 2 cores; the few-step students do not use it.
        multistep_steps=20,
        strips=("hold_w", "hold_l", "walk_then_turn"),
        # The perfect-model row costs a pose estimate per case (about 50 s of the 5-minute budget on 2 cores):
        # on in toy-ablate, or here with `minwm eval --vae-floor`.
        vae_floor=False,
    ),
    "toy-ablate": Suite(
        name="toy-ablate",
        description="2 held-out scenes x the moves camera control is judged on (w s a d j l, w+l, walk then "
                    "turn), for the ablations",
        scenes=2,
        trajectories=("hold_w", "hold_s", "hold_a", "hold_d", "hold_j", "hold_l", "hold_w_l", "walk_then_turn"),
        multistep_steps=20,
        strips=("hold_w", "hold_l"),
    ),
    "toy-smoke": Suite(
        name="toy-smoke",
        description="1 held-out scene x forward and yaw right (a fast check of the whole path, for tests)",
        scenes=1,
        trajectories=("hold_w", "hold_l"),
        multistep_steps=4,
        strips=("hold_w",),
    ),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise MinwmError(f"--suite: unknown suite {name!r} (expected one of: {', '.join(SUITES)})")
    return SUITES[name]


def trajectory_group(name: str) -> str:
    """single / compound / pause / sequence, for the report's grouping."""
    if name == "pause":
        return "pause"
    if name.startswith("hold_"):
        return "single" if name[5:] in SINGLE_KEYS else "compound"
    return "sequence"


@dataclass(frozen=True)
class Case:
    name: str              # "s0/hold_w" (or "s0/long_walk@12" for a long case)
    scene: int
    trajectory: str
    program: str           # the action program: latent_frames - 1 steps
    latent_frames: int
    group: str             # single / compound / pause / sequence / long

    @property
    def long(self) -> bool:
        return self.group == "long"

    def pixel_frames(self, temporal_factor: int) -> int:
        return 1 + temporal_factor * (self.latent_frames - 1)


def suite_cases(suite: Suite, latent_frames: int) -> list[Case]:
    """The cases of `suite` for clips of `latent_frames` latent frames (long cases: long_factor times more)."""
    from minwm.worlds.trajectories import eval_trajectories

    L = suite.latent_frames or latent_frames
    if L < 2:
        raise MinwmError(f"suite {suite.name}: clips of {L} latent frame(s); a trajectory needs at least 2")
    lengths = [(L, suite.trajectories, False)]
    if suite.long:
        lengths.append((L * suite.long_factor, suite.long, True))
    cases = []
    for n, names, is_long in lengths:
        programs = eval_trajectories(n)
        for t in names:
            if t not in programs:
                raise MinwmError(f"suite {suite.name}: unknown trajectory {t!r} (expected one of: "
                                 f"{', '.join(programs)})")
        for s in range(min(suite.scenes, suite.long_scenes) if is_long else suite.scenes):
            for t in names:
                name = f"s{s}/{t}" + (f"@{n}" if is_long else "")
                cases.append(Case(name, s, t, programs[t], n, "long" if is_long else trajectory_group(t)))
    return cases


def check_heldout(suite: Suite, data_seed: int, where: str) -> None:
    if data_seed == suite.seed:
        raise MinwmError(f"{where}: data.seed {data_seed} is the held-out evaluation seed of suite {suite.name}; "
                         f"its scenes would be training scenes (train with another data.seed)")


def render_case(case: Case, suite: Suite, height: int, width: int, hfov_deg: float, actions, temporal_factor: int):
    """The ground-truth Clip of a case: frames uint8 [F, H, W, 3], exact per-pixel-frame cameras, caption."""
    from minwm.data.clips import DataConfig
    from minwm.data.procedural import render_clip

    cfg = DataConfig(num_clips=1, frames=case.pixel_frames(temporal_factor), height=height, width=width,
                     seed=suite.seed, hfov_deg=hfov_deg)
    return render_clip(cfg, case.scene, case.program, case.trajectory, actions)


def with_overrides(suite: Suite, **kw) -> Suite:
    """The suite with some fields replaced (None values are ignored), e.g. a CLI's --latent-frames."""
    kw = {k: v for k, v in kw.items() if v is not None}
    return dataclasses.replace(suite, **kw) if kw else suite
