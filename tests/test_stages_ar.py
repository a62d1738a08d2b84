"""Stage 1 (teacher-forcing AR): block-constant timesteps, the output checkpoint loads strictly and samples
chunk by chunk in streaming mode with the KV cache (causal: a chunk never depends on later noise)."""

from __future__ import annotations

import json

import pytest
import torch
from stages_helpers import make_cache, tiny_config

from minwm.stages.bidirectional import frame_timestep_indices

torch.set_num_threads(1)


def test_frame_timestep_indices_are_constant_within_blocks():
    idx = torch.tensor([[3, 7, 1], [0, 0, 9]])
    out = frame_timestep_indices(idx, 6)
    assert out.tolist() == [[3, 3, 7, 7, 1, 1], [0, 0, 0, 0, 9, 9]]
    assert frame_timestep_indices(torch.tensor([[5]]), 4).tolist() == [[5, 5, 5, 5]]
    with pytest.raises(ValueError):
        frame_timestep_indices(idx, 5)


def test_flow_matching_loss_uses_independent_block_timesteps():
    """In teacher forcing each block gets its own t (and the noisy half's target is eps - x0); the model receives
    exactly those per-frame timesteps and the clean ground truth as clean_latents."""
    from minwm.diffusion.schedule import FlowSchedule
    from minwm.stages.bidirectional import flow_matching_loss
    from minwm.train.data import MicroBatch

    seen = {}

    class Probe(torch.nn.Module):
        class cfg:
            class camera:
                kind = "prope"

        def forward(self, x, t, text, cams, *, mode, clean_latents=None):
            seen.update(x=x, t=t, mode=mode, clean=clean_latents, cams=cams)
            return torch.zeros_like(x)

    class Cond:
        def clean_frames(self, F):
            return 0

        def extra(self, x0):
            return {}

        def cameras(self, mb):
            return ("w2c", "K")

        def text(self, mb):
            return {}

    x0 = torch.randn(3, 4, 6, 2, 2)
    mb = MicroBatch({"latents": x0}, torch.arange(3), torch.tensor([10, 11, 12]), 0, 0)
    sched = FlowSchedule(1000, 5.0)
    out = flow_matching_loss(Probe(), Cond(), mb, sched, mode="teacher_forcing", blocks=3)
    t = seen["t"]
    assert seen["mode"] == "teacher_forcing" and torch.equal(seen["clean"], x0)
    assert t.shape == (3, 6) and torch.equal(t[:, 0::2], t[:, 1::2])          # constant within a block
    assert len({tuple(r) for r in t[:, 0::2].tolist()}) == 3                   # differs across samples
    assert any(len(set(r)) > 1 for r in t[:, 0::2].tolist())                  # and across blocks
    sigma = (t / 1000).double()[:, None, :, None, None]
    eps = (seen["x"].double() - (1 - sigma) * x0.double()) / sigma
    assert torch.allclose(eps, mb.randn(4, 6, 2, 2, salt="noise").double(), atol=1e-4)
    # zero prediction: the loss is the weighted mean of (eps - x0)^2 per frame
    w = sched.weights[((sched.timesteps[None, None, :] - t.double()[..., None]).abs().argmin(-1))]
    per_frame = ((eps - x0.double()) ** 2).mean(dim=(1, 3, 4))
    assert torch.allclose(out["loss"].double(), (w * per_frame).mean(), rtol=1e-4)


