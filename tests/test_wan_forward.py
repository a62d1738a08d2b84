"""The Wan adapter's own forward against diffusers' forward (the oracle), its RoPE against
WanRotaryPosEmbed, KV-cached streaming against teacher forcing, and PRoPE's rigid-motion invariance."""

import math

import pytest
import torch

from minwm.models.config import CameraInjectionConfig, ModelConfig
from minwm.models.wan import WanBackbone, rope_3d

torch.set_num_threads(1)

# Tiny Wan: head dim 32 (divisible by 8 for PRoPE's paper layout; 3-D RoPE split t/h/w = 12/10/10).
TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True, eps=1e-6)
B, F, H, W, L = 2, 4, 8, 8, 8


def make(kind="prope", chunk=2, window=20, sink=0, layout="paper", seed=0, camera_weights=None):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="wan", diffusers=dict(TINY), chunk_frames=chunk, window_frames=window, sink_frames=sink,
                      camera=CameraInjectionConfig(kind=kind, prope_layout=layout))
    m = WanBackbone(cfg).eval()
    if camera_weights is not None:  # make the camera branch matter (it starts at zero)
        for name in m.camera_parameter_names():
            torch.nn.init.normal_(m.transformer.get_parameter(name), std=camera_weights)
    return m


def rotation(a):
    """Rotation matrices from axis-angle vectors [..., 3]."""
    S = torch.zeros(*a.shape[:-1], 3, 3, dtype=a.dtype)
    S[..., 0, 1], S[..., 0, 2], S[..., 1, 2] = -a[..., 2], a[..., 1], -a[..., 0]
    return torch.matrix_exp(S - S.transpose(-1, -2))


def cameras(seed=1, frames=F):
    g = torch.Generator().manual_seed(seed)
    w2c = torch.eye(4, dtype=torch.float64).repeat(B, frames, 1, 1)
    w2c[..., :3, :3] = rotation(0.3 * torch.randn(B, frames, 3, generator=g, dtype=torch.float64))
    w2c[..., :3, 3] = torch.randn(B, frames, 3, generator=g, dtype=torch.float64)
    K = torch.tensor([0.8, 0.9, 0.45, 0.55], dtype=torch.float64).expand(B, frames, 4).clone()
    return w2c, K


def inputs(seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 16, F, H, W, generator=g), torch.randn(B, 16, F, H, W, generator=g),
            1000 * torch.rand(B, F, generator=g), torch.randn(B, L, 32, generator=g))


@pytest.mark.parametrize("kind", ["prope", "plucker", "none"])
def test_bidirectional_equals_diffusers_forward(kind):
    m = make(kind)
    x, _, _, ehs = inputs()
    t = torch.tensor([250.0, 900.0])
    with torch.no_grad():
        ref = m.transformer(x, t, ehs, return_dict=False)[0]
        ours = m(x, t, {"encoder_hidden_states": ehs}, cameras(), mode="bidirectional")
    assert ours.shape == ref.shape == x.shape
    assert (ours - ref).abs().max() <= 1e-5


