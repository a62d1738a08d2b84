"""One player's session: its own WorldModel state, the keys held, the generation loop and the recording.

Loop policy:
- While keys are held, one chunk is generated per tick with the key set held at that moment
  (["w", "l"] -> action "w+l" for every latent frame of the chunk), so held keys repeat every chunk.
- With no key held the session pauses (idle="pause", the default): no compute is spent on a world
  nobody is steering, which matters when several sessions share one accelerator. idle="noop" keeps
  the world running with "_" chunks instead (a world that moves on its own, e.g. water or people).
- Ticks are paced to real time: the next chunk starts so that it is ready about when the page has
  played the last one (frames_per_chunk / fps seconds after it arrived, minus the last chunk's
  generation time). A model faster than real time thus waits with the freshest keys instead of
  queueing seconds of video behind the player's input; a slower one runs back to back.
- Every model call (create, reset, step, JPEG encode, mp4 append, close) runs on the session's own
  single worker thread, so the event loop stays responsive and one WorldModel is never used by two
  threads at once. Sessions may share weights (the server's factory builds each session's WorldModel
  over one loaded backbone), so model calls also take the server-wide `model_lock`: one forward at a
  time on the shared modules; JPEG encoding and sending run outside it. Reset, prompt and record
  requests are queued and run between chunks in order.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import cv2
import numpy as np

from minwm.cameras.actions import format_actions
from minwm.errors import MinwmError
from minwm.serve import protocol
from minwm.serve.recording import Mp4Recorder

log = logging.getLogger("minwm.serve")

IDLE_POLICIES = ("pause", "noop")


@dataclass
class SessionOptions:
    prompt: str = "a walk through a procedural world"   # the prompt a new session starts from
    seed: int | None = 0
    idle: str = "pause"
    jpeg_quality: int = 85
    record_dir: Path = field(default_factory=lambda: Path("runs/play"))
    # The first frame of every rollout (uint8 [H, W, 3]). None: text-only, or for an image-to-video checkpoint a
    # render of its procedural world for the reset's seed (a new scene per seed).
    image: np.ndarray | None = None

    def __post_init__(self):
        if self.idle not in IDLE_POLICIES:
            raise MinwmError(f"play: idle: expected one of {', '.join(IDLE_POLICIES)}, got {self.idle!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise MinwmError(f"play: jpeg_quality: expected 1..100, got {self.jpeg_quality}")
        self.record_dir = Path(self.record_dir)


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    """uint8 RGB [H, W, 3] -> JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(frame[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise MinwmError(f"play: could not JPEG-encode a frame of shape {tuple(frame.shape)}")
    return buf.tobytes()


def action_string(keys: frozenset[str]) -> str:
    """The action-language form of a key set: {"l", "w"} -> "w+l", {} -> "_"."""
    return format_actions([frozenset(keys)])


def next_start(t_ready: float, step_s: float, chunk_s: float) -> float:
    """When to start the next chunk so it is ready as the page finishes playing this one."""
    return t_ready + chunk_s - step_s


Send = Callable[[dict | bytes], Awaitable[None]]


class PlaySession:
    """Drives one WorldModel for one WebSocket. `send` delivers a JSON dict or binary frame message;
    `on_recorded(path)` returns the URL the page may download a finished recording from."""

    def __init__(self, world_factory: Callable[[], object], send: Send, options: SessionOptions,
                 session_id: str, on_recorded: Callable[[Path], str | None] | None = None,
                 model_lock: threading.Lock | None = None):
        self._factory, self._send, self.opt, self.id = world_factory, send, options, session_id
        self._on_recorded = on_recorded
        self._lock = model_lock if model_lock is not None else contextlib.nullcontext()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"minwm-play-{session_id}")
        self.world = None
        self.prompt, self.seed = options.prompt, options.seed
        self.keys: frozenset[str] = frozenset()
        self._keys_seq: int | None = None
        self._keys_t = 0.0
        self._commands: collections.deque = collections.deque()
        self._wake = asyncio.Event()
        self._recorder: Mp4Recorder | None = None
        self._recordings = 0
        self._chunk = 0
        self._frames = 0          # pixel frames shown since the last reset (world.frame_index counts latents)
        self._next_start = 0.0

    # ---- called from the socket's receive loop --------------------------------------------------
    def handle(self, msg: protocol.ClientMessage) -> None:
        if isinstance(msg, protocol.Keys):
            self.keys, self._keys_seq, self._keys_t = msg.keys, msg.seq, time.monotonic()
        else:
            self._commands.append(msg)
        self._wake.set()

    # ---- the generation loop ----------------------------------------------------------------------
    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _action(self) -> frozenset[str] | None:
        if self.keys:
            return self.keys
        return frozenset() if self.opt.idle == "noop" else None

    async def run(self) -> None:
        """Create the world, greet the page, show the first picture, then generate until cancelled."""
        w = await self._call(self._create)
        await self._send({"type": "hello", "session": self.id, "height": w.height, "width": w.width,
                          "fps": w.fps, "chunk_frames": w.chunk_frames, "frames_per_chunk": w.frames_per_chunk,
                          "idle": self.opt.idle, "max_message_bytes": protocol.MAX_MESSAGE_BYTES,
                          "prompt": self.prompt, "seed": self.seed})
        await self._reset(protocol.Reset(self.prompt, self.seed))
        while True:
            if self._commands:
                await self._apply(self._commands.popleft())
                continue
            action = self._action()
            self._wake.clear()
            if action is None:
                await self._wake.wait()
                continue
            delay = self._next_start - time.monotonic()
            if delay > 0:
                # Wait for the tick, but let a command or a key change in the meantime be seen at once.
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                if self._next_start > time.monotonic():
                    continue
                action = self._action()
                if action is None:
                    continue
            await self._step(action)

    def _create(self):
        # Assigned on the worker, so close() releases the world even if the socket left mid-load.
        with self._lock:
            self.world = self._factory()
        return self.world

    async def _apply(self, msg) -> None:
        if isinstance(msg, protocol.Reset):
            await self._reset(msg)
        elif isinstance(msg, protocol.Prompt):
            await self._reset(protocol.Reset(msg.prompt, self.seed))
        elif isinstance(msg, protocol.Record):
            await self._record(msg.on)

    async def _reset(self, msg: protocol.Reset) -> None:
        prompt = self.prompt if msg.prompt is None else msg.prompt
        try:
            frames = await self._call(self._locked, self._start, prompt, msg.seed)
        except MinwmError as e:
            await self._send(protocol.error(f"reset: {e}"))
            return
        self.prompt, self.seed, self._chunk, self._frames, self._next_start = prompt, msg.seed, 0, 0, 0.0
        await self._send(self._state())
        if frames is not None:
            await self._emit(await self._call(self._encode, np.asarray(frames)), "_", None, 0.0, 0.0)
        else:
            # A text-only start has no picture until a chunk is made: make one still ("_") chunk so
            # the page shows the world before the player moves.
            await self._step(frozenset(), from_keys=False)

    async def _step(self, keys: frozenset[str], from_keys: bool = True) -> None:
        action = action_string(keys)
        # seq tells the page which of its key messages this chunk answers (its key-to-frame latency).
        seq, keys_t = (self._keys_seq, self._keys_t) if from_keys else (None, 0.0)
        t0 = time.monotonic()
        try:
            jpegs = await self._call(self._step_and_encode, action)
        except MinwmError as e:
            # A model-side refusal (e.g. an action the checkpoint cannot take): say so and stop
            # repeating it until the player presses something else.
            self.keys = frozenset()
            await self._send(protocol.error(f"step {action}: {e}"))
            return
        t1 = time.monotonic()
        self._next_start = next_start(t1, t1 - t0, len(jpegs) / self.world.fps)
        await self._emit(jpegs, action, seq, t1 - t0, t1 - max(keys_t, t0))
        self._chunk += 1

    def _encode(self, frames: np.ndarray) -> list[bytes]:
        if frames.ndim == 3:
            frames = frames[None]
        if self._recorder is not None:
            self._recorder.append(frames)
        return [encode_jpeg(f, self.opt.jpeg_quality) for f in frames]

    def _start(self, prompt: str, seed: int | None):
        w, image = self.world, self.opt.image
        if image is None and w.needs_image:
            image, _ = w.procedural_image(seed)
        return w.reset(prompt, image, seed)

    def _locked(self, fn, *args):
        with self._lock:
            return fn(*args)

    def _step_and_encode(self, action: str) -> list[bytes]:
        return self._encode(np.asarray(self._locked(self.world.step, action)))

    async def _emit(self, jpegs: list[bytes], action: str, seq, step_s: float, latency_s: float) -> None:
        w = self.world
        first, self._frames = self._frames, self._frames + len(jpegs)
        timings = {k: round(v * 1000, 2) for k, v in (getattr(w, "last_timings", None) or {}).items()}
        for i, jpeg in enumerate(jpegs):
            header = {"index": first + i, "chunk": self._chunk, "i": i, "n": len(jpegs), "keys": action,
                      "seq": seq, "step_ms": round(step_s * 1000, 2), "latency_ms": round(latency_s * 1000, 2),
                      "gen_fps": round(len(jpegs) / step_s, 2) if step_s > 0 else None,
                      "fps": w.fps, "timings_ms": timings, "recording": self._recorder is not None}
            await self._send(protocol.encode_frame(header, jpeg))

    async def _record(self, on: bool) -> None:
        if on and self._recorder is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self._recordings += 1   # two recordings within one second must not share a name
            path = self.opt.record_dir / f"play-{stamp}-{self.id}-{self._recordings}.mp4"
            try:
                self._recorder = await self._call(Mp4Recorder, path, self.world.fps)
            except (OSError, MinwmError) as e:
                await self._send(protocol.error(f"record: cannot write {path}: {e}"))
                return
            await self._send({"type": "recording", "on": True, "path": str(path.resolve())})
        elif not on and self._recorder is not None:
            rec, self._recorder = self._recorder, None
            path = await self._call(rec.close)
            url = self._on_recorded(path) if (path is not None and self._on_recorded) else None
            await self._send({"type": "recording", "on": False, "frames": rec.frames,
                              "path": None if path is None else str(path.resolve()), "url": url})
        else:
            await self._send(self._state())

    def _state(self) -> dict:
        return {"type": "state", "prompt": self.prompt, "seed": self.seed,
                "frame_index": self._frames, "recording": self._recorder is not None}

    # ---- teardown -----------------------------------------------------------------------------
    def _close_sync(self) -> Path | None:
        path = None
        if self._recorder is not None:
            # The socket went away mid-recording: keep what was recorded (the player asked for it).
            path, self._recorder = self._recorder.close(), None
            if path is not None:
                log.info("session %s: recording saved to %s", self.id, path)
        if self.world is not None:
            self._locked(self.world.close)
        return path

    async def close(self) -> None:
        """Finish the recording and release the world, after any model call still running on the worker."""
        try:
            await self._call(self._close_sync)
        finally:
            self._pool.shutdown(wait=False)
