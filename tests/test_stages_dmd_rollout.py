"""DMD's self-rollout at model level (a tiny Wan backbone with PRoPE, streaming with a KV cache): which calls
run with grad, that the gradient is exactly that of the exit-step calls on a detached clean cache, and that
the values equal the block-causal teacher-forcing forward (whose gradient, through the clean keys, differs)."""

import torch

from minwm.models.config import CameraInjectionConfig, ModelConfig
from minwm.models.wan import WanBackbone
from minwm.stages.rollout import generator_rollout, split_blocks

torch.set_num_threads(1)

TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, eps=1e-6)
B, C, F, H, W, CHUNK = 2, 16, 6, 8, 8, 2
TS = [1000.0, 937.5, 833.3333333333334, 625.0]


def make_model():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="wan", diffusers=dict(TINY), chunk_frames=CHUNK, window_frames=20,
                      camera=CameraInjectionConfig(kind="prope"))
    m = WanBackbone(cfg)
    for name in m.camera_parameter_names():  # the camera branch starts at zero; make it matter
        torch.nn.init.normal_(m.transformer.get_parameter(name), std=0.05)
    return m


def inputs():
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(B, C, F, H, W, generator=g)
    text = {"encoder_hidden_states": torch.randn(B, 5, 32, generator=g)}
    w2c = torch.eye(4, dtype=torch.float64).repeat(B, F, 1, 1)
    w2c[..., :3, 3] = torch.randn(B, F, 3, generator=g, dtype=torch.float64) * 0.3
    K = torch.tensor([0.9, 1.2, 0.5, 0.5], dtype=torch.float64).repeat(B, F, 1)
    fresh = [torch.randn(B, C, CHUNK, H, W, generator=g) for _ in range(3 * len(TS))]
    return noise, text, (w2c, K), fresh


def record_calls(model):
    calls = []

    def hook(module, args, kwargs):
        t = float(torch.as_tensor(args[1]).flatten()[0])
        calls.append((round(t, 3), torch.is_grad_enabled(), kwargs.get("commit", False), kwargs.get("mode")))
    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_only_exit_steps_carry_gradient_and_it_matches_a_replay():
    model = make_model()
    noise, text, cams, fresh = inputs()
    weight = torch.randn(B, C, F, H, W, generator=torch.Generator().manual_seed(5))
    s = 2
    it = iter(fresh)
    calls, handle = record_calls(model)
    out = generator_rollout(model, noise, TS, s, text, cams, noise_fn=lambda ref: next(it))
    handle.remove()
    n_blocks = F // CHUNK
    expect = []
    for b in range(n_blocks):
        expect += [(round(TS[k], 3), False, False, "streaming") for k in range(s)]
        expect.append((round(TS[s], 3), True, False, "streaming"))
        if b + 1 < n_blocks:
            expect.append((0.0, False, True, "streaming"))  # the clean refresh, no grad, commit
    assert calls == expect
    assert out.shape == noise.shape and out.requires_grad
    (out * weight).sum().backward()
    g_roll = grads(model)

    # Replay without the rollout code: per block, a fresh cache holding the detached outputs of earlier blocks,
    # the same no-grad steps, and a single grad-enabled call on a detached input.
    ref = make_model()
    ref.load_state_dict(model.state_dict())
    it = iter(fresh)
    blocks = split_blocks(noise, CHUNK)
    outs = []
    total = 0.0
    for b, x in enumerate(blocks):
        sl = slice(b * CHUNK, (b + 1) * CHUNK)
        bc = (cams[0][:, sl], cams[1][:, sl])
        cache = ref.new_cache(B, H, W)
        with torch.no_grad():
            for j, prev in enumerate(outs):
                pc = (cams[0][:, j * CHUNK:(j + 1) * CHUNK], cams[1][:, j * CHUNK:(j + 1) * CHUNK])
                ref(prev, 0.0, text, pc, mode="streaming", cache=cache, commit=True)
            for k in range(s):
                sig = TS[k] / 1000
                x0 = x - sig * ref(x, TS[k], text, bc, mode="streaming", cache=cache)
                x = (1 - TS[k + 1] / 1000) * x0 + TS[k + 1] / 1000 * next(it)
        sig = TS[s] / 1000
        x0 = x.detach() - sig * ref(x.detach(), TS[s], text, bc, mode="streaming", cache=cache)
        total = total + (x0 * weight[:, :, sl]).sum()
        outs.append(x0.detach())
    assert torch.allclose(out.detach(), torch.cat(outs, 2), atol=1e-5)
    total.backward()
    g_ref = grads(ref)
    for n in g_roll:
        err = float((g_roll[n] - g_ref[n]).norm())
        assert err <= 1e-4 * float(g_ref[n].norm()) + 1e-8, (n, err)
    assert g_roll["transformer.patch_embedding.weight"].abs().sum() > 0
    assert g_roll["transformer.blocks.0.attn1_prope_out.weight"].abs().sum() > 0

    # The same values come out of the block-causal teacher-forcing forward on [outputs | exit inputs]; its
    # gradient also flows through the clean copy's keys, which the rollout's detached cache must not.
    tf = make_model()
    tf.load_state_dict(model.state_dict())
    it = iter(fresh)
    seen = []  # the exit-step inputs of a no-grad rollout with the same noise
    h = tf.register_forward_pre_hook(
        lambda m, a, kw: seen.append(a[0].detach().clone()) if abs(float(a[1]) - TS[s]) < 1e-6
        else None, with_kwargs=True)
    with torch.no_grad():
        generator_rollout(tf, noise, TS, s, text, cams, noise_fn=lambda ref: next(it))
    h.remove()
    assert len(seen) == n_blocks
    noisy = torch.cat(seen, 2)
    clean = torch.cat(outs, 2)
    v = tf(noisy, torch.full((B, F), TS[s]), text, cams, mode="teacher_forcing", clean_latents=clean)
    x0_tf = noisy - TS[s] / 1000 * v
    assert torch.allclose(x0_tf.detach(), out.detach(), atol=1e-4)
    (x0_tf * weight).sum().backward()
    g_tf = grads(tf)
    rel = max(float((g_tf[n] - g_roll[n]).norm()) / (float(g_roll[n].norm()) + 1e-12) for n in g_roll)
    assert rel > 1e-2, rel  # the test can tell a gradient through the cache from none


def test_no_grad_rollout_and_exit_zero():
    model = make_model()
    noise, text, cams, fresh = inputs()
    it = iter(fresh)
    calls, handle = record_calls(model)
    with torch.no_grad():
        out = generator_rollout(model, noise, TS, 0, text, cams, noise_fn=lambda ref: next(it))
    handle.remove()
    assert not out.requires_grad
    assert [c[:3] for c in calls] == [(1000.0, False, False), (0.0, False, True),
                                      (1000.0, False, False), (0.0, False, True), (1000.0, False, False)]
