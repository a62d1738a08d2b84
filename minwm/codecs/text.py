"""Text encoders: Wan2.1's UMT5 and HunyuanVideo-1.5's Qwen2.5-VL text model + ByT5 glyph encoder.

`encode(list[str])` returns a dict of tensors on the model's device, always with "embeds" [B, L, D] and "mask" [B, L] (int64,
1 = real token); HunyuanVideo-1.5 adds "glyph_embeds" [B, Lg, Dg] and "glyph_mask". Positions past a
caption's length are zeroed, as the Wan pipeline does, so padding never carries information.

Without a checkpoint the model is a tiny random one over ByT5Tokenizer's byte vocabulary, which needs no
downloaded file; a fixed random encoder still maps each caption to its own embedding (DESIGN.md §1).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import torch

from minwm.codecs.config import TextEncoderConfig
from minwm.codecs.vae import load_state_dict_strict, read_model_config
from minwm.errors import MinwmError

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"


def clean_prompt(text: str) -> str:
    """Whitespace normalisation (the part of Wan's prompt_clean that needs no extra package)."""
    return re.sub(r"\s+", " ", text).strip()


def _byte_tokenizer():
    from transformers import ByT5Tokenizer
    return ByT5Tokenizer()


def _tokenize(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = tokenizer(texts, padding="max_length", max_length=max_len, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    return out.input_ids, out.attention_mask.long()


def _load_hf(klass, folder: Path, dtype: torch.dtype):
    """Build a transformers model from folder/config.json and load its safetensors strictly."""
    read_model_config(folder)
    config = klass.config_class.from_pretrained(str(folder))
    model = klass(config)
    load_state_dict_strict(model, folder, HF_WEIGHTS, HF_INDEX)
    return model.to(dtype).eval().requires_grad_(False)


def _load_tokenizer(folder: Path, where: str):
    from transformers import AutoTokenizer
    if not folder.is_dir():
        raise MinwmError(f"{folder}: tokenizer directory not found (needed by {where})")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise MinwmError(f"{folder}: cannot load tokenizer ({str(e).splitlines()[0]})") from None


class TextEncoder:
    def __init__(self, kind: str, model: torch.nn.Module, tokenizer, max_len: int,
                 glyph_model: torch.nn.Module | None = None, glyph_tokenizer=None, glyph_max_len: int = 0,
                 chat_template: bool = False):
        self.kind = kind
        self.model = model
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.glyph_model = glyph_model
        self.glyph_tokenizer = glyph_tokenizer
        self.glyph_max_len = glyph_max_len
        self.chat_template = chat_template  # real HunyuanVideo-1.5 prompts go through its chat template

    @property
    def dim(self) -> int:
        cfg = self.model.config
        return getattr(cfg, "d_model", None) or cfg.hidden_size

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: TextEncoderConfig) -> "TextEncoder":
        if cfg.pretrained:
            return cls.from_pretrained(cfg.pretrained, cfg.kind, cfg.max_text_len)
        return cls.tiny(cfg.kind, cfg.tiny, cfg.seed, cfg.max_text_len)

    @classmethod
    def tiny(cls, kind: str, kwargs: dict[str, Any], seed: int, max_len: int) -> "TextEncoder":
        """A random encoder; the same seed gives the same weights in every process."""
        from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel, \
            UMT5Config, UMT5EncoderModel
        tok = _byte_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                if kind == "umt5":
                    model = UMT5EncoderModel(UMT5Config(**kwargs))
                    return cls(kind, model.eval().requires_grad_(False), tok, max_len)
                # HunyuanVideo-1.5: both encoders tiny; the byte tokenizer serves both.
                kw = dict(kwargs)
                glyph_kw = kw.pop("glyph", {"vocab_size": 384, "d_model": 32, "d_kv": 8, "d_ff": 64,
                                            "num_layers": 1, "num_heads": 4})
                kw = {"vocab_size": 384, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "bos_token_id": None, "eos_token_id": None,
                      "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [1, 1, 2]}, **kw}
                model = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**kw))
                glyph = T5EncoderModel(T5Config(**glyph_kw))
            except (TypeError, ValueError) as e:
                raise MinwmError(f"codec.text.tiny: {e}") from None
        return cls(kind, model.eval().requires_grad_(False), tok, max_len,
                   glyph.eval().requires_grad_(False), tok, max_len)

    @classmethod
    def from_pretrained(cls, path: str | Path, kind: str = "umt5", max_len: int = 512,
                        dtype: torch.dtype = torch.float32) -> "TextEncoder":
        """`path` is a diffusers pipeline root (text_encoder/, tokenizer/, and for HunyuanVideo-1.5
        text_encoder_2/, tokenizer_2/) or, for UMT5, the encoder folder itself with its tokenizer."""
        from transformers import Qwen2_5_VLTextModel, T5EncoderModel, UMT5EncoderModel
        root = Path(path)
        if not root.is_dir():
            raise MinwmError(f"{root}: text encoder directory not found")
        sub = root / "text_encoder"
        enc_dir = sub if sub.is_dir() else root
        tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else enc_dir
        if kind == "umt5":
            model = _load_hf(UMT5EncoderModel, enc_dir, dtype)
            return cls(kind, model, _load_tokenizer(tok_dir, str(enc_dir)), max_len)
        model = _load_hf(Qwen2_5_VLTextModel, enc_dir, dtype)
        glyph = _load_hf(T5EncoderModel, root / "text_encoder_2", dtype)
        tok = _load_tokenizer(tok_dir, str(enc_dir))
        # The real Qwen tokenizer ships the chat template the checkpoint was trained with; a saved toy
        # (byte tokenizer) has none and encodes the bare prompt, as when it was built.
        return cls(kind, model, tok, max_len, glyph,
                   _load_tokenizer(root / "tokenizer_2", str(root / "text_encoder_2")), 256,
                   chat_template=getattr(tok, "chat_template", None) is not None)

    def save_pretrained(self, path: str | Path) -> None:
        """Save the encoder(s) in the pipeline layout that `from_pretrained` reads (the byte tokenizer has
        no files; a real tokenizer is saved beside its model)."""
        from minwm.io import atomic_path
        with atomic_path(path) as tmp:
            self.model.save_pretrained(str(tmp / "text_encoder"))
            self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            if self.glyph_model is not None:
                self.glyph_model.save_pretrained(str(tmp / "text_encoder_2"))
                self.glyph_tokenizer.save_pretrained(str(tmp / "tokenizer_2"))

    # ---- encoding -----------------------------------------------------------------------------
    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise MinwmError("text encode: expected a list of strings")
        texts = [clean_prompt(t) for t in texts]
        device = next(self.model.parameters()).device
        with torch.no_grad():
            if self.kind == "umt5":
                ids, mask = _tokenize(self.tokenizer, texts, self.max_len)
                h = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
                mask = mask.to(device)
                return {"embeds": _zero_pad(h.float(), mask), "mask": mask}
            embeds, mask = self._encode_mllm(texts, device)
            glyph, glyph_mask = self._encode_glyph(texts, device)
        return {"embeds": embeds, "mask": mask, "glyph_embeds": glyph, "glyph_mask": glyph_mask}

    def _encode_mllm(self, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        # HunyuanVideo-1.5 takes the hidden state 2 layers before the last (num_hidden_layers_to_skip=2).
        crop = 0
        if self.chat_template:
            from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import (
                HunyuanVideo15Pipeline, format_text_input)
            # Use the pipeline's own defaults (system message and crop_start, which drops the system
            # prompt's tokens) so our token ids match the checkpoint's training exactly.
            params = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters
            crop = params["crop_start"].default
            msgs = format_text_input(texts, params["system_message"].default)
            out = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True, padding="max_length",
                                                     max_length=self.max_len + crop, truncation=True,
                                                     return_tensors="pt")
            ids, mask = out.input_ids, out.attention_mask.long()
        else:
            ids, mask = _tokenize(self.tokenizer, texts, self.max_len)
        h = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       output_hidden_states=True).hidden_states[-3]
        h, mask = h[:, crop:].float(), mask[:, crop:].to(device)
        return _zero_pad(h, mask), mask

    def _encode_glyph(self, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """ByT5 over the quoted text of each prompt (what HunyuanVideo-1.5 renders as glyphs); a prompt
        with no quoted text gets zero embeddings and an all-zero mask, as in the pipeline."""
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts
        d = self.glyph_model.config.d_model
        embeds, masks = [], []
        for t in texts:
            glyph = extract_glyph_texts(t)
            if glyph is None:
                embeds.append(torch.zeros(1, self.glyph_max_len, d, device=device))
                masks.append(torch.zeros(1, self.glyph_max_len, dtype=torch.long, device=device))
                continue
            ids, mask = _tokenize(self.glyph_tokenizer, [glyph], self.glyph_max_len)
            h = self.glyph_model(input_ids=ids.to(device), attention_mask=mask.to(device).float())[0]
            mask = mask.to(device)
            embeds.append(_zero_pad(h.float(), mask))
            masks.append(mask)
        return torch.cat(embeds), torch.cat(masks)


def _zero_pad(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return h * mask.to(h.device, h.dtype)[..., None]

