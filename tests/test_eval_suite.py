"""`minwm eval` on tiny random checkpoints with the toy-smoke suite: the metrics.json contract (every checkpoint and
its baseline carry the camera and image metrics), the report and its figures, scoring checked against an oracle
that returns the render itself, the no-camera checkpoint, and the one-line errors for bad input."""

import json
import math

import numpy as np
import pytest
import torch
import yaml

from minwm.cameras.actions import parse_actions
from minwm.cli import main
from minwm.codecs.config import tiny_wan_vae
from minwm.codecs.vae import VideoCodec
from minwm.errors import MinwmError
from minwm.eval import checkpoints as C
from minwm.eval import runner as R
from minwm.eval.suite import HELDOUT_SEED, SUITES, get_suite, suite_cases, trajectory_group
from minwm.models.backbone import build_backbone
from minwm.models.config import CameraInjectionConfig, ModelConfig

torch.set_num_threads(1)

TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, eps=1e-6,
            qk_norm="rms_norm_across_heads")
SIZE = 32          # pixels: the pose estimator needs >= 16 a side, SSIM >= 11
FRAMES = 13        # 4 latent frames: a 2-frame context chunk, one generated chunk
KEYS = ("rot_err", "trans_err", "cam_mc", "direction_accuracy", "psnr", "ssim")


def make_ckpt(d, stage="dmd", camera="prope", vae=True, seed=0):
    torch.manual_seed(seed)
    model = {"arch": "wan", "diffusers": dict(TINY), "chunk_frames": 2, "window_frames": 4,
             "camera": {"kind": camera}}
    bb = build_backbone(ModelConfig(**{**model, "diffusers": dict(TINY),
                                       "camera": CameraInjectionConfig(kind=camera)}))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the camera branch starts at zero: give it weight so cameras change the output
        for name in bb.camera_parameter_names():
            p = bb.transformer.get_parameter(name)
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    bb.save_pretrained(d)
    if vae:
        VideoCodec.from_config(tiny_wan_vae(), seed=0).save_pretrained(d / "vae")
    cfg = {"model": model, "codec": {"vae": "vae" if vae else None},
           "data": {"frames": FRAMES, "height": SIZE, "width": SIZE},
           "inference": {"steps": [1000, 500], "baseline_steps": 4}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "metrics.json").write_text(json.dumps({"stage": stage, "complete": True}))
    return d


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"dmd": make_ckpt(root / "dmd"), "bidirectional": make_ckpt(root / "bidirectional", "bidirectional"),
            "nocam": make_ckpt(root / "nocam", camera="none")}


