import pytest
import torch

from minwm.errors import MinwmError
from minwm.models.attention import attention, rope_apply
from minwm.models.kv_cache import KVCache
from minwm.models.masks import cached_frame_ranges

torch.set_num_threads(1)
TPF, H, D = 3, 2, 4


def frames(idx, batch=1):
    """Tokens of the given absolute frames, every value = frame index (k) or -frame index (v)."""
    k = torch.tensor(idx, dtype=torch.float32).repeat_interleave(TPF)[None, :, None, None].expand(batch, -1, H, D)
    return k.clone(), -k.clone()


def frame_ids(k):
    return k[0, ::TPF, 0, 0].long().tolist()


def expected_held(total, window, sink):
    return [f for a, b in cached_frame_ranges(total, window, sink) for f in range(a, b)]


@torch.no_grad()
def test_ring_of_four_frames_over_fifty_chunks_stays_put():
    cache = KVCache(2, window_frames=4, sink_frames=0, tokens_per_frame=TPF, batch=1, streams=("self", "prope"))
    ptrs, size = None, None
    for c in range(50):
        for layer in range(2):
            for stream in ("self", "prope"):
                cache.append(layer, stream, *frames([2 * c, 2 * c + 1]))
        now = [cache._slots[key].k.data_ptr() for key in sorted(cache._slots)]
        ptrs = ptrs or now
        size = size or cache.nbytes()
        assert now == ptrs and cache.nbytes() == size
        k, v, n = cache.read(1, "prope")
        want = expected_held(2 * c + 2, 4, 0)
        assert n == len(want) == cache.num_frames and frame_ids(k) == want and frame_ids(-v) == want
        assert k.data_ptr() == cache._slots[(1, "prope")].k.data_ptr()  # a view, not a copy
    assert cache.total_frames == 100 and cache.num_frames == 4
    assert cache.held_frame_indices(0, "self") == [96, 97, 98, 99]
    assert size == 2 * 2 * 2 * 4 * TPF * H * D * 4  # layers x streams x (k, v) x 4 frames, float32


@torch.no_grad()
@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_sinks_are_kept_and_order_is_sinks_then_window(chunk):
    cache = KVCache(1, window_frames=4, sink_frames=2, tokens_per_frame=TPF, batch=1, streams=("self",))
    total = 0
    for _ in range(9):
        cache.append(0, "self", *frames(list(range(total, total + chunk))))
        total += chunk
        k, v, n = cache.read(0, "self")
        want = expected_held(total, 4, 2)  # the same set teacher forcing's windowed mask uses
        assert frame_ids(k) == want == cache.held_frame_indices(0, "self")
        assert frame_ids(-v) == want and n == len(want) == min(total, 6)
        # temporal RoPE positions of the read are contiguous 0..n-1 whatever the absolute indices
        assert list(range(n)) == list(range(len(frame_ids(k))))
    assert cache.total_frames == total and frame_ids(cache.read(0, "self")[0])[:2] == [0, 1]


