"""HunyuanVideo-1.5 adapter: our forward against diffusers' own, streaming against teacher forcing, PRoPE rigid
invariance, the real-size parameter count. Tiny random float32 configs on CPU."""

import math

import pytest
import torch

from minwm.errors import MinwmError
from minwm.models.config import CameraInjectionConfig, ModelConfig
from minwm.models.hunyuan15 import Hunyuan15Backbone

torch.set_num_threads(2)

# 2 dual-stream blocks, 2 heads x 16, latent 4 channels (+4 condition +1 mask), text streams of 12/10/8 dims.
TINY = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=12,
            text_embed_2_dim=10, image_embed_dim=8, rope_axes_dim=(4, 6, 6), task_type="t2v")
B, C, H, W = 2, 4, 4, 6  # latent 4x6 -> 2x3 patches (non-square on purpose)


def make(kind="prope", chunk=2, layout="paper", seed=0, window=20, sink=0, **over):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="hunyuan15", diffusers={**TINY, **over}, chunk_frames=chunk, window_frames=window,
                      sink_frames=sink,
                      camera=CameraInjectionConfig(kind=kind, prope_layout=layout))
    return Hunyuan15Backbone(cfg).eval()


def randomise_camera_(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in model.camera_parameter_names():
            p = model.transformer.get_parameter(name)
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def text_inputs(image=False, seed=2):
    g = torch.Generator().manual_seed(seed)
    t = {
        "encoder_hidden_states": torch.randn(B, 7, 12, generator=g),
        "encoder_attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3]),
        "encoder_hidden_states_2": torch.randn(B, 5, 10, generator=g),
        "encoder_attention_mask_2": torch.tensor([[1] * 3 + [0] * 2, [0] * 5]),
        "image_embeds": torch.randn(B, 3, 8, generator=g) if image else torch.zeros(B, 3, 8),
    }
    return t


def rand_rotation(g):
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q * torch.sign(torch.det(q))


def cameras(F, seed=3):
    g = torch.Generator().manual_seed(seed)
    w2c = torch.eye(4, dtype=torch.float64).repeat(B, F, 1, 1)
    for b in range(B):
        for f in range(F):
            w2c[b, f, :3, :3] = rand_rotation(g)
            w2c[b, f, :3, 3] = torch.randn(3, generator=g, dtype=torch.float64)
    K = torch.tensor([0.9, 1.2, 0.5, 0.48], dtype=torch.float64).repeat(B, F, 1)
    return w2c, K


def diffusers_forward(model, latents, t, text, image_latents=None):
    Bn, Cn, F, Hn, Wn = latents.shape
    cond = torch.zeros(Bn, Cn + 1, F, Hn, Wn)
    if image_latents is not None:
        cond[:, :Cn, 0] = image_latents[:, :, 0]
        cond[:, Cn, 0] = 1.0
    return model.transformer(torch.cat([latents, cond], 1), torch.full((Bn,), float(t)), return_dict=False,
                             **text)[0]


@pytest.mark.parametrize("image", [False, True])
def test_bidirectional_equals_diffusers(image):
    model = make("prope")  # camera branch present, zero-initialised
    F = 3
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(B, C, F, H, W, generator=g)
    image_latents = torch.randn(B, C, 1, H, W, generator=g) if image else None
    text = text_inputs(image)
    with torch.no_grad():
        ref = diffusers_forward(model, latents, 640.0, text, image_latents)
        ours = model(latents, torch.full((B, F), 640.0), text, cameras(F), image_latents=image_latents)
    assert ours.shape == (B, C, F, H, W)
    assert ref.abs().mean() > 1e-2  # the comparison is not between two near-zero tensors
    assert (ours - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("chunk,kind,window,sink", [(1, "none", 20, 0), (2, "none", 20, 0), (1, "prope", 20, 0),
                                                    (2, "prope", 20, 0), (1, "prope", 2, 0), (1, "none", 1, 1)])
def test_streaming_equals_teacher_forcing(chunk, kind, window, sink):
    """Chunk by chunk with the KV cache equals the teacher-forcing forward, also once the window evicts
    (window < 4 frames, with and without a sink frame: both modes put a block's visible frames at contiguous
    RoPE positions, which an MMDiT needs because its video-text logits see absolute video positions)."""
    model = make(kind, chunk=chunk, window=window, sink=sink)
    if kind == "prope":
        randomise_camera_(model)
    F = 4
    g = torch.Generator().manual_seed(7)
    clean = torch.randn(B, C, F, H, W, generator=g)
    noisy = torch.randn(B, C, F, H, W, generator=g)
    image_latents = clean[:, :, :1]
    nb = F // chunk
    t = (torch.rand(B, nb, generator=g) * 1000).repeat_interleave(chunk, 1)
    cams = cameras(F) if kind == "prope" else None
    text = text_inputs(image=True)
    with torch.no_grad():
        tf = model(noisy, t, text, cams, mode="teacher_forcing", clean_latents=clean, image_latents=image_latents)
        cache = model.new_cache(B, H, W)
        for b in range(nb):
            sl = slice(b * chunk, (b + 1) * chunk)
            cc = None if cams is None else (cams[0][:, sl], cams[1][:, sl])
            out = model(noisy[:, :, sl], t[:, sl], text, cc, mode="streaming", cache=cache,
                        image_latents=image_latents)
            assert (out - tf[:, :, sl]).abs().max() <= 1e-4, f"chunk {b}"
            model(clean[:, :, sl], torch.zeros(B, chunk), text, cc, mode="streaming", cache=cache, commit=True,
                  image_latents=image_latents)
        assert cache.total_frames == F
    # the camera branch really acts (otherwise the PRoPE half of this test proves nothing)
    if kind == "prope":
        with torch.no_grad():
            model.zero_camera_()
            tf0 = model(noisy, t, text, cams, mode="teacher_forcing", clean_latents=clean,
                        image_latents=image_latents)
        assert (tf0 - tf).abs().max() > 1e-3


def test_teacher_forcing_is_causal():
    """A noisy block's output does not change when later frames change (clean or noisy copies)."""
    model = make("none", chunk=2)
    F = 4
    g = torch.Generator().manual_seed(9)
    clean, noisy = torch.randn(B, C, F, H, W, generator=g), torch.randn(B, C, F, H, W, generator=g)
    t = torch.tensor([[300.0, 300.0, 800.0, 800.0]] * B)
    text = text_inputs()
    with torch.no_grad():
        a = model(noisy, t, text, mode="teacher_forcing", clean_latents=clean)
        clean2, noisy2 = clean.clone(), noisy.clone()
        clean2[:, :, 2:] += 1.0
        noisy2[:, :, 2:] += 1.0
        t2 = t.clone()
        t2[:, 2:] = 100.0
        b = model(noisy2, t2, text, mode="teacher_forcing", clean_latents=clean2)
    assert (a[:, :, :2] - b[:, :, :2]).abs().max() <= 1e-5
    assert (a[:, :, 2:] - b[:, :, 2:]).abs().max() > 1e-3


@pytest.mark.parametrize("layout", ["paper", "full"])
def test_rigid_transform_invariance(layout):
    model = make("prope", layout=layout)
    randomise_camera_(model)
    F = 4
    g = torch.Generator().manual_seed(11)
    clean, noisy = torch.randn(B, C, F, H, W, generator=g), torch.randn(B, C, F, H, W, generator=g)
    w2c, K = cameras(F)
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = rand_rotation(g)
    T[:3, 3] = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
    w2c2 = w2c @ torch.linalg.inv(T)  # the same rig, expressed in a moved world frame
    t = torch.tensor([[0.0, 0.0, 700.0, 700.0]] * B)
    text = text_inputs()
    other = w2c.clone()
    other[:, 1:, :3, 3] += 0.5  # a different relative trajectory must change the output
    with torch.no_grad():
        for mode, kw in (("bidirectional", {}), ("teacher_forcing", {"clean_latents": clean})):
            a = model(noisy, t, text, (w2c, K), mode=mode, **kw)
            b = model(noisy, t, text, (w2c2, K), mode=mode, **kw)
            c = model(noisy, t, text, (other, K), mode=mode, **kw)
            assert (a - b).abs().max() <= 1e-4, mode
            assert (a - c).abs().max() > 1e-3, mode


def test_per_frame_timesteps_act_per_frame():
    """Changing frame 2's timestep changes the bidirectional output, and equal timesteps reproduce diffusers
    regardless of how they were given (scalar, [B], [B, F])."""
    model = make("none")
    F = 3
    g = torch.Generator().manual_seed(13)
    x = torch.randn(B, C, F, H, W, generator=g)
    text = text_inputs()
    with torch.no_grad():
        a = model(x, 500.0, text)
        b = model(x, torch.full((B,), 500.0), text)
        t = torch.full((B, F), 500.0)
        t[:, 2] = 100.0
        c = model(x, t, text)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_bad_inputs_name_the_field():
    model = make("prope")
    x = torch.randn(B, C, 2, H, W)
    text = text_inputs()
    with pytest.raises(MinwmError, match="cameras"):
        model(x, 10.0, text)
    with pytest.raises(MinwmError, match="text: unknown key 'prompt_embeds'"):
        model(x, 10.0, {**text, "prompt_embeds": text["encoder_hidden_states"]}, cameras(2))
    bad = dict(text)
    bad["encoder_attention_mask_2"] = bad["encoder_attention_mask_2"][:, :3]
    with pytest.raises(MinwmError, match="encoder_attention_mask_2"):
        model(x, 10.0, bad, cameras(2))
    with pytest.raises(MinwmError, match="image_latents"):
        model(x, 10.0, text, cameras(2), image_latents=torch.randn(B, C, 2, H, W))
    with pytest.raises(MinwmError, match="in_channels"):
        make("none", in_channels=7)


def test_real_size_parameter_count_on_meta():
    """HunyuanVideo-1.5 480p (diffusers' conversion script config: 54 blocks, 16 x 128 heads, Qwen2.5-VL 3584,
    ByT5 1472, SigLIP 1152, in 65 / out 32): 8.33B parameters, + 54 x (2048^2 + 2048) for the PRoPE branch."""
    real = dict(in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
                num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
                text_embed_dim=3584, text_embed_2_dim=1472, image_embed_dim=1152, rope_theta=256.0,
                rope_axes_dim=(16, 56, 56), use_meanflow=False, target_size=640, task_type="t2v")
    with torch.device("meta"):
        base = Hunyuan15Backbone(ModelConfig(arch="hunyuan15", diffusers=real,
                                             camera=CameraInjectionConfig(kind="none")))
        cam = Hunyuan15Backbone(ModelConfig(arch="hunyuan15", diffusers=real))
    n = base.num_parameters()
    assert math.isclose(n / 1e9, 8.33, abs_tol=0.01), n
    assert cam.num_parameters() - n == 54 * (2048 * 2048 + 2048)


def test_streaming_text_memo_follows_the_prompt():
    """Text keys/values are reused per (prompt, t) within a cache; a new prompt (or one edited in place) is
    recomputed, so a reset cache with a new prompt equals a fresh cache."""
    model = make("none", chunk=2)
    g = torch.Generator().manual_seed(17)
    x = torch.randn(B, C, 2, H, W, generator=g)
    t = torch.full((B, 2), 500.0)
    text_a, text_b = text_inputs(seed=2), text_inputs(seed=3)
    with torch.no_grad():
        cache = model.new_cache(B, H, W)
        a1 = model(x, t, text_a, mode="streaming", cache=cache)
        a2 = model(x, t, text_a, mode="streaming", cache=cache)  # memo hit
        cache.reset()
        b1 = model(x, t, text_b, mode="streaming", cache=cache)
        b_fresh = model(x, t, text_b, mode="streaming", cache=model.new_cache(B, H, W))
        text_b["encoder_hidden_states"].mul_(2.0)  # in place: must not reuse the old text states
        b2 = model(x, t, text_b, mode="streaming", cache=cache)
    assert torch.equal(a1, a2)
    assert torch.equal(b1, b_fresh)
    assert (a1 - b1).abs().max() > 1e-3
    assert (b2 - b1).abs().max() > 1e-4


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make("prope", chunk=2)
    randomise_camera_(model)
    F = 4
    g = torch.Generator().manual_seed(19)
    clean, noisy = torch.randn(B, C, F, H, W, generator=g), torch.randn(B, C, F, H, W, generator=g)
    t = torch.tensor([[200.0, 200.0, 900.0, 900.0]] * B)
    text, cams = text_inputs(image=True), cameras(F)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        out = model(noisy, t, text, cams, mode="teacher_forcing", clean_latents=clean)
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    assert (grads[0] - grads[1]).abs().max() <= 1e-6


def test_bfloat16_runs_every_mode():
    model = make("prope", chunk=2).to(torch.bfloat16)
    F = 2
    x = torch.randn(B, C, F, H, W)
    text, cams = text_inputs(image=True), cameras(F)
    with torch.no_grad():
        a = model(x.bfloat16(), 300.0, text, cams)
        b = model(x.bfloat16(), 300.0, text, cams, mode="teacher_forcing", clean_latents=x.bfloat16())
        cache = model.new_cache(B, H, W)
        c = model(x.bfloat16(), 300.0, text, cams, mode="streaming", cache=cache, commit=True)
    for y in (a, b, c):
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert cache.total_frames == F
