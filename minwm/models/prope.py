"""PRoPE, the minWM paper's camera operator (its §2.1), in the GTA form

    out = D ⊙ Attn(Dᵀ⊙Q, D⁻¹⊙K, D⁻¹⊙V)

with, per token t of frame i at patch column x_t and row y_t, D_t block-diagonal over each head's d channels:

    layout "paper": [0, d/2) I_{d/8} ⊗ P_i (d/8 consecutive 4-vectors, each multiplied by the frame's 4x4),
                    [d/2, 3d/4) RoPE(x_t), [3d/4, d) RoPE(y_t)   (positions in patch units, base rope_base)
    layout "full":  all d channels are d/4 four-vectors multiplied by P_i; no x/y RoPE (ablation only).

P_i = [[K_i, 0], [0, 1]] · w2c_i with K built from normalised intrinsics with the principal point centred:
K = [[fx/W, 0, cx/W - 0.5], [0, fy/H, cy/H - 0.5], [0, 0, 1]].

What each transform does to one channel block (rows below are the 4-vectors / channel pairs of one token):
    apply_q:   q ← Dᵀ q   : q_c ← P_iᵀ q_c,   RoPE pairs rotated by -angle (Rᵀ(a) = R(-a))
    apply_kv:  x ← D⁻¹ x  : x_c ← P_j⁻¹ x_c,  RoPE pairs rotated by -angle (R⁻¹(a) = R(-a))
    apply_out: o ← D o    : o_c ← P_i o_c,    RoPE pairs rotated by +angle
so logits are (D_tᵀq)ᵀ(D_s⁻¹k) = qᵀ D_t D_s⁻¹ k: qᵀ P_i P_j⁻¹ k on the camera channels and
qᵀ R(a_t - a_s) k on the RoPE channels -- standard RoPE with the sign of the offset flipped (a convention;
the logits still depend only on relative patch offsets) -- and values are carried by the same relative maps.
With row vectors these are right-multiplications: q_cᵀ P, x_cᵀ P⁻ᵀ, o_cᵀ Pᵀ, done as one batched matmul per
(batch, frame) against the frame's 4x4, never a per-token matrix.

P and P⁻¹ are formed in float64 (P⁻¹ by torch.linalg.inv, which stays exact for any invertible K and w2c --
an analytic rigid inverse would silently assume an orthonormal rotation), then cast to the state's dtype.
Transforms compute in the promoted dtype of the input and the state (so a float32 state keeps bf16
activations' camera maths in float32) and return the input's dtype.

Streaming: the PRoPE branch's KV cache stores keys and values AFTER apply_kv (the cached frames' cameras are
not needed again), so a chunk's attention is apply_out(attention(apply_q(q), [cache | apply_kv(k)],
[cache | apply_kv(v)])) -- `prope_attention(..., k_cache=, v_cache=)` does exactly that, or, without copying
the cache: kt, vt = apply_kv(k, st), apply_kv(v, st); K, V, _ = cache.read_with(layer, "prope", kt, vt);
out = apply_out(attention(apply_q(q, st), K, V), st); and at the t=0 refresh, cache.append(layer, "prope",
kt, vt) after attending.

Teacher forcing ([clean | noisy], both copies sharing cameras): build the state over 2F frames with
torch.cat([w2c, w2c], 1) and the same for intrinsics.

API note: `prope_state` takes an optional trailing `head_dim`; without it the RoPE tables are built on first
use from the tensor's head dim and cached in the state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from minwm.errors import MinwmError
from minwm.models.attention import Mask, attention, rope_apply

LAYOUTS = ("paper", "full")


def intrinsics_matrices(intrinsics: torch.Tensor) -> torch.Tensor:
    """[..., 4] normalised (fx/W, fy/H, cx/W, cy/H) -> [..., 3, 3] K with the principal point centred (float64)."""
    f = torch.as_tensor(intrinsics).to(torch.float64)
    K = torch.zeros(*f.shape[:-1], 3, 3, dtype=torch.float64, device=f.device)
    K[..., 0, 0] = f[..., 0]
    K[..., 1, 1] = f[..., 1]
    K[..., 0, 2] = f[..., 2] - 0.5
    K[..., 1, 2] = f[..., 3] - 0.5
    K[..., 2, 2] = 1.0
    return K


def projective_matrices(w2c: torch.Tensor, intrinsics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w2c [..., 4, 4], intrinsics [..., 4] -> (P, P⁻¹), each [..., 4, 4] float64, P = [[K, 0], [0, 1]] · w2c."""
    w2c = torch.as_tensor(w2c).to(torch.float64)
    lift = torch.zeros(*w2c.shape[:-2], 4, 4, dtype=torch.float64, device=w2c.device)
    lift[..., :3, :3] = intrinsics_matrices(intrinsics).to(w2c.device)
    lift[..., 3, 3] = 1.0
    P = lift @ w2c
    return P, torch.linalg.inv(P)


