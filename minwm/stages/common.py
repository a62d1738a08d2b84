"""Shared plumbing of the DiT training stages: context, models, data, conditioning, output.

How to write a stage (see stages/bidirectional.py for the shortest complete one)
-------------------------------------------------------------------------------
A stage is one module `minwm/stages/<name>.py`, listed in `minwm.stages.STAGES`, with

    INPUTS = {"init": "ar", "teacher": "ar"}     # input name -> producing stage(s) ("cd|ode": either)
    TRAIN_DEFAULTS = {"betas": [0.9, 0.999]}     # optional: reference train values differing from `train`

    @dataclass
    class Params:                                # config section stages.<name> (every field has a default)
        shift: float = 5.0
        ...

    def run(cfg, out_dir, *, init=None, resume=False, max_steps=None) -> Path:
        ctx = common.prepare("<name>", cfg, out_dir, init, resume, max_steps)   # checks, no heavy work
        p = ctx.params                                                          # your Params (+ .train)
        data = common.latent_dataset(ctx)                                       # the latent cache
        model = common.build_model(ctx, "init")          # trainable; strict load of the input checkpoint
        model = common.shard(ctx, model)                 # FSDP2 under torchrun (EMA before, optimiser after)
        teacher = common.build_model(ctx, "teacher", trainable=False)           # frozen input
        common.check_data(data, model, ctx, chunked=True)                       # one-line errors, before training
        trainer = common.make_trainer(ctx, data)
        trainer.add("model", model, trainer.adamw(model.parameters()))          # or ema=True (train.ema_decay)
        cond = common.Conditioner(ctx, model)                                   # text / cameras / CFG negative

        def loss_fn(mb):                          # mb: MicroBatch; mb.data is the collated batch dict
            x0 = mb.data["latents"]                                       # [B, C, F, h, w]
            eps = mb.randn(*x0.shape[1:], salt="noise", device=x0.device) # ALL randomness from mb / step gens
            ...
            v = model(x_t, t, cond.text(mb), cond.cameras(mb), mode=..., **cond.extra(mb))
            return {"loss": loss, ...}

        trainer.fit(lambda tr, mbs, step: tr.accumulate("model", mbs, loss_fn), resume=ctx.resume)
        return common.write_output(ctx, trainer, "model")     # model.safetensors, config.yaml, PNG, metrics.json

Rules that keep resume and multi-process runs exact: draw every noise / timestep / dropout decision from
`mb.randn / mb.rand / mb.randint` (per sample, seeded by the data position) or `trainer.step_generator(step)`
(per step, e.g. DMD's exit index), never from the global RNG; register every trained module with trainer.add (EMA
copies included); frozen networks are inputs, not state. Bad input must fail in `prepare`, `build_model`,
`latent_dataset` or `check_data`, before `trainer.fit`.

What `write_output` leaves in OUT (the stage-output contract, read by the next stage, `minwm generate` and the
pipeline): model.safetensors + model_config.json (a save_pretrained backbone: diffusers key names, loadable by
models.loading.load_pretrained), config.yaml (the full config, model section made self-contained), loss_curve.png,
and metrics.json written last with "complete": true (the pipeline's "this stage is done").
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from minwm.errors import MinwmError
from minwm.stages import STAGES, check_name, producers, stage_inputs

log = logging.getLogger("minwm.stages")

METRICS = "metrics.json"
LOSS_CURVE = "loss_curve.png"


# ---- context ----------------------------------------------------------------------------------------------

@dataclass
class StageContext:
    stage: str
    cfg: Any                      # the full minwm Config
    params: Any                   # the stage's section: its Params fields plus .train overrides (or None)
    train: Any                    # the effective TrainConfig
    out_dir: Path
    inputs: dict[str, Path]       # input name -> stage output directory
    resume: bool
    info: Any                     # train.distributed.DistInfo
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def where(self) -> str:
        return getattr(self.cfg, "path", "<config>")


def check_inputs(stage: str, init: Optional[dict[str, str]]) -> dict[str, Path]:
    """Input names against the stage's INPUTS (all required), each a finished stage output; one-line errors."""
    wanted = stage_inputs(stage)
    given = dict(init or {})
    unknown = sorted(set(given) - set(wanted))
    if unknown:
        expected = ", ".join(f"{k} (from {v})" for k, v in wanted.items()) or "none"
        raise MinwmError(f"stage {stage}: unknown input {unknown[0]!r} (expected: {expected})")
    missing = [k for k in wanted if k not in given]
    if missing:
        raise MinwmError(f"stage {stage}: input {missing[0]!r} is required (the output directory of a "
                         f"{' or '.join(producers(wanted[missing[0]]))} stage, e.g. --init {missing[0]}=DIR)")
    out = {}
    for k, v in given.items():
        p = Path(v)
        if not p.is_dir():
            raise MinwmError(f"{p}: input {k!r} of stage {stage}: not a directory")
        if not is_complete(p):
            raise MinwmError(f"{p}: input {k!r} of stage {stage}: not a finished stage output (no complete "
                             f"{METRICS})")
        out[k] = p
    return out


