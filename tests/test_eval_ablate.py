"""`minwm ablate`: value parsing, the variants, a one-line error without a VAE, and the steps ablation end to end
on a tiny config (render -> encode -> bidirectional training resumed between values -> eval -> report)."""

import json

import pytest
import torch
import yaml

from minwm.cli import main
from minwm.codecs.config import tiny_wan_vae
from minwm.codecs.vae import VideoCodec
from minwm.errors import MinwmError
from minwm.eval.ablate import default_values, parse_values, variant_name

torch.set_num_threads(1)

TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, eps=1e-6,
            qk_norm="rms_norm_across_heads")


def tiny_config(tmp_path, vae=True):
    cfg = {"data": {"num_clips": 3, "frames": 9, "height": 32, "width": 32},
           "model": {"arch": "wan", "diffusers": dict(TINY), "chunk_frames": 2, "window_frames": 4},
           "codec": {"vae": None},
           "train": {"lr": 1e-3, "batch_size": 2, "max_steps": 2, "ckpt_every": 1, "log_every": 100,
                     "tensorboard": False, "plot": False, "mixed_precision": "no"},
           "inference": {"baseline_steps": 2}}
    if vae:
        VideoCodec.from_config(tiny_wan_vae(), seed=0).save_pretrained(tmp_path / "vae")
        cfg["codec"]["vae"] = str(tmp_path / "vae")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_values_and_variants():
    assert default_values("steps", 300, 8) == ["50", "100", "200", "300"]
    assert default_values("batch-size", 300, 8) == ["1", "2", "4", "8"]
    assert parse_values("pose-noise", ["2,0.05", "0,0"]) == [(0.0, 0.0), (2.0, 0.05)]
    assert [variant_name("pose-noise", v) for v in [(0.0, 0.0), (2.0, 0.05)]] == ["exact", "noise-2deg-0.05"]
    assert variant_name("batch-size", 4) == "batch-4"
    for ab, bad, msg in (("pose-noise", ["2"], "ROT_DEG,TRANS"), ("pose-noise", ["-1,0"], ">= 0"),
                         ("steps", ["x"], "integer"), ("batch-size", ["0"], ">= 1"), ("steps", ["5", "5"], "repeated")):
        with pytest.raises(MinwmError, match=msg):
            parse_values(ab, bad)


def test_ablate_without_vae_is_a_one_line_error(tmp_path, capsys):
    cfg = tiny_config(tmp_path, vae=False)
    assert main(["ablate", "steps", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "codec.vae is not set" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_steps_ablation_end_to_end(tmp_path):
    cfg = tiny_config(tmp_path)
    out = tmp_path / "abl"
    args = ["ablate", "steps", "--config", str(cfg), "--out", str(out), "--values", "1;2", "--suite", "toy-smoke",
            "--pose-workers", "0"]
    assert main(args) == 0
    res = json.loads((out / "steps" / "ablation.json").read_text())
    assert [r["value"] for r in res["rows"]] == [1, 2]
    for r, steps in zip(res["rows"], (1, 2)):
        m = json.loads((out / "steps" / f"steps-{steps}" / "bidirectional" / "metrics.json").read_text())
        assert m["stage"] == "bidirectional" and m["steps"] == steps   # snapshots along one resumed run
        assert r["psnr"] is not None and "direction_accuracy" in r["baseline"]
    report = (out / "steps" / "report.md").read_text()
    assert "training steps" in report and "![ablation](ablation.png)" in report
    assert (out / "steps" / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    # re-running skips everything that is done (no training, no evaluation)
    mtime = (out / "steps" / "steps-2" / "eval" / "metrics.json").stat().st_mtime
    assert main(args) == 0
    assert (out / "steps" / "steps-2" / "eval" / "metrics.json").stat().st_mtime == mtime
