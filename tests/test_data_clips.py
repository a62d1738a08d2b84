import io
import json
import zipfile

import numpy as np
import pytest
import torch

from minwm.cameras.camera import Cameras
from minwm.data.clips import (Clip, ClipDataset, ClipWriter, DataConfig, collate_clips, iter_clips, perturb_cameras,
                              write_shard)
from minwm.data.procedural import render_dataset
from minwm.errors import MinwmError

torch.set_num_threads(1)


def _clip(name="c0", F=5, H=8, W=12, seed=0, caption="a red box"):
    rng = np.random.default_rng(seed)
    w2c = torch.eye(4, dtype=torch.float64).repeat(F, 1, 1)
    w2c[:, 2, 3] = torch.arange(F, dtype=torch.float64) * 0.1
    K = torch.tensor([0.9, 1.2, 0.5, 0.5], dtype=torch.float64)
    return Clip(name, rng.integers(0, 256, (F, H, W, 3), dtype=np.uint8), Cameras(w2c, K), caption, "test")


def _write(root, clips, per_shard=2):
    with ClipWriter(root, clips_per_shard=per_shard) as w:
        for c in clips:
            w.add(c)


def _rewrite_member(shard, member, array):
    """Replace one array inside a shard (simulates a corrupt or hand-edited dataset)."""
    with zipfile.ZipFile(shard) as z:
        items = {n: z.read(n) for n in z.namelist()}
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array)
    items[member] = buf.getvalue()
    with zipfile.ZipFile(shard, "w") as z:
        for n, b in items.items():
            z.writestr(n, b)


def test_round_trip_and_index(tmp_path):
    clips = [_clip(f"c{i}", seed=i) for i in range(3)]
    _write(tmp_path / "ds", clips)
    ds = ClipDataset(tmp_path / "ds")
    assert len(ds) == 3 and ds.names == ["c0", "c1", "c2"]
    assert sorted(p.name for p in (tmp_path / "ds" / "shards").iterdir()) == ["00000.npz", "00001.npz"]
    for a, b in zip(clips, iter_clips(tmp_path / "ds")):
        assert np.array_equal(a.frames, b.frames) and torch.equal(a.cameras.w2c, b.cameras.w2c)
        assert torch.equal(a.cameras.intrinsics, b.cameras.intrinsics)
        assert (b.caption, b.source) == (a.caption, "test")
    batch = collate_clips([ds[0], ds[1]])
    assert batch["frames"].shape == (2, 5, 8, 12, 3) and batch["w2c"].shape == (2, 5, 4, 4)
    assert batch["captions"] == ["a red box"] * 2


def test_writer_refuses_existing_dataset_and_duplicate_names(tmp_path):
    _write(tmp_path / "ds", [_clip("a")])
    with pytest.raises(MinwmError, match="already holds"):
        ClipWriter(tmp_path / "ds")
    w = ClipWriter(tmp_path / "ds", append=True)
    with pytest.raises(MinwmError, match="clip a: a clip of that name"):
        w.add(_clip("a"))
    with pytest.raises(MinwmError, match="clip name"):
        w.add(_clip("../evil"))


def test_writer_rejects_bad_clip_by_name(tmp_path):
    bad = _clip("short")
    bad = Clip(bad.name, bad.frames, bad.cameras[:4], bad.caption, bad.source)
    with pytest.raises(MinwmError, match="clip short: 5 frames but 4 cameras"):
        ClipWriter(tmp_path / "ds").add(bad)