def test_eval_cli_writes_report_and_metrics_for_every_stage(ckpts, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval", "--ckpt", str(ckpts["bidirectional"]), "--ckpt", str(ckpts["dmd"]), "--suite", "toy-smoke",
                 "--out", str(out), "--quiet"]) == 0
    assert "report.md" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["checkpoints"]) == ["bidirectional", "dmd"]
    assert m["checkpoints"]["bidirectional"]["sampler"] == "bidirectional"
    assert m["checkpoints"]["dmd"]["sampler"] == "fewstep"
    for c in m["checkpoints"].values():
        for k in KEYS:
            assert k in c and k in c["baseline"]
        assert math.isfinite(c["psnr"]) and 0 < c["ssim"] <= 1 and c["context_latent_frames"] == 2
        assert len(c["cases"]) == 2 and len(c["baseline"]["cases"]) == 2
        # a random model's frames cannot be read by the pose estimator (or can): either way it is accounted for
        assert c["pose_failures"] + sum(1 for r in c["cases"] if r["rot_err"] is not None) == 2
    ref = m["reference"]["estimator"]
    assert ref["direction_accuracy"] == 1.0 and ref["rot_err_deg"] < 2.0   # the estimator reads the renders
    report = (out / "report.md").read_text()
    assert m["reference"]["vae_roundtrip"]["num_cases"] == 2 and "(a perfect model)" in report
    assert "baseline (fixed camera)" in report and "Per-stage comparison" in report and "First chunk (2 latent frames" in report
    for png in ("error_vs_frame.png", "stages.png", "strip_s0_hold_w.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"({png})" in report


def test_vae_floor_row_follows_the_flag(ckpts, tmp_path):
    # toy-smoke has the perfect-model row (the test above); --no-vae-floor leaves it and its pose estimates out
    assert main(["eval", "--ckpt", str(ckpts["dmd"]), "--suite", "toy-smoke", "--out", str(tmp_path / "r"), "--quiet",
                 "--no-vae-floor"]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert not m["reference"].get("vae_roundtrip") and "(a perfect model)" not in (tmp_path / "r" / "report.md").read_text()


def test_scoring_against_an_oracle(ckpts, monkeypatch):
    """A 'model' that returns the render and a baseline that freezes frame 0: the model must score exactly the
    estimator floor with full direction accuracy, the frozen baseline no direction at all."""
    def oracle(self, items, batch_size=16):
        out = []
        for it in items:
            fixed = torch.allclose(it.cameras.w2c, torch.eye(4, dtype=it.cameras.w2c.dtype).expand_as(it.cameras.w2c))
            out.append(np.repeat(it.frames[:1], len(it.frames), 0) if fixed else it.frames.copy())
        return out

    monkeypatch.setattr(C.CheckpointRunner, "generate_batch", oracle)
    monkeypatch.setattr(C.CheckpointRunner, "roundtrip", lambda self, frames: frames.copy())  # a lossless VAE
    monkeypatch.setattr(R, "_GT_MEMO", {})   # not the real VAE's round trips an earlier test left in memory
    res = R.evaluate([ckpts["dmd"]], "toy-smoke", None, pose_workers=0, progress=False, echo=lambda *a: None)
    c, ref = res["checkpoints"]["dmd"], res["reference"]["estimator"]
    rt = res["reference"]["vae_roundtrip"]   # the render through the VAE: with a lossless one, the render itself
    assert rt["num_cases"] == 2 and rt["psnr"] == R.PSNR_CAP
    for k in ("rot_err", "trans_err", "cam_mc", "direction_accuracy"):
        assert rt[k] == pytest.approx(ref[k])
    for k in ("rot_err", "trans_err", "cam_mc", "direction_accuracy"):
        assert c[k] == pytest.approx(ref[k])
    assert c["direction_accuracy"] == 1.0 and c["pose_failures"] == 0
    assert c["psnr"] == R.PSNR_CAP and c["ssim"] == pytest.approx(1.0)  # identical frames: capped
    b = c["baseline"]
    assert b["direction_accuracy"] == 0.0
    assert b["per_trajectory"]["hold_l"]["rot_err_deg"] > 3 * c["per_trajectory"]["hold_l"]["rot_err_deg"]


def test_checkpoint_without_camera_skips_camera_metrics(ckpts, tmp_path):
    res = R.evaluate({"nocam": ckpts["nocam"]}, "toy-smoke", tmp_path / "r", pose_workers=0, progress=False, echo=lambda *a: None)
    c = res["checkpoints"]["nocam"]
    assert not c["camera"] and all(c[k] is None for k in ("rot_err", "trans_err", "cam_mc", "direction_accuracy"))
    assert c["psnr"] is not None and all(c["baseline"][k] is None for k in KEYS)
    report = (tmp_path / "r" / "report.md").read_text()
    assert "no camera injection" in report and "camera metrics skipped" in report


@pytest.mark.parametrize("args,message", [
    (["--suite", "nope"], "unknown suite 'nope'"),
    (["--latent-frames", "2"], "nothing to generate"),
    (["--sampler", "fewstep", "--threads", "0"], "--threads: expected >= 1"),
])
def test_eval_bad_input_messages(ckpts, tmp_path, capsys, args, message):
    out = tmp_path / "r"
    assert main(["eval", "--ckpt", str(ckpts["dmd"]), "--out", str(out), "--quiet", "--suite", "toy-smoke",
                 *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minwm: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()  # nothing half-written


def test_bad_checkpoints(tmp_path, capsys):
    assert main(["eval", "--ckpt", str(tmp_path / "missing"), "--suite", "toy-smoke"]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--ckpt", str(tmp_path / "empty")]) == 2
    assert "not a checkpoint (no model.safetensors)" in capsys.readouterr().err
    novae = make_ckpt(tmp_path / "novae", vae=False)
    with pytest.raises(MinwmError, match="codec.vae is not set"):
        R.evaluate([novae], "toy-smoke", None, pose_workers=0, progress=False)


def test_heldout_seed_collision_is_refused(tmp_path):
    d = make_ckpt(tmp_path / "c")
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["data"]["seed"] = HELDOUT_SEED
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(MinwmError, match="held-out evaluation seed"):
        R.evaluate([d], "toy-smoke", None, pose_workers=0, progress=False)


def test_suites_and_naming(tmp_path):
    cases = suite_cases(get_suite("toy-heldout"), 6)
    main_cases = [c for c in cases if not c.long]
    assert len(main_cases) == 2 * len(SUITES["toy-heldout"].trajectories)
    assert {c.latent_frames for c in main_cases} == {6} and {c.latent_frames for c in cases if c.long} == {12}
    assert len({c.name for c in cases}) == len(cases)
    assert {trajectory_group(t) for t in ("hold_w", "hold_w_l", "pause", "zigzag_walk")} == \
        {"single", "compound", "pause", "sequence"}
    for c in cases:   # every program drives exactly the clip's latent steps
        assert len(parse_actions(c.program)) == c.latent_frames - 1
    with pytest.raises(MinwmError, match="at least 2"):
        suite_cases(get_suite("toy-smoke"), 1)
    a, b = tmp_path / "x" / "ar", tmp_path / "y" / "ar"
    for d in (a, b):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"")
        (d / "config.yaml").write_text("{}")
    assert list(C.checkpoint_names([a, b])) == ["x/ar", "y/ar"]
    assert C.choose_sampler("ar", "fewstep") == "multistep"
    assert C.choose_sampler(None, "fewstep") == "fewstep"
    assert C.choose_sampler("dmd", "fewstep", "bidirectional") == "bidirectional"
    assert R.jsonable({"a": [float("nan"), np.float32(1.5), float("inf")]}) == {"a": [None, 1.5, None]}
