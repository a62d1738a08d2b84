"""Bad backbone input is a one-line MinwmError naming what was wrong, raised before any compute."""

import pytest
import torch

from minwm.errors import MinwmError
from minwm.models.backbone import build_backbone, frame_timesteps
from minwm.models.config import ModelConfig

torch.set_num_threads(1)

TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=8, freq_dim=16, ffn_dim=32, num_layers=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_backbone(ModelConfig(arch="wan", diffusers=dict(TINY), chunk_frames=2)).eval()


def good(F=4, H=4, W=4, C=4):
    return dict(latents=torch.randn(1, C, F, H, W), timesteps=torch.full((1, F), 500.0),
                text={"encoder_hidden_states": torch.randn(1, 3, 8)},
                cameras=(torch.eye(4).repeat(1, F, 1, 1), torch.full((1, F, 4), 0.5)))


def call(model, **over):
    kw = {**good(), **over}
    with torch.no_grad():
        return model(kw.pop("latents"), kw.pop("timesteps"), kw.pop("text"), kw.pop("cameras"), **kw)


def one_line(model, match, **over):
    with pytest.raises(MinwmError, match=match) as e:
        call(model, **over)
    assert "\n" not in str(e.value)


def test_good_input_runs(model):
    assert call(model).shape == (1, 4, 4, 4, 4)


def test_frame_count_mismatch(model):
    g = good(F=3)
    one_line(model, r"cameras: 3 camera frames for 4 latent frames", cameras=g["cameras"])


def test_channel_count(model):
    g = good(C=5)
    one_line(model, r"latents: 5 channels, expected 4", latents=g["latents"])


def test_chunk_must_divide_frames(model):
    g = good(F=3)
    one_line(model, r"latents: 3 frames is not divisible by chunk_frames=2", latents=g["latents"],
             timesteps=g["timesteps"], cameras=g["cameras"], mode="teacher_forcing", clean_latents=g["latents"])


def test_spatial_size_and_patch(model):
    g = good(H=5)
    one_line(model, r"spatial size 5x4 is not divisible by the patch size 2x2", latents=g["latents"])


def test_other_mistakes(model):
    one_line(model, r"timesteps: shape \(1, 3\), expected \[1, 4\]", timesteps=torch.zeros(1, 3))
    one_line(model, r"mode: expected one of", mode="causal")
    one_line(model, r"clean_latents: required in teacher_forcing mode", mode="teacher_forcing")
    one_line(model, r"cache: streaming mode needs a KV cache", mode="streaming", latents=good(F=2)["latents"])
    one_line(model, r"cameras: required by camera injection 'prope'", cameras=None)
    one_line(model, r"commit: only used in streaming mode", commit=True)
    one_line(model, r"cache: only used in streaming mode", cache=model.new_cache(1, 4, 4))
    one_line(model, r"text: encoder_hidden_states has shape \(1, 3, 9\), expected \[B, L, 8\]",
             text={"encoder_hidden_states": torch.randn(1, 3, 9)})
    cache = model.new_cache(1, 4, 4)
    one_line(model, r"latents: streaming takes one chunk of chunk_frames=2 frames, got 4", mode="streaming",
             cache=cache)
    g = good(F=2, H=6)
    one_line(model, r"cache: made for 4 tokens per frame, the latents have 6", mode="streaming", cache=cache,
             latents=g["latents"], timesteps=g["timesteps"], cameras=g["cameras"])


def test_timesteps_forms():
    assert frame_timesteps(500, 2, 3).shape == (2, 3)
    assert torch.equal(frame_timesteps(torch.tensor([1.0, 2.0]), 2, 3)[:, 2], torch.tensor([1.0, 2.0]))
    assert frame_timesteps(torch.tensor([[999]], dtype=torch.bfloat16), 1, 1).dtype == torch.float32
    with pytest.raises(MinwmError, match="non-finite"):
        frame_timesteps(torch.tensor([float("nan")]), 1, 1)


def test_config_errors():
    with pytest.raises(MinwmError, match=r"PRoPE layout 'paper' needs the attention head dim divisible by 8"):
        build_backbone(ModelConfig(diffusers={**TINY, "attention_head_dim": 12}))
    with pytest.raises(MinwmError, match=r"model\.diffusers\.image_dim: image conditioning"):
        build_backbone(ModelConfig(diffusers={**TINY, "image_dim": 16}))
    with pytest.raises(MinwmError, match=r"model\.diffusers: .*unexpected keyword argument 'num_layer'"):
        build_backbone(ModelConfig(diffusers={"num_layer": 2}))