def model_inputs(stage: str) -> list[str]:
    """The inputs of `stage` that are backbone checkpoints (everything but data stages' outputs)."""
    return [k for k, spec in stage_inputs(stage).items() if "ode-data" not in producers(spec)]


def check_checkpoint_matches(path: Path, model_cfg: Any, what: str = "init checkpoint") -> None:
    """Cheap pre-flight (reads model_config.json only): the checkpoint's architecture, camera injection and
    diffusers kwargs must agree with the config's `model` section."""
    from minwm.config import to_dict
    from minwm.models import loading

    if not (path / loading.MODEL_CONFIG).is_file():
        raise MinwmError(f"{path}: {what} has no {loading.MODEL_CONFIG} (not a backbone written by a DiT stage)")
    saved = loading.read_model_config(path)
    if saved.arch != model_cfg.arch:
        raise MinwmError(f"{path}: {what} is a {saved.arch!r} backbone but model.arch is {model_cfg.arch!r}")
    for k, v in to_dict(model_cfg.camera).items():
        if getattr(saved.camera, k) != v:
            raise MinwmError(f"{path}: {what} was trained with model.camera.{k}={getattr(saved.camera, k)!r}, "
                             f"the config has {v!r}")
    for k, v in dict(model_cfg.diffusers).items():
        have = saved.diffusers.get(k)
        if (list(have) if isinstance(have, tuple) else have) != (list(v) if isinstance(v, tuple) else v):
            raise MinwmError(f"{path}: {what} has model.diffusers.{k}={have!r}, the config has {v!r}")


def prepare(stage: str, cfg: Any, out_dir: str | Path, init: Optional[dict[str, str]] = None, resume: bool = False,
            max_steps: Optional[int] = None) -> StageContext:
    """Validate everything a stage can check without heavy work (inputs, their architecture, train settings,
    the output directory) and return the context. Joins the process group under torchrun."""
    from minwm.stages.config import stage_params, stage_train_config
    from minwm.train import distributed as D

    check_name(stage)
    if "stages" not in cfg:
        raise MinwmError(f"{getattr(cfg, 'path', '<config>')}: no `stages` section registered")
    inputs = check_inputs(stage, init)
    for k in model_inputs(stage):
        check_checkpoint_matches(inputs[k], cfg["model"], f"input {k!r}")
    train = stage_train_config(cfg, stage, max_steps)
    shared = cfg["stages"]
    if shared.threads:
        torch.set_num_threads(shared.threads)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MinwmError(f"{out}: output path exists and is not a directory")
    info = D.init_distributed()
    return StageContext(stage, cfg, stage_params(cfg, stage), train, out, inputs, bool(resume), info)


# ---- models -----------------------------------------------------------------------------------------------

def load_backbone(path: str | Path, model_cfg: Any, device: Any = None):
    """A backbone from a stage output directory, strictly (arch / camera / shapes must match)."""
    from minwm.models import loading

    return loading.load_pretrained(path, model_cfg, device=device)


def build_model(ctx: StageContext, input: Optional[str] = "init", *, trainable: bool = True):
    """The backbone for input `input` of the stage (loaded strictly from its checkpoint), or, when the stage
    has no such input given, from the `model` section (model.pretrained, else random init seeded by
    train.seed). Trainable: train mode with grads; else eval, frozen."""
    from minwm.models.backbone import build_backbone
    from minwm.train.data import mix_seed

    path = ctx.inputs.get(input) if input else None
    if path is not None:
        model = load_backbone(path, ctx.cfg["model"])
    else:
        # Seeded and isolated from the global RNG, so every rank (and a resumed run) builds the same weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(ctx.train.seed, "init", ctx.stage))
            model = build_backbone(ctx.cfg["model"])
    model = model.to(ctx.device).float()
    if trainable:
        model.train().requires_grad_(True)
    else:
        model.eval().requires_grad_(False)
    return model


