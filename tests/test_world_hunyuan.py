"""WorldModel over the HunyuanVideo-1.5 adapter: T2V streaming and TI2V through its image condition channels."""

import numpy as np
import torch

from minwm.codecs.config import tiny_wan_vae
from minwm.codecs.vae import VideoCodec
from minwm.config import parse_config
from minwm.models.backbone import build_backbone
from minwm.world import WorldModel

torch.set_num_threads(1)

# 2 dual-stream blocks, 2 heads x 16, 4 latent channels + 4 condition + 1 mask (TI2V-capable).
TINY = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=12,
            text_embed_2_dim=10, image_embed_dim=8, rope_axes_dim=(4, 6, 6), task_type="t2v")


def test_hunyuan_session_t2v_and_ti2v():
    cfg = parse_config({"model": {"arch": "hunyuan15", "diffusers": TINY, "chunk_frames": 2, "window_frames": 4},
                        "inference": {"height": 16, "width": 24, "steps": [1000, 500]}})
    torch.manual_seed(0)
    codec = VideoCodec.from_config({**tiny_wan_vae(), "z_dim": 4}, seed=0)
    wm = WorldModel(build_backbone(cfg["model"]), cfg, codec=codec)
    assert (wm.latent_height, wm.latent_width, wm.latent_channels) == (4, 6, 4)
    assert wm.reset("a hall", seed=0) is None
    assert wm.step("w").shape == (5, 16, 24, 3)   # first chunk of 2 latent frames: 1 + 4
    assert wm.step("l").shape == (8, 16, 24, 3)
    t2v = wm.step_latents("w")
    img = np.full((16, 24, 3), 200, np.uint8)
    first = wm.reset("a hall", image=img, seed=0)
    assert first.shape == (1, 16, 24, 3) and (first == 200).all()
    assert wm.step("w").shape == (4, 16, 24, 3)   # the image was frame 0
    wm.step("l")
    ti2v = wm.step_latents("w")
    assert torch.isfinite(ti2v).all() and not torch.allclose(t2v, ti2v)  # the image conditions the rollout
