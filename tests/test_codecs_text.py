import pytest
import torch

from minwm.codecs.config import TextEncoderConfig
from minwm.codecs.text import TextEncoder
from minwm.errors import MinwmError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def umt5():
    return TextEncoder.from_config(TextEncoderConfig(kind="umt5", max_text_len=24))


def test_umt5_shapes_mask_and_padding(umt5):
    out = umt5.encode(["a red ball", "two   blue  boxes "])
    assert out["embeds"].shape == (2, 24, umt5.dim) and out["mask"].shape == (2, 24)
    # Byte tokens + </s>: "a red ball" is 10 bytes -> 11 tokens.
    assert out["mask"][0].sum() == 11 and out["mask"][0, :11].all()
    # Whitespace is normalised before tokenising, as Wan's prompt_clean does.
    assert out["mask"][1].sum() == len("two blue boxes") + 1
    # Padding carries nothing (Wan zeroes embeddings past each caption's length).
    assert out["embeds"][0, 11:].abs().max() == 0
    assert out["embeds"][0, :11].abs().max() > 0


def test_random_encoder_is_deterministic_and_distinguishes_captions(umt5):
    again = TextEncoder.from_config(TextEncoderConfig(kind="umt5", max_text_len=24))
    a = umt5.encode(["a red ball", "a blue ball"])["embeds"]
    assert torch.equal(again.encode(["a red ball"])["embeds"][0], a[0])
    assert (a[0] - a[1]).abs().max() > 1e-3
    other_seed = TextEncoder.from_config(TextEncoderConfig(kind="umt5", max_text_len=24, seed=1))
    assert (other_seed.encode(["a red ball"])["embeds"][0] - a[0]).abs().max() > 1e-3


def test_umt5_save_and_load(umt5, tmp_path):
    umt5.save_pretrained(tmp_path / "te")
    back = TextEncoder.from_pretrained(tmp_path / "te", "umt5", 24)
    assert torch.equal(back.encode(["a red ball"])["embeds"], umt5.encode(["a red ball"])["embeds"])


def test_hunyuan15_has_glyph_embeddings():
    te = TextEncoder.from_config(TextEncoderConfig(kind="hunyuan15", tiny={}, max_text_len=16))
    out = te.encode(["a plain scene", 'a sign that says "OPEN"'])
    assert out["embeds"].shape == (2, 16, 32) and out["glyph_embeds"].shape[:2] == (2, 16)
    # No quoted text -> no glyph tokens, as in the HunyuanVideo-1.5 pipeline.
    assert out["glyph_mask"][0].sum() == 0 and out["glyph_embeds"][0].abs().max() == 0
    assert out["glyph_mask"][1].sum() > 0


def test_bad_input(umt5, tmp_path):
    with pytest.raises(MinwmError, match="list of strings"):
        umt5.encode("not a list")
    with pytest.raises(MinwmError, match="not found"):
        TextEncoder.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MinwmError, match="config.json"):
        TextEncoder.from_pretrained(tmp_path / "empty")
