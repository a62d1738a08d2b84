import json
import math

import numpy as np
import pytest
import torch

from minwm.codecs.cli import check_codec
from minwm.codecs.quality import psnr, ssim
from minwm.codecs.vae import VideoCodec
from minwm.config import parse_config
from minwm.errors import MinwmError
from minwm.stages.vae import crop_batch, crop_length, latent_stats, run, spread

torch.set_num_threads(1)

TINY = {"base_dim": 4, "z_dim": 4, "dim_mult": [1, 2, 4], "num_res_blocks": 1, "attn_scales": [],
        "temperal_downsample": [True, True]}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from minwm.data.clips import DataConfig
    from minwm.data.procedural import render_dataset
    out = tmp_path_factory.mktemp("clips") / "clips"
    render_dataset(DataConfig(num_clips=6, frames=9, height=16, width=16, seed=0), out, progress=False)
    return out


def config(data, max_steps=3, **params):
    # 5-frame crops, then a last step on whole (9-frame) 12x12 crops: both phases run.
    p = {"data": str(data), "heldout_clips": 2, "eval_every": 2, "crop_size": 8, "clip_frames": 5,
         "long_steps": 1, "long_crop_size": 12, **params,
         "train": {"max_steps": max_steps, "batch_size": 2, "ckpt_every": 2}}
    return parse_config({"codec": {"vae_tiny": TINY}, "stages": {"threads": 1, "vae": p}})


@pytest.fixture(scope="module")
def trained(clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "vae"
    run(config(clips), out)
    return out


def test_stage_output_and_normalised_training_latents(trained, clips):
    names = ["config.json", "diffusion_pytorch_model.safetensors", "model.safetensors", "config.yaml",
             "metrics.json", "psnr_curve.png"]
    assert all((trained / n).is_file() for n in names)
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["steps"] == 3 and math.isfinite(metrics["heldout_psnr"]) and len(metrics["psnr_curve"]) == 2
    codec = VideoCodec.from_pretrained(trained)
    assert codec.vae.config.latents_mean == pytest.approx(metrics["latents_mean"])
    # Normalised latents of the training clips: per-channel mean ~0 and std ~1.
    from minwm.data.clips import ClipDataset
    ds = ClipDataset(clips)
    order = sorted(range(len(ds)), key=lambda i: ds.names[i])[:-2]  # the 2 held-out clips excluded
    x = torch.stack([torch.from_numpy(ds[i].frames) for i in order]).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    z = codec.encode(x).transpose(0, 1).flatten(1).double()
    assert z.mean(1).abs().max() < 0.05
    assert (z.std(1, unbiased=False) - 1).abs().max() < 0.05


def test_resume_continues_from_checkpoint(trained, clips, tmp_path):
    import shutil
    out = tmp_path / "vae"
    shutil.copytree(trained, out)
    run(config(clips, max_steps=5), out, resume=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 5 and [h["step"] for h in metrics["history"]] == [1, 2, 3, 4, 5]


def test_codec_check_writes_metrics_and_strip(trained, clips, tmp_path):
    m = check_codec(trained, clips, tmp_path / "check", max_clips=3, strip_clips=2)
    assert len(m["clips"]) == 3 and all(math.isfinite(v["psnr"]) for v in m["clips"].values())
    saved = json.loads((tmp_path / "check" / "metrics.json").read_text())
    assert saved["mean_psnr"] == m["mean_psnr"]
    import cv2
    img = cv2.imread(str(tmp_path / "check" / "strip.png"))
    assert img.shape == (2 * (3 * 16 + 4), 9 * 16, 3)


def test_stage_errors(clips, tmp_path):
    with pytest.raises(MinwmError, match="stages.vae.data"):
        run(parse_config({"codec": {"vae_tiny": TINY}}), tmp_path / "a")
    with pytest.raises(MinwmError, match="heldout_clips"):
        run(config(clips, heldout_clips=6), tmp_path / "b")
    with pytest.raises(MinwmError, match="clip_frames"):
        parse_config({"stages": {"vae": {"clip_frames": 4}}})
    with pytest.raises(MinwmError, match="clip_frames=13"):
        run(config(clips, clip_frames=13), tmp_path / "c")


def test_crop_length_and_stats_subset():
    # 0 = whole clips (cut to 1 + 4k), the length the held-out PSNR is measured at.
    assert crop_length(21, 0, 4, "d") == 21 and crop_length(23, 0, 4, "d") == 21 and crop_length(21, 9, 4, "d") == 9
    with pytest.raises(MinwmError, match="d: clips have 5 frames"):
        crop_length(5, 9, 4, "d")
    assert spread(list(range(10)), 3) == [0, 4, 9] and spread([1, 2], 0) == [1, 2] and spread([1, 2], 5) == [1, 2]


def test_latent_stats_match_direct_computation():
    codec = VideoCodec.from_config(TINY, seed=0)
    g = torch.Generator().manual_seed(0)
    frames = [torch.randint(0, 256, (5, 16, 16, 3), generator=g, dtype=torch.uint8) for _ in range(3)]
    mean, std = latent_stats(codec.vae, frames, 4, batch=2)
    x = torch.stack(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    with torch.no_grad():
        z = codec.vae.encode(x).latent_dist.mode().transpose(0, 1).flatten(1).double()
    assert np.allclose(mean, z.mean(1).numpy(), atol=1e-5)
    assert np.allclose(std, z.std(1, unbiased=False).numpy(), atol=1e-5)


def test_crops():
    f = torch.arange(2 * 9 * 8 * 8 * 3, dtype=torch.int64).reshape(2, 9, 8, 8, 3).to(torch.uint8)
    x = crop_batch(f, torch.tensor([0, 4]), torch.tensor([False, True]), 5, torch.tensor([0, 4]),
                   torch.tensor([2, 0]), 4)
    assert x.shape == (2, 3, 5, 4, 4)
    assert torch.equal(x[1], (f[1, 4:9, 4:8, 0:4].flip(2).permute(3, 0, 1, 2).float() / 127.5 - 1))


def test_quality_metrics():
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    y = (x + 0.02).clamp(-1, 1)
    assert psnr(x, x)[0] > 100 and ssim(x, x)[0] == pytest.approx(1.0)
    # Uniform error e in [-1, 1] units is e/2 in [0, 1] units: PSNR = -20 log10(0.01) = 40 dB when unclipped.
    assert psnr(x.clamp(-0.9, 0.9), x.clamp(-0.9, 0.9) + 0.02)[0] == pytest.approx(40.0, abs=1e-3)
    assert 0.5 < ssim(x, y)[0] < 1.0
