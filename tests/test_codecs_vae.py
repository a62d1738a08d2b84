import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from minwm.codecs.config import tiny_wan_vae
from minwm.codecs.vae import VideoCodec
from minwm.errors import MinwmError

torch.set_num_threads(1)

TINY = {"base_dim": 4, "z_dim": 4, "dim_mult": [1, 2, 4], "num_res_blocks": 1, "attn_scales": [],
        "temperal_downsample": [True, True]}
TINY_HY = {"block_out_channels": [8, 16, 16], "layers_per_block": 1, "latent_channels": 4,
           "spatial_compression_ratio": 4, "temporal_compression_ratio": 4}


@pytest.fixture(scope="module")
def codec():
    c = VideoCodec.from_config(TINY, seed=0)
    # Non-trivial statistics, so a wrong normalisation formula would show.
    c.set_latent_stats([0.5, -0.25, 0.0, 1.0], [2.0, 0.5, 1.0, 3.0])
    return c


def video(frames, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


def test_factors_and_latent_frames(codec):
    assert (codec.temporal_factor, codec.spatial_factor, codec.latent_channels) == (4, 4, 4)
    for k in (0, 1, 2):
        z = codec.encode(video(1 + 4 * k))
        assert z.shape == (1, 4, 1 + k, 4, 4)
        assert codec.decode(z).shape == (1, 3, 1 + 4 * k, 16, 16)


def test_encode_normalises_like_wan(codec):
    x = video(5)
    raw = codec.vae.encode(x).latent_dist.mode()
    mean = torch.tensor(codec.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(codec.vae.config.latents_std).view(1, -1, 1, 1, 1)
    # The Wan pipelines: (z - mean) * (1 / std) to encode, z / (1 / std) + mean to decode.
    torch.testing.assert_close(codec.encode(x), (raw - mean) * (1.0 / std), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(codec.denormalise(codec.encode(x)), raw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", [[1, 1, 1, 1], [1, 3], [2, 2], [4]])
def test_streaming_decode_equals_full_decode(codec, split):
    z = codec.encode(video(13))  # 4 latent frames
    full = codec.decode(z)
    dec = codec.streaming_decoder()
    parts, i = [], 0
    for n in split:
        out = dec(z[:, :, i:i + n])
        assert out.shape[2] == (1 + 4 * (n - 1) if i == 0 else 4 * n)
        parts.append(out)
        i += n
    assert (torch.cat(parts, 2) - full).abs().max() <= 1e-5
    # reset() starts a new video: the same latents decode to the same frames again.
    dec.reset()
    assert (dec(z) - full).abs().max() <= 1e-5


def test_hunyuan15_codec_and_streaming():
    c = VideoCodec.from_config(TINY_HY, kind="hunyuan15", seed=0)
    assert (c.temporal_factor, c.spatial_factor, c.latent_channels) == (4, 4, 4)
    z = c.encode(video(9))
    assert z.shape == (1, 4, 3, 4, 4)
    torch.testing.assert_close(c.denormalise(z), c.vae.encode(video(9)).latent_dist.mode(), rtol=1e-5, atol=1e-5)
    full = c.decode(z)
    dec = c.streaming_decoder()
    out = torch.cat([dec(z[:, :, :1]), dec(z[:, :, 1:])], 2)
    assert (out - full).abs().max() <= 1e-5


@pytest.mark.parametrize("shape,needle", [((1, 3, 6, 16, 16), "expected 1 + 4k frames"),
                                          ((1, 3, 5, 18, 16), "not divisible by the VAE's spatial factor 4"),
                                          ((1, 4, 5, 16, 16), "expected [B, 3, F, H, W]")])
def test_bad_video_shapes(codec, shape, needle):
    with pytest.raises(MinwmError) as e:
        codec.encode(torch.zeros(shape))
    assert needle in str(e.value) and str(tuple(shape)) in str(e.value) and "\n" not in str(e.value)


def test_save_load_roundtrip(codec, tmp_path):
    codec.save_pretrained(tmp_path / "vae")
    back = VideoCodec.from_pretrained(tmp_path / "vae")
    x = video(5)
    assert torch.equal(back.encode(x), codec.encode(x))
    assert back.vae.config.latents_std == codec.vae.config.latents_std
    # A diffusers pipeline root (VAE in vae/) is accepted too.
    assert VideoCodec.from_pretrained(tmp_path).spatial_factor == 4


def test_strict_loading_errors(codec, tmp_path):
    d = tmp_path / "vae"
    codec.save_pretrained(d)
    weights = d / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    key = sorted(sd)[3]
    del sd[key]
    save_file(sd, str(weights))
    with pytest.raises(MinwmError, match=f"missing key '{key}'"):
        VideoCodec.from_pretrained(d)
    weights.unlink()
    with pytest.raises(MinwmError, match="no weights found") as e:
        VideoCodec.from_pretrained(d)
    assert str(weights) in str(e.value)
    with pytest.raises(MinwmError, match="codec directory not found"):
        VideoCodec.from_pretrained(tmp_path / "nowhere")
    cfg = json.loads((d / "config.json").read_text())
    cfg["_class_name"] = "AutoencoderKL"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MinwmError, match="_class_name"):
        VideoCodec.from_pretrained(d)


def test_streaming_decode_residual_variant():
    # The toy's default VAE uses Wan2.2-style residual blocks (avg-down / dup-up shortcuts).
    c = VideoCodec.from_config({**TINY, "dim_mult": [1, 2, 2], "is_residual": True}, seed=0)
    assert c.spatial_factor == 4 and c.temporal_factor == 4
    z = c.encode(video(9))
    full = c.decode(z)
    dec = c.streaming_decoder()
    out = torch.cat([dec(z[:, :, :1]), dec(z[:, :, 1:2]), dec(z[:, :, 2:])], 2)
    assert out.shape == full.shape and (out - full).abs().max() <= 1e-5


def test_fast_rms_norms_match_diffusers_forward_and_gradients():
    from minwm.codecs.vae import use_fast_rms_norms
    ref = VideoCodec.from_config({**TINY, "is_residual": True, "dim_mult": [1, 2, 2]}, seed=0).vae
    fast = VideoCodec.from_config({**TINY, "is_residual": True, "dim_mult": [1, 2, 2]}, seed=0).vae
    assert use_fast_rms_norms(fast) > 0
    assert fast.state_dict().keys() == ref.state_dict().keys()
    x = video(5)
    outs = []
    for vae in (ref, fast):
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        y.square().mean().backward()
        outs.append((y.detach(), vae.encoder.conv_in.weight.grad.clone()))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    assert torch.allclose(outs[0][1], outs[1][1], rtol=1e-3, atol=1e-6)
    # A zero input keeps the eps guard: finite, like F.normalize.
    assert torch.isfinite(fast.encode(torch.zeros(1, 3, 1, 16, 16)).latent_dist.mode()).all()


def test_pixel_conversions_invert_and_round_trip_keeps_the_clip_shape():
    from minwm.codecs.vae import round_trip, uint8_frames, vae_input

    frames = np.random.default_rng(0).integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)
    video = vae_input(frames)
    assert video.shape == (1, 3, 5, 16, 24) and -1 <= video.min() and video.max() <= 1
    assert np.array_equal(uint8_frames(video), frames)                  # exact inverse on uint8 frames
    out = round_trip(VideoCodec.from_config(tiny_wan_vae(), seed=0), frames)
    assert out.dtype == np.uint8 and out.shape == frames.shape and not np.array_equal(out, frames)