@torch.no_grad()
def test_contiguous_positions_without_sink_equal_a_fresh_run_on_the_window():
    """Re-roping the kept frames from position 0 changes nothing in the logits against the chunk (relative
    RoPE), so streaming equals a model run on just the last window."""
    g = torch.Generator().manual_seed(0)
    W, chunk, steps = 4, 2, 5
    cache = KVCache(1, W, 0, TPF, 1, streams=("self",))
    ks = torch.randn(1, (chunk * steps + chunk) * TPF, H, D, generator=g)
    vs = torch.randn_like(ks)
    for c in range(steps):
        cache.append(0, "self", ks[:, c * chunk * TPF:(c + 1) * chunk * TPF], vs[:, c * chunk * TPF:(c + 1) * chunk * TPF])
    q = torch.randn(1, chunk * TPF, H, D, generator=g)
    new = slice(steps * chunk * TPF, None)
    k, v, n = cache.read_with(0, "self", ks[:, new], vs[:, new])

    def rope(x, first_frame):
        pos = (first_frame + torch.arange(x.shape[1]) // TPF).float()
        ang = pos[:, None] * torch.tensor([1.0, 0.1])  # 1-D temporal RoPE, 2 pairs
        return rope_apply(x, ang.cos()[None, :, None], ang.sin()[None, :, None])

    streamed = attention(rope(q, n), rope(k, 0), v)
    start = steps * chunk - W  # absolute first kept frame
    absolute = attention(rope(q, steps * chunk), rope(ks[:, start * TPF:], start), vs[:, start * TPF:])
    assert n == W and (streamed - absolute).abs().max() < 1e-5


@torch.no_grad()
def test_read_with_stages_the_chunk_without_committing_it():
    cache = KVCache(1, 4, 0, TPF, 2, streams=("prope",), staging_frames=2)
    for c in range(3):
        cache.append(0, "prope", *frames([2 * c, 2 * c + 1], batch=2))
    k_new, v_new = frames([6, 7], batch=2)
    k, v, n = cache.read_with(0, "prope", k_new, v_new)
    assert n == 4 and frame_ids(k) == [2, 3, 4, 5, 6, 7] and frame_ids(-v) == [2, 3, 4, 5, 6, 7]
    assert k.data_ptr() == cache._slots[(0, "prope")].k.data_ptr()  # no copy of the cache
    assert cache.num_frames == 4 and cache.total_frames == 6
    cache.append(0, "prope", k_new, v_new)
    assert frame_ids(cache.read(0, "prope")[0]) == [4, 5, 6, 7]
    # without staging room it falls back to a concatenation with the same content
    tight = KVCache(1, 2, 0, TPF, 2, streams=("prope",))
    tight.append(0, "prope", *frames([0, 1], batch=2))
    k, _, n = tight.read_with(0, "prope", k_new, v_new)
    assert n == 2 and frame_ids(k) == [0, 1, 6, 7]
    # an empty cache returns the new tokens themselves
    assert KVCache(1, 2, 0, TPF, 2, streams=("prope",)).read_with(0, "prope", k_new, v_new)[2] == 0


def test_grad_enabled_reads_are_copies_and_survive_later_commits():
    cache = KVCache(1, 2, 0, TPF, 1, streams=("self",))
    cache.append(0, "self", *frames([0, 1]))
    q = torch.randn(1, TPF, H, D, requires_grad=True)
    k_new, v_new = frames([2])
    k, v, _ = cache.read_with(0, "self", k_new.requires_grad_(), v_new)
    out = attention(q, k, v)
    cache.append(0, "self", *frames([2, 3]))  # rewrites the buffer in place
    out.sum().backward()  # would fail on a modified saved view
    assert q.grad is not None and k_new.grad is not None
    assert not cache._slots[(0, "self")].k.requires_grad  # no gradient through the cache


@torch.no_grad()
def test_reset_bad_input_and_layers_out_of_step():
    cache = KVCache(2, 4, 1, TPF, 1, streams=("self",))
    cache.append(0, "self", *frames([0, 1]))
    with pytest.raises(RuntimeError, match="out of step"):
        cache.num_frames
    cache.append(1, "self", *frames([0, 1]))
    ptr = cache._slots[(0, "self")].k.data_ptr()
    cache.reset()
    assert cache.num_frames == 0 and cache.total_frames == 0 and cache.read(0, "self")[2] == 0
    cache.append(0, "self", *frames([0]))
    assert cache._slots[(0, "self")].k.data_ptr() == ptr
    with pytest.raises(ValueError, match="whole frames"):
        cache.append(0, "self", torch.zeros(1, TPF + 1, H, D), torch.zeros(1, TPF + 1, H, D))
    with pytest.raises(ValueError, match="heads/dims changed"):
        cache.append(0, "self", torch.zeros(1, TPF, H, D + 1), torch.zeros(1, TPF, H, D + 1))
    with pytest.raises(ValueError, match="stream"):
        cache.read(0, "prope")
    with pytest.raises(MinwmError, match="window_frames"):
        KVCache(1, 0, 0, TPF, 1)


@torch.no_grad()
def test_unwindowed_cache_keeps_every_frame():
    cache = KVCache(1, None, 0, TPF, 1, streams=("self",), staging_frames=1)
    for c in range(5):
        cache.append(0, "self", *frames([3 * c, 3 * c + 1, 3 * c + 2]))
    k, v, n = cache.read(0, "self")
    assert n == 15 and frame_ids(k) == list(range(15)) and frame_ids(-v) == list(range(15))
    k, _, n = cache.read_with(0, "self", *frames([15]))
    assert n == 15 and frame_ids(k) == list(range(16))