def check_head_dim(head_dim: int, layout: str) -> None:
    if layout not in LAYOUTS:
        raise MinwmError(f"camera.prope_layout: expected paper or full, got {layout!r}")
    need = 8 if layout == "paper" else 4
    if head_dim < need or head_dim % need:
        raise MinwmError(f"PRoPE layout {layout!r} needs the attention head dim divisible by {need}, got {head_dim}")


def xy_angles(height: int, width: int, head_dim: int, rope_base: float = 100.0, device=None) -> torch.Tensor:
    """[height*width, d/4] float64 RoPE angles of the paper layout's second half, one per channel pair:
    the first d/8 pairs (channels [d/2, 3d/4)) rotate by x·ω_j, the last d/8 (channels [3d/4, d)) by y·ω_j,
    ω_j = rope_base^(-j/(d/8)), x/y the token's patch column/row (tokens row-major within a frame)."""
    m = head_dim // 8
    omega = rope_base ** (-torch.arange(m, dtype=torch.float64, device=device) / m)
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float64, device=device),
                          torch.arange(width, dtype=torch.float64, device=device), indexing="ij")
    return torch.cat([x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega], 1)


@dataclass
class PRoPEState:
    """Everything the transforms need for one token set of `frames` frames of height x width patches.

    P, P_inv: [B, F, 4, 4] in `dtype` (B may be 1 and broadcast over the activations' batch).
    cos/sin of the x/y RoPE are per within-frame position [height*width, d/4] (the same for every frame),
    built for a head dim on first use and cached in `_tables`.
    """

    P: torch.Tensor
    P_inv: torch.Tensor
    frames: int
    height: int
    width: int
    layout: str = "paper"
    rope_base: float = 100.0
    _tables: dict = field(default_factory=dict, repr=False)

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width

    def rope_tables(self, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if head_dim not in self._tables:
            check_head_dim(head_dim, self.layout)
            a = xy_angles(self.height, self.width, head_dim, self.rope_base, self.P.device)
            self._tables[head_dim] = (a.cos().to(self.P.dtype), a.sin().to(self.P.dtype))
        return self._tables[head_dim]


def prope_state(w2c: torch.Tensor, intrinsics: torch.Tensor, frames: int, height: int, width: int,
                layout: str = "paper", rope_base: float = 100.0, dtype: torch.dtype = torch.float32,
                head_dim: Optional[int] = None) -> PRoPEState:
    """Per-call state. w2c [B, F, 4, 4] (or [F, 4, 4]), intrinsics [B, F, 4] (or [F, 4]), F == frames; height,
    width: the latent token grid after patching, so the token set has S = frames*height*width tokens."""
    if layout not in LAYOUTS:
        raise MinwmError(f"camera.prope_layout: expected paper or full, got {layout!r}")
    w2c = torch.as_tensor(w2c)
    intrinsics = torch.as_tensor(intrinsics)
    if w2c.ndim == 3:
        w2c = w2c.unsqueeze(0)
    if intrinsics.ndim == 2:
        intrinsics = intrinsics.unsqueeze(0)
    if w2c.ndim != 4 or w2c.shape[-2:] != (4, 4) or w2c.shape[1] != frames:
        raise ValueError(f"prope_state: w2c is {tuple(w2c.shape)}, expected [B, {frames}, 4, 4]")
    if intrinsics.ndim != 3 or intrinsics.shape[-1] != 4 or intrinsics.shape[1] != frames:
        raise ValueError(f"prope_state: intrinsics are {tuple(intrinsics.shape)}, expected [B, {frames}, 4]")
    P, P_inv = projective_matrices(w2c, intrinsics.to(w2c.device))
    st = PRoPEState(P.to(dtype), P_inv.to(dtype), frames, height, width, layout, float(rope_base))
    if head_dim is not None:
        check_head_dim(head_dim, layout)
        if layout == "paper":
            st.rope_tables(head_dim)
    return st


class PRoPE:
    """Config holder: head dim, layout and RoPE base checked once; `state(...)` builds a PRoPEState."""

    def __init__(self, head_dim: int, layout: str = "paper", rope_base: float = 100.0):
        check_head_dim(head_dim, layout)
        self.head_dim, self.layout, self.rope_base = head_dim, layout, float(rope_base)

    def state(self, w2c, intrinsics, frames: int, height: int, width: int,
              dtype: torch.dtype = torch.float32) -> PRoPEState:
        return prope_state(w2c, intrinsics, frames, height, width, self.layout, self.rope_base, dtype,
                           self.head_dim)



def _transform(x: torch.Tensor, st: PRoPEState, mat: torch.Tensor, rope_sign: float) -> torch.Tensor:
    """x [B, S, H, d]: camera channels right-multiplied (as row 4-vectors) by the frame's `mat` [B, F, 4, 4],
    paper-layout RoPE channels rotated by rope_sign · angle."""
    if x.ndim != 4:
        raise ValueError(f"PRoPE: expected [B, S, H, d], got {tuple(x.shape)}")
    B, S, H, d = x.shape
    if S != st.tokens:
        raise ValueError(f"PRoPE: {S} tokens but the state describes {st.frames}x{st.height}x{st.width}")
    check_head_dim(d, st.layout)
    ct = torch.promote_types(x.dtype, mat.dtype)
    F_, HW = st.frames, st.height * st.width
    nc = d // 2 if st.layout == "paper" else d
    mat = mat.to(device=x.device, dtype=ct)
    # [B, F, HW*H*nc/4, 4] @ [B, F, 4, 4]: one small-K matmul per (batch, frame).
    cam = x[..., :nc].to(ct).reshape(B, F_, HW * H * (nc // 4), 4) @ mat
    cam = cam.reshape(B, S, H, nc).to(x.dtype)
    if st.layout == "full":
        return cam
    cos, sin = st.rope_tables(d)
    cos = cos.to(x.device)[None, None, :, None, :]  # [1, 1, HW, 1, d/4] against [B, F, HW, H, d/4]
    sin = sin.to(x.device)[None, None, :, None, :] * rope_sign
    rot = rope_apply(x[..., nc:].reshape(B, F_, HW, H, d - nc), cos, sin).reshape(B, S, H, d - nc)
    return torch.cat([cam, rot], -1)


def apply_q(q: torch.Tensor, st: PRoPEState) -> torch.Tensor:
    """q ← Dᵀ q (queries)."""
    return _transform(q, st, st.P, -1.0)


def apply_kv(x: torch.Tensor, st: PRoPEState) -> torch.Tensor:
    """x ← D⁻¹ x (keys and values; this is what the PRoPE stream of the KV cache stores)."""
    return _transform(x, st, st.P_inv.mT, -1.0)


def apply_out(o: torch.Tensor, st: PRoPEState) -> torch.Tensor:
    """o ← D o (attention output, back to the queries' frames)."""
    return _transform(o, st, st.P.mT, 1.0)


def prope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, st_q: PRoPEState,
                    st_kv: Optional[PRoPEState] = None, mask: Mask = None, *,
                    k_cache: Optional[torch.Tensor] = None, v_cache: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None) -> torch.Tensor:
    """D ⊙ Attn(Dᵀq, D⁻¹k, D⁻¹v) for q/k/v [B, S, H, d] (untransformed; st_kv defaults to st_q).

    k_cache/v_cache [B, Sc, H, d]: already-transformed keys/values (the KV cache's PRoPE stream) placed before
    this call's keys; the mask, if any, is over [cache | k]."""
    st_kv = st_q if st_kv is None else st_kv
    kt, vt = apply_kv(k, st_kv), apply_kv(v, st_kv)
    if (k_cache is None) != (v_cache is None):
        raise ValueError("prope_attention: pass both k_cache and v_cache or neither")
    if k_cache is not None and k_cache.shape[1]:
        kt = torch.cat([k_cache.to(kt.dtype), kt], 1)
        vt = torch.cat([v_cache.to(vt.dtype), vt], 1)
    return apply_out(attention(apply_q(q, st_q), kt, vt, mask, scale), st_q)
