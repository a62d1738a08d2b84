"""`minwm generate` end to end on a tiny random-weight checkpoint with a tiny random VAE: every trajectory form gives
the documented frame count, TI2V, key overlays, and one-line errors that leave no output behind."""

import json

import cv2
import numpy as np
import pytest
import torch
import yaml

from minwm.cameras.actions import actions_to_cameras
from minwm.cameras.formats import save_cameras
from minwm.cli import main
from minwm.codecs.config import tiny_wan_vae
from minwm.codecs.vae import VideoCodec
from minwm.errors import MinwmError
from minwm.generate import overlay_keys
from minwm.inference.trajectory import chunk_actions, load_trajectory
from minwm.models.backbone import build_backbone
from minwm.models.config import ModelConfig
from minwm.world import WorldModel

torch.set_num_threads(1)

TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, eps=1e-6,
            qk_norm="rms_norm_across_heads")
H, W = 24, 40  # pixels; the tiny VAE is 4x spatial -> 6x10 latents


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = {"arch": "wan", "diffusers": dict(TINY), "chunk_frames": 2, "window_frames": 4}
    build_backbone(ModelConfig(**{**model, "diffusers": dict(TINY)})).save_pretrained(d)
    VideoCodec.from_config(tiny_wan_vae(), seed=0).save_pretrained(d / "vae")
    cfg = {"model": model, "codec": {"vae": "vae"},
           "inference": {"height": H, "width": W, "steps": [1000, 500], "max_generate_frames": 12, "fps": 8}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    return d


def read_video(path):
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def generate(ckpt, out, trajectory, *extra):
    return main(["generate", "--ckpt", str(ckpt), "--prompt", "a red room", "--trajectory", trajectory,
                 "--out", str(out), "--threads", "1", "--quiet", *extra])


def test_dsl_frame_count_and_overlay(ckpt, tmp_path):
    out = tmp_path / "dsl.mp4"
    assert generate(ckpt, out, "w*3,w+l*2", "--overlay-keys", "--seed", "1") == 0
    v = read_video(out)
    assert v.shape == (1 + 4 * 5, H, W, 3)  # 5 steps -> 6 latent frames -> 21 pixel frames


def test_camera_json_and_re10k_frame_counts(ckpt, tmp_path):
    cams = actions_to_cameras("w*4,l*4", intrinsics=(0.6, 1.0, 0.5, 0.5))  # 9 cameras = 1 + 4*2 pixel frames
    save_cameras(tmp_path / "traj.json", cams)
    out = tmp_path / "json.mp4"
    assert generate(ckpt, out, str(tmp_path / "traj.json")) == 0
    assert len(read_video(out)) == 9
    # A real RealEstate10K file of 16 frames: the longest 1 + 4k prefix (13 frames) is used, with a note.
    re10k = "tests/fixtures/re10k/0bf152ef84195293.txt"
    out = tmp_path / "re10k.mp4"
    assert generate(ckpt, out, re10k) == 0
    assert len(read_video(out)) == 13


def test_image_first_frame(ckpt, tmp_path, capsys):
    img = np.zeros((48, 64, 3), np.uint8)
    img[:, :32] = (255, 0, 0)
    path = tmp_path / "first.png"
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    out = tmp_path / "ti2v.mp4"
    assert generate(ckpt, out, "w*2", "--image", str(path)) == 0
    assert "resizing" in capsys.readouterr().err
    v = read_video(out)
    assert len(v) == 9
    # frame 0 is the (resized) image itself: left half red, right half black (up to H.264 error)
    assert v[0, :, :16, 0].mean() > 200 and v[0, :, 24:].mean() < 40


def test_errors_are_one_line_and_leave_nothing(ckpt, tmp_path, capsys):
    out = tmp_path / "x.mp4"
    assert generate(tmp_path / "nope", out, "w") == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
    assert generate(ckpt, out, "w*12") == 2  # 13 latent frames > max_generate_frames 12
    err = capsys.readouterr().err
    assert "max_generate_frames" in err and err.count("\n") == 1
    assert generate(ckpt, out, "w*2,x") == 2
    assert generate(ckpt, out, str(tmp_path / "missing.json")) == 2
    assert not out.exists() and not list(tmp_path.glob(".x.mp4*"))


def test_trajectory_forms_unit():
    from minwm.cameras.actions import ActionConfig

    cfg = ActionConfig()
    t = load_trajectory("w*5", cfg, 4, 100)
    assert t.latent_frames == 6 and t.pixel_frames(4) == 21
    # chunk 0 holds latent frames 0..3: frame 0 takes no action, frame i takes step i-1; padding none.
    assert chunk_actions(t, 4, 0) == [frozenset()] + [frozenset("w")] * 3
    assert chunk_actions(t, 4, 1) == [frozenset("w")] * 2 + [frozenset()] * 2
    assert t.labels(cfg) == ["", "w", "w", "w", "w", "w"]
    with pytest.raises(MinwmError, match="max_generate_frames"):
        load_trajectory("w*5", cfg, 4, 5)
    frames = np.zeros((9, 8, 8, 3), np.uint8)
    over = overlay_keys(frames, ["", "w", "w+l"], 4)
    assert over[0].sum() == 0 and over[1].sum() > 0 and over[8].sum() > 0


def test_from_checkpoint_matches_the_saved_weights(ckpt):
    wm = WorldModel.from_checkpoint(ckpt)
    assert (wm.height, wm.width, wm.latent_height, wm.latent_width) == (H, W, 6, 10)
    assert wm.frames_per_chunk == 8 and wm.fps == 8 and wm.text_encoder is not None
    wm.reset("a red room", seed=0)
    frames = wm.step("w")
    assert frames.dtype == np.uint8 and frames.shape == (1 + 4 * 1, H, W, 3)  # first chunk: 1 + 4(chunk - 1)
    assert wm.step("l").shape == (8, H, W, 3)
    assert set(wm.last_timings) >= {"denoise_s", "refresh_s", "decode_s"}
    again = WorldModel.from_checkpoint(ckpt, steps=[1000], window_frames=2)
    assert again.timesteps == [1000.0] and again._caches[0].window_frames == 2
    json.dumps(wm.last_timings)


def test_ti2v_holds_the_image_latent_in_frame_zero(ckpt):
    wm = WorldModel.from_checkpoint(ckpt)
    img = (np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8)
    first = wm.reset("a red room", image=img, seed=0)
    assert first.shape == (1, H, W, 3) and (first[0] == img).all()
    x0 = wm.step_latents("w")
    video = torch.from_numpy(img).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
    torch.testing.assert_close(x0[:, :, :1], wm.codec.encode(video))


@pytest.fixture(scope="module")
def ti2v_ckpt(ckpt, tmp_path_factory):
    """The same weights marked image-to-video (stages.ti2v), with a procedural world of the model's size."""
    import shutil

    d = tmp_path_factory.mktemp("ti2v") / "ckpt"
    shutil.copytree(ckpt, d)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["stages"] = {"ti2v": True}
    cfg["data"] = {"height": H, "width": W, "frames": 9}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    return d


def test_image_to_video_checkpoint_needs_a_first_frame(ti2v_ckpt, tmp_path, capsys):
    wm = WorldModel.from_checkpoint(ti2v_ckpt)
    assert wm.needs_image
    with pytest.raises(MinwmError, match="image-to-video"):
        wm.reset("a red room", seed=0)
    image, caption = wm.procedural_image(3)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8 and caption
    assert (wm.procedural_image(3)[0] == image).all() and not (wm.procedural_image(4)[0] == image).all()
    # generate without --image starts from that render, and says so
    out = tmp_path / "p.mp4"
    assert generate(ti2v_ckpt, out, "w*2", "--seed", "3") == 0
    assert "procedural world (seed 3" in capsys.readouterr().err
    v = read_video(out)
    assert len(v) == 9 and np.abs(v[0].astype(float) - image).mean() < 6   # H.264 error only


def test_camera_guidance_flag_reaches_the_session(ckpt, tmp_path, monkeypatch):
    seen = {}
    real = WorldModel.from_checkpoint.__func__

    def spy(cls, path, **kw):
        wm = real(cls, path, **kw)
        seen["inference"] = wm.inference
        return wm
    monkeypatch.setattr(WorldModel, "from_checkpoint", classmethod(spy))
    out = tmp_path / "cg.mp4"
    assert generate(ckpt, out, "w*2", "--mode", "multistep", "--camera-guidance") == 0 and out.is_file()
    assert seen["inference"].camera_guidance and seen["inference"].mode == "multistep"
    assert generate(ckpt, tmp_path / "off.mp4", "w*2", "--no-camera-guidance") == 0
    assert not seen["inference"].camera_guidance
