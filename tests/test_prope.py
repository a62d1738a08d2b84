import math

import pytest
import torch

from minwm.errors import MinwmError
from minwm.models.attention import attention
from minwm.models.prope import (PRoPE, apply_kv, apply_out, apply_q, projective_matrices, prope_attention,
                                prope_state)

torch.set_num_threads(1)
D64 = torch.float64


def random_rotation(g, n):
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=D64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q * torch.det(q).sign()[:, None, None]


def random_cameras(g, B, F):
    w2c = torch.eye(4, dtype=D64).repeat(B, F, 1, 1)
    w2c[..., :3, :3] = random_rotation(g, B * F).reshape(B, F, 3, 3)
    w2c[..., :3, 3] = torch.randn(B, F, 3, generator=g, dtype=D64)
    intr = torch.stack([0.6 + 0.4 * torch.rand(B, F, generator=g, dtype=D64),
                        0.8 + 0.4 * torch.rand(B, F, generator=g, dtype=D64),
                        0.4 + 0.2 * torch.rand(B, F, generator=g, dtype=D64),
                        0.4 + 0.2 * torch.rand(B, F, generator=g, dtype=D64)], -1)
    return w2c, intr


def qkv(g, B, S, H, d, scale=0.5):
    return [scale * torch.randn(B, S, H, d, generator=g, dtype=D64) for _ in range(3)]


def rot2(a):
    return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=D64)


