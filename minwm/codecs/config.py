"""The `codec` section of a config: which VAE and text encoder turn clips into latents and embeddings,
and the architecture of the toy's tiny VAE."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

VAE_KINDS = ("wan", "hunyuan15")
TEXT_KINDS = ("umt5", "hunyuan15")


def tiny_wan_vae() -> dict[str, Any]:
    """The toy's AutoencoderKLWan: 4x temporal, 4x spatial, 16 latent channels (as Wan2.1, so the DiT
    side is unchanged). Wan2.2-style residual blocks (space-to-depth average shortcuts down, channel
    duplication up) learned 1-3 dB faster than Wan2.1's plain blocks at equal steps on the toy renders;
    they need dim_mult [1, 2, 2] for a 4x spatial factor (the last level must keep its width)."""
    return {
        "base_dim": 16,
        "z_dim": 16,
        "dim_mult": [1, 2, 2],
        "num_res_blocks": 1,
        "attn_scales": [],
        "temperal_downsample": [True, True],
        "is_residual": True,
    }


def tiny_umt5() -> dict[str, Any]:
    """A tiny random UMT5 encoder over the byte vocabulary (384 ids = ByT5Tokenizer's 3 specials, 256
    bytes and 125 extra ids), so no vocabulary file is ever downloaded."""
    return {"vocab_size": 384, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
            "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32,
            "dropout_rate": 0.0, "feed_forward_proj": "gated-gelu"}


@dataclass
class TextEncoderConfig:
    # "umt5": Wan2.1's UMT5 encoder. "hunyuan15": HunyuanVideo-1.5's Qwen2.5-VL text model plus the
    # ByT5 glyph encoder.
    kind: str = "umt5"
    # A local directory (a diffusers pipeline root with text_encoder/ and tokenizer/, or the model
    # folder itself). When null, a random model is built from `tiny` with `seed`.
    pretrained: Optional[str] = None
    tiny: dict[str, Any] = field(default_factory=tiny_umt5)
    seed: int = 0
    max_text_len: int = 32

    def __post_init__(self):
        if self.kind not in TEXT_KINDS:
            raise ValueError(f"text.kind: expected one of {', '.join(TEXT_KINDS)}, got {self.kind!r}")
        if self.max_text_len < 1:
            raise ValueError(f"text.max_text_len: expected >= 1, got {self.max_text_len}")


@dataclass
class CodecConfig:
    vae_kind: str = "wan"
    # A local diffusers-format VAE directory (config.json + diffusion_pytorch_model.safetensors),
    # e.g. the output of `minwm train vae`. Null: the toy VAE still has to be trained.
    vae: Optional[str] = None
    # AutoencoderKLWan keyword arguments for the toy VAE that `minwm train vae` trains (its training
    # settings are the stage's: config section stages.vae, see minwm/stages/vae.py).
    vae_tiny: dict[str, Any] = field(default_factory=tiny_wan_vae)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    # Clips per latent-cache shard.
    shard_clips: int = 8

    def __post_init__(self):
        if self.vae_kind not in VAE_KINDS:
            raise ValueError(f"vae_kind: expected one of {', '.join(VAE_KINDS)}, got {self.vae_kind!r}")
        if self.shard_clips < 1:
            raise ValueError(f"shard_clips: expected >= 1, got {self.shard_clips}")
