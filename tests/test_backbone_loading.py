"""Strict loading: diffusers-format dirs (single file and sharded), our save_pretrained format, the
base-checkpoint allowance for camera parameters, factory, and the real Wan2.1-1.3B size on meta."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from minwm.errors import MinwmError
from minwm.models.backbone import build_backbone
from minwm.models.config import CameraInjectionConfig, ModelConfig
from minwm.models.loading import from_pretrained, load_pretrained
from minwm.models.wan import WAN21_T2V_1_3B, WanBackbone

torch.set_num_threads(1)

TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, eps=1e-6)


def cfg(kind="prope", **kw):
    return ModelConfig(arch="wan", diffusers=dict(TINY), camera=CameraInjectionConfig(kind=kind), chunk_frames=1, **kw)


def sample():
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 3, 32, generator=g)
    w2c = torch.eye(4).repeat(1, 2, 1, 1)
    w2c[0, 1, :3, 3] = torch.tensor([0.5, 0.0, 0.2])
    return x, torch.tensor([[300.0, 600.0]]), {"encoder_hidden_states": ehs}, (w2c, torch.full((1, 2, 4), 0.5) + 0.3)


def out(m):
    with torch.no_grad():
        return m(*sample())


def test_save_and_reload_strictly(tmp_path):
    torch.manual_seed(0)
    m = WanBackbone(cfg())
    for name in m.camera_parameter_names():
        torch.nn.init.normal_(m.transformer.get_parameter(name), std=0.1)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "metrics.json").write_text("{}")
    m.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "metrics.json").exists()  # other files of a stage's dir are left alone
    r = load_pretrained(tmp_path / "ckpt")
    assert r.cfg.camera.kind == "prope" and not any(p.is_meta for p in r.parameters())
    assert torch.equal(out(m), out(r))
    # build_backbone goes through the same path; runtime settings come from the caller's config.
    r2 = build_backbone(cfg(pretrained=str(tmp_path / "ckpt"), window_frames=7))
    assert r2.cfg.window_frames == 7 and torch.equal(out(m), out(r2))


@pytest.mark.parametrize("edit", ["remove", "rename"])
def test_edited_checkpoint_fails_naming_the_key(tmp_path, edit):
    WanBackbone(cfg()).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    key = "blocks.1.attn1.to_k.weight"
    t = sd.pop(key)
    if edit == "rename":
        sd["blocks.1.attn1.to_key.weight"] = t
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(MinwmError, match=r"missing keys \(1\): blocks\.1\.attn1\.to_k\.weight") as e:
        load_pretrained(tmp_path)
    assert "\n" not in str(e.value)
    if edit == "rename":
        assert "unexpected keys (1): blocks.1.attn1.to_key.weight" in str(e.value)


def test_camera_keys_are_strict_in_our_format(tmp_path):
    # Our checkpoints must carry the camera branch: dropping it is an error, not a silent zero-init.
    WanBackbone(cfg()).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if "prope_out" not in k}, str(tmp_path / "model.safetensors"))
    with pytest.raises(MinwmError, match="missing keys .*attn1_prope_out"):
        load_pretrained(tmp_path)
    with pytest.raises(MinwmError, match=r"model\.camera\.kind: 'none' but"):
        load_pretrained(tmp_path, cfg("none"))


def test_diffusers_dir_loads_base_checkpoint_with_zero_camera_branch(tmp_path, caplog):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(1)
    base = WanTransformer3DModel(**TINY)
    base.save_pretrained(tmp_path / "single")
    base.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    x, t, text, cams = sample()
    with torch.no_grad():
        ref = base(x, t[:, 0], text["encoder_hidden_states"], return_dict=False)[0]
    for d in ("single", "sharded"):
        with caplog.at_level(logging.WARNING, logger="minwm.models"):
            m = from_pretrained(tmp_path / d, cfg())
        assert "camera parameters (prope) are zero-initialised" in caplog.text
        assert all(float(m.transformer.get_parameter(n).detach().abs().max()) == 0 for n in m.camera_parameter_names())
        assert all(p.requires_grad and not p.is_meta for p in m.parameters())
        with torch.no_grad():
            ours = m(x, t[:, :1].expand(1, 2), text, cams)
        assert (ours - ref).abs().max() <= 1e-5


def test_diffusers_dir_errors(tmp_path):
    from diffusers import WanTransformer3DModel

    WanTransformer3DModel(**TINY).save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    # A checkpoint with only part of a camera branch is not a base checkpoint: strict.
    sd["blocks.0.attn1_prope_out.weight"] = torch.zeros(64, 64)
    save_file(sd, str(path))
    with pytest.raises(MinwmError, match="missing keys .*blocks.0.attn1_prope_out.bias"):
        from_pretrained(tmp_path, cfg())
    with pytest.raises(MinwmError, match="unexpected keys .*blocks.0.attn1_prope_out.weight"):
        from_pretrained(tmp_path, cfg("none"))
    with pytest.raises(MinwmError, match=r"model\.diffusers\.num_layers: 3 disagrees"):
        from_pretrained(tmp_path, ModelConfig(diffusers={"num_layers": 3}))
    cfgj = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfgj, "_class_name": "UNet2DModel"}))
    with pytest.raises(MinwmError, match="_class_name is 'UNet2DModel'"):
        from_pretrained(tmp_path, cfg())
    with pytest.raises(MinwmError, match="not a checkpoint"):
        from_pretrained(tmp_path / "nowhere", cfg())


def test_real_wan21_size_on_meta():
    with torch.device("meta"):
        m = WanBackbone(ModelConfig(diffusers=dict(WAN21_T2V_1_3B)))
    n = m.num_parameters()
    prope = sum(m.transformer.get_parameter(k).numel() for k in m.camera_parameter_names())
    assert n - prope == 1_418_996_800  # Wan2.1-T2V-1.3B
    assert prope == 30 * (1536 * 1536 + 1536)
    assert 1.3e9 < n < 1.6e9
