"""`minwm quickstart`: the orchestration end to end on a micro recipe (tiny sizes, 2 steps per stage, the
toy-smoke eval suite), its outputs (summary.json keys, report.md), resume / staleness, and its pure helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minwm.errors import MinwmError
from minwm.quickstart import Quickstart, fmt_duration, pace, scaled_steps, stage_list
from minwm.quickstart_report import acceptance, single_action_metrics, strip_indices

MICRO = """
data: {num_clips: 10, frames: 13, height: 32, width: 32}
codec:
  vae_tiny: {base_dim: 8, z_dim: 16, dim_mult: [1, 2, 2], num_res_blocks: 1, attn_scales: [],
             temperal_downsample: [true, true], is_residual: true}
  text: {max_text_len: 8}
model:
  arch: wan
  diffusers: {patch_size: [1, 2, 2], num_attention_heads: 2, attention_head_dim: 16, in_channels: 16,
              out_channels: 16, text_dim: 32, freq_dim: 32, ffn_dim: 64, num_layers: 2, cross_attn_norm: true,
              eps: 1.0e-6}
  chunk_frames: 2
  window_frames: 4
train: {lr: 1.0e-3, batch_size: 2, max_steps: 2, ckpt_every: 100, log_every: 1, tensorboard: false, plot: false,
        mixed_precision: "no"}
stages:
  latent_frames: 4
  threads: 1
  vae: {heldout_clips: 2, clip_frames: 9, crop_size: 16, eval_every: 100, train: {max_steps: 2, batch_size: 2}}
  bidirectional: {text_dropout: 0.1}
  ar: {text_dropout: 0.1}
  ode_data: {steps: 8, batch_size: 2, train: {max_steps: 4}}
  cd: {grid_steps: 8}
