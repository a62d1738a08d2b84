"""Wan2.1 backbone: diffusers' `WanTransformer3DModel` for the weights and layers, our own forward.

We own the forward because a diffusers block passes nothing per call to its attention processor (no
cache, frame offset or mask can reach it) and its time embedding is per sample. The forward calls the
diffusers submodules directly (patch embedding, condition embedder, each block's norms / projections /
FFN, norm_out / proj_out), so parameter names stay those of the diffusers checkpoints and diffusers'
own forward stays the test oracle.

Differences from diffusers' forward, all on purpose:
- timesteps are per latent frame [B, F]; each frame's modulation is broadcast to its tokens;
- the 3-D RoPE is computed on the fly for any frame position (diffusers precomputes a 1024-position
  table), with a frame offset, and matches `WanRotaryPosEmbed` exactly at the same positions;
- camera injection: "prope" adds a second self-attention branch per block over the SAME normalised
  q/k/v (no 3-D RoPE), PRoPE-transformed, with its own zero-initialised output projection
  `blocks.{i}.attn1_prope_out`; "plucker" adds Plücker-ray tokens through a zero-initialised
  `plucker_embedding`. Both are registered inside the diffusers module so its state_dict is our
  checkpoint format (a superset of the diffusers keys);
- modes: bidirectional, teacher forcing ([clean | noisy]) and streaming (KV cache), see backbone.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from minwm.errors import MinwmError
from minwm.models import prope as prope_ops
from minwm.models.attention import attention
from minwm.models.backbone import Backbone, check_inputs, frame_timesteps
from minwm.models.config import ModelConfig
from minwm.models.modulation import gate, modulate
from minwm.models.masks import teacher_forcing_spans
from minwm.models.plucker_embed import PLUCKER_CHANNELS, plucker_tokens

ROPE_THETA = 10000.0  # WanRotaryPosEmbed's default; WanTransformer3DModel never overrides it

# diffusers kwargs of Wan2.1-T2V-1.3B (its transformer/config.json): 1,418,996,800 parameters, plus
# 70,824,960 for the PRoPE branch's 30 output projections.
WAN21_T2V_1_3B = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16,
                      out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                      cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
                      added_kv_proj_dim=None, rope_max_seq_len=1024)


# ---- 3-D RoPE ------------------------------------------------------------------------------------
def rope_split(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) channel counts of Wan's 3-D RoPE, as WanRotaryPosEmbed splits a head."""
    h = w = 2 * (head_dim // 6)
    return head_dim - h - w, h, w


def _axis_table(pos: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    # Same arithmetic as diffusers' get_1d_rotary_pos_embed(use_real, repeat_interleave_real, float64):
    # float64 angles, each pair's cos/sin repeated for both channels of the pair, cast to float32.
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim))
    ang = torch.outer(pos.to(torch.float64), inv)
    return ang.cos().repeat_interleave(2, dim=1).float(), ang.sin().repeat_interleave(2, dim=1).float()


