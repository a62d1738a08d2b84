"""Attention masks of autoregressive (chunk-causal) video diffusion, as pure functions. True = may attend.

Frames are grouped in chunks ("blocks") of `chunk` frames; block b holds frames [b*chunk, (b+1)*chunk) and
its tokens are frame-major, `tokens_per_frame` per frame.

Window semantics, chosen so that teacher forcing sees exactly what streaming inference sees: when a chunk
starting at frame s is generated, the KV cache (kv_cache.KVCache) holds the committed frames before s that it
keeps -- the first `sink_frames` frames forever, plus the last `window_frames` frames before s -- and the
chunk attends to those plus its own frames. `cached_frame_ranges(s, window_frames, sink_frames)` is that set,
and both masks below use it for every query of the chunk (the window is measured from the chunk's first
frame, so all queries of a chunk see the same keys, as in streaming). window_frames=None keeps everything.

Temporal RoPE positions are not a mask matter, but note: streaming re-ropes kept frames with contiguous
positions (the eviction gap collapses), so with sink frames and a window that has started evicting, the
sink-to-chunk RoPE distance differs from teacher forcing's absolute one. Without sinks the two are equal.

Each mask exists in two forms with one source of truth: `*_spans` gives a `BlockSpans` (per query block, the
key ranges it sees), which attention.attention runs block by block without building the [Sq, Sk] tensor;
`*_mask` gives that tensor as bool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from minwm.errors import MinwmError

Range = tuple[int, int]


@dataclass(frozen=True)
class BlockSpans:
    """A block-structured mask: query rows [q0, q1) may attend to the union of key ranges [a, b)."""

    num_queries: int
    num_keys: int
    blocks: tuple[tuple[int, int, tuple[Range, ...]], ...]

    def to_bool(self, device=None) -> torch.Tensor:
        mask = torch.zeros(self.num_queries, self.num_keys, dtype=torch.bool, device=device)
        for q0, q1, ranges in self.blocks:
            for a, b in ranges:
                mask[q0:q1, a:b] = True
        return mask


def _merge(ranges: list[Range]) -> tuple[Range, ...]:
    """Sort, drop empty ranges and join touching ones, so a contiguous key set is one slice."""
    out: list[list[int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def _check(num_frames: int, chunk: int, tokens_per_frame: int, window_frames: Optional[int], sink_frames: int):
    if chunk < 1:
        raise MinwmError(f"chunk: expected >= 1 latent frame, got {chunk}")
    if num_frames < 1 or num_frames % chunk:
        raise MinwmError(f"chunk: {chunk} latent frames must divide num_frames, got num_frames={num_frames}")
    if tokens_per_frame < 1:
        raise MinwmError(f"tokens_per_frame: expected >= 1, got {tokens_per_frame}")
    if window_frames is not None and window_frames < 1:
        raise MinwmError(f"window_frames: expected >= 1 or null, got {window_frames}")
    if sink_frames < 0:
        raise MinwmError(f"sink_frames: expected >= 0, got {sink_frames}")


def cached_frame_ranges(start_frame: int, window_frames: Optional[int] = None, sink_frames: int = 0) -> tuple[Range, ...]:
    """Frames a streaming KV cache holds when the chunk starting at `start_frame` is generated (half-open ranges,
    oldest first): the first `sink_frames` committed frames plus the last `window_frames` before `start_frame`."""
    if window_frames is None:
        return _merge([(0, start_frame)])
    sink = min(sink_frames, start_frame)
    return _merge([(0, sink), (max(sink, start_frame - window_frames), start_frame)])


def block_causal_spans(num_frames: int, chunk: int, tokens_per_frame: int, window_frames: Optional[int] = None,
                       sink_frames: int = 0) -> BlockSpans:
    """One copy of the video: a query of block b sees its own block (bidirectionally) and the cached past."""
    _check(num_frames, chunk, tokens_per_frame, window_frames, sink_frames)
    n = tokens_per_frame
    blocks = []
    for s in range(0, num_frames, chunk):
        frames = list(cached_frame_ranges(s, window_frames, sink_frames)) + [(s, s + chunk)]
        blocks.append((s * n, (s + chunk) * n, _merge([(a * n, b * n) for a, b in frames])))
    total = num_frames * n
    return BlockSpans(total, total, tuple(blocks))


def teacher_forcing_spans(num_frames: int, chunk: int, tokens_per_frame: int, window_frames: Optional[int] = None,
                          sink_frames: int = 0) -> BlockSpans:
    """Sequence [clean copy | noisy copy], each num_frames * tokens_per_frame tokens.

    A clean query of block b sees the clean keys of blocks <= b (the t=0 cache-refresh pass of streaming); a
    noisy query of block b sees the clean keys of blocks < b and the noisy keys of its own block only (a
    denoising step of streaming). Both are limited to the cached frames when window_frames is set.
    """
    _check(num_frames, chunk, tokens_per_frame, window_frames, sink_frames)
    n = tokens_per_frame
    half = num_frames * n
    clean, noisy = [], []
    for s in range(0, num_frames, chunk):
        past = [(a * n, b * n) for a, b in cached_frame_ranges(s, window_frames, sink_frames)]
        own = (s * n, (s + chunk) * n)
        clean.append((own[0], own[1], _merge(past + [own])))
        noisy.append((half + own[0], half + own[1], _merge(past + [(half + own[0], half + own[1])])))
    return BlockSpans(2 * half, 2 * half, tuple(clean + noisy))


def block_causal_mask(num_frames: int, chunk: int, tokens_per_frame: int, window_frames: Optional[int] = None,
                      sink_frames: int = 0, device=None) -> torch.Tensor:
    """[S, S] bool, S = num_frames * tokens_per_frame. See block_causal_spans."""
    return block_causal_spans(num_frames, chunk, tokens_per_frame, window_frames, sink_frames).to_bool(device)


def teacher_forcing_mask(num_frames: int, chunk: int, tokens_per_frame: int, window_frames: Optional[int] = None,
                         sink_frames: int = 0, device=None) -> torch.Tensor:
    """[2S, 2S] bool over [clean | noisy]. See teacher_forcing_spans."""
    return teacher_forcing_spans(num_frames, chunk, tokens_per_frame, window_frames, sink_frames).to_bool(device)
