"""Prompts -> the text dict a backbone takes, once per prompt.

TextEncoder.encode returns {"embeds", "mask"} (+ "glyph_embeds", "glyph_mask" for HunyuanVideo-1.5); the
backbones take the diffusers names. Without a text encoder (bench, random-weight runs) a prompt maps to fixed
random embeddings seeded by the prompt's CRC, so the same prompt always gives the same tensor.
"""

from __future__ import annotations

import zlib
from typing import Any, Optional

import torch

from minwm.errors import MinwmError


def backbone_text(arch: str, enc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TextEncoder output -> the adapter's text dict."""
    if arch == "wan":
        return {"encoder_hidden_states": enc["embeds"]}
    if arch == "hunyuan15":
        out = {"encoder_hidden_states": enc["embeds"], "encoder_attention_mask": enc["mask"]}
        if "glyph_embeds" in enc:
            out["encoder_hidden_states_2"] = enc["glyph_embeds"]
            out["encoder_attention_mask_2"] = enc["glyph_mask"]
        return out
    raise MinwmError(f"model.arch: no text mapping for {arch!r}")


def text_dim(backbone) -> int:
    c = backbone.transformer.config
    return int(c.text_dim if backbone.arch == "wan" else c.text_embed_dim)


def random_text(backbone, prompt: str, tokens: int) -> dict[str, torch.Tensor]:
    """Fixed random embeddings [1, tokens, text_dim] for `prompt` (the bench's '32 tokens x 64 dims random')."""
    g = torch.Generator().manual_seed(zlib.crc32(prompt.encode("utf-8")))
    e = torch.randn(1, tokens, text_dim(backbone), generator=g)
    enc = {"embeds": e, "mask": torch.ones(1, tokens, dtype=torch.long)}
    return backbone_text(backbone.arch, enc)


def prepare_text(backbone, text: dict[str, torch.Tensor], device: Any, dtype: torch.dtype) -> Any:
    """Move a text dict to the model and, where the adapter can, precompute its per-block cross-attention K/V
    (Wan's encode_text) so no streamed chunk recomputes them."""
    with torch.no_grad():
        text = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
                for k, v in text.items()}
    encode = getattr(backbone, "encode_text", None)
    if encode is None:
        return text
    with torch.inference_mode():
        return encode(text)


def encode_prompt(backbone, text_encoder: Optional[Any], prompt: str, tokens: int, device: Any,
                  dtype: torch.dtype) -> Any:
    """The prepared text of one prompt: from the text encoder when there is one, else random_text."""
    if not isinstance(prompt, str):
        raise MinwmError(f"prompt: expected a string, got {type(prompt).__name__}")
    if text_encoder is None:
        raw = random_text(backbone, prompt, tokens)
    else:
        raw = backbone_text(backbone.arch, text_encoder.encode([prompt]))
        d = text_dim(backbone)
        if raw["encoder_hidden_states"].shape[-1] != d:
            raise MinwmError(f"codec.text: the text encoder gives {raw['encoder_hidden_states'].shape[-1]}-dim "
                             f"embeddings but the model expects text_dim {d}")
    return prepare_text(backbone, raw, device, dtype)