def rope_3d(frame_pos: torch.Tensor, height: int, width: int, head_dim: int,
            theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [len(frame_pos)*height*width, head_dim] float32 for tokens laid out frame-major, then
    row-major over a height x width patch grid; frame i of the token set sits at temporal position
    frame_pos[i] (any integer, no table limit)."""
    t_dim, h_dim, w_dim = rope_split(head_dim)
    dev = frame_pos.device
    tc, ts = _axis_table(frame_pos, t_dim, theta)
    hc, hs = _axis_table(torch.arange(height, device=dev), h_dim, theta)
    wc, ws = _axis_table(torch.arange(width, device=dev), w_dim, theta)
    F = frame_pos.shape[0]

    def grid(t, h, w):
        return torch.cat([t[:, None, None].expand(F, height, width, -1),
                          h[None, :, None].expand(F, height, width, -1),
                          w[None, None, :].expand(F, height, width, -1)], -1).reshape(F * height * width, head_dim)

    return grid(tc, hc, wc), grid(ts, hs, ws)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, Dh] rotated pairwise (2j, 2j+1) as diffusers' WanAttnProcessor does; cos/sin [S, Dh]."""
    if x.dtype == cos.dtype and x.dtype in (torch.float32, torch.float64):
        # The same products as below as one complex multiply (x1 + i x2)(c + i s): bit-identical on CPU and
        # 10-25x faster than the unbind/stack form, which matters in streaming, where every pass re-ropes the
        # whole KV cache (measured: 9.8 ms -> 0.37 ms for 20 frames x 256 tokens x 8 heads x 32, 1 thread).
        rot = torch.complex(cos[:, 0::2], sin[:, 1::2])[None, :, None]
        return torch.view_as_real(torch.view_as_complex(x.contiguous().unflatten(-1, (-1, 2))) * rot).flatten(-2)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c = cos[None, :, None, 0::2]
    s = sin[None, :, None, 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2).type_as(x)


@dataclass
class WanTextContext:
    """A prompt's cross-attention keys/values per block, computed once (and reused by every streamed chunk)."""

    keys: list[torch.Tensor]    # per block [B, L, H, Dh] (after norm_k)
    values: list[torch.Tensor]  # per block [B, L, H, Dh]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]


@dataclass
class _Pass:
    """What every block of one forward call shares."""

    rope: Optional[tuple[torch.Tensor, torch.Tensor]]  # this call's tokens (non-streaming modes)
    mask: Any                                     # None or masks.BlockSpans
    prope_q: Optional[prope_ops.PRoPEState]
    cache: Any
    commit: bool
    frames: int                                   # latent frames in this call (one copy)
    frame_offset: int
    grid: tuple[int, int]                         # (h, w) tokens per frame after patching
    rope_cache: dict                              # n kept frames -> (cos, sin) for [kept | chunk]
    device: torch.device


class WanBackbone(Backbone):
    arch = "wan"

    @classmethod
    def diffusers_class(cls) -> type:
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        kwargs = dict(cfg.diffusers)
        for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
            if kwargs.get(key) is not None:
                raise MinwmError(f"model.diffusers.{key}: image conditioning (Wan I2V) is not supported, expected null")
        try:
            self.transformer = self.diffusers_class()(**kwargs)
        except TypeError as e:
            raise MinwmError(f"model.diffusers: {e}") from None
        c = self.transformer.config
        if tuple(c.patch_size)[0] != 1:
            raise MinwmError(f"model.diffusers.patch_size: temporal patch must be 1 (one token grid per latent "
                             f"frame), got {tuple(c.patch_size)}")
        self.dim = c.num_attention_heads * c.attention_head_dim
        self.heads = c.num_attention_heads
        self.head_dim = c.attention_head_dim
        if min(rope_split(self.head_dim)[1:]) < 2:
            raise MinwmError(f"model.diffusers.attention_head_dim: {self.head_dim} is too small for Wan's 3-D RoPE "
                             f"(expected >= 6)")
        kind = cfg.camera.kind
        if kind == "prope":
            prope_ops.check_head_dim(self.head_dim, cfg.camera.prope_layout)
            for blk in self.transformer.blocks:
                blk.add_module("attn1_prope_out", _zero_linear(self.dim, self.dim))
        elif kind == "plucker":
            p = math.prod(tuple(c.patch_size))
            self.transformer.add_module("plucker_embedding", _zero_linear(PLUCKER_CHANNELS * p, self.dim))

    # ---- properties ----------------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def out_channels(self) -> int:
        return self.transformer.config.out_channels or self.in_channels

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.transformer.config.patch_size)

    @property
    def num_layers(self) -> int:
        return len(self.transformer.blocks)

    def tokens_per_frame(self, height: int, width: int) -> int:
        _, p_h, p_w = self.patch_size
        return (height // p_h) * (width // p_w)

    def camera_parameter_names(self) -> list[str]:
        names = []
        for name, _ in self.transformer.named_parameters():
            if ".attn1_prope_out." in name or name.startswith("plucker_embedding."):
                names.append(name)
        return names

    def new_cache(self, batch: int, height: int, width: int, device=None, dtype=None,
                  window_frames: Optional[int] = -1, sink_frames: Optional[int] = None):
        """A KV cache for streaming latents of height x width (latent pixels). window_frames / sink_frames
        default to the config's (pass window_frames=None to keep every frame)."""
        from minwm.models.kv_cache import KVCache

        p = next(self.parameters())
        streams = ("self", "prope") if self.cfg.camera.kind == "prope" else ("self",)
        return KVCache(self.num_layers,
                       self.cfg.window_frames if window_frames == -1 else window_frames,
                       self.cfg.sink_frames if sink_frames is None else sink_frames,
                       self.tokens_per_frame(height, width), batch,
                       device=p.device if device is None else device,
                       dtype=p.dtype if dtype is None else dtype, streams=streams,
                       staging_frames=self.cfg.chunk_frames)  # room for read_with's zero-copy [cache | chunk]

    # ---- text --------------------------------------------------------------------------------
    def encode_text(self, text: dict) -> WanTextContext:
        """{"encoder_hidden_states": [B, L, text_dim]} -> per-block cross-attention K/V."""
        if isinstance(text, WanTextContext):
            return text
        if not isinstance(text, dict) or "encoder_hidden_states" not in text:
            raise MinwmError("text: expected a dict with 'encoder_hidden_states' [B, L, text_dim]")
        ehs = text["encoder_hidden_states"]
        td = self.transformer.config.text_dim
        if ehs.ndim != 3 or ehs.shape[-1] != td:
            raise MinwmError(f"text: encoder_hidden_states has shape {tuple(ehs.shape)}, expected [B, L, {td}]")
        ctx = self.transformer.condition_embedder.text_embedder(ehs)
        keys, values = [], []
        for blk in self.transformer.blocks:
            a = blk.attn2
            keys.append(a.norm_k(a.to_k(ctx)).unflatten(2, (a.heads, -1)))
            values.append(a.to_v(ctx).unflatten(2, (a.heads, -1)))
        return WanTextContext(keys, values)

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, latents: torch.Tensor, timesteps: Any, text: Any,
                cameras: Optional[tuple[torch.Tensor, torch.Tensor]] = None, *, mode: str = "bidirectional",
                clean_latents: Optional[torch.Tensor] = None, cache: Any = None, commit: bool = False,
                frame_offset: int = 0, output: bool = True) -> Optional[torch.Tensor]:
        """Velocity prediction [B, C_out, F, H, W]. See backbone.py for the modes.

        Temporal RoPE positions: bidirectional and both teacher-forcing copies put frame i at
        frame_offset + i; streaming puts the cache's n kept frames at frame_offset + 0..n-1 and the chunk
        right after them (RoPE is relative, so the offset never changes what attends to what)."""
        kind = self.cfg.camera.kind
        chunk = self.cfg.chunk_frames
        check_inputs(latents, cameras, in_channels=self.in_channels, patch_size=self.patch_size,
                     chunk_frames=chunk, mode=mode, camera_kind=kind, clean_latents=clean_latents, cache=cache,
                     commit=commit, output=output)
        B, _, F, H, W = latents.shape
        _, p_h, p_w = self.patch_size
        h, w = H // p_h, W // p_w
        T = h * w
        t = frame_timesteps(timesteps, B, F, latents.device)
        ctx = self.encode_text(text)
        if ctx.batch not in (1, B):
            raise MinwmError(f"text: batch {ctx.batch} does not match the latents' batch {B}")
        if mode == "streaming":
            self._check_cache(cache, B, T)
        if kind != "none":
            cameras = tuple(c.to(latents.device) for c in cameras)

        x = self._embed(latents, cameras)
        mask = None
        frames = torch.arange(F, device=latents.device) + frame_offset
        if mode == "teacher_forcing":
            x = torch.cat([self._embed(clean_latents, cameras), x], 1)
            t = torch.cat([torch.zeros_like(t), t], 1)
            frames = torch.cat([frames, frames])
            mask = teacher_forcing_spans(F, chunk, T, self.cfg.window_frames, self.cfg.sink_frames)
            if kind != "none":
                cameras = tuple(torch.cat([c, c], 1) for c in cameras)
        temb, mod = self._time_embedding(t, x.dtype)

        prope_q = None
        if kind == "prope":
            prope_q = prope_ops.prope_state(cameras[0], cameras[1], cameras[0].shape[1], h, w,
                                            self.cfg.camera.prope_layout, self.cfg.camera.prope_rope_base,
                                            torch.float32, self.head_dim)
        rope = None if mode == "streaming" else rope_3d(frames, h, w, self.head_dim)
        ps = _Pass(rope, mask, prope_q, cache if mode == "streaming" else None, commit, F, frame_offset, (h, w),
                   {}, latents.device)

        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled() and not (
            mode == "streaming" and commit)  # recomputation would append to the cache twice
        blocks = self.transformer.blocks
        if not output:  # a refresh pass: of the last block only its keys/values are kept
            *blocks, last = blocks
        for i, blk in enumerate(blocks):
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(self._block, i, blk, x, mod, ctx, ps, use_reentrant=False)
            else:
                x = self._block(i, blk, x, mod, ctx, ps)
        if not output:
            self._commit_keys(len(blocks), last, x, mod, ps)
            return None

        if mode == "teacher_forcing":  # only the noisy half goes through the output head
            x, temb = x[:, F * T:], temb[:, F:]
        return self._head(x, temb, F, h, w)

    def _check_cache(self, cache: Any, batch: int, tokens_per_frame: int) -> None:
        tpf = getattr(cache, "tokens_per_frame", tokens_per_frame)
        if tpf != tokens_per_frame:
            raise MinwmError(f"cache: made for {tpf} tokens per frame, the latents have {tokens_per_frame}")
        cb = getattr(cache, "batch", batch)
        if cb != batch:
            raise MinwmError(f"cache: made for batch {cb}, the latents have batch {batch}")
        streams = getattr(cache, "streams", None)
        if self.cfg.camera.kind == "prope" and streams is not None and "prope" not in streams:
            raise MinwmError("cache: has no 'prope' stream; make it with backbone.new_cache(...)")

    # ---- pieces --------------------------------------------------------------------------------
    def _embed(self, latents: torch.Tensor, cameras) -> torch.Tensor:
        tr = self.transformer
        x = tr.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()  # [B, F*h*w, D] frame-major
        if self.cfg.camera.kind == "plucker":
            H, W = latents.shape[-2:]
            rays = plucker_tokens(cameras[0], cameras[1], H, W, self.patch_size, tr.plucker_embedding.weight.dtype)
            x = x + tr.plucker_embedding(rays).to(x.dtype)
        return x

    def _time_embedding(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame t [B, nf] -> temb [B, nf, D] and block modulation [B, nf, 6, D], with diffusers'
        condition-embedder modules and casts (the Wan2.2 per-token path, one entry per frame)."""
        ce = self.transformer.condition_embedder
        B, nf = t.shape
        proj = ce.timesteps_proj(t.flatten()).unflatten(0, (B, nf))
        te_dtype = next(iter(ce.time_embedder.parameters())).dtype
        if proj.dtype != te_dtype and te_dtype != torch.int8:
            proj = proj.to(te_dtype)
        temb = ce.time_embedder(proj).to(dtype)
        mod = ce.time_proj(ce.act_fn(temb)).unflatten(2, (6, -1))
        return temb, mod

    def _block(self, i: int, blk: nn.Module, x: torch.Tensor, mod: torch.Tensor, ctx: WanTextContext,
               ps: _Pass) -> torch.Tensor:
        # Same arithmetic and casts as WanTransformerBlock.forward, with per-frame modulation.
        e = blk.scale_shift_table[:, None] + mod.float()  # [B, nf, 6, D]
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = e.unbind(2)

        nh = modulate(blk.norm1(x.float()), scale_msa, shift_msa).type_as(x)
        q, k, v = self._qkv(blk.attn1, nh)
        attn = self._self_attention(i, blk, q, k, v, ps)
        x = (x.float() + gate(attn, gate_msa)).type_as(x)

        nh = blk.norm2(x.float()).type_as(x)
        x = x + self._cross_attention(blk.attn2, nh, ctx.keys[i], ctx.values[i])

        nh = modulate(blk.norm3(x.float()), c_scale, c_shift).type_as(x)
        ff = blk.ffn(nh)
        return (x.float() + gate(ff.float(), c_gate)).type_as(x)

    @staticmethod
    def _qkv(a: nn.Module, x: torch.Tensor, with_q: bool = True):
        q = a.norm_q(a.to_q(x)).unflatten(2, (a.heads, -1)) if with_q else None
        k = a.norm_k(a.to_k(x)).unflatten(2, (a.heads, -1))
        v = a.to_v(x).unflatten(2, (a.heads, -1))
        return q, k, v

    def _commit_keys(self, i: int, blk: nn.Module, x: torch.Tensor, mod: torch.Tensor, ps: _Pass) -> None:
        """The cache writes of block i in a refresh pass, without the attention and FFN nothing reads."""
        e = blk.scale_shift_table[:, None] + mod.float()
        nh = modulate(blk.norm1(x.float()), e[:, :, 1], e[:, :, 0]).type_as(x)
        _, k, v = self._qkv(blk.attn1, nh, with_q=False)
        if ps.prope_q is not None:
            ps.cache.append(i, "prope", prope_ops.apply_kv(k, ps.prope_q), prope_ops.apply_kv(v, ps.prope_q))
        ps.cache.append(i, "self", k, v)

    def _self_attention(self, i: int, blk: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        ps: _Pass) -> torch.Tensor:
        a = blk.attn1
        if ps.cache is None:
            cos, sin = ps.rope
            out = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, ps.mask)
        else:
            # The "self" stream holds keys before RoPE: [kept frames | chunk] are roped together at contiguous
            # positions (kept frames 0..n-1, the chunk from n), so eviction leaves no gap and nothing overflows.
            ka, va, n = ps.cache.read_with(i, "self", k, v)
            cos, sin = self._stream_rope(ps, n)
            sq = q.shape[1]  # the chunk's queries sit at the last positions
            out = attention(apply_rope(q, cos[-sq:], sin[-sq:]), apply_rope(ka.to(k.dtype), cos, sin),
                            va.to(v.dtype))
        out = a.to_out[0](out.flatten(2).type_as(q))

        if ps.prope_q is not None:
            st = ps.prope_q
            qp, kp, vp = prope_ops.apply_q(q, st), prope_ops.apply_kv(k, st), prope_ops.apply_kv(v, st)
            if ps.cache is not None:
                # The cached camera-branch keys/values are the PRoPE-transformed ones, each under its own
                # frame's camera -- never the RoPE keys of the "self" stream.
                kpa, vpa, _ = ps.cache.read_with(i, "prope", kp, vp)
                op = attention(qp, kpa.to(kp.dtype), vpa.to(vp.dtype))
            else:
                op = attention(qp, kp, vp, ps.mask)
            out = out + blk.attn1_prope_out(prope_ops.apply_out(op, st).flatten(2).type_as(q))
            if ps.cache is not None and ps.commit:
                ps.cache.append(i, "prope", kp, vp)
        # Commit only after both attentions: read_with may hand out views that an append would shift.
        if ps.cache is not None and ps.commit:
            ps.cache.append(i, "self", k, v)
        return out

    def _stream_rope(self, ps: _Pass, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for [n kept frames | this chunk] at positions frame_offset + 0 .. n+F-1."""
        if n not in ps.rope_cache:
            pos = torch.arange(n + ps.frames, device=ps.device) + ps.frame_offset
            ps.rope_cache[n] = rope_3d(pos, *ps.grid, self.head_dim)
        return ps.rope_cache[n]

    @staticmethod
    def _cross_attention(a: nn.Module, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = a.norm_q(a.to_q(x)).unflatten(2, (a.heads, -1))
        if k.shape[0] != q.shape[0]:  # one prompt for the whole batch
            k, v = k.expand(q.shape[0], *k.shape[1:]), v.expand(q.shape[0], *v.shape[1:])
        out = attention(q, k, v).flatten(2).type_as(q)
        return a.to_out[0](out)

    def _head(self, x: torch.Tensor, temb: torch.Tensor, F: int, h: int, w: int) -> torch.Tensor:
        tr = self.transformer
        shift, scale = (tr.scale_shift_table[:, None] + temb[:, :, None]).unbind(2)  # [B, F, D] each
        x = modulate(tr.norm_out(x.float()), scale, shift).type_as(x)
        x = tr.proj_out(x)
        p_t, p_h, p_w = self.patch_size
        B = x.shape[0]
        x = x.reshape(B, F // p_t, h, w, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _zero_linear(n_in: int, n_out: int) -> nn.Linear:
    # Zero-initialised so that step 0 of a camera-injected model reproduces the pretrained model exactly.
    lin = nn.Linear(n_in, n_out)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin
