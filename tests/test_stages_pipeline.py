"""`minwm train` / `minwm pipeline`: the stages config section, one-line errors before any training (unknown
stage, config typo, wrong-architecture or missing input), and a tiny recipe that runs, then skips when done."""

from __future__ import annotations

import dataclasses
import json
import types
from dataclasses import dataclass

import pytest
import torch
import yaml
from stages_helpers import TINY_WAN, make_cache, tiny_config

from minwm.cli import main
from minwm.errors import MinwmError

torch.set_num_threads(1)


def write_config(tmp_path, cache, **extra):
    data = {
        "model": {"arch": "wan", "diffusers": dict(TINY_WAN), "chunk_frames": 2, "window_frames": 8},
        "codec": {"text": {"max_text_len": 8}},
        "train": {"lr": 1e-3, "batch_size": 2, "max_steps": 2, "ckpt_every": 1, "log_every": 100,
                  "tensorboard": False, "plot": False, "mixed_precision": "no"},
        "stages": {"latents": str(cache), "threads": 1},
        **extra,
    }
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def write_recipe(tmp_path, stages, name="r", **extra):
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"config": "tiny.yaml", "name": name, "runs": str(tmp_path / "runs"),
                                 "stages": stages, **extra}))
    return p


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minwm: error: ") and "\n" not in err, err
    return err


# ---- config section --------------------------------------------------------------------------------------------

def test_stage_sections_are_built_from_params_and_train_overrides_take_precedence():
    from minwm.config import parse_config
    from minwm.stages.config import _stage_section_class, stage_train_config

    cfg = parse_config({"train": {"lr": 1e-5, "max_steps": 7},
                        "stages": {"ar": {"text_dropout": 0.1, "train": {"lr": 3e-4}}}}, "x.yaml")
    assert cfg.stages.ar.text_dropout == 0.1 and cfg.stages.bidirectional.text_dropout == 0.0
    tc = stage_train_config(cfg, "ar")
    assert tc.lr == 3e-4 and tc.max_steps == 7 and tc.betas == [0.0, 0.999]
    assert stage_train_config(cfg, "bidirectional").lr == 1e-5
    assert stage_train_config(cfg, "ar", max_steps=3).max_steps == 3
    with pytest.raises(MinwmError, match=r"stages\.ar\.train\.lrr: unknown key"):
        parse_config({"stages": {"ar": {"train": {"lrr": 1}}}}, "x.yaml")
    with pytest.raises(MinwmError, match=r"stages\.ar\.shfit: unknown key"):
        parse_config({"stages": {"ar": {"shfit": 1}}}, "x.yaml")
    with pytest.raises(MinwmError, match=r"stages\.bidirectional\.train: .*betas"):
        stage_train_config(parse_config({"stages": {"bidirectional": {"train": {"betas": [2.0, 0.5]}}}}, "x.yaml"),
                           "bidirectional")

    # A stage author's module: Params + TRAIN_DEFAULTS become a strict section with the reference values.
    @dataclass
    class Params:
        grid: int = 48

    mod = types.SimpleNamespace(Params=Params, TRAIN_DEFAULTS={"betas": [0.9, 0.999], "ema_decay": 0.99})
    cls = _stage_section_class("my-stage", mod)
    sec = cls()
    assert sec.grid == 48 and sec.train.betas == [0.9, 0.999] and sec.train.ema_decay == 0.99 and sec.train.lr is None
    assert isinstance(sec, Params) and {f.name for f in dataclasses.fields(cls)} == {"grid", "train"}
    with pytest.raises(MinwmError, match="unknown train setting"):
        _stage_section_class("bad", types.SimpleNamespace(Params=Params, TRAIN_DEFAULTS={"lrr": 1}))


# ---- errors before training ------------------------------------------------------------------------------------

