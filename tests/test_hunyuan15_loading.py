"""HunyuanVideo-1.5 adapter: strict save/reload, and loading a base diffusers checkpoint into the camera model."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from minwm.errors import MinwmError
from minwm.models.backbone import build_backbone
from minwm.models.config import ModelConfig
from minwm.models.loading import from_pretrained, load_pretrained

from test_hunyuan15_backbone import TINY, B, C, H, W, cameras, diffusers_forward, make, randomise_camera_, text_inputs

torch.set_num_threads(2)


def _inputs(F=2):
    g = torch.Generator().manual_seed(21)
    return torch.randn(B, C, F, H, W, generator=g), torch.full((B, F), 420.0), text_inputs(), cameras(F)


def test_factory_builds_hunyuan15():
    model = build_backbone(ModelConfig(arch="hunyuan15", diffusers=TINY))
    assert model.arch == "hunyuan15"
    assert len(model.camera_parameter_names()) == 2 * TINY["num_layers"]  # weight + bias per block


def test_save_reload_roundtrip(tmp_path):
    model = make("prope")
    randomise_camera_(model)
    model.save_pretrained(tmp_path / "ckpt")
    again = load_pretrained(tmp_path / "ckpt").eval()
    x, t, text, cams = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, text, cams), again(x, t, text, cams))


@pytest.mark.parametrize("edit", ["drop", "rename"])
def test_reload_is_strict_and_names_the_key(tmp_path, edit):
    model = make("prope")
    model.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    key = "transformer_blocks.1.attn.norm_added_k.weight"
    value = sd.pop(key)
    if edit == "rename":
        sd["transformer_blocks.1.attn.norm_added_key.weight"] = value
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(MinwmError, match=key.replace(".", r"\.")) as e:
        load_pretrained(tmp_path)
    if edit == "rename":
        assert "norm_added_key" in str(e.value)
    # a camera key may not go missing from one of our own checkpoints either
    sd = load_file(str(tmp_path / "model.safetensors")) if edit == "drop" else sd
    sd[key] = value
    sd.pop("transformer_blocks.0.prope_out.bias")
    sd.pop("transformer_blocks.1.attn.norm_added_key.weight", None)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(MinwmError, match=r"transformer_blocks\.0\.prope_out\.bias"):
        load_pretrained(tmp_path)


def test_base_diffusers_checkpoint_loads_with_zero_camera(tmp_path):
    """A plain diffusers HunyuanVideo15Transformer3DModel directory loads into the PRoPE model; the camera branch
    starts at zero, so the result equals diffusers' own forward."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(4)
    base = HunyuanVideo15Transformer3DModel(**TINY).eval()
    base.save_pretrained(tmp_path / "dit")
    model = from_pretrained(tmp_path / "dit", ModelConfig(arch="hunyuan15")).eval()
    assert model.cfg.camera.kind == "prope"
    x, t, text, cams = _inputs()
    with torch.no_grad():
        ref = diffusers_forward(model, x, 420.0, text)
        ours = model(x, t, text, cams)
        assert (diffusers_forward(type("M", (), {"transformer": base})(), x, 420.0, text) - ref).abs().max() == 0
    assert (ours - ref).abs().max() <= 1e-5
    # a base checkpoint missing a non-camera key is refused, naming it
    sd = load_file(str(tmp_path / "dit" / "diffusion_pytorch_model.safetensors"))
    sd.pop("context_embedder_2.linear_3.bias")
    save_file(sd, str(tmp_path / "dit" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(MinwmError, match=r"context_embedder_2\.linear_3\.bias"):
        from_pretrained(tmp_path / "dit", ModelConfig(arch="hunyuan15"))
