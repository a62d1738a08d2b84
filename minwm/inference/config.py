"""Config section `inference`: how a WorldModel samples (few-step or multi-step AR), its cache window, size,
intrinsics and the baselines' settings; `apply_overrides` replaces fields with one-line errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from minwm.cameras.camera import standing_still
from minwm.errors import MinwmError

MODES = ("fewstep", "multistep")

# Wan2.1's negative prompt, in English: what the unconditional branch of the multi-step baselines avoids.
DEFAULT_NEGATIVE_PROMPT = ("vivid colours, overexposed, static, blurry details, subtitles, style, artwork, painting, "
                           "still image, overall grey, worst quality, low quality, JPEG artefacts, ugly, deformed, "
                           "extra fingers, poorly drawn hands, poorly drawn face, malformed limbs, fused fingers, "
                           "motionless frame, cluttered background, three legs, many people in the background, "
                           "walking backwards")


@dataclass
class InferenceConfig:
    """Config section `inference`: how a checkpoint is sampled."""

    # "fewstep": the distilled student (consistency sampler over `steps`); "multistep": the AR baseline.
    mode: str = "fewstep"
    # Few-step timesteps (t in [0, 1000]); with warp they index the shifted training grid, as in training:
    # [1000, 750, 500, 250] -> [1000, 937.5, 833.3, 625.0] at shift 5.
    steps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    warp: bool = True
    shift: float = 5.0
    # KV-cache overrides (null: the model section's window_frames / sink_frames).
    window_frames: Optional[int] = None
    sink_frames: Optional[int] = None
    # Output size in pixels (a multiple of the VAE's spatial factor times the patch size), or the latent grid
    # directly (needed when there is no codec, e.g. the bench). Unset: the training clips' data.height/width.
    height: Optional[int] = None
    width: Optional[int] = None
    latent_height: Optional[int] = None
    latent_width: Optional[int] = None
    # Normalised (fx/W, fy/H, cx/W, cy/H). Null: the training data's (data.hfov_deg, square pixels, centred, at
    # this size). Inference with other intrinsics than training is a known failure: leave null unless the
    # training data had other intrinsics.
    intrinsics: Optional[list[float]] = None
    # Multi-step baselines (mode multistep, and the bench): sampler, steps, CFG scale, negative prompt.
    sampler: str = "unipc"
    baseline_steps: int = 50
    guidance: float = 3.0
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    # Camera guidance: CFG's unconditional branch also stands still (every frame at the first frame's camera),
    # so the guidance scale amplifies the commanded motion as well as the prompt: v_u(negative prompt, still
    # camera) + g (v_c - v_u). Applies wherever CFG does: the multi-step samplers and the Stage-2/3 teachers
    # (ode-data, cd, dmd's real score), so the few-step student learns the same guidance. It costs nothing (the
    # same two passes). Measured on the toy (README): the multi-step sampler gains direction accuracy and loses
    # PSNR; students distilled from guided teachers gained nothing. Off reproduces upstream.
    camera_guidance: bool = False
    # `minwm generate` refuses trajectories longer than this many latent frames (memory of the whole video).
    max_generate_frames: int = 1024
    fps: int = 16
    seed: int = 0
    # Prompt embedding length when there is no text encoder (random embeddings, bench only).
    text_tokens: int = 32

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.steps or any(not 0 < float(t) <= 1000 for t in self.steps):
            raise ValueError(f"steps: expected a non-empty list of timesteps in (0, 1000], got {self.steps}")
        if list(self.steps) != sorted(self.steps, reverse=True):
            raise ValueError(f"steps: expected descending timesteps, got {self.steps}")
        if self.shift <= 0:
            raise ValueError(f"shift: expected > 0, got {self.shift}")
        if self.sampler not in ("unipc", "euler"):
            raise ValueError(f"sampler: expected unipc or euler, got {self.sampler!r}")
        for name in ("baseline_steps", "max_generate_frames", "fps", "text_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("height", "width", "latent_height", "latent_width", "window_frames"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name}: expected >= 1 or null, got {v}")
        if self.sink_frames is not None and self.sink_frames < 0:
            raise ValueError(f"sink_frames: expected >= 0 or null, got {self.sink_frames}")
        if self.intrinsics is not None and (len(self.intrinsics) != 4 or min(self.intrinsics[:2]) <= 0):
            raise ValueError(f"intrinsics: expected [fx/W, fy/H, cx/W, cy/H] with positive focals, "
                             f"got {self.intrinsics}")

    def timesteps(self) -> list[float]:
        """The few-step list the student was trained on (warped onto the shifted grid when `warp`)."""
        if not self.warp:
            return [float(t) for t in self.steps]
        from minwm.diffusion.schedule import warp_timesteps

        return [float(t) for t in warp_timesteps(self.steps, self.shift)]

    def uncond_cameras(self, cameras):
        """The camera input of CFG's unconditional branch: standing still under camera_guidance, else `cameras`."""
        return standing_still(cameras) if self.camera_guidance else cameras


def apply_overrides(cfg: InferenceConfig, overrides: dict) -> InferenceConfig:
    names = {f.name for f in dataclasses.fields(InferenceConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise MinwmError(f"WorldModel: unknown inference setting {bad[0]!r} "
                         f"(expected one of: {', '.join(sorted(names))})")
    try:
        return dataclasses.replace(cfg, **overrides)
    except (TypeError, ValueError) as e:
        raise MinwmError(f"inference: {e}") from None


