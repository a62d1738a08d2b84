import json

import numpy as np
import pytest
import torch

from minwm.cli import main
from minwm.data.cli import parse_pose_noise, parse_size
from minwm.data.clips import ClipDataset, iter_clips
from minwm.data.contact_sheet import pick_frames
from minwm.errors import MinwmError
from minwm.worlds.trajectories import eval_trajectories

torch.set_num_threads(1)
SMALL = ["--frames", "5", "--size", "32x32", "--quiet"]


def _tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_render_is_deterministic_per_seed(tmp_path):
    for name, seed in (("a", "4"), ("b", "4"), ("c", "5")):
        assert main(["data", "render", "--num-clips", "3", "--seed", seed, "--out", str(tmp_path / name), *SMALL]) == 0
    a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")
    assert a == b and a.keys() == c.keys() and a != c
    clips = list(iter_clips(tmp_path / "a"))
    assert [cl.name for cl in clips] == ["clip-000000", "clip-000001", "clip-000002"]
    assert all(cl.frames.shape == (5, 32, 32, 3) and cl.caption for cl in clips)


def test_render_rejects_bad_frames_and_options(tmp_path, capsys):
    assert main(["data", "render", "--num-clips", "1", "--frames", "6", "--out", str(tmp_path / "x")]) == 2
    assert "--frames: 6 is not 1 + 4k" in capsys.readouterr().err
    assert main(["data", "render", "--num-clips", "1", "--pose-noise", "1", "--out", str(tmp_path / "x")]) == 2
    assert "--pose-noise: expected ROT_DEG,TRANS" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_render_pose_noise_changes_cameras_not_frames(tmp_path):
    args = ["data", "render", "--num-clips", "2", "--seed", "1", *SMALL]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    assert main([*args, "--out", str(tmp_path / "noisy"), "--pose-noise", "0.5,0.01"]) == 0
    for a, b in zip(iter_clips(tmp_path / "clean"), iter_clips(tmp_path / "noisy")):
        assert np.array_equal(a.frames, b.frames)
        assert not torch.allclose(a.cameras.w2c, b.cameras.w2c, atol=1e-5)


def test_render_with_trajectory_file(tmp_path):
    progs = eval_trajectories(2)                      # 5 frames = 2 latent frames = 1 step
    (tmp_path / "t.json").write_text(json.dumps({k: progs[k] for k in ("hold_w", "hold_l")}))
    assert main(["data", "render", "--num-clips", "3", "--trajectories", str(tmp_path / "t.json"),
                 "--out", str(tmp_path / "ds"), *SMALL]) == 0
    clips = list(iter_clips(tmp_path / "ds"))
    assert [c.name for c in clips] == ["clip-000000-hold_w", "clip-000001-hold_l", "clip-000002-hold_w"]
    assert clips[0].cameras.positions[-1, 2] == pytest.approx(0.08)
    assert main(["data", "render", "--num-clips", "2", "--trajectories", "eval", "--out", str(tmp_path / "ev"),
                 *SMALL]) == 0
    assert ClipDataset(tmp_path / "ev").names == ["clip-000000-hold_w", "clip-000001-hold_s"]
    (tmp_path / "bad.txt").write_text("# comment\nw*2\n")
    assert main(["data", "render", "--num-clips", "1", "--trajectories", str(tmp_path / "bad.txt"),
                 "--out", str(tmp_path / "ds2"), *SMALL]) == 2


def test_show_writes_contact_sheet(tmp_path):
    assert main(["data", "render", "--num-clips", "2", "--out", str(tmp_path / "ds"), "--frames", "9",
                 "--size", "32x32", "--quiet"]) == 0
    out = tmp_path / "sheet.png"
    assert main(["data", "show", str(tmp_path / "ds"), "--out", str(out), "--frames", "3"]) == 0
    import matplotlib.image as mpimg

    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert pick_frames(9, 3) == [0, 4, 8] and pick_frames(2, 5) == [0, 1]
    # The sheet compares first and last frames: they must differ for every clip (the camera moved).
    for clip in ClipDataset(tmp_path / "ds"):
        if clip.meta["actions"] != "_*2":
            assert np.abs(clip.frames[0].astype(int) - clip.frames[-1]).mean() > 1


def test_import_through_cli(tmp_path, capsys):
    import cv2

    from minwm.cameras import Cameras, save_cameras

    (tmp_path / "imgs").mkdir()
    for i in range(5):
        cv2.imwrite(str(tmp_path / "imgs" / f"{i}.png"), np.full((20, 30, 3), 40 * i, dtype=np.uint8))
    cams = Cameras(torch.eye(4, dtype=torch.float64).repeat(5, 1, 1), torch.tensor([0.8, 1.2, 0.5, 0.5]))
    save_cameras(tmp_path / "c.json", cams, "json")
    assert main(["data", "import", "--format", "json", "--frames", str(tmp_path / "imgs"), "--cameras",
                 str(tmp_path / "c.json"), "--out", str(tmp_path / "ds"), "--size", "16x16"]) == 0
    assert ClipDataset(tmp_path / "ds")[0].frames.shape == (5, 16, 16, 3)
    assert main(["data", "import", "--frames", str(tmp_path / "nope"), "--cameras", str(tmp_path / "c.json"),
                 "--out", str(tmp_path / "ds2")]) == 2
    assert "neither a folder of images nor a video" in capsys.readouterr().err


def test_argument_parsers():
    assert parse_size("48x64") == (48, 64) and parse_pose_noise("0.5,0.01") == (0.5, 0.01)
    for bad in ("64", "0x4", "axb"):
        with pytest.raises(MinwmError, match="--size"):
            parse_size(bad)
    with pytest.raises(MinwmError, match=">= 0"):
        parse_pose_noise("-1,0")
