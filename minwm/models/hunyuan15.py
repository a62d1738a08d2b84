"""HunyuanVideo-1.5 backbone adapter (MMDiT joint attention, T2V / TI2V).

The weights and layers are diffusers' `HunyuanVideo15Transformer3DModel` (54 dual-stream blocks at full size:
every block keeps separate video and text weights and attends over the joint token set; 1.5 has no single-stream
blocks). We own the forward: the block loop and each block's attention path, calling the block's submodules
(norms, q/k/v projections, qk-norms, output projections, FFNs) directly, because diffusers' forward takes one
timestep per sample and passes nothing per call to its attention processor.

Inputs the diffusers model takes, and how they arrive here:
  * latents [B, C=out_channels, F, H, W]; the model's input is [latents | cond latents | cond mask] on channels
    (in_channels = 2C + 1). The condition is the clean first-frame image latent at absolute latent frame 0 (mask
    1 there, zeros elsewhere), exactly as diffusers' I2V pipeline builds it; T2V passes zeros. We build it from
    `image_latents` [B, C, 1, H, W] at the video's first latent frame -- frame 0 of the latents in the
    bidirectional and teacher-forcing modes, the first frame ever committed to the cache in streaming (the chunk
    starting at cache.total_frames == 0) -- so every mode sees the same condition for the same frame. A model configured with in_channels = C takes no condition channels.
  * text (dict): "encoder_hidden_states" [B, L1, text_embed_dim] + "encoder_attention_mask" [B, L1] (the Qwen2.5-VL
    stream, refined by the timestep-conditioned token refiner), optional "encoder_hidden_states_2" [B, L2,
    text_embed_2_dim] + "encoder_attention_mask_2" (ByT5 glyph stream), optional "image_embeds" [B, L3,
    image_embed_dim] (SigLIP tokens of the conditioning image; an all-zero sample means T2V and its image tokens are
    masked out -- decided per sample, where diffusers decides for the whole batch). Tokens are joined as
    [image | byt5 | mllm] with their masks; padding keys are masked (diffusers also moves valid tokens first,
    which changes nothing since text carries no positional encoding).

The text stream depends on the timestep (token refiner and every block's text modulation). With per-frame
timesteps we give it one timestep per *text group*:
  * bidirectional: one group at max_f t_f (equal to diffusers' single t when the timesteps are uniform); joint
    attention exactly as diffusers (text queries see video and text).
  * teacher_forcing: group 0 at t=0 serves the clean copy, group b+1 at max t over noisy block b serves that
    block; each video query sees the text group of its block.
  * streaming: one group at max t over the chunk (t=0 on the commit pass).
In the causal modes text queries attend only to their own group's text, so text states never depend on video
(no leak of future frames) and depend on nothing but (prompt, t): streaming recomputes exactly what teacher
forcing computes, and the stream's per-layer text keys/values are a pure function of the prompt and t
(streaming keeps them per cache and prompt, computed once per distinct t: see _text_memo).

Attention per block: video q/k (after the block's RMS qk-norms) get HunyuanVideo's 3-D RoPE at (frame, row,
column) positions. Text keys carry no RoPE, so unlike a cross-attention DiT a video query's logits against text
depend on its *absolute* temporal position, not only on frame offsets. Temporal positions are therefore defined
the same way in the causal modes: a chunk's visible frames, in KV-cache read order (sinks, window, the chunk),
sit at frame_offset + 0, 1, ... -- streaming ropes the held pre-RoPE keys so at read time, and teacher forcing
ropes per query block likewise. Without eviction this is frame_offset + i for frame i (as in bidirectional
mode); with eviction and sinks teacher forcing still equals streaming exactly, and positions stay bounded in a
rollout of any length. frame_offset only shifts positions (as in the Wan adapter).
The PRoPE branch (camera.kind "prope") reuses the same normed q/k/v without RoPE, over video tokens only and
under the same block mask, and adds its own zero-initialised output projection (`transformer_blocks.{i}.
prope_out`) to the video attention output, so at init the model is exactly the pretrained one.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from torch import nn

from minwm.errors import MinwmError
from minwm.models import prope as prope_ops
from minwm.models.attention import attention, key_padding_mask
from minwm.models.backbone import Backbone, check_inputs, frame_timesteps
from minwm.models.config import ModelConfig
from minwm.models.modulation import gate, modulate
from minwm.models.masks import teacher_forcing_spans

TEXT_KEYS = ("encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2",
             "encoder_attention_mask_2", "image_embeds")


def _diffusers():
    from diffusers import HunyuanVideo15Transformer3DModel
    from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed

    return HunyuanVideo15Transformer3DModel, apply_rotary_emb, get_1d_rotary_pos_embed


def rope_tables(frame_positions: torch.Tensor, height: int, width: int, axes_dim, theta: float):
    """HunyuanVideo's 3-D RoPE (cos, sin) [len(frame_positions)*height*width, sum(axes_dim)] for tokens at the given
    temporal positions, frame-major then row then column (the order of diffusers' patch embedding). With
    frame_positions = 0..F-1 this is exactly diffusers' HunyuanVideo15RotaryPosEmbed."""
    _, _, get_1d = _diffusers()
    dev = frame_positions.device
    t = frame_positions.to(torch.float32)
    F_ = t.shape[0]
    grid_t = t[:, None, None].expand(F_, height, width).reshape(-1)
    grid_h = torch.arange(height, device=dev, dtype=torch.float32)[None, :, None].expand(F_, height, width).reshape(-1)
    grid_w = torch.arange(width, device=dev, dtype=torch.float32)[None, None, :].expand(F_, height, width).reshape(-1)
    parts = [get_1d(axes_dim[i], g, theta, use_real=True) for i, g in enumerate((grid_t, grid_h, grid_w))]
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


class Hunyuan15Backbone(Backbone):
    """See the module docstring. `self.transformer` is the diffusers model (its state_dict is the checkpoint
    format, camera modules included as `transformer_blocks.{i}.prope_out`)."""

    arch = "hunyuan15"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        cls, _, _ = _diffusers()
        try:
            self.transformer = cls(**dict(cfg.diffusers))
        except TypeError as e:
            raise MinwmError(f"model.diffusers: bad HunyuanVideo15Transformer3DModel argument ({e})") from None
        c = self.transformer.config
        self.heads, self.head_dim = c.num_attention_heads, c.attention_head_dim
        self.inner_dim = self.heads * self.head_dim
        self.latent_channels = c.out_channels
        if c.use_meanflow:
            raise MinwmError("model.diffusers.use_meanflow: the MeanFlow super-resolution variant is not supported")
        if c.patch_size_t != 1:
            raise MinwmError(f"model.diffusers.patch_size_t: per-latent-frame timesteps need 1, got {c.patch_size_t}")
        if sum(c.rope_axes_dim) != self.head_dim:
            raise MinwmError(f"model.diffusers.rope_axes_dim: {list(c.rope_axes_dim)} must sum to "
                             f"attention_head_dim={self.head_dim}")
        if c.in_channels == 2 * c.out_channels + 1:
            self.condition_channels = True
        elif c.in_channels == c.out_channels:
            self.condition_channels = False
        else:
            raise MinwmError(f"model.diffusers.in_channels: expected out_channels ({c.out_channels}) or "
                             f"2*out_channels+1 ({2 * c.out_channels + 1}: latents | image condition | mask), "
                             f"got {c.in_channels}")
        self.camera_kind = cfg.camera.kind
        if self.camera_kind == "plucker":
            raise MinwmError("model.camera.kind: 'plucker' is not implemented for hunyuan15 (use prope or none)")
        if self.camera_kind == "prope":
            prope_ops.check_head_dim(self.head_dim, cfg.camera.prope_layout)
            for blk in self.transformer.transformer_blocks:
                blk.prope_out = nn.Linear(self.inner_dim, self.inner_dim)
            self.zero_camera_()
        self.chunk_frames = cfg.chunk_frames
        # streaming text keys/values per cache (see _text_memo); weak, so a dropped cache frees its entry
        self._memo = weakref.WeakKeyDictionary()

    # ---- protocol -------------------------------------------------------------------------------
    @classmethod
    def diffusers_class(cls) -> type:
        return _diffusers()[0]

    def camera_parameter_names(self) -> list[str]:
        return [k for k in self.transformer.state_dict() if ".prope_out." in k]

    @torch.no_grad()
    def zero_camera_(self) -> None:
        """Zero the PRoPE output projections: the model then equals the pretrained one exactly."""
        for blk in self.transformer.transformer_blocks:
            if hasattr(blk, "prope_out"):
                nn.init.zeros_(blk.prope_out.weight)
                nn.init.zeros_(blk.prope_out.bias)

    def tokens_per_frame(self, height: int, width: int) -> int:
        p = self.transformer.config.patch_size
        return (height // p) * (width // p)

    def new_cache(self, batch: int, height: int, width: int, device=None, dtype=None,
                  window_frames: Optional[int] = -1, sink_frames: Optional[int] = None):
        """A KV cache for streaming at latent size height x width: per layer the "self" stream (video keys after
        the qk-norm, before RoPE, and values) and, with PRoPE, the "prope" stream (keys/values after apply_kv).
        window_frames / sink_frames default to the config's."""
        from minwm.models.kv_cache import KVCache

        p = next(self.parameters())
        streams = ("self", "prope") if self.camera_kind == "prope" else ("self",)
        return KVCache(len(self.transformer.transformer_blocks),
                       self.cfg.window_frames if window_frames == -1 else window_frames,
                       self.cfg.sink_frames if sink_frames is None else sink_frames,
                       self.tokens_per_frame(height, width), batch,
                       device=p.device if device is None else device, dtype=p.dtype if dtype is None else dtype,
                       streams=streams)

    def _check_cache(self, cache: Any, batch: int, tokens_per_frame: int) -> None:
        for what, have, want in (("tokens per frame", getattr(cache, "tokens_per_frame", None), tokens_per_frame),
                                 ("batch", getattr(cache, "batch", None), batch),
                                 ("layers", getattr(cache, "num_layers", None), len(self.transformer.transformer_blocks))):
            if have != want:
                raise MinwmError(f"cache: made for {what} {have}, this call needs {want}")
        if self.camera_kind == "prope" and "prope" not in getattr(cache, "streams", ()):
            raise MinwmError("cache: has no 'prope' stream; make it with backbone.new_cache(...)")

    # ---- inputs ---------------------------------------------------------------------------------
    def _condition(self, latents: torch.Tensor, image_latents: Optional[torch.Tensor], first_frame: int):
        """[latents | cond | mask] on channels, cond/mask non-zero only at the video's latent frame 0 (TI2V);
        `first_frame` is the index of latents' frame 0 within the video."""
        if not self.condition_channels:
            if image_latents is not None:
                raise MinwmError("image_latents: this model has no condition channels (in_channels == out_channels)")
            return latents
        B, C, F, H, W = latents.shape
        cond = latents.new_zeros(B, C + 1, F, H, W)
        if image_latents is not None and first_frame <= 0 < first_frame + F:
            if tuple(image_latents.shape) != (B, C, 1, H, W):
                raise MinwmError(f"image_latents: shape {tuple(image_latents.shape)}, expected [{B}, {C}, 1, {H}, {W}]")
            i = -first_frame
            cond[:, :C, i] = image_latents[:, :, 0].to(latents.dtype)
            cond[:, C, i] = 1.0
        return torch.cat([latents, cond], 1)

    def _check_text(self, text: Any, batch: int) -> dict:
        if not isinstance(text, dict):
            raise MinwmError(f"text: expected a dict with {', '.join(TEXT_KEYS)}, got {type(text).__name__}")
        unknown = sorted(set(text) - set(TEXT_KEYS))
        if unknown:
            raise MinwmError(f"text: unknown key {unknown[0]!r} (expected {', '.join(TEXT_KEYS)})")
        c = self.transformer.config
        for key, mkey, dim in (("encoder_hidden_states", "encoder_attention_mask", c.text_embed_dim),
                               ("encoder_hidden_states_2", "encoder_attention_mask_2", c.text_embed_2_dim)):
            if key == "encoder_hidden_states" and key not in text:
                raise MinwmError("text: 'encoder_hidden_states' (the Qwen2.5-VL embeddings) is required")
            if key not in text:
                if mkey in text:
                    raise MinwmError(f"text: {mkey!r} given without {key!r}")
                continue
            e = text[key]
            if e.ndim != 3 or e.shape[0] != batch or e.shape[2] != dim:
                raise MinwmError(f"text.{key}: shape {tuple(e.shape)}, expected [{batch}, L, {dim}]")
            m = text.get(mkey)
            if m is None or tuple(m.shape) != tuple(e.shape[:2]):
                got = None if m is None else tuple(m.shape)
                raise MinwmError(f"text.{mkey}: shape {got}, expected {tuple(e.shape[:2])}")
        if "image_embeds" in text:
            e = text["image_embeds"]
            if e.ndim != 3 or e.shape[0] != batch or e.shape[2] != c.image_embed_dim:
                raise MinwmError(f"text.image_embeds: shape {tuple(e.shape)}, expected [{batch}, L, {c.image_embed_dim}]")
        return text

    def _time_embed(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Timestep embedding of any-shaped float timesteps (computed from float32 t, never bf16)."""
        te = self.transformer.time_embed
        proj = te.time_proj(t.reshape(-1).float())
        return te.timestep_embedder(proj.to(dtype)).view(*t.shape, -1)

    def _text_states(self, text: dict, t_text: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens [B, G, L, D] and key validity [B, G, L] for text groups at timesteps t_text [B, G]."""
        m = self.transformer
        B, G = t_text.shape
        ehs = text["encoder_hidden_states"].to(dtype)
        mask = text["encoder_attention_mask"]
        rep = lambda x: x.repeat_interleave(G, 0)  # noqa: E731  row b*G + g is sample b, group g
        mllm = m.context_embedder(rep(ehs), t_text.reshape(-1).float(), rep(mask))
        mllm = mllm + m.cond_type_embed.weight[0].to(mllm.dtype)
        parts, valid = [], []
        if "image_embeds" in text:
            img = text["image_embeds"].to(dtype)
            tok = m.image_embedder(img) + m.cond_type_embed.weight[2].to(dtype)
            parts.append(rep(tok))
            v = (img != 0).flatten(1).any(1)[:, None].expand(B, img.shape[1])
            valid.append(rep(v))
        if "encoder_hidden_states_2" in text:
            tok = m.context_embedder_2(text["encoder_hidden_states_2"].to(dtype)) + m.cond_type_embed.weight[1].to(dtype)
            parts.append(rep(tok))
            valid.append(rep(text["encoder_attention_mask_2"].bool()))
        parts.append(mllm)
        valid.append(rep(mask.bool()))
        tokens, valid = torch.cat(parts, 1), torch.cat(valid, 1)
        # drop token slots that are padding in every row: masked keys change nothing, so this is exact and
        # saves their compute (all of it at batch 1); one slot stays so shapes never go empty
        keep = valid.any(0)
        if not keep.all():
            keep[0] = True
            tokens, valid = tokens[:, keep], valid[:, keep]
        return tokens.view(B, G, *tokens.shape[1:]), valid.view(B, G, -1)

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, latents, timesteps, text, cameras=None, *, mode="bidirectional", clean_latents=None,
                cache=None, commit=False, frame_offset=0, image_latents=None, output=True):
        m = self.transformer
        c = m.config
        check_inputs(latents, cameras, in_channels=self.latent_channels, patch_size=(1, c.patch_size, c.patch_size),
                     chunk_frames=self.chunk_frames, mode=mode, camera_kind=self.camera_kind,
                     clean_latents=clean_latents, cache=cache, commit=commit, output=output)
        B, C, F, H, W = latents.shape
        text = self._check_text(text, B)
        p = c.patch_size
        hp, wp = H // p, W // p
        n = hp * wp
        dtype = m.x_embedder.proj.weight.dtype
        dev = latents.device
        t = frame_timesteps(timesteps, B, F, dev)

        if mode == "streaming":
            self._check_cache(cache, B, n)
        first_frame = cache.total_frames if mode == "streaming" else 0
        x = m.x_embedder(self._condition(latents, image_latents, first_frame).to(dtype))  # [B, F*n, D]
        positions = torch.arange(F, device=dev, dtype=torch.float32) + frame_offset
        if mode == "teacher_forcing":
            xc = m.x_embedder(self._condition(clean_latents, image_latents, 0).to(dtype))
            x = torch.cat([xc, x], 1)
            t_frames = torch.cat([torch.zeros_like(t), t], 1)
            positions = torch.cat([positions, positions])
            nb = F // self.chunk_frames
            t_text = torch.cat([torch.zeros_like(t[:, :1]), t.view(B, nb, self.chunk_frames).amax(2)], 1)
            # video frame -> text group: clean copy group 0, noisy frame of block b group b+1
            frame_group = torch.cat([torch.zeros(F, dtype=torch.long),
                                     1 + torch.arange(F) // self.chunk_frames]).tolist()
        else:
            t_frames = t
            t_text = t.amax(1, keepdim=True)
            frame_group = [0] * F
        Fv = t_frames.shape[1]
        temb = self._time_embed(t_frames, dtype)                       # [B, Fv, D]

        # Streaming: the text stream is a pure function of (prompt, t), so its per-layer keys/values are kept
        # per cache and reused by every later chunk at the same t (K+1 distinct t per rollout).
        memo = self._text_memo(cache, text, t_text) if mode == "streaming" and not torch.is_grad_enabled() else None
        text_kv = memo.get("kv") if memo is not None else None
        if text_kv is not None:
            txt, temb_txt, txt_valid = None, None, memo["valid"]
        else:
            txt, txt_valid = self._text_states(text, t_text, dtype)    # [B, G, L, D], [B, G, L]
            txt = txt.flatten(0, 1)
            temb_txt = self._time_embed(t_text, dtype).flatten(0, 1)
        G, L = txt_valid.shape[1], txt_valid.shape[2]

        prope_st = None
        if self.camera_kind == "prope":
            w2c, K = cameras
            if mode == "teacher_forcing":
                w2c, K = torch.cat([w2c, w2c], 1), torch.cat([K, K], 1)
            prope_st = prope_ops.prope_state(w2c, K, Fv, hp, wp, self.cfg.camera.prope_layout,
                                             self.cfg.camera.prope_rope_base, torch.float32, self.head_dim)

        ctx = dict(mode=mode, B=B, n=n, hp=hp, wp=wp, Fv=Fv, G=G, L=L, txt_valid=txt_valid,
                   frame_group=frame_group, prope_st=prope_st, cache=cache, commit=commit,
                   text_kv=text_kv, new_text_kv=[] if memo is not None and text_kv is None else None,
                   spans=teacher_forcing_spans(F, self.chunk_frames, n, self.cfg.window_frames,
                                               self.cfg.sink_frames) if mode == "teacher_forcing" else None)
        if mode == "streaming":
            # [held frames | chunk] at contiguous positions from frame_offset (the same for every layer)
            positions = frame_offset + torch.arange(cache.num_frames + F, device=dev, dtype=torch.float32)
        elif mode == "teacher_forcing":
            # per query block, its visible frames in cache order at frame_offset + 0.. (see _tf_video_attention)
            positions = positions[:F]
        ctx["rope"] = rope_tables(positions, hp, wp, c.rope_axes_dim, c.rope_theta)
        blocks = list(m.transformer_blocks)
        if not output:  # a refresh pass: of the last block only its keys/values are kept
            *blocks, last = blocks
        for layer, blk in enumerate(blocks):
            # no checkpointing of a committing pass: recomputation would append to the cache twice
            if torch.is_grad_enabled() and self.gradient_checkpointing and not (mode == "streaming" and commit):
                x, txt = torch.utils.checkpoint.checkpoint(self._block, layer, blk, x, txt, temb, temb_txt, ctx,
                                                           use_reentrant=False)
            else:
                x, txt = self._block(layer, blk, x, txt, temb, temb_txt, ctx)
        if not output:
            self._block(len(blocks), last, x, txt, temb, temb_txt, ctx, kv_only=True)
        if ctx["new_text_kv"] is not None:
            memo.update(kv=ctx["new_text_kv"], valid=txt_valid)
        if not output:
            return None

        if mode == "teacher_forcing":  # only the noisy copy goes through the head
            x, temb = x[:, F * n:], temb[:, F:]
        emb = m.norm_out.linear(m.norm_out.silu(temb).to(x.dtype))   # [B, F, 2D]: scale, shift
        scale, shift = emb.chunk(2, dim=-1)
        x = modulate(m.norm_out.norm(x), scale, shift)
        x = m.proj_out(x)
        x = x.reshape(B, F, hp, wp, -1, 1, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _text_memo(self, cache, text: dict, t_text: torch.Tensor) -> dict:
        """The per-cache memo entry for this prompt and text timestep. A prompt is recognised by the identity
        and in-place version counter of its tensors (the memo holds references, so an id is never reused
        while its entry lives); a new prompt replaces the cache's entries."""
        sig = tuple((k, id(v), v._version) for k, v in sorted(text.items()))
        entry = self._memo.get(cache)
        if entry is None or entry["sig"] != sig:
            entry = {"sig": sig, "refs": dict(text), "by_t": {}}
            self._memo[cache] = entry
        return entry["by_t"].setdefault(tuple(t_text.flatten().tolist()), {})

    # ---- one dual-stream block ----------------------------------------------------------------
    def _block(self, layer: int, blk: nn.Module, x, txt, temb, temb_txt, ctx, kv_only: bool = False):
        """One block; kv_only (a refresh pass's last block): write the cache (and the text memo) and stop before
        the attention and MLPs, which feed nothing there."""
        mv = blk.norm1.linear(blk.norm1.silu(temb))                      # [B, Fv, 6D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mv.chunk(6, dim=-1)
        nx = modulate(blk.norm1.norm(x), scale_msa, shift_msa)
        attn = blk.attn
        heads = lambda y: y.unflatten(2, (attn.heads, -1))  # noqa: E731
        q, k, v = attn.norm_q(heads(attn.to_q(nx))), attn.norm_k(heads(attn.to_k(nx))), heads(attn.to_v(nx))

        tq = None
        if ctx["text_kv"] is not None:        # streaming, text keys/values of this (prompt, t) already known
            tk, tv = ctx["text_kv"][layer]
        else:
            mt = blk.norm1_context.linear(blk.norm1_context.silu(temb_txt))  # [B*G, 6D]
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = mt[:, None].chunk(6, -1)
            nt = blk.norm1_context.norm(txt) * (1 + c_scale_msa) + c_shift_msa
            tq = attn.norm_added_q(heads(attn.add_q_proj(nt)))
            tk = attn.norm_added_k(heads(attn.add_k_proj(nt)))
            tv = heads(attn.add_v_proj(nt))
            if ctx["new_text_kv"] is not None:
                ctx["new_text_kv"].append((tk, tv))
        if kv_only:
            self._commit(layer, k, v, ctx)
            return x, txt

        attn_v, attn_t = self._attention(layer, blk, q, k, v, tq, tk, tv, ctx)
        if tq is not None:
            txt = txt + attn.to_add_out(attn_t.flatten(2)) * c_gate_msa
            nt = blk.norm2_context(txt) * (1 + c_scale_mlp) + c_shift_mlp
            txt = txt + c_gate_mlp * blk.ff_context(nt)

        x = x + gate(attn_v, gate_msa)
        nx = modulate(blk.norm2(x), scale_mlp, shift_mlp)
        x = x + gate(blk.ff(nx), gate_mlp)
        return x, txt

    @staticmethod
    def _commit(layer: int, k, v, ctx) -> None:
        """Append this pass's video keys/values (pre-RoPE; PRoPE-transformed for the camera stream)."""
        cache, st = ctx["cache"], ctx["prope_st"]
        cache.append(layer, "self", k, v)
        if st is not None:
            cache.append(layer, "prope", prope_ops.apply_kv(k, st), prope_ops.apply_kv(v, st))

    def _attention(self, layer: int, blk: nn.Module, q, k, v, tq, tk, tv, ctx):
        """Video q/k/v [B, Sv, H, Dh] (normed, no RoPE yet), text tq/tk/tv [B*G, L, H, Dh] (tq None when the text
        stream is not computed) -> (video output after to_out (+ PRoPE branch), raw text attention output)."""
        _, apply_rotary_emb, _ = _diffusers()
        attn = blk.attn
        B, G, L, n = ctx["B"], ctx["G"], ctx["L"], ctx["n"]
        txt_valid = ctx["txt_valid"]                                     # [B, G, L]
        mode = ctx["mode"]
        cache = ctx["cache"]
        Sv = q.shape[1]
        out_t = None

        if mode == "streaming":
            # [held frames | this chunk]; held keys are pre-RoPE, so rope them all here at contiguous temporal
            # positions frame_offset + 0..nf-1 and the chunk right after (RoPE logits only see offsets)
            k_all, v_all, nf = cache.read_with(layer, "self", k, v)
            cos, sin = ctx["rope"]
            if cos.shape[0] != k_all.shape[1]:
                raise RuntimeError(f"KV cache layer {layer} holds {nf} frames, expected {cache.num_frames}")
            q_r = apply_rotary_emb(q, (cos[nf * n:], sin[nf * n:]), sequence_dim=1)
            k_r = apply_rotary_emb(k_all.to(k.dtype), (cos, sin), sequence_dim=1)
            v_all = v_all.to(v.dtype)
        elif mode == "bidirectional":
            q_r = apply_rotary_emb(q, ctx["rope"], sequence_dim=1)
            k_r = apply_rotary_emb(k, ctx["rope"], sequence_dim=1)
            v_all = v

        if mode == "bidirectional":
            # diffusers' joint attention: [video | text] queries over [video | text] keys, padding keys masked
            valid = torch.cat([txt_valid.new_ones(B, Sv), txt_valid[:, 0]], 1)
            out = attention(torch.cat([q_r, tq], 1), torch.cat([k_r, tk], 1), torch.cat([v_all, tv], 1),
                            key_padding_mask(valid, Sv + L))
            out_v, out_t = out[:, :Sv], out[:, Sv:]
        else:
            if tq is not None:  # text queries: their own group's text only
                out_t = attention(tq, tk, tv, key_padding_mask(txt_valid.reshape(B * G, L), L))
            tk, tv = tk.view(B, G, L, *tk.shape[2:]), tv.view(B, G, L, *tv.shape[2:])
            if mode == "streaming":
                valid = torch.cat([txt_valid.new_ones(B, k_r.shape[1]), txt_valid[:, 0]], 1)
                out_v = attention(q_r, torch.cat([k_r, tk[:, 0]], 1), torch.cat([v_all, tv[:, 0]], 1),
                                  key_padding_mask(valid, Sv))
            else:
                out_v = self._tf_video_attention(q, k, v, tk, tv, txt_valid, ctx)
        out_v = attn.to_out[1](attn.to_out[0](out_v.flatten(2)))

        st = ctx["prope_st"]
        if st is not None:
            if mode == "streaming":
                kp_c, vp_c, _ = cache.read(layer, "prope")
                po = prope_ops.prope_attention(q, k, v, st, k_cache=kp_c, v_cache=vp_c)
            else:
                po = prope_ops.prope_attention(q, k, v, st, mask=ctx["spans"])
            out_v = out_v + blk.prope_out(po.flatten(2))

        if mode == "streaming" and ctx["commit"]:
            self._commit(layer, k, v, ctx)
        return out_v, out_t

    def _tf_video_attention(self, q, k, v, tk, tv, txt_valid, ctx):
        """Teacher forcing: per query block, the video keys its span allows plus its text group's keys.

        RoPE is applied here, per block, exactly as streaming applies it: the block's visible frames, in cache
        read order (sinks, window, then the block's own frames -- the spans' ascending key ranges), sit at
        positions frame_offset + 0, 1, ... This matters for an MMDiT: text keys carry no RoPE, so a video
        query's logits against text depend on its absolute temporal position, not only on offsets between
        frames; with these positions teacher forcing equals streaming also after the window starts evicting,
        and streaming positions stay bounded for rollouts of any length. Without eviction they are the
        absolute frame positions (frame_offset + i)."""
        _, apply_rotary_emb, _ = _diffusers()
        B, n = ctx["B"], ctx["n"]
        cos, sin = ctx["rope"]
        fg = ctx["frame_group"]
        out = q.new_empty(q.shape)
        for q0, q1, ranges in ctx["spans"].blocks:
            g = fg[q0 // n]
            kb = torch.cat([k[:, a:b] for a, b in ranges], 1)
            vb = torch.cat([v[:, a:b] for a, b in ranges], 1)
            nk, nq = kb.shape[1], q1 - q0
            kb = apply_rotary_emb(kb, (cos[:nk], sin[:nk]), sequence_dim=1)
            qb = apply_rotary_emb(q[:, q0:q1], (cos[nk - nq:nk], sin[nk - nq:nk]), sequence_dim=1)
            valid = torch.cat([txt_valid.new_ones(B, nk), txt_valid[:, g]], 1)
            out[:, q0:q1] = attention(qb, torch.cat([kb, tk[:, g]], 1), torch.cat([vb, tv[:, g]], 1),
                                      key_padding_mask(valid, nq))
        return out
