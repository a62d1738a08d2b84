"""The one attention call both backbones use, in the [B, S, H, Dh] layout (batch, tokens, heads, head dim).

`attention(q, k, v, mask)` accepts
  * mask=None: full attention;
  * a bool tensor (True = may attend) of shape [Sq, Sk], [B, Sq, Sk] or [B, H, Sq, Sk];
  * a float tensor of the same shapes, added to the logits;
  * a `masks.BlockSpans` (the block-structured masks of masks.py): attention runs query block by query block
    over the keys that block may see, unmasked. This never builds the [Sq, Sk] mask (4.3 GB of bools for a
    teacher-forced Wan2.1 sequence of 2 x 32760 tokens) and lets the GPU use its flash kernels, which a
    dense mask would rule out. The result equals the dense-masked call exactly up to float summation order.
    Measured on CPU (1 thread, float32, teacher-forcing mask of 20 frames, chunk 4, 2 x 1280 tokens, 4 heads of
    32): dense bool mask 47 ms, blockwise 12 ms, unmasked full attention 37 ms -- blockwise skips the masked
    blocks instead of computing and discarding them. flex_attention does run on CPU in torch 2.13 but only
    compiled (6-23 s of compile per shape here) and its steady state was no faster than blockwise, so it is
    not used.

`rope_apply(x, cos, sin)` rotates interleaved channel pairs (2j, 2j+1) by per-pair angles; it is the generic
helper PRoPE's x/y RoPE uses (the Wan adapter's 3-D RoPE follows diffusers' own code, not this).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from minwm.models.masks import BlockSpans

Mask = Union[None, torch.Tensor, BlockSpans]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale) -> torch.Tensor:
    # SDPA wants [B, H, S, Dh]; transposes are views, SDPA copies if its kernel needs contiguity.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask = None,
              scale: Optional[float] = None) -> torch.Tensor:
    """Softmax attention. q [B, Sq, H, Dh], k/v [B, Sk, H, Dh] (v may have its own head dim) -> [B, Sq, H, Dv]."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: expected [B, S, H, Dh] tensors, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"attention: k has {k.shape[1]} tokens but v has {v.shape[1]}")
    if isinstance(mask, BlockSpans):
        return blockwise_attention(q, k, v, mask, scale)
    if mask is not None:
        Sq, Sk = q.shape[1], k.shape[1]
        if tuple(mask.shape[-2:]) != (Sq, Sk):
            raise ValueError(f"attention: mask is {tuple(mask.shape)}, expected [..., {Sq}, {Sk}]")
        if mask.ndim == 3:  # [B, Sq, Sk]: same mask for every head
            mask = mask.unsqueeze(1)
        if mask.dtype != torch.bool and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
    return _sdpa(q, k, v, mask, scale)


def blockwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: BlockSpans,
                        scale: Optional[float] = None) -> torch.Tensor:
    """Attention under a block-structured mask: one unmasked SDPA per query block over its visible keys.

    A block whose keys are one contiguous range uses a view of k/v; several ranges are concatenated (a copy of
    only the keys that block sees).
    """
    B, Sq, H, _ = q.shape
    if (Sq, k.shape[1]) != (spans.num_queries, spans.num_keys):
        raise ValueError(f"attention: spans describe {spans.num_queries}x{spans.num_keys} but q/k have "
                         f"{Sq}x{k.shape[1]} tokens")
    out = q.new_empty(B, Sq, H, v.shape[-1])
    for q0, q1, key_ranges in spans.blocks:
        if len(key_ranges) == 1:
            a, b = key_ranges[0]
            kb, vb = k[:, a:b], v[:, a:b]
        else:
            kb = torch.cat([k[:, a:b] for a, b in key_ranges], 1)
            vb = torch.cat([v[:, a:b] for a, b in key_ranges], 1)
        out[:, q0:q1] = _sdpa(q[:, q0:q1], kb, vb, None, scale)
    return out


def key_padding_mask(valid: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Key-validity mask [B, Sk] (True = a real key) -> [B, 1, Sq, Sk] (an expanded view). Masking keys only --
    never query rows -- means no row is ever fully masked while a sample has one valid key (a fully masked row
    would give NaN values that masked keys still multiply into valid rows)."""
    return valid[:, None, None, :].expand(valid.shape[0], 1, num_queries, valid.shape[1])


def mask_to_additive(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bool mask (True = may attend) -> additive float mask (0 where allowed, -inf elsewhere)."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~mask, float("-inf"))


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x[2j], x[2j+1]) of the last dim by angle a_j, given cos/sin of a_j.

    cos/sin broadcast against x's shape with the last dim halved (one value per pair). Rotation by -a is
    rope_apply(x, cos, -sin). Computed in the promoted dtype of x and cos, returned in x's dtype.
    """
    ct = torch.promote_types(x.dtype, cos.dtype)
    if x.dtype == ct == sin.dtype and ct in (torch.float32, torch.float64):
        # The same products as below as one complex multiply (a + ib)(cos + i sin): ~10x faster on CPU than the
        # unbind/stack form (PRoPE applies it four times per layer and pass in streaming).
        rot = torch.complex(cos, sin)
        return torch.view_as_real(torch.view_as_complex(x.contiguous().unflatten(-1, (-1, 2))) * rot).flatten(-2)
    pairs = x.to(ct).unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(ct), sin.to(ct)
    return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2).to(x.dtype)
