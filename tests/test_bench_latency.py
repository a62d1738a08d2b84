"""`minwm bench latency` on a tiny model: the report's files and keys, and the pure summaries behind them."""

import json

import pytest
import yaml

from minwm.bench.latency import extrapolate, flat_cost_ratio, full_window_start, render_markdown
from minwm.cli import main

TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
            text_dim=64, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, eps=1e-6,
            qk_norm="rms_norm_across_heads")


def test_full_window_start():
    assert full_window_start(16, 0, 4) == 4   # chunks 0..3 fill 16 frames; chunk 4 starts full
    assert full_window_start(20, 0, 4) == 5
    assert full_window_start(6, 1, 4) == 2    # 7 frames held -> full after 2 chunks
    assert full_window_start(None, 0, 4) == 0


def test_flat_cost_ratio():
    assert flat_cost_ratio([9.0] * 3 + [1.0] * 10, 3) == 1.0
    assert flat_cost_ratio([1.0] * 5 + [2.0] * 5, 0) == 2.0
    assert flat_cost_ratio([1, 1, 1, 1, 100, 1, 1, 1, 1, 1], 0) == 1.0  # medians ignore one outlier
    assert flat_cost_ratio([1.0] * 9, 0) is None


def test_extrapolate():
    assert extrapolate(0.3, 3, 50) == pytest.approx(5.0)


def test_bench_cli_writes_report(tmp_path):
    cfg = {"model": {"arch": "wan", "diffusers": TINY, "chunk_frames": 2, "window_frames": 4},
           "inference": {"latent_height": 4, "latent_width": 6, "steps": [1000, 500], "baseline_steps": 10,
                         "guidance": 8.0},
           "bench": {"frames": 4, "chunks": 12, "threads": 1, "runs": 1}}
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["bench", "latency", "--config", str(path), "--random-weights", "--out", str(out),
                 "--baseline-steps", "2"]) == 0
    r = json.loads((out / "bench.json").read_text())
    ff = r["first_frame_latency_s"]
    assert set(ff) == {"bidirectional", "ar_multistep", "ar_fewstep"} and all(v > 0 for v in ff.values())
    assert r["first_frame_speedup"] == pytest.approx(ff["bidirectional"] / ff["ar_fewstep"])
    assert r["baselines"]["extrapolated"] and r["baselines"]["measured_steps"] == 2
    assert len(r["chunk_latency_s"]) == 12 and r["full_window_from_chunk"] == 2
    assert r["flat_cost_ratio"] is not None and r["steady_fps"] > 0 and r["peak_memory_mb"] > 0
    assert r["with_decode"] is None
    md = (out / "bench.md").read_text()
    assert "extrapolated from 2 measured steps" in md and "without VAE decode" in md
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert render_markdown(r) == md