def dense_D(P, frames, height, width, d, layout, base=100.0):
    """Per-token d x d matrices D_t written straight from the paper's definition: [S, d, d] (batch 0)."""
    Ds = []
    for f in range(frames):
        for y in range(height):
            for x in range(width):
                blocks = [P[0, f]] * (d // 8 if layout == "paper" else d // 4)
                if layout == "paper":
                    m = d // 8
                    blocks += [rot2(x * base ** (-j / m)) for j in range(m)]
                    blocks += [rot2(y * base ** (-j / m)) for j in range(m)]
                Ds.append(torch.block_diag(*blocks))
    return torch.stack(Ds)


def softmax_attention(q, k, v):
    """Plain attention in float64, [B, S, H, d]."""
    logits = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhts,bshd->bthd", logits.softmax(-1), v)


def test_projective_matrix_by_hand():
    w2c = torch.eye(4, dtype=D64)
    w2c[:3, 3] = torch.tensor([1.0, 2.0, 3.0])
    P, P_inv = projective_matrices(w2c, torch.tensor([0.5, 0.8, 0.6, 0.5], dtype=D64))
    K = torch.tensor([[0.5, 0, 0.1], [0, 0.8, 0.0], [0, 0, 1]], dtype=D64)
    expected = torch.eye(4, dtype=D64)
    expected[:3, :3] = K
    expected[:3, 3] = K @ torch.tensor([1.0, 2.0, 3.0], dtype=D64)
    assert torch.allclose(P, expected, atol=1e-15)
    assert torch.allclose(P @ P_inv, torch.eye(4, dtype=D64), atol=1e-12)


@pytest.mark.parametrize("layout,d", [("paper", 16), ("full", 8)])
def test_matches_dense_gta_definition(layout, d):
    g = torch.Generator().manual_seed(0)
    F, h, w, H = 2, 2, 3, 2
    w2c, intr = random_cameras(g, 1, F)
    q, k, v = qkv(g, 1, F * h * w, H, d)
    st = prope_state(w2c, intr, F, h, w, layout, dtype=D64)
    D = dense_D(st.P, F, h, w, d, layout)
    Dinv = torch.linalg.inv(D)
    qt = torch.einsum("tji,bthj->bthi", D, q)  # D^T q
    kt = torch.einsum("tij,bthj->bthi", Dinv, k)
    vt = torch.einsum("tij,bthj->bthi", Dinv, v)
    ref = torch.einsum("tij,bthj->bthi", D, softmax_attention(qt, kt, vt))
    out = prope_attention(q, k, v, st)
    assert (out - ref).abs().max() < 1e-10
    assert (apply_kv(v, st) - vt).abs().max() < 1e-12


@pytest.mark.parametrize("layout,d", [("paper", 16), ("full", 8)])
def test_invariant_to_one_rigid_transform_of_every_camera(layout, d):
    g = torch.Generator().manual_seed(1)
    B, F, h, w, H = 2, 3, 2, 2, 2
    w2c, intr = random_cameras(g, B, F)
    T = torch.eye(4, dtype=D64)
    T[:3, :3] = random_rotation(g, 1)[0]
    T[:3, 3] = torch.tensor([3.0, -2.0, 5.0])
    q, k, v = qkv(g, B, F * h * w, H, d)
    out = prope_attention(q, k, v, prope_state(w2c, intr, F, h, w, layout, dtype=D64))
    moved = prope_attention(q, k, v, prope_state(w2c @ torch.linalg.inv(T), intr, F, h, w, layout, dtype=D64))
    assert (out - moved).abs().max() <= 1e-8
    # ...while a different relative pose does change it (the test can fail).
    w2c2 = w2c.clone()
    w2c2[:, 1] = w2c[:, 1] @ torch.linalg.inv(T)
    other = prope_attention(q, k, v, prope_state(w2c2, intr, F, h, w, layout, dtype=D64))
    assert (out - other).abs().max() > 1e-3


def test_full_layout_with_identical_cameras_is_plain_attention():
    g = torch.Generator().manual_seed(2)
    F, h, w, H, d = 3, 2, 2, 2, 8
    w2c, intr = random_cameras(g, 1, 1)
    st = prope_state(w2c.expand(1, F, 4, 4), intr.expand(1, F, 4), F, h, w, "full", dtype=D64)
    q, k, v = qkv(g, 1, F * h * w, H, d)
    assert (prope_attention(q, k, v, st) - softmax_attention(q, k, v)).abs().max() < 1e-10


def test_paper_layout_with_identical_cameras_is_2d_rope_on_second_half():
    g = torch.Generator().manual_seed(3)
    F, h, w, H, d, base = 2, 3, 4, 2, 16, 100.0
    w2c, intr = random_cameras(g, 1, 1)
    st = prope_state(w2c.expand(1, F, 4, 4), intr.expand(1, F, 4), F, h, w, "paper", base, dtype=D64)
    q, k, v = qkv(g, 1, F * h * w, H, d)
    # Reference with complex numbers: channel pairs of the second half as x + iy; pairs [0, d/8) turn with the
    # token's column, [d/8, d/4) with its row. GTA form: q, k, v turned by -angle, output by +angle.
    m = d // 8
    omega = base ** (-torch.arange(m, dtype=D64) / m)
    col = torch.arange(w, dtype=D64).repeat(h).repeat(F)
    row = torch.arange(h, dtype=D64).repeat_interleave(w).repeat(F)
    angle = torch.cat([col[:, None] * omega, row[:, None] * omega], 1)  # [S, d/4]
    turn = torch.polar(torch.ones_like(angle), angle)[None, :, None, :]

    def c(x):
        return torch.view_as_complex(x[..., d // 2:].reshape(*x.shape[:-1], d // 4, 2).contiguous())

    def r(x1, z):
        return torch.cat([x1, torch.view_as_real(z).flatten(-2)], -1)

    qr, kr, vr = (r(x[..., :d // 2], c(x) / turn) for x in (q, k, v))
    o = softmax_attention(qr, kr, vr)
    ref = r(o[..., :d // 2], c(o) * turn)
    assert (prope_attention(q, k, v, st) - ref).abs().max() < 1e-10
    # Logits are first-half dot products plus standard RoPE logits of the relative offset (t - s).
    lt = torch.einsum("bthd,bshd->bhts", apply_q(q, st), apply_kv(k, st))
    rel = torch.exp(1j * (angle[:, None, :] - angle[None, :, :]))  # [t, s, d/4]
    rope = torch.einsum("bthp,tsp,bshp->bhts", c(q).conj(), rel, c(k)).real
    direct = torch.einsum("bthd,bshd->bhts", q[..., :d // 2], k[..., :d // 2]) + rope
    assert (lt - direct).abs().max() < 1e-10


@pytest.mark.parametrize("layout,d", [("paper", 16), ("full", 8)])
def test_camera_half_logits_are_q_P_i_P_j_inverse_k(layout, d):
    g = torch.Generator().manual_seed(4)
    B, F, h, w, H = 2, 3, 1, 2, 1
    w2c, intr = random_cameras(g, B, F)
    st = prope_state(w2c, intr, F, h, w, layout, dtype=D64)
    q, k, _ = qkv(g, B, F * h * w, H, d)
    nc = d // 2 if layout == "paper" else d
    q[..., nc:] = 0  # isolate the camera channels
    k[..., nc:] = 0
    lt = torch.einsum("bthd,bshd->bhts", apply_q(q, st), apply_kv(k, st))
    P, P_inv = projective_matrices(w2c, intr)
    frame = torch.arange(F).repeat_interleave(h * w)
    rel = P[:, frame][:, :, None] @ P_inv[:, frame][:, None, :]  # [B, t, s, 4, 4] = P_i P_j^-1
    qc = q[..., :nc].unflatten(-1, (-1, 4))
    kc = k[..., :nc].unflatten(-1, (-1, 4))
    direct = torch.einsum("bthci,btsij,bshcj->bhts", qc, rel, kc)
    assert (lt - direct).abs().max() < 1e-10


def test_streaming_with_pretransformed_cache_equals_full_sequence_rows():
    g = torch.Generator().manual_seed(5)
    F, h, w, H, d = 3, 2, 2, 2, 16
    n = h * w
    w2c, intr = random_cameras(g, 1, F)
    q, k, v = qkv(g, 1, F * n, H, d)
    full = prope_attention(q, k, v, prope_state(w2c, intr, F, h, w, dtype=D64))
    past = prope_state(w2c[:, :2], intr[:, :2], 2, h, w, dtype=D64)
    now = prope_state(w2c[:, 2:], intr[:, 2:], 1, h, w, dtype=D64)
    out = prope_attention(q[:, 2 * n:], k[:, 2 * n:], v[:, 2 * n:], now,
                          k_cache=apply_kv(k[:, :2 * n], past), v_cache=apply_kv(v[:, :2 * n], past))
    assert (out - full[:, 2 * n:]).abs().max() < 1e-10
    # The known upstream bug (cache holding untransformed keys) gives a different answer.
    wrong = prope_attention(q[:, 2 * n:], k[:, 2 * n:], v[:, 2 * n:], now, k_cache=k[:, :2 * n], v_cache=v[:, :2 * n])
    assert (wrong - full[:, 2 * n:]).abs().max() > 1e-3


def test_pieces_compose_and_float32_state_serves_bfloat16():
    g = torch.Generator().manual_seed(6)
    F, h, w, H, d = 2, 2, 2, 2, 16
    w2c, intr = random_cameras(g, 1, F)
    q, k, v = qkv(g, 2, F * h * w, H, d)
    st64 = prope_state(w2c, intr, F, h, w, dtype=D64)  # batch-1 state broadcast over batch 2
    ref = apply_out(attention(apply_q(q, st64), apply_kv(k, st64), apply_kv(v, st64)), st64)
    assert (prope_attention(q, k, v, st64) - ref).abs().max() < 1e-12
    # apply_out undoes apply_kv (D D^-1 = I)
    assert (apply_out(apply_kv(v, st64), st64) - v).abs().max() < 1e-10
    st32 = PRoPE(d).state(w2c, intr, F, h, w, dtype=torch.float32)
    out = prope_attention(*(x.to(torch.bfloat16) for x in (q, k, v)), st32)
    assert out.dtype == torch.bfloat16 and (out.double() - ref).abs().max() < 0.1


def test_bad_head_dim_and_layout_are_one_line_errors():
    with pytest.raises(MinwmError, match="divisible by 8"):
        PRoPE(12, "paper")
    with pytest.raises(MinwmError, match="divisible by 4"):
        PRoPE(6, "full")
    PRoPE(12, "full")
    with pytest.raises(MinwmError, match="prope_layout"):
        PRoPE(16, "upstream")
    st = prope_state(torch.eye(4).repeat(1, 1, 1), torch.tensor([[0.5, 0.5, 0.5, 0.5]]), 1, 1, 2)
    with pytest.raises(MinwmError, match="divisible by 8"):
        apply_q(torch.zeros(1, 2, 1, 12), st)