@pytest.mark.parametrize("damage, message", [
    ("fewer_cameras", "clip c1: 5 frames but 4 cameras"),
    ("nan_pose", "clip c1: frame 2: non-finite camera pose"),
    ("no_caption", "clip c1: missing field 'caption'"),
    ("bad_video", "clip c1: cannot read video"),
    ("wrong_size", "clip c1: frames have shape"),
    ("bad_rotation", "clip c1: frame 0: rotation is not orthonormal"),
])
def test_bad_clips_named_with_reason(tmp_path, damage, message):
    root = tmp_path / "ds"
    _write(root, [_clip("c0"), _clip("c1", seed=1)], per_shard=1)
    shard = root / "shards" / "00001.npz"
    index = json.loads((root / "index.json").read_text())
    if damage == "fewer_cameras":
        w2c = np.load(shard)["c1.w2c"][:4]
        _rewrite_member(shard, "c1.w2c.npy", w2c)
        _rewrite_member(shard, "c1.intrinsics.npy", np.load(shard)["c1.intrinsics"][:4])
    elif damage == "nan_pose":
        w2c = np.load(shard)["c1.w2c"]
        w2c[2, 0, 3] = np.nan
        _rewrite_member(shard, "c1.w2c.npy", w2c)
    elif damage == "no_caption":
        del index["clips"][1]["caption"]
    elif damage == "bad_video":
        (root / "videos").mkdir()
        (root / "videos" / "c1.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
        index["clips"][1]["video"] = "videos/c1.mp4"
    elif damage == "wrong_size":
        index["clips"][1]["height"] = 9
    elif damage == "bad_rotation":
        w2c = np.load(shard)["c1.w2c"]
        w2c[0, :3, :3] *= 2
        _rewrite_member(shard, "c1.w2c.npy", w2c)
    (root / "index.json").write_text(json.dumps(index))

    def read_all():
        ds = ClipDataset(root)
        return [ds[i] for i in range(len(ds))]

    with pytest.raises(MinwmError, match=message):
        read_all()
    with pytest.warns(UserWarning, match="clip c1"):
        ds = ClipDataset(root, skip_bad=True)
    assert ds.names == ["c0"] and ds.rejected[0][0] == "c1"


def test_video_clips_are_read(tmp_path):
    import av

    root = tmp_path / "ds"
    _write(root, [_clip("v", H=16, W=16)])
    frames = np.zeros((5, 16, 16, 3), dtype=np.uint8)
    frames[:, :, :8] = 200
    (root / "videos").mkdir()
    with av.open(str(root / "videos" / "v.mp4"), "w") as out:
        st = out.add_stream("libx264", rate=10)
        st.width = st.height = 16
        st.pix_fmt = "yuv420p"
        for f in frames:
            for p in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    index = json.loads((root / "index.json").read_text())
    index["clips"][0]["video"] = "videos/v.mp4"
    (root / "index.json").write_text(json.dumps(index))
    clip = ClipDataset(root)[0]
    assert clip.frames.shape == (5, 16, 16, 3)
    assert np.abs(clip.frames.astype(int) - frames).mean() < 10      # lossy, but the same picture


def test_shards_are_deterministic(tmp_path):
    clips = [_clip("a"), _clip("b", seed=1)]
    write_shard(tmp_path / "1.npz", clips)
    write_shard(tmp_path / "2.npz", clips)
    assert (tmp_path / "1.npz").read_bytes() == (tmp_path / "2.npz").read_bytes()


def test_render_dataset_and_pose_noise_only_touches_cameras(tmp_path):
    cfg = DataConfig(num_clips=2, frames=5, height=24, width=32, seed=11)
    render_dataset(cfg, tmp_path / "clean", progress=False)
    noisy = DataConfig(num_clips=2, frames=5, height=24, width=32, seed=11, pose_noise_rot_deg=1.0,
                       pose_noise_trans=0.02)
    render_dataset(noisy, tmp_path / "noisy", progress=False)
    for a, b in zip(iter_clips(tmp_path / "clean"), iter_clips(tmp_path / "noisy")):
        assert np.array_equal(a.frames, b.frames)
        assert a.caption == b.caption and a.caption
        d = (a.cameras.w2c - b.cameras.w2c).abs().amax(dim=(1, 2))
        assert (d > 1e-4).all() and (d < 0.2).all()
        assert a.frames.shape == (5, 24, 32, 3) and a.meta["actions"]


def test_perturb_cameras_statistics():
    cams = Cameras(torch.eye(4, dtype=torch.float64).repeat(2000, 1, 1), torch.tensor([1.0, 1.0, 0.5, 0.5]))
    out = perturb_cameras(cams, np.random.default_rng(0), rot_deg=2.0, trans=0.05).validate()
    R = out.c2w[:, :3, :3]
    ang = torch.rad2deg(torch.acos(((R.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)))
    assert float(ang.pow(2).mean().sqrt()) == pytest.approx(2.0, rel=0.1)
    assert float(out.positions.std()) == pytest.approx(0.05, rel=0.1)
    assert torch.equal(out.intrinsics, cams.intrinsics)


def test_data_config_checks():
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        DataConfig(frames=6)
    with pytest.raises(ValueError):
        DataConfig(pose_noise_trans=-1)