def test_ar_output_loads_and_generates_chunk_by_chunk(tmp_path):
    from minwm.models.loading import load_pretrained
    from minwm.stages import ar, bidirectional
    from minwm.stages.common import relative_cameras, text_dict

    cache = make_cache(tmp_path / "cache", n=4, frames=4)
    cfg = tiny_config(cache, steps=3, ckpt_every=3, bidirectional={"text_dropout": 0.3})
    bi = bidirectional.run(cfg, tmp_path / "bi")
    out = ar.run(cfg, tmp_path / "ar", init={"init": str(bi)})
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["steps"] == 3 and metrics["inputs"] == {"init": str(bi)}
    for f in ("model.safetensors", "model_config.json", "config.yaml"):
        assert (out / f).is_file()

    model = load_pretrained(out, cfg["model"]).eval()  # strict
    from minwm.stages.common import StageDataset

    item = StageDataset(cache)[0]
    text = text_dict("wan", {k: item[k][None] for k in ("embeds", "mask")})
    cams = relative_cameras(item["w2c"][None], item["intrinsics"][None])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 4, 4, 4, generator=g)
    neg = {"encoder_hidden_states": torch.zeros_like(text["encoder_hidden_states"])}
    x = ar.generate(model, text, cams, noise, steps=3, guidance=2.0, negative_text=neg)
    assert x.shape == noise.shape and torch.isfinite(x).all()
    # Causal: new noise for chunk 2 leaves chunk 1 unchanged; new noise for chunk 1 changes chunk 2 (via the cache).
    n2 = noise.clone()
    n2[:, :, 2:] = torch.randn(1, 4, 2, 4, 4, generator=g)
    y = ar.generate(model, text, cams, n2, steps=3, guidance=2.0, negative_text=neg)
    assert torch.equal(x[:, :, :2], y[:, :, :2]) and not torch.allclose(x[:, :, 2:], y[:, :, 2:])
    n3 = noise.clone()
    n3[:, :, :2] = torch.randn(1, 4, 2, 4, 4, generator=g)
    z = ar.generate(model, text, cams, n3, steps=3, guidance=2.0, negative_text=neg)
    assert not torch.allclose(z[:, :, 2:], x[:, :, 2:], atol=1e-4)  # chunk 2 reads chunk 1 from the cache
    # The first chunk equals a streaming pass of the same steps without any cache content: chunk-by-chunk
    # sampling is the teacher-forcing model's own conditional (block-causal) generation.
    from minwm.diffusion.samplers import euler_sample, euler_sigmas
    cache_ = model.new_cache(1, 4, 4)
    with torch.no_grad():
        first = euler_sample(lambda v, t: model(v, torch.full((1, 2), t), text, (cams[0][:, :2], cams[1][:, :2]),
                                                mode="streaming", cache=cache_), noise[:, :, :2], euler_sigmas(3, 5.0))
    x1 = ar.generate(model, text, cams, noise, steps=3)
    assert torch.allclose(first, x1[:, :, :2], atol=1e-5)


def test_hunyuan15_ti2v_trains_both_stages_and_holds_the_image_frame(tmp_path):
    """The MMDiT adapter through the same stages: its text dict (Qwen + ByT5 glyph streams), CFG dropout to the
    negative prompt, and TI2V (frame 0 clean at t = 0, passed as image_latents, outside the loss)."""
    from minwm.stages import ar, bidirectional
    from minwm.stages.common import relative_cameras, text_dict, StageDataset
    from minwm.models.loading import load_pretrained

    cache = make_cache(tmp_path / "cache", n=2, frames=4, text_kind="hunyuan15")
    cfg = tiny_config(cache, steps=2, ckpt_every=2, arch="hunyuan15", ti2v=True,
                      bidirectional={"text_dropout": 0.5}, ar={"text_dropout": 0.5})
    bi = bidirectional.run(cfg, tmp_path / "bi")
    out = ar.run(cfg, tmp_path / "ar", init={"init": str(bi)})
    losses = [h["model/loss"] for h in json.loads((out / "metrics.json").read_text())["history"]]
    assert len(losses) == 2 and all(l == l and l > 0 for l in losses)
    model = load_pretrained(out, cfg["model"]).eval()
    item = StageDataset(cache)[0]
    text = text_dict("hunyuan15", {k: item[k][None] for k in item if k in ("embeds", "mask", "glyph_embeds", "glyph_mask")})
    assert "encoder_hidden_states_2" in text
    cams = relative_cameras(item["w2c"][None], item["intrinsics"][None])
    image = item["latents"][None, :, :1]
    x = ar.generate(model, text, cams, torch.randn(1, 4, 4, 4, 4), steps=2, clean_first=image, image_latents=image)
    assert x.shape == (1, 4, 4, 4, 4) and torch.equal(x[:, :, :1], image)