def test_bad_inputs_are_one_line_errors_before_training(tmp_path, capsys):
    from minwm.models.config import ModelConfig
    from minwm.models.hunyuan15 import Hunyuan15Backbone

    cache = make_cache(tmp_path / "cache", n=2, frames=4)
    cfg = write_config(tmp_path, cache)
    out = tmp_path / "out"
    # unknown stage
    err = one_line_error(capsys, ["train", "ardd", "--config", str(cfg), "--out", str(out)])
    assert "unknown stage 'ardd'" in err
    # missing input
    err = one_line_error(capsys, ["train", "ar", "--config", str(cfg), "--out", str(out)])
    assert "input 'init' is required" in err
    # unknown input name
    err = one_line_error(capsys, ["train", "ar", "--config", str(cfg), "--out", str(out), "--init",
                                  f"teacher={tmp_path}"])
    assert "unknown input 'teacher'" in err
    # an init checkpoint of another architecture (a finished HunyuanVideo-1.5 stage output)
    hy = tmp_path / "hy"
    tiny_hy = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                   num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=12,
                   text_embed_2_dim=10, image_embed_dim=8, rope_axes_dim=(4, 6, 6), task_type="t2v")
    Hunyuan15Backbone(ModelConfig(arch="hunyuan15", diffusers=tiny_hy)).save_pretrained(hy)
    (hy / "metrics.json").write_text(json.dumps({"complete": True}))
    err = one_line_error(capsys, ["train", "ar", "--config", str(cfg), "--out", str(out), "--init", str(hy)])
    assert "'hunyuan15' backbone but model.arch is 'wan'" in err
    # same architecture, other size
    other = tmp_path / "other"
    from minwm.models.wan import WanBackbone
    WanBackbone(ModelConfig(arch="wan", diffusers={**TINY_WAN, "num_layers": 3})).save_pretrained(other)
    (other / "metrics.json").write_text(json.dumps({"complete": True}))
    err = one_line_error(capsys, ["train", "ar", "--config", str(cfg), "--out", str(out), "--init", str(other)])
    assert "num_layers=3" in err
    # an unfinished input
    (other / "metrics.json").unlink()
    err = one_line_error(capsys, ["train", "ar", "--config", str(cfg), "--out", str(out), "--init", str(other)])
    assert "not a finished stage output" in err
    # a config typo
    bad = write_config(tmp_path, cache, stages={"latents": str(cache), "bidirectional": {"txt_dropout": 0.1}})
    err = one_line_error(capsys, ["train", "bidirectional", "--config", str(bad), "--out", str(out)])
    assert "stages.bidirectional.txt_dropout: unknown key" in err
    assert not out.exists()  # nothing was started


def test_recipe_errors_come_before_any_stage_runs(tmp_path, capsys):
    cache = make_cache(tmp_path / "cache", n=2, frames=4)
    write_config(tmp_path, cache)
    runs = tmp_path / "runs"
    err = one_line_error(capsys, ["pipeline", str(write_recipe(tmp_path, ["bidirectional", "ar", "cdd"]))])
    assert "stages[2]: unknown stage 'cdd'" in err
    err = one_line_error(capsys, ["pipeline", str(write_recipe(
        tmp_path, ["bidirectional", {"ar": {"train": {"max_step": 3}}}]))])
    assert "stages.ar.train.max_step: unknown key" in err or "train.max_step: unknown key" in err
    err = one_line_error(capsys, ["pipeline", str(write_recipe(tmp_path, ["ar"]))])
    assert "needs input 'init' from bidirectional" in err
    err = one_line_error(capsys, ["pipeline", str(write_recipe(tmp_path, ["ar", "bidirectional"]))])
    assert "cannot run after" in err
    err = one_line_error(capsys, ["pipeline", str(write_recipe(tmp_path, ["bidirectional"], confg="x"))])
    assert "confg: unknown key" in err
    assert not runs.exists()


def test_pipeline_runs_skips_finished_stages_and_resumes(tmp_path, capsys):
    from minwm.stages.pipeline import run_pipeline

    cache = make_cache(tmp_path / "cache", n=2, frames=4)
    write_config(tmp_path, cache)
    recipe = write_recipe(tmp_path, ["bidirectional", {"ar": {"train": {"max_steps": 3}}}])
    outs = run_pipeline(recipe, echo=lambda s: None)
    runs = tmp_path / "runs" / "r"
    assert outs == [runs / "bidirectional", runs / "ar"]
    m = json.loads((runs / "ar" / "metrics.json").read_text())
    assert m["steps"] == 3 and m["inputs"] == {"init": str(runs / "bidirectional")}
    before = (runs / "ar" / "model.safetensors").stat().st_mtime_ns
    said = []
    run_pipeline(recipe, echo=said.append)
    assert all("skipped" in s for s in said) and len(said) == 2
    assert (runs / "ar" / "model.safetensors").stat().st_mtime_ns == before
    # An interrupted stage (no metrics.json, checkpoints present) resumes instead of restarting.
    (runs / "ar" / "metrics.json").unlink()
    said = []
    run_pipeline(recipe, echo=said.append)
    assert "skipped" in said[0] and "training" in said[1]
    assert json.loads((runs / "ar" / "metrics.json").read_text())["history"] == m["history"]
    # --from needs the earlier stages done; --fresh retrains the selected ones.
    run_pipeline(recipe, start="ar", fresh=True, echo=lambda s: None)
    assert json.loads((runs / "ar" / "metrics.json").read_text())["steps"] == 3