def shard(ctx: StageContext, model):
    """Under torchrun (world size > 1): FSDP2-shard a trainable backbone so gradients are reduced across ranks
    (a no-op in one process). Build EMA copies BEFORE this (trainer.add(..., ema=EMA(model, ...)) on the
    unsharded model, then shard both) and the optimiser AFTER it.

    The root is the only FSDP unit: our backbone forward calls each block's submodules directly (never
    blk.forward), so per-block units would never be gathered by FSDP's forward hooks."""
    from minwm.train import distributed as D

    if not ctx.info.distributed:
        return model
    return D.shard_model(model, block_names=[], mixed_precision=ctx.train.mixed_precision
                         if ctx.train.mixed_precision == "bf16" else "no")


# ---- data ---------------------------------------------------------------------------------------------------

class StageDataset(torch.utils.data.Dataset):
    """The latent cache as training items: latents [C, F, h, w] float32 (the first `latent_frames`), w2c
    [F, 4, 4] and intrinsics [F, 4] float64, embeds [L, D] / mask [L] (+ glyph_embeds / glyph_mask)."""

    KEYS = ("latents", "w2c", "intrinsics", "embeds", "mask", "glyph_embeds", "glyph_mask")

    def __init__(self, root: str | Path, latent_frames: Optional[int] = None):
        from minwm.data.latent_cache import LatentDataset

        self.root = Path(root)
        self.cache = LatentDataset(self.root)
        self.latent_frames = latent_frames
        if len(self.cache) == 0:
            raise MinwmError(f"{self.root}: the latent cache holds no clips")

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.cache[i]
        out = {k: item[k] for k in self.KEYS if k in item}
        n = self.latent_frames
        if n is not None:
            frames = out["latents"].shape[1]
            if frames < n:
                raise MinwmError(f"{self.root}: clip {item.get('name')} has {frames} latent frames, fewer than "
                                 f"stages.latent_frames={n}")
            out["latents"], out["w2c"], out["intrinsics"] = out["latents"][:, :n], out["w2c"][:n], out["intrinsics"][:n]
        out["latents"] = out["latents"].float()
        return out


def latent_dataset(ctx: StageContext) -> StageDataset:
    root = ctx.cfg["stages"].latents
    if not root:
        raise MinwmError(f"{ctx.where}: stages.latents: no latent cache folder set (make one with "
                         f"`minwm data encode`)")
    return StageDataset(root, ctx.cfg["stages"].latent_frames)


def check_data(data: StageDataset, model: Any, ctx: StageContext, chunked: bool = False) -> None:
    """The cache's first item against the model: channels, spatial size vs patch, frames vs chunk, text width,
    camera frames. One-line errors before any training."""
    from minwm.inference.text import text_dim

    item = data[0]
    lat = item["latents"]
    where = f"{data.root}"
    if lat.ndim != 4:
        raise MinwmError(f"{where}: latents of shape {tuple(lat.shape)}, expected [C, F, h, w]")
    C, F, h, w = lat.shape
    tc = model.transformer.config
    want_c = tc.out_channels
    if C != want_c:
        raise MinwmError(f"{where}: latents have {C} channels, the model expects {want_c}")
    patch = tc.patch_size
    ph, pw = (patch[1], patch[2]) if isinstance(patch, (list, tuple)) else (patch, patch)
    if h % ph or w % pw:
        raise MinwmError(f"{where}: latent size {h}x{w} is not divisible by the model's patch {ph}x{pw}")
    chunk = model.cfg.chunk_frames
    if chunked and F % chunk:
        raise MinwmError(f"{where}: {F} latent frames per clip is not a multiple of model.chunk_frames={chunk} "
                         f"(set stages.latent_frames to a multiple)")
    if item["w2c"].shape[0] != F or item["intrinsics"].shape[0] != F:
        raise MinwmError(f"{where}: {item['w2c'].shape[0]} cameras for {F} latent frames")
    d = text_dim(model)
    if item["embeds"].shape[-1] != d:
        raise MinwmError(f"{where}: text embeddings are {item['embeds'].shape[-1]}-dim, the model's text_dim is {d} "
                         f"(encode with a matching codec.text)")
    if ctx.cfg["stages"].ti2v and F < 2:
        raise MinwmError(f"{where}: stages.ti2v needs at least 2 latent frames per clip")


