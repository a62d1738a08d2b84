import numpy as np
import pytest
import torch

from minwm.cameras import save_cameras
from minwm.data.clips import ClipDataset
from minwm.data.importers import import_clip
from minwm.errors import MinwmError
from minwm.worlds.render import render
from minwm.worlds.scene import generate_scene
from minwm.worlds.trajectories import program_cameras, square_intrinsics

torch.set_num_threads(1)


def _write_images(folder, frames, names=None):
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"frame_{i:03d}.png" for i in range(len(frames))]
    for f, n in zip(frames, names):
        cv2.imwrite(str(folder / n), f[..., ::-1])
    return names


def _write_video(path, frames, fps=10):
    import av

    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=fps)
        st.height, st.width = frames.shape[1:3]
        st.pix_fmt = "yuv420p"
        st.options = {"crf": "0"}
        for f in frames:
            for p in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(p)
        for p in st.encode():
            out.mux(p)


def _procedural(H, W, frames=5, seed=0):
    rng = np.random.default_rng(seed)
    cams = program_cameras("w+l", frames, square_intrinsics(70, H, W))
    scene = generate_scene(rng, cams.positions.numpy())
    return scene, cams, render(scene, cams, H, W)


def test_import_images_with_crop_keeps_geometry(tmp_path):
    scene, cams, frames = _procedural(48, 72)
    _write_images(tmp_path / "imgs", frames)
    save_cameras(tmp_path / "cams.json", cams, "json", image_size=(48, 72))
    clip = import_clip(tmp_path / "imgs", tmp_path / "cams.json", tmp_path / "ds", size=(32, 32), caption="hi")
    back = ClipDataset(tmp_path / "ds")[0]
    assert back.frames.shape == (5, 32, 32, 3) and back.caption == "hi" and clip.name == "imgs"
    fx, fy, cx, cy = back.cameras.intrinsics[0].tolist()
    assert cx == pytest.approx(0.5) and cy == pytest.approx(0.5) and fx == pytest.approx(cams.intrinsics[0, 0] * 72 / 48)
    # The imported cameras must describe the imported pixels: re-render with them and compare.
    again = render(scene, back.cameras, 32, 32)
    assert np.abs(again.astype(int) - back.frames.astype(int)).mean() < 8


def test_import_video_with_re10k_timestamps(tmp_path):
    # 10 video frames at 10 fps whose brightness encodes their index; 5 cameras at 0.0, 0.2, ... s.
    video = np.stack([np.full((16, 16, 3), 20 * i, dtype=np.uint8) for i in range(10)])
    _write_video(tmp_path / "v.mp4", video)
    _, cams, _ = _procedural(16, 16)
    save_cameras(tmp_path / "c.txt", cams, "re10k", meta={"source": "https://example.com/v",
                                                             "timestamps_us": [200000 * i for i in range(5)]})
    import_clip(tmp_path / "v.mp4", tmp_path / "c.txt", tmp_path / "ds", fmt="re10k", name="walk")
    clip = ClipDataset(tmp_path / "ds")[0]
    assert clip.name == "walk" and clip.source == "https://example.com/v"
    got = clip.frames.reshape(5, -1).mean(1) / 20
    assert np.allclose(got, [0, 2, 4, 6, 8], atol=0.3)
    assert torch.allclose(clip.cameras.w2c, cams.w2c, atol=1e-6)


def test_import_nerfstudio_uses_file_paths_order(tmp_path):
    _, cams, frames = _procedural(24, 24)
    names = [f"img_{9 - i}.png" for i in range(5)]           # file order opposite to name order
    _write_images(tmp_path / "scene" / "images", frames, names)
    save_cameras(tmp_path / "scene" / "transforms.json", cams, "nerfstudio",
                 meta={"file_paths": [f"images/{n}" for n in names]}, image_size=(24, 24))
    import_clip(tmp_path / "scene" / "images", tmp_path / "scene" / "transforms.json", tmp_path / "ds")
    clip = ClipDataset(tmp_path / "ds")[0]
    assert np.array_equal(clip.frames, frames)
    assert torch.allclose(clip.cameras.w2c, cams.w2c, atol=1e-6)


@pytest.mark.parametrize("case", ["count_mismatch", "unreadable_video", "aspect_mismatch"])
def test_failed_import_writes_nothing(tmp_path, case):
    _, cams, frames = _procedural(16, 16)
    if case == "count_mismatch":
        _write_images(tmp_path / "imgs", frames[:4])
        src, msg = tmp_path / "imgs", "clip imgs: 4 images .* but 5 cameras"
    elif case == "unreadable_video":
        (tmp_path / "bad.mp4").write_bytes(b"not a video at all" * 10)
        src, msg = tmp_path / "bad.mp4", "clip bad: cannot read video"
    else:
        _write_images(tmp_path / "imgs", frames)
        src, msg = tmp_path / "imgs", "describes 16x32 images"
    save_cameras(tmp_path / "c.json", cams, "json", image_size=(16, 32) if case == "aspect_mismatch" else None)
    with pytest.raises(MinwmError, match=msg):
        import_clip(src, tmp_path / "c.json", tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_import_appends_and_rejects_duplicates(tmp_path):
    _, cams, frames = _procedural(16, 16)
    _write_images(tmp_path / "a", frames)
    save_cameras(tmp_path / "c.json", cams, "json")
    import_clip(tmp_path / "a", tmp_path / "c.json", tmp_path / "ds")
    import_clip(tmp_path / "a", tmp_path / "c.json", tmp_path / "ds", name="a2")
    assert ClipDataset(tmp_path / "ds").names == ["a", "a2"]
    before = (tmp_path / "ds" / "index.json").read_bytes()
    with pytest.raises(MinwmError, match="clip a: a clip of that name"):
        import_clip(tmp_path / "a", tmp_path / "c.json", tmp_path / "ds")
    assert (tmp_path / "ds" / "index.json").read_bytes() == before
    assert len(list((tmp_path / "ds" / "shards").iterdir())) == 2


def test_import_real_re10k_file(tmp_path):
    from pathlib import Path

    from minwm.cameras import load_cameras

    cam_file = Path(__file__).parent / "fixtures" / "re10k" / "0bf152ef84195293.txt"
    cams, _ = load_cameras(cam_file)
    # Frames stand in for the YouTube video (16:9, as the file's fx/fy imply); one image per camera.
    frames = np.random.default_rng(0).integers(0, 256, (len(cams), 36, 64, 3), dtype=np.uint8)
    _write_images(tmp_path / "imgs", frames)
    import_clip(tmp_path / "imgs", cam_file, tmp_path / "ds", size=(32, 32), name="re10k-real")
    clip = ClipDataset(tmp_path / "ds")[0]
    assert clip.source == "https://www.youtube.com/watch?v=QShWPZxTDoE" and len(clip.frames) == len(cams)
    assert torch.allclose(clip.cameras.w2c, cams.w2c)
    fx, fy, cx, cy = clip.cameras.intrinsics[0].tolist()
    # Centre crop 36x36 out of 36x64: horizontal focal length grows by 64/36, vertical unchanged.
    assert fx == pytest.approx(cams.intrinsics[0, 0].item() * 64 / 36) and fy == pytest.approx(cams.intrinsics[0, 1].item())
    assert (cx, cy) == (pytest.approx(0.5), pytest.approx(0.5))
    assert fx * 32 == pytest.approx(fy * 32, rel=0.01)           # square pixels after the crop
