"""Per-layer key/value cache of streaming inference: constant memory for a rollout of any length.

What it holds: the first `sink_frames` committed frames forever, plus the last `window_frames` committed frames
(masks.cached_frame_ranges gives the same set; teacher forcing's windowed mask is built from it).
window_frames=None keeps every frame (buffers grow by doubling: for tests against the unwindowed forward). Frames are
committed whole, once per chunk, by the clean t=0 refresh pass (`append`); during the denoising steps the
chunk's own keys/values ride after the cache uncommitted (`read_with`).

Streams, per layer:
  "self":  the pretrained branch, keys stored BEFORE RoPE. The reader ropes [cache | chunk] at read time with
           contiguous temporal positions 0..n-1 over the kept frames in read order (sinks first, then the
           window) and n.. for the chunk. The eviction gap collapses (LongLive-style); without sinks this is
           exactly a fresh run on the last window, positions never grow, no position table can overflow and
           float32 angles stay small.
  "prope": the camera branch, keys and values stored AFTER prope.apply_kv (no position needed).

Order within a chunk's refresh pass: attend over read_with(...) FIRST, then append -- committing first would
evict frames the chunk is still entitled to see, and a commit invalidates views returned earlier.

Storage and its cost: one preallocated buffer per layer
and stream of (sink + window + staging) frames, allocated on first write (heads and head dim come from it)
and never reallocated. Frames stay physically in read order: when the window is full, `append` shifts the
window left by the evicted frames with slab copies of at most `shift` frames each (non-overlapping, so no
temporary) and writes the new frames at the end. That costs one window-sized copy per commit, i.e. per chunk,
while every read -- K+1 per chunk per layer -- is a zero-copy view; a wrapped ring would instead gather
(copy) the window on every read. Measured (CPU, 1 thread, fp32, 256 tokens/frame, 8 heads of 32, window 20,
chunk 4, per layer and stream): append incl. shift 0.21 ms, read 0.003 ms, read_with 0.04 ms, versus a ring
gather 0.24 ms per read and a torch.cat of cache+chunk 0.32 ms per read; the chunk's attention is 70 ms.

`read_with(layer, stream, k_new, v_new)` returns [cache | new] as one tensor: the new tokens are written into
the `staging_frames` slack right after the held frames, so the cache itself is not copied (falls back to
torch.cat when there is no room).

Autograd: nothing written to the cache carries gradient (writes are detached: no gradient through the
cache). When grad is enabled, reads return copies rather than views, because a later commit rewrites the
buffer in place and would invalidate tensors saved for backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from minwm.errors import MinwmError


@dataclass
class _Slot:
    k: Optional[torch.Tensor] = None  # [B, capacity_tokens, H, Dk]
    v: Optional[torch.Tensor] = None  # [B, capacity_tokens, H, Dv]
    held: int = 0  # frames held, physically in read order at [0, held)
    total: int = 0  # frames ever committed


class KVCache:
    def __init__(self, num_layers: int, window_frames: int, sink_frames: int, tokens_per_frame: int, batch: int,
                 device=None, dtype: torch.dtype = torch.float32, streams=("self", "prope"), staging_frames: int = 0):
        if num_layers < 1:
            raise MinwmError(f"num_layers: expected >= 1, got {num_layers}")
        if window_frames is not None and window_frames < 1:
            raise MinwmError(f"window_frames: expected >= 1 latent frame or null, got {window_frames}")
        if sink_frames < 0:
            raise MinwmError(f"sink_frames: expected >= 0, got {sink_frames}")
        if tokens_per_frame < 1 or batch < 1 or staging_frames < 0:
            raise MinwmError(f"KV cache: bad sizes tokens_per_frame={tokens_per_frame} batch={batch} "
                             f"staging_frames={staging_frames}")
        self.num_layers, self.window_frames, self.sink_frames = num_layers, window_frames, sink_frames
        self.tokens_per_frame, self.batch, self.staging_frames = tokens_per_frame, batch, staging_frames
        self.device, self.dtype = torch.device(device) if device is not None else torch.device("cpu"), dtype
        self.streams = tuple(streams)
        # window_frames=None keeps every frame: the buffers then grow by doubling (amortised, NOT constant
        # memory) -- for equivalence tests against the unwindowed block-causal forward, not for long rollouts.
        self.capacity_frames = sink_frames + window_frames if window_frames is not None else None
        self._slots = {(layer, s): _Slot() for layer in range(num_layers) for s in self.streams}

    # ---- bookkeeping ---------------------------------------------------------------------------------
    def _slot(self, layer: int, stream: str) -> _Slot:
        try:
            return self._slots[(layer, stream)]
        except KeyError:
            raise ValueError(f"KV cache: no layer {layer} / stream {stream!r} "
                             f"(layers 0..{self.num_layers - 1}, streams {self.streams})") from None

    def _counts(self, attr: str) -> int:
        # A stream no layer ever wrote (e.g. no camera branch) is ignored; in a used stream every layer counts.
        live = {st for (_, st), s in self._slots.items() if s.k is not None}
        used = {getattr(s, attr) for (_, st), s in self._slots.items() if st in live}
        if len(used) > 1:
            raise RuntimeError(f"KV cache: layers/streams out of step ({attr} {sorted(used)}); "
                               "a layer missed its commit")
        return used.pop() if used else 0

    @property
    def num_frames(self) -> int:
        """Committed frames currently held (the same in every written layer/stream between forwards)."""
        return self._counts("held")

    @property
    def total_frames(self) -> int:
        """Frames ever committed: the absolute index of the next frame."""
        return self._counts("total")

    def held_frame_indices(self, layer: int = 0, stream: Optional[str] = None) -> list[int]:
        """Absolute frame indices of the held frames, in read order (sinks first, then the window)."""
        s = self._slot(layer, stream or self.streams[0])
        sinks = min(s.total, self.sink_frames)
        return list(range(sinks)) + list(range(s.total - (s.held - sinks), s.total))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self._slots.values() for t in (s.k, s.v) if t is not None)

    def reset(self) -> None:
        """Forget every frame; the buffers are kept (no reallocation for the next rollout)."""
        for s in self._slots.values():
            s.held = s.total = 0

    # ---- writing ---------------------------------------------------------------------------------------
    def _check_new(self, what: str, k: torch.Tensor, v: torch.Tensor) -> int:
        if k.ndim != 4 or v.ndim != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(f"KV cache {what}: expected k, v [B, S, H, D], got {tuple(k.shape)}, {tuple(v.shape)}")
        if k.shape[0] != self.batch:
            raise ValueError(f"KV cache {what}: batch {k.shape[0]}, cache was built for {self.batch}")
        if k.shape[1] % self.tokens_per_frame:
            raise ValueError(f"KV cache {what}: {k.shape[1]} tokens is not whole frames of {self.tokens_per_frame}")
        return k.shape[1] // self.tokens_per_frame

    def _allocate(self, s: _Slot, k: torch.Tensor, v: torch.Tensor, frames: int = 0) -> None:
        """Allocate on first write; in an unwindowed cache also grow to hold `frames` frames plus staging."""
        if s.k is not None and (s.k.shape[2:] != k.shape[2:] or s.v.shape[2:] != v.shape[2:]):
            raise ValueError(f"KV cache: heads/dims changed from {tuple(s.k.shape[2:])}/{tuple(s.v.shape[2:])} "
                             f"to {tuple(k.shape[2:])}/{tuple(v.shape[2:])}")
        t = self.tokens_per_frame
        if s.k is not None and self.capacity_frames is None and (frames + self.staging_frames) * t > s.k.shape[1]:
            old_k, old_v, used = s.k, s.v, s.held * t
            s.k = s.v = None
            self._allocate(s, k, v, max(frames, 2 * (old_k.shape[1] // t)))
            s.k[:, :used], s.v[:, :used] = old_k[:, :used], old_v[:, :used]
        if s.k is None:
            cap = self.capacity_frames if self.capacity_frames is not None else max(frames, 1)
            n = (cap + self.staging_frames) * t
            # Normal (not inference-mode) tensors, so the cache can be written inside and outside inference_mode.
            with torch.inference_mode(False):
                s.k = torch.empty(self.batch, n, *k.shape[2:], device=self.device, dtype=self.dtype)
                s.v = torch.empty(self.batch, n, *v.shape[2:], device=self.device, dtype=self.dtype)

    def _write(self, s: _Slot, frame0: int, k: torch.Tensor, v: torch.Tensor) -> None:
        t = self.tokens_per_frame
        s.k[:, frame0 * t: frame0 * t + k.shape[1]] = k.detach()
        s.v[:, frame0 * t: frame0 * t + v.shape[1]] = v.detach()

    def _shift_left(self, s: _Slot, dst: int, src: int, length: int) -> None:
        """Move frames [src, src+length) to [dst, ...), dst < src, in slabs no longer than the shift, so each
        copy's source and destination are disjoint and every source slab is read before it is overwritten."""
        t, step = self.tokens_per_frame, src - dst
        for i in range(0, length, step):
            n = min(step, length - i)
            for buf in (s.k, s.v):
                buf[:, (dst + i) * t:(dst + i + n) * t] = buf[:, (src + i) * t:(src + i + n) * t]

    @torch.no_grad()
    def append(self, layer: int, stream: str, k: torch.Tensor, v: torch.Tensor) -> None:
        """Commit whole frames (k/v [B, n_frames*tokens_per_frame, H, D]), evicting the oldest non-sink frames."""
        s = self._slot(layer, stream)
        n = self._check_new("append", k, v)
        self._allocate(s, k, v, s.held + n)
        t, sink, W = self.tokens_per_frame, self.sink_frames, self.window_frames
        if W is None:  # keep everything
            self._write(s, s.held, k, v)
            s.held += n
            s.total += n
            return
        # Frames that still become sinks: while fewer than `sink` were ever committed, everything held is a sink.
        a = min(n, max(0, sink - s.total))
        if a:
            self._write(s, s.held, k[:, :a * t], v[:, :a * t])
            s.held += a
        r = n - a
        if r:
            k, v = k[:, a * t:], v[:, a * t:]
            if r >= W:  # the new frames alone fill the window
                self._write(s, sink, k[:, (r - W) * t:], v[:, (r - W) * t:])
                s.held = sink + W
            else:
                in_window = s.held - sink
                evict = max(0, in_window + r - W)
                if evict:
                    self._shift_left(s, sink, sink + evict, in_window - evict)
                    s.held -= evict
                self._write(s, s.held, k, v)
                s.held += r
        s.total += n

    # ---- reading ---------------------------------------------------------------------------------------
    def read(self, layer: int, stream: str):
        """(k, v, num_frames): the held frames [B, num_frames*tokens_per_frame, H, D], oldest first (sinks first).
        Views of the buffer (valid until the next append to this layer/stream) when grad is disabled, copies
        when it is enabled. (None, None, 0) before the first write."""
        s = self._slot(layer, stream)
        if s.k is None:
            return None, None, 0
        end = s.held * self.tokens_per_frame
        k, v = s.k[:, :end], s.v[:, :end]
        if torch.is_grad_enabled():
            k, v = k.clone(), v.clone()
        return k, v, s.held

    def read_with(self, layer: int, stream: str, k_new: torch.Tensor, v_new: torch.Tensor):
        """(k, v, num_frames): [held frames | k_new] along tokens, without committing k_new; num_frames counts the
        held frames only (so k_new's temporal RoPE positions start there). k_new must be whole frames.
        Zero-copy for the cache when grad is disabled and the staging slack has room; else a torch.cat."""
        s = self._slot(layer, stream)
        self._check_new("read_with", k_new, v_new)
        if s.k is None or s.held == 0:  # nothing held (e.g. the first chunk after a reset): no copy needed
            return k_new, v_new, 0
        self._allocate(s, k_new, v_new)  # checks heads/dims
        t = self.tokens_per_frame
        start, end = s.held * t, s.held * t + k_new.shape[1]
        # With grad enabled, writing k_new into the buffer would put the buffer into the autograd graph.
        # torch.cat's output is fresh memory and cat saves nothing for backward, so its inputs may be views.
        if torch.is_grad_enabled() or end > s.k.shape[1]:
            k, v = s.k[:, :start], s.v[:, :start]
            return torch.cat([k, k_new.to(k.dtype)], 1), torch.cat([v, v_new.to(v.dtype)], 1), s.held
        s.k[:, start:end] = k_new
        s.v[:, start:end] = v_new
        return s.k[:, :end], s.v[:, :end], s.held