def make_trainer(ctx: StageContext, dataset):
    from minwm.train.trainer import Trainer

    return Trainer(ctx.train, ctx.out_dir, dataset, info=ctx.info, desc=ctx.stage, run_config=ctx.cfg.to_dict()
                   if hasattr(ctx.cfg, "to_dict") else None)


# ---- conditioning -------------------------------------------------------------------------------------------

def relative_cameras(w2c: torch.Tensor, intrinsics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, F, 4, 4] w2c and [B, F, 4] intrinsics -> (w2c relative to each clip's first frame, K), float32.

    The algebra runs in float64 (as stored); idempotent for trajectories already relative to their first frame."""
    from minwm.cameras.camera import invert_rigid

    w = w2c.to(torch.float64)
    rel = w @ invert_rigid(w[:, :1])
    return rel.float(), intrinsics.float()


def text_dict(arch: str, batch: dict) -> dict[str, torch.Tensor]:
    """The adapter's text dict from a batch's embeds / mask (+ glyph) tensors."""
    from minwm.inference.text import backbone_text

    enc = {k: batch[k] for k in ("embeds", "mask", "glyph_embeds", "glyph_mask") if k in batch}
    return backbone_text(arch, enc)


def select_text(cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor], drop: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """Per sample: uncond where drop[i] (classifier-free-guidance dropout), cond elsewhere."""
    out = {}
    for k, v in cond.items():
        u = uncond[k].to(v.device, v.dtype).expand_as(v)
        m = drop.to(v.device).reshape(-1, *([1] * (v.ndim - 1)))
        out[k] = torch.where(m, u, v)
    return out


def text_encoder_digest(enc: Any) -> dict[str, Any]:
    """kind / max_len / weight digests of a TextEncoder, comparable with a latent cache's index fingerprint."""
    import hashlib

    def digest(m: torch.nn.Module) -> str:
        h = hashlib.sha256()
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
        return h.hexdigest()[:16]

    out = {"kind": enc.kind, "max_len": enc.max_len, "weights": digest(enc.model)}
    if enc.glyph_model is not None:
        out["glyph_weights"] = digest(enc.glyph_model)
    return out


def negative_embeddings(ctx: StageContext, data: Optional[StageDataset] = None) -> dict[str, torch.Tensor]:
    """TextEncoder output {"embeds", "mask", ...} [1, L, D] of the unconditional prompt
    (`inference.negative_prompt`, the same one inference's CFG uses), from the `codec.text` encoder; when a
    latent cache is given, the encoder must be the one that made it. Computed once per context."""
    if "negative" in ctx._cache:
        return ctx._cache["negative"]
    from minwm.codecs.text import TextEncoder

    enc = TextEncoder.from_config(ctx.cfg["codec"].text)
    if data is not None:
        made = (data.cache.index.get("fingerprint") or {}).get("text")
        mine = text_encoder_digest(enc)
        if made is not None and any(made.get(k) != v for k, v in mine.items()):
            raise MinwmError(f"{data.root}: made with a different text encoder than codec.text in {ctx.where} "
                             f"(the CFG negative prompt must be encoded by the same one)")
    out = {k: v.detach().cpu() for k, v in enc.encode([ctx.cfg["inference"].negative_prompt]).items()}
    del enc
    ctx._cache["negative"] = out
    return out


class Conditioner:
    """Per micro-batch conditioning of one backbone: text (with optional CFG dropout to the negative prompt),
    relative cameras, the TI2V image latent."""

    def __init__(self, ctx: StageContext, model: Any, data: Optional[StageDataset] = None,
                 text_dropout: float = 0.0, need_negative: bool = False):
        self.ctx, self.arch = ctx, model.arch
        self.text_dropout = float(text_dropout)
        self.ti2v = bool(ctx.cfg["stages"].ti2v)
        self.condition_channels = bool(getattr(model, "condition_channels", False))
        self._neg = None
        if self.text_dropout > 0 or need_negative:
            self._neg = text_dict(self.arch, negative_embeddings(ctx, data))

    def text(self, mb: Any, salt: str = "text_dropout") -> dict[str, torch.Tensor]:
        cond = text_dict(self.arch, mb.data)
        if self.text_dropout > 0:
            drop = mb.rand(salt=salt) < self.text_dropout  # [B], per sample, exact on resume
            cond = select_text(cond, self._neg, drop)
        return cond

    def negative(self, batch: int, device: Any) -> dict[str, torch.Tensor]:
        """The unconditional text dict expanded to `batch` (adapters differ on batch broadcasting)."""
        if self._neg is None:
            self._neg = text_dict(self.arch, negative_embeddings(self.ctx))
        return {k: v.to(device).expand(batch, *v.shape[1:]) for k, v in self._neg.items()}

    @staticmethod
    def cameras(mb: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return relative_cameras(mb.data["w2c"], mb.data["intrinsics"])

    def uncond_cameras(self, cameras: Any) -> Any:
        """The camera input of a CFG teacher's unconditional branch (inference.camera_guidance: standing still),
        so the student learns the guidance inference would apply."""
        return self.ctx.cfg["inference"].uncond_cameras(cameras)

    def extra(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra forward kwargs: image_latents (clean latent frame 0) for TI2V adapters with condition channels."""
        if self.ti2v and self.condition_channels:
            return {"image_latents": x0[:, :, :1]}
        return {}

    def clean_frames(self, frames: int) -> int:
        """How many leading latent frames are conditions (held clean at t = 0, outside every loss)."""
        return 1 if self.ti2v else 0


# ---- output ----------------------------------------------------------------------------------------------

def is_complete(out_dir: str | Path) -> bool:
    """A finished stage output: metrics.json is there (written last), readable, and not marked incomplete."""
    p = Path(out_dir) / METRICS
    if not p.is_file():
        return False
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("complete", True) is True


def output_config(cfg: Any, backbone: Any) -> Any:
    """The config written beside the weights: the `model` section made self-contained (diffusers kwargs
    filled in, no pretrained path) so `minwm generate` needs nothing but the directory."""
    from minwm.config import Config

    out = Config(cfg)
    out.path = getattr(cfg, "path", "<config>")
    out["model"] = dataclasses.replace(backbone.cfg, diffusers=_plain(backbone.diffusers_config), pretrained=None)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def summarize(history: list[dict], last: int = 20) -> dict[str, float]:
    """Mean of every numeric metric over the first and the last `last` records (how far the loss fell)."""
    if not history:
        return {}
    keys = sorted({k for r in history for k, v in r.items() if isinstance(v, (int, float)) and k not in
                   ("step", "time", "step_time")})
    out = {}
    for k in keys:
        for name, recs in (("first", history[:last]), ("last", history[-last:])):
            vals = [r[k] for r in recs if isinstance(r.get(k), (int, float))]
            if vals:
                out[f"{k}/{name}{last}"] = sum(vals) / len(vals)
    return out


def write_output(ctx: StageContext, trainer: Any, module: str = "model", *, use_ema: bool = False,
                 extra_metrics: Optional[dict] = None) -> Path:
    """Write the stage output into ctx.out_dir (collective; rank 0 writes). metrics.json comes last."""
    from safetensors.torch import save_file

    from minwm.config import to_dict
    from minwm.io import atomic_path, write_json, write_text
    from minwm.models import loading
    from minwm.train import distributed as D
    from minwm.train.logging import plot_curves

    import yaml

    backbone = trainer.modules[module]
    sd = trainer.full_state_dict(module, ema=use_ema)
    out = ctx.out_dir
    if trainer.is_main:
        out.mkdir(parents=True, exist_ok=True)
        prefix = "transformer."
        tensors = {k[len(prefix):]: v.detach().cpu().contiguous().clone() for k, v in sd.items()
                   if k.startswith(prefix)}
        if len(tensors) != len(sd):
            raise MinwmError(f"stage {ctx.stage}: module {module!r} has weights outside its transformer")
        cfg_out = output_config(ctx.cfg, backbone)
        with atomic_path(out / loading.WEIGHTS) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "minwm": loading.FORMAT})
        write_json(out / loading.MODEL_CONFIG, {"format": loading.FORMAT, "version": 1,
                                                "model": to_dict(cfg_out["model"])})
        write_text(out / "config.yaml", yaml.safe_dump(cfg_out.to_dict(), sort_keys=False))
        history = trainer.history
        loss_keys = sorted({k for r in history for k in r if k.endswith("loss")})
        if history and loss_keys:
            plot_curves(history, out / LOSS_CURVE, keys=loss_keys, smooth=max(1, min(20, len(history) // 10)))
        metrics = {"stage": ctx.stage, "complete": True, "steps": trainer.step, "max_steps": ctx.train.max_steps,
                   "inputs": {k: str(v) for k, v in ctx.inputs.items()}, "weights": "ema" if use_ema else "model",
                   "params": sum(t.numel() for t in tensors.values()), "summary": summarize(history),
                   **(extra_metrics or {}), "history": history}
        write_json(out / METRICS, metrics)
    D.barrier()
    return out
