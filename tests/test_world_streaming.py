"""WorldModel's streamed rollout against the teacher-forcing forward, at non-square and other latent grids, with the
window evicting; plus the session's actions, cameras, seeds, modes and constant cache memory."""

import math

import pytest
import torch

from minwm.cameras.actions import ActionConfig
from minwm.errors import MinwmError
from minwm.inference.config import InferenceConfig
from minwm.world import WorldModel

torch.set_num_threads(1)

TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, eps=1e-6,
            qk_norm="rms_norm_across_heads")


def config(lh=6, lw=10, chunk=2, window=4, sink=0, **inference):
    return {"model": {"arch": "wan", "diffusers": dict(TINY), "chunk_frames": chunk, "window_frames": window,
                      "sink_frames": sink},
            "inference": {"latent_height": lh, "latent_width": lw, "steps": [1000, 500], **inference}}


def session(cfg, seed=0, camera_std=0.3, **kw):
    wm = WorldModel.from_config(cfg, seed=seed, **kw)
    # The camera branch starts at zero; give it weight so cameras change the output.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in wm.backbone.camera_parameter_names():
            p = wm.backbone.transformer.get_parameter(name)
            p.copy_(camera_std * torch.randn(p.shape, generator=g))
    return wm


def record(wm):
    calls = []

    def hook(module, args, kwargs, out):
        if kwargs.get("mode") == "streaming":
            x, t, text, cams = args
            calls.append(dict(x=x.clone(), t=t.clone(), cams=tuple(c.clone() for c in cams),
                              v=None if out is None else out.clone(),  # a refresh pass returns nothing
                              commit=kwargs.get("commit", False), text=text))
    return calls, wm.backbone.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("lh,lw", [(6, 10), (4, 4), (8, 6)])
def test_streaming_equals_teacher_forcing_at_any_grid(lh, lw):
    chunks, chunk = 4, 2
    wm = session(config(lh, lw, chunk=chunk, window=4))
    calls, handle = record(wm)
    wm.reset("a street", seed=3)
    for a in ["w", "w+l", "a", "i"]:
        wm.step_latents(a)
    handle.remove()
    K = len(wm.timesteps)
    assert len(calls) == chunks * (K + 1)  # K denoising passes + 1 clean refresh per chunk
    per_chunk = [calls[c * (K + 1):(c + 1) * (K + 1)] for c in range(chunks)]
    assert all(p[-1]["commit"] and not any(q["commit"] for q in p[:-1]) for p in per_chunk)
    clean = torch.cat([p[-1]["x"] for p in per_chunk], 2)
    w2c = torch.cat([p[0]["cams"][0] for p in per_chunk], 1)
    Kin = torch.cat([p[0]["cams"][1] for p in per_chunk], 1)
    for k in range(K):
        noisy = torch.cat([p[k]["x"] for p in per_chunk], 2)
        t = torch.cat([p[k]["t"] for p in per_chunk], 1)
        with torch.inference_mode():
            v_tf = wm.backbone(noisy, t, calls[0]["text"], (w2c, Kin), mode="teacher_forcing", clean_latents=clean)
        v_stream = torch.cat([p[k]["v"] for p in per_chunk], 2)
        assert v_tf.shape == (1, 16, chunks * chunk, lh, lw)
        torch.testing.assert_close(v_stream, v_tf, atol=2e-4, rtol=1e-4)