def test_per_frame_timesteps_equal_diffusers_per_token_path():
    # diffusers' Wan2.2 path takes one timestep per token; a per-frame t broadcast to its tokens must match.
    m = make("prope")
    x, _, t, ehs = inputs()
    with torch.no_grad():
        ref = m.transformer(x, t.repeat_interleave((H // 2) * (W // 2), 1), ehs, return_dict=False)[0]
        ours = m(x, t, {"encoder_hidden_states": ehs}, cameras())
        single = m(x, t[:, :1].expand(B, F), {"encoder_hidden_states": ehs}, cameras())
    assert (ours - ref).abs().max() <= 1e-5
    assert (ours - single).abs().max() > 1e-3  # the per-frame t really reaches the frames


def test_rope_matches_diffusers_table_and_extends_past_it():
    m = make("none")
    x = torch.zeros(1, 16, 5, 6, 10)
    ref_cos, ref_sin = m.transformer.rope(x)  # [1, S, 1, Dh]
    cos, sin = rope_3d(torch.arange(5), 3, 5, 32)
    assert torch.equal(cos, ref_cos[0, :, 0]) and torch.equal(sin, ref_sin[0, :, 0])
    # Positions far past diffusers' 1024-entry table: same formula, no overflow.
    cos, sin = rope_3d(torch.arange(5000, 5003), 3, 5, 32)
    ang = 5001 * 10000.0 ** (-torch.arange(0, 12, 2, dtype=torch.float64) / 12)
    assert torch.allclose(cos[15, 0:12:2].double(), ang.cos(), atol=1e-6)
    assert torch.allclose(sin[15, 1:12:2].double(), ang.sin(), atol=1e-6)


def test_frame_offset_only_shifts_positions():
    # RoPE is relative: a global temporal offset (even past diffusers' table) leaves the output unchanged.
    m = make("prope", camera_weights=0.2)
    x, _, t, ehs = inputs()
    text = {"encoder_hidden_states": ehs}
    with torch.no_grad():
        a = m(x, t, text, cameras())
        b = m(x, t, text, cameras(), frame_offset=2000)
    assert (a - b).abs().max() <= 1e-4


def _stream(m, x, clean, t, text, cams, chunk, refresh=True):
    cache = m.new_cache(B, H, W)
    outs = []
    for s in range(0, F, chunk):
        sl = slice(s, s + chunk)
        c = (cams[0][:, sl], cams[1][:, sl])
        outs.append(m(x[:, :, sl], t[:, sl], text, c, mode="streaming", cache=cache))
        if refresh:  # the clean t=0 pass commits the chunk's keys/values
            m(clean[:, :, sl], torch.zeros(B, chunk), text, c, mode="streaming", cache=cache, commit=True)
    return torch.cat(outs, 2), cache


@pytest.mark.parametrize("kind,chunk,window", [("prope", 1, 20), ("prope", 2, 20), ("none", 1, 20),
                                               ("none", 2, 20), ("prope", 1, 2), ("plucker", 2, 20)])
def test_streaming_equals_teacher_forcing(kind, chunk, window):
    m = make(kind, chunk=chunk, window=window, camera_weights=0.3)
    x, clean, t, ehs = inputs()
    cams = cameras()
    text = m.encode_text({"encoder_hidden_states": ehs})  # cross-attention K/V computed once
    with torch.no_grad():
        tf = m(x, t, text, cams, mode="teacher_forcing", clean_latents=clean)
        st, cache = _stream(m, x, clean, t, text, cams, chunk)
    assert tf.shape == x.shape
    assert (tf - st).abs().max() <= 1e-4
    assert cache.total_frames == F and cache.num_frames == min(F, window)
    # The test has teeth: without the committed clean context, later chunks change.
    with torch.no_grad():
        blind, _ = _stream(m, x, clean, t, text, cams, chunk, refresh=False)
    assert (blind[:, :, :chunk] - tf[:, :, :chunk]).abs().max() <= 1e-4
    assert (blind[:, :, chunk:] - tf[:, :, chunk:]).abs().max() > 1e-2


def test_teacher_forcing_is_block_causal():
    m = make("prope", chunk=2, camera_weights=0.3)
    x, clean, t, ehs = inputs()
    text = {"encoder_hidden_states": ehs}
    with torch.no_grad():
        a = m(x, t, text, cameras(), mode="teacher_forcing", clean_latents=clean)
        clean2 = clean.clone()
        clean2[:, :, 2:] += 1.0  # change the second block, clean and noisy copies:
        x2 = x.clone()  # the first block's noisy output must not move, the second's must
        x2[:, :, 2:] += 1.0
        b = m(x2, t, text, cameras(), mode="teacher_forcing", clean_latents=clean2)
    assert (a[:, :, :2] - b[:, :, :2]).abs().max() <= 1e-6
    assert (a[:, :, 2:] - b[:, :, 2:]).abs().max() > 1e-2


@pytest.mark.parametrize("layout", ["paper", "full"])
def test_prope_model_invariant_to_one_rigid_transform_of_all_cameras(layout):
    m = make("prope", layout=layout, camera_weights=0.3)
    x, clean, t, ehs = inputs()
    w2c, K = cameras()
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = rotation(torch.tensor([0.4, -1.1, 0.7], dtype=torch.float64))
    T[:3, 3] = torch.tensor([3.0, -2.0, 5.0], dtype=torch.float64)
    moved = w2c @ torch.linalg.inv(T)  # the world moved by T: w2c' = w2c T^-1
    text = {"encoder_hidden_states": ehs}
    with torch.no_grad():
        a = m(x, t, text, (w2c, K), mode="teacher_forcing", clean_latents=clean)
        b = m(x, t, text, (moved, K), mode="teacher_forcing", clean_latents=clean)
        # ... while a camera moving relative to the others does change it.
        other = w2c.clone()
        other[:, 1, :3, 3] += 1.0
        c = m(x, t, text, (other, K), mode="teacher_forcing", clean_latents=clean)
    assert (a - b).abs().max() <= 1e-4
    assert (a - c).abs().max() > 1e-3


def test_plucker_cameras_reach_the_tokens():
    m = make("plucker", camera_weights=0.3)
    x, _, t, ehs = inputs()
    w2c, K = cameras()
    other = w2c.clone()
    other[:, 2, :3, 3] += 0.5
    with torch.no_grad():
        a = m(x, t, {"encoder_hidden_states": ehs}, (w2c, K))
        b = m(x, t, {"encoder_hidden_states": ehs}, (other, K))
    assert (a - b).abs().max() > 1e-3


def test_text_context_reuse_and_broadcast():
    m = make("none")
    x, _, t, ehs = inputs()
    with torch.no_grad():
        one = m(x, t, {"encoder_hidden_states": ehs[:1].expand(B, L, 32)})
        shared = m(x, t, m.encode_text({"encoder_hidden_states": ehs[:1]}))
    assert (one - shared).abs().max() <= 1e-6


def test_gradient_checkpointing_gives_same_gradients():
    m = make("prope", camera_weights=0.1).train()
    x, clean, t, ehs = inputs()
    text = {"encoder_hidden_states": ehs}
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        m(x, t, text, cameras(), mode="teacher_forcing", clean_latents=clean).square().mean().backward()
        grads.append(m.transformer.blocks[0].attn1_prope_out.weight.grad.clone())
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)
    assert math.isfinite(float(grads[0].sum()))
