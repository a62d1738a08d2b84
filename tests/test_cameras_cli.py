import json
from pathlib import Path

import pytest

from minwm.cameras import load_cameras
from minwm.cli import main

FIXTURE = sorted((Path(__file__).parent / "fixtures" / "re10k").glob("*.txt"))[0]


def test_convert_round_trip(tmp_path):
    assert main(["camera", "convert", str(FIXTURE), "--to", "json", "--out", str(tmp_path / "c.json")]) == 0
    assert main(["camera", "convert", str(tmp_path / "c.json"), "--to", "nerfstudio", "--image-size", "360", "640",
                 "--out", str(tmp_path / "ns" / "transforms.json")]) == 0
    assert main(["camera", "convert", str(tmp_path / "ns"), "--to", "re10k", "--out", str(tmp_path / "b.txt")]) == 0
    a, _ = load_cameras(FIXTURE)
    b, _ = load_cameras(tmp_path / "b.txt")
    assert (a.w2c - b.w2c).abs().max() < 1e-6 and (a.intrinsics - b.intrinsics).abs().max() < 1e-6


def test_show_writes_png(tmp_path):
    out = tmp_path / "t.png"
    assert main(["camera", "show", "w*8,l*10,w*8", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert main(["camera", "show", str(FIXTURE), "--relative", "--out", str(tmp_path / "r.png")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.png", "t.png"]    # no temporaries left


def test_parse_prints_json(capsys):
    assert main(["camera", "parse", "w*2,l"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "minwm.cameras/1" and len(doc["frames"]) == 4 and doc["source"] == "w*2,l"
    assert doc["frames"][2]["w2c"][2][3] == pytest.approx(-0.16)


def bad_re10k(tmp_path) -> Path:
    p = tmp_path / "bad.txt"
    p.write_text("https://example.com/v\n1 0.5 0.5 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1\n")
    return p


@pytest.mark.parametrize("argv, match", [
    (["camera", "show", "w*", "--out", "{out}"], "actions: position 2: expected a repeat count"),
    (["camera", "show", "x*3", "--out", "{out}"], "actions: position 0: expected a key"),
    (["camera", "show", "w*-1", "--out", "{out}"], "actions: position 2"),
    (["camera", "show", "w**2", "--out", "{out}"], "actions: position 2"),
    (["camera", "show", "w*100000", "--out", "{out}"], "above the cap of 4096"),
    (["camera", "parse", "w++a"], "actions: position 2: expected a key"),
    (["camera", "convert", "{bad}", "--to", "json", "--out", "{out}"], "bad.txt:2: expected 19 columns"),
    (["camera", "convert", "{fixture}", "--to", "nerfstudio", "--out", "{out}"], "image size is unknown"),
    (["camera", "convert", "{tmp}/missing.json", "--to", "re10k", "--out", "{out}"], "missing.json: file not found"),
    (["camera", "show", "{tmp}/traj.json", "--out", "{out}"], "traj.json: file not found"),
])
def test_errors_exit_2_and_write_nothing(tmp_path, capsys, argv, match):
    out = tmp_path / "out" / "result.png"
    argv = [a.format(out=out, bad=bad_re10k(tmp_path), fixture=FIXTURE, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("minwm: error: ") and match in err and err.count("\n") == 1
    assert not out.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_parse_uses_config_step_sizes(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("actions:\n  translation_step: 1.0\n")
    assert main(["camera", "parse", "w*2", "--config", str(cfg), "--intrinsics", "0.6", "1.0", "0.5", "0.5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["frames"][2]["w2c"][2][3] == pytest.approx(-2.0) and doc["frames"][0]["intrinsics"][0] == 0.6