def test_cameras_follow_actions_and_frame_zero_is_the_start():
    wm = session(config(4, 4, chunk=2, window=4))
    wm.reset("x", seed=0)
    wm.step_latents("w")          # frame 0 = start (its action ignored), frame 1 one step forward
    wm.step_latents(["w", "l"])   # frame 2 forward, frame 3 yaw right
    cams = wm.cameras
    assert len(cams) == 4 and wm.frame_index == 4
    step = ActionConfig().translation_step
    torch.testing.assert_close(cams.w2c[0], torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(cams.positions[:3, 2], torch.tensor([0.0, step, 2 * step], dtype=torch.float64))
    yaw = math.degrees(math.atan2(cams.c2w[3, 0, 2], cams.c2w[3, 2, 2]))
    assert yaw == pytest.approx(ActionConfig().rotation_step_deg)
    torch.testing.assert_close(cams.intrinsics[0], torch.tensor(wm.intrinsics, dtype=torch.float64))


def test_action_forms_and_errors():
    wm = session(config(4, 4, chunk=4, window=8))
    w, l = frozenset("w"), frozenset("l")
    assert wm._chunk_actions("w+l") == [frozenset({"w", "l"})] * 4
    assert wm._chunk_actions("w,w,l,_") == [w, w, l, frozenset()]
    assert wm._chunk_actions(frozenset({"w"})) == [w] * 4
    assert wm._chunk_actions(["w", "l", "w", "l"]) == [w, l, w, l]
    assert wm._chunk_actions(None) == [frozenset()] * 4
    for bad in ["w,l", ["w", "l"], 3, "x"]:
        with pytest.raises(MinwmError):
            wm._chunk_actions(bad)
    with pytest.raises(MinwmError, match="reset"):
        wm.step_latents("w")


def test_seed_determinism_and_modes():
    cfg = config(4, 6, chunk=2, window=4)
    a, b = session(cfg), session(cfg)
    outs = []
    for wm, seed in ((a, 5), (b, 5), (b, 6)):
        wm.reset("p", seed=seed)
        outs.append(torch.cat([wm.step_latents("w"), wm.step_latents("l")], 2))
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])
    ms = session(config(4, 6, chunk=2, window=4, mode="multistep", baseline_steps=2, guidance=3.0))
    assert len(ms._caches) == 2  # conditional and unconditional branches keep their own caches
    ms.reset("p", seed=0)
    x = ms.step_latents("w")
    assert x.shape == (1, 16, 2, 4, 6) and torch.isfinite(x).all()
    assert ms._caches[0].total_frames == ms._caches[1].total_frames == 2


def test_cache_memory_is_constant_once_the_window_is_full():
    wm = session(config(4, 4, chunk=2, window=4, sink=2))
    wm.reset("p", seed=0)
    sizes, held = [], []
    for _ in range(8):
        wm.step_latents("w")
        sizes.append(wm.cache_nbytes)
        held.append(wm._caches[0].num_frames)
    assert len(set(sizes)) == 1  # preallocated ring: never grows
    assert held[-1] == 6 and wm._caches[0].total_frames == 16  # 2 sinks + window of 4


def test_inference_config_checks_and_warped_steps():
    assert InferenceConfig().timesteps() == pytest.approx([1000.0, 937.5, 833.333333, 625.0])
    assert InferenceConfig(warp=False, steps=[1000, 500]).timesteps() == [1000.0, 500.0]
    for bad in (dict(steps=[]), dict(steps=[500, 1000]), dict(mode="x"), dict(sampler="ddim"),
                dict(intrinsics=[1.0, 1.0]), dict(window_frames=0)):
        with pytest.raises(ValueError):
            InferenceConfig(**bad)
    with pytest.raises(MinwmError, match="unknown inference setting"):
        WorldModel.from_config(config(), stpes=[1])
    with pytest.raises(MinwmError, match="patch size"):
        WorldModel.from_config(config(5, 4))


def test_camera_guidance_uncond_branch_stands_still():
    """camera_guidance: the unconditional branch (negative prompt, own cache) sees every frame at the start camera,
    the conditional one the commanded cameras; off, both see the commanded ones. A still command is unaffected."""
    outs = {}
    for on in (False, True):
        wm = session(config(4, 6, chunk=2, window=4, mode="multistep", baseline_steps=2, guidance=3.0,
                            camera_guidance=on))
        calls, handle = record(wm)
        wm.reset("p", seed=0)
        x = [wm.step_latents("w+l"), wm.step_latents("w+l")]
        handle.remove()
        neg = [c for c in calls if c["text"] is wm._neg_text]
        pos = [c for c in calls if c["text"] is not wm._neg_text]
        assert neg and pos
        eye = torch.eye(4, dtype=pos[0]["cams"][0].dtype).expand_as(pos[-1]["cams"][0])
        assert not torch.allclose(pos[-1]["cams"][0], eye)
        for c in neg:
            assert torch.equal(c["cams"][0], eye) == on
            torch.testing.assert_close(c["cams"][1], pos[0]["cams"][1])
        wm.reset("p", seed=0)
        outs[on] = (torch.cat(x, 2), torch.cat([wm.step_latents("_"), wm.step_latents("_")], 2))
    assert not torch.allclose(outs[False][0], outs[True][0])    # a moving command: guidance changes the motion
    torch.testing.assert_close(outs[False][1], outs[True][1])   # standing still already: nothing to amplify
