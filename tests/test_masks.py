import pytest
import torch

from minwm.errors import MinwmError
from minwm.models.attention import attention, mask_to_additive
from minwm.models.masks import (block_causal_mask, block_causal_spans, cached_frame_ranges, teacher_forcing_mask,
                                teacher_forcing_spans)

torch.set_num_threads(1)


def grid(rows):
    return torch.tensor([[c == "1" for c in r.replace(" ", "")] for r in rows])


def test_teacher_forcing_two_blocks_one_token_per_frame():
    # [c0 c1 | n0 n1], chunk of 1 frame
    expected = grid(["10 00",
                     "11 00",
                     "00 10",
                     "10 01"])
    assert torch.equal(teacher_forcing_mask(2, 1, 1), expected)


def test_block_causal_is_bidirectional_inside_a_chunk():
    expected = grid(["1100",
                     "1100",
                     "1111",
                     "1111"])
    assert torch.equal(block_causal_mask(4, 2, 1), expected)
    # two tokens per frame, one frame per chunk: same pattern at token level
    assert torch.equal(block_causal_mask(2, 1, 2), expected)


def test_windowed_block_causal_matches_the_cache_contents():
    # 6 frames, chunk 2, cache window 2 frames: block 2 (frames 4, 5) sees frames 2..5 only
    expected = grid(["110000",
                     "110000",
                     "111100",
                     "111100",
                     "001111",
                     "001111"])
    assert torch.equal(block_causal_mask(6, 2, 1, window_frames=2), expected)
    # one sink frame stays visible to every later chunk
    expected[4:, 0] = True
    assert torch.equal(block_causal_mask(6, 2, 1, window_frames=2, sink_frames=1), expected)
    # a window of 3 frames (not a multiple of the chunk): block 2 also sees frame 1
    assert block_causal_mask(6, 2, 1, window_frames=3)[4].tolist() == [False, True, True, True, True, True]


def test_windowed_teacher_forcing_hand_checked():
    # 3 frames, chunk 1, window 1: [c0 c1 c2 | n0 n1 n2]
    expected = grid(["100 000",
                     "110 000",
                     "011 000",
                     "000 100",
                     "100 010",
                     "010 001"])
    assert torch.equal(teacher_forcing_mask(3, 1, 1, window_frames=1), expected)
    # without the window, the noisy query of block 2 sees all earlier clean frames
    assert teacher_forcing_mask(3, 1, 1)[5].tolist() == [True, True, False, False, False, True]


def test_cached_frame_ranges():
    assert cached_frame_ranges(0, 4, 1) == ()
    assert cached_frame_ranges(3, 4, 1) == ((0, 3),)
    assert cached_frame_ranges(8, 4, 0) == ((4, 8),)
    assert cached_frame_ranges(8, 4, 2) == ((0, 2), (4, 8))
    assert cached_frame_ranges(6, 4, 2) == ((0, 6),)
    assert cached_frame_ranges(8, None, 2) == ((0, 8),)


def test_chunk_must_divide_num_frames():
    with pytest.raises(MinwmError, match="chunk: 3 latent frames must divide num_frames"):
        teacher_forcing_mask(10, 3, 4)
    with pytest.raises(MinwmError, match="chunk"):
        block_causal_mask(5, 2, 1)
    with pytest.raises(MinwmError, match="window_frames"):
        block_causal_mask(4, 2, 1, window_frames=0)


@pytest.mark.parametrize("window", [None, 2])
def test_blockwise_attention_equals_dense_masked_attention(window):
    g = torch.Generator().manual_seed(0)
    spans = teacher_forcing_spans(6, 2, 3, window_frames=window, sink_frames=1)
    S = spans.num_queries
    q, k, v = (torch.randn(2, S, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    dense = attention(q, k, v, spans.to_bool())
    assert (attention(q, k, v, spans) - dense).abs().max() < 1e-12
    assert (attention(q, k, v, mask_to_additive(spans.to_bool(), torch.float64)) - dense).abs().max() < 1e-12
    # the mask matters (the test can fail)
    assert (attention(q, k, v) - dense).abs().max() > 1e-3
    bc = block_causal_spans(6, 2, 3, window_frames=window)
    assert (attention(q[:, :18], k[:, :18], v[:, :18], bc)
            - attention(q[:, :18], k[:, :18], v[:, :18], bc.to_bool())).abs().max() < 1e-12


def test_blockwise_attention_gradients_match_dense():
    g = torch.Generator().manual_seed(1)
    spans = teacher_forcing_spans(4, 2, 2, window_frames=2)
    S = spans.num_queries
    leaves = [torch.randn(1, S, 2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    w = torch.randn(1, S, 2, 4, generator=g, dtype=torch.float64)
    grads = []
    for mask in (spans, spans.to_bool()):
        (attention(*leaves, mask) * w).sum().backward()
        grads.append([x.grad.clone() for x in leaves])
        for x in leaves:
            x.grad = None
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(*grads))