bench: {frames: 4, chunks: 2, runs: 1, threads: 1, baseline_steps: 2}
inference: {baseline_steps: 4, fps: 8}
"""


def micro_recipe(tmp_path: Path) -> Path:
    (tmp_path / "micro.yaml").write_text(MICRO)
    p = tmp_path / "recipe.yaml"
    p.write_text("config: micro.yaml\nname: micro\nstages: [vae, bidirectional, ar, cd, dmd]\n")
    return p


def test_helpers():
    assert stage_list(["vae", "bidirectional", "ar", "cd", "dmd"], "ode") == \
        ["vae", "bidirectional", "ar", "ode-data", "ode", "dmd"]
    assert stage_list(["vae", "bidirectional", "ar", "ode-data", "ode", "dmd"], "cd") == \
        ["vae", "bidirectional", "ar", "cd", "dmd"]
    with pytest.raises(MinwmError, match="no Stage 2"):
        stage_list(["vae", "bidirectional", "ar", "dmd"], "cd")
    with pytest.raises(MinwmError, match="--stage2"):
        stage_list(["cd"], "dmd")
    assert scaled_steps(300, 0.1) == 30 and scaled_steps(3, 0.01) == 1
    assert fmt_duration(45) == "45s" and fmt_duration(185) == "3m05s" and fmt_duration(3720) == "1h02m"
    assert pace([]) == 1.0 and pace([(1.0, 100.0)]) == 1.0          # tiny steps do not move the forecast
    assert pace([(10.0, 20.0), (30.0, 60.0)]) == pytest.approx(2.0)
    assert strip_indices(21) == [0, 4, 8, 12, 16, 20]


def test_acceptance_reads_single_action_trajectories():
    def entry(acc, rot, base_rot):
        per = {f"hold_{k}": {"direction_accuracy": acc, "rot_err_deg": rot} for k in "wsadqejlik"}
        per["hold_w_l"] = {"direction_accuracy": 0.0, "rot_err_deg": 99.0}     # compound: not a single action
        return {"per_trajectory": per, "baseline": {"per_trajectory": {
            k: {"direction_accuracy": 0.5, "rot_err_deg": base_rot} for k in per}}}

    sa = single_action_metrics(entry(0.95, 1.0, 3.0))
    assert sa == {"direction_accuracy": 0.95, "rot_err_deg": 1.0, "baseline_direction_accuracy": 0.5,
                  "baseline_rot_err_deg": 3.0}
    ok = acceptance({"bidirectional": entry(0.95, 0.8, 3.0), "dmd": entry(0.95, 1.0, 3.0)},
                    {"first_frame_speedup": 40.0})
    assert all(v["pass"] for v in ok.values())
    bad = acceptance({"bidirectional": entry(0.95, 0.5, 3.0), "dmd": entry(0.8, 2.0, 3.0)}, None)
    assert [v["pass"] for v in bad.values()] == [False, False, False, None]


def test_quickstart_micro_end_to_end_resume_and_staleness(tmp_path):
    recipe = micro_recipe(tmp_path)
    out = tmp_path / "qs"
    said: list[str] = []
    qs = Quickstart(out, recipe, suite="toy-smoke", echo=said.append, progress=False)
    summary = qs.run()

    # summary.json: eval per stage with the eval's per-checkpoint keys, bench.json's keys, a time per step.
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert list(summary["eval"]) == ["bidirectional", "ar", "cd", "dmd"]
    for stage, m in summary["eval"].items():
        assert set(m) == set(metrics["checkpoints"][stage]) and "rot_err_deg" in m and "baseline" in m
    bench = json.loads((out / "bench" / "bench.json").read_text())
    assert set(summary["bench"]) == set(bench) and "first_frame_speedup" in bench
    steps = ["render", "vae", "encode", "bidirectional", "ar", "cd", "dmd", "eval", "samples", "bench", "report"]
    assert list(summary["wall_time_s"]) == steps + ["total"]
    assert summary["wall_time_s"]["total"] == pytest.approx(sum(summary["wall_time_s"][k] for k in steps), abs=0.1)
    assert json.loads((out / "summary.json").read_text())["eval"].keys() == summary["eval"].keys()
    report = (out / "report.md").read_text()
    assert f"minwm play --ckpt {out.resolve() / 'dmd'}" in report and "no-camera baseline" in report
    assert "samples/strips.png" in report and "training_curves.png" in report
    for f in ("reference.gif", "dmd.gif", "strips.png"):
        assert (out / "samples" / f).stat().st_size > 0
    assert any("est." in s for s in said)

    # Re-running skips every finished step (only the report is rewritten).
    bi_weights = (out / "bidirectional" / "model.safetensors").stat().st_mtime_ns
    said.clear()
    Quickstart(out, recipe, suite="toy-smoke", echo=said.append, progress=False).run()
    assert sum("skipped" in s for s in said) == len(steps) - 1

    # A stage made again makes every later step stale: they are redone, earlier ones are kept.
    eval_mtime = (out / "eval" / "metrics.json").stat().st_mtime_ns
    (out / "dmd" / "metrics.json").unlink()
    said.clear()
    Quickstart(out, recipe, suite="toy-smoke", echo=said.append, progress=False).run()
    assert (out / "bidirectional" / "model.safetensors").stat().st_mtime_ns == bi_weights
    assert (out / "eval" / "metrics.json").stat().st_mtime_ns != eval_mtime
    assert any(s.startswith("[9/11] samples: made before") for s in said)

    # Other settings (or an edited config) on the same folder are refused before any work.
    with pytest.raises(MinwmError, match="other settings.*stage2='cd'"):
        Quickstart(out, recipe, stage2="ode", suite="toy-smoke", echo=said.append, progress=False).run()
    (tmp_path / "micro.yaml").write_text(MICRO + "# edited\n")
    with pytest.raises(MinwmError, match="other settings.*config_digest.*--fresh"):
        Quickstart(out, recipe, suite="toy-smoke", echo=said.append, progress=False).run()


def test_cli_is_registered_and_bad_input_is_one_line(tmp_path, capsys):
    from minwm.cli import main

    assert main(["quickstart", "--recipe", str(micro_recipe(tmp_path)), "--out", str(tmp_path / "q"),
                 "--budget-scale", "0"]) == 2
    assert "--budget-scale: expected > 0" in capsys.readouterr().err
    assert main(["quickstart", "--recipe", str(micro_recipe(tmp_path)), "--out", str(tmp_path / "q"),
                 "--suite", "nope"]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
