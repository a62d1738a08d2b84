"""The refresh pass with output=False (commit only) writes exactly the cache a full committing pass writes, for
both adapters and every camera injection: the chunks that follow see the same keys/values, so their outputs are
bit-identical, and it returns None. Without commit in streaming mode output=False is refused."""

import pytest
import torch

from minwm.errors import MinwmError

import test_backbone_ring_buffer as wan_t
import test_hunyuan15_backbone as hy_t


def _wan(kind):
    from minwm.models.config import CameraInjectionConfig, ModelConfig
    from minwm.models.wan import WanBackbone

    torch.manual_seed(0)
    cfg = ModelConfig(arch="wan", diffusers=dict(wan_t.TINY), chunk_frames=2, window_frames=3, sink_frames=1,
                      camera=CameraInjectionConfig(kind=kind))
    m = WanBackbone(cfg).eval()
    for name in m.camera_parameter_names():  # the camera branch starts at zero: make it matter
        torch.nn.init.normal_(m.transformer.get_parameter(name), std=0.3)
    g = torch.Generator().manual_seed(1)
    text = {"encoder_hidden_states": torch.randn(1, 5, 32, generator=g)}
    return m, text, 1, 16, 4, 6, lambda s, n: wan_t.cameras(s, n) if kind != "none" else None


def _hunyuan(kind):
    m = hy_t.make(kind, chunk=2, window=3, sink=1)
    if kind != "none":
        hy_t.randomise_camera_(m)
    cams = hy_t.cameras(8)
    return m, hy_t.text_inputs(), hy_t.B, 4, hy_t.H, hy_t.W, \
        (lambda s, n: (cams[0][:, s:s + n], cams[1][:, s:s + n])) if kind != "none" else (lambda s, n: None)


@pytest.mark.parametrize("make,kind", [(_wan, "prope"), (_wan, "plucker"), (_wan, "none"), (_hunyuan, "prope"),
                                       (_hunyuan, "none")])
@torch.no_grad()
def test_commit_only_refresh_writes_the_same_cache(make, kind):
    m, text, B, C, H, W, cams = make(kind)
    g = torch.Generator().manual_seed(4)
    noisy, clean = torch.randn(B, C, 8, H, W, generator=g), torch.randn(B, C, 8, H, W, generator=g)
    outs = {}
    for output in (True, False):
        cache, res = m.new_cache(B, H, W), []
        for s in range(0, 8, 2):  # 4 chunks: the window (3 frames + 1 sink) evicts from chunk 3 on
            res.append(m(noisy[:, :, s:s + 2], 600.0, text, cams(s, 2), mode="streaming", cache=cache))
            r = m(clean[:, :, s:s + 2], 0.0, text, cams(s, 2), mode="streaming", cache=cache, commit=True,
                  output=output)
            assert (r is None) == (not output)
        outs[output] = torch.cat(res, 2)
    assert torch.equal(outs[True], outs[False])


def test_output_false_needs_a_committing_streaming_pass():
    m, text, B, C, H, W, cams = _wan("prope")
    x = torch.zeros(B, C, 2, H, W)
    with pytest.raises(MinwmError, match="output=False"):
        m(x, 0.0, text, cams(0, 2), mode="streaming", cache=m.new_cache(B, H, W), output=False)
    with pytest.raises(MinwmError, match="output=False"):
        m(x, 0.0, text, cams(0, 2), output=False)
