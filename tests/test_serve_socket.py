"""The play server over a real socket (uvicorn on 127.0.0.1, a free port) with a stand-in world.

FakeWorld implements the WorldModel protocol the server relies on (reset / step / close, sizes, fps,
timings) and paints each frame with a colour that names the action, so the tests can see which keys a
chunk was generated with. The end-to-end test with the real WorldModel is tests/test_play_browser.py."""

import json
import time

import cv2
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from minwm.errors import MinwmError
from minwm.serve import protocol
from minwm.serve.server import BackgroundServer, bind, create_app
from minwm.serve.session import SessionOptions


class FakeWorld:
    height, width, chunk_frames, fps = 24, 40, 2, 400
    frames_per_chunk = 8
    needs_image = False

    def __init__(self, log):
        self.log, self.frame_index, self.last_timings, self.closed = log, 0, {}, False
        self.images = []

    def procedural_image(self, seed):
        return np.full((self.height, self.width, 3), seed, np.uint8), f"scene {seed}"

    def reset(self, prompt, image=None, seed=None):
        self.log.append(("reset", prompt, seed))
        self.images.append(None if image is None else int(image[0, 0, 0]))
        self.frame_index = 0
        return None if image is None else image[None]

    def step(self, action):
        if action == "i+k":
            raise MinwmError("action: this checkpoint cannot look up and down at once")
        self.log.append(("step", action))
        n = self.frames_per_chunk - (3 if self.frame_index == 0 else 0)   # 1 + T*(chunk-1) first
        self.frame_index += self.chunk_frames
        self.last_timings = {"denoise_s": 0.001, "refresh_s": 0.0005, "decode_s": 0.0005}
        frames = np.zeros((n, self.height, self.width, 3), np.uint8)
        frames[..., 0] = 40 * len(action)            # "_" 40, "w" 40, "w+l" 120
        frames[..., 1] = 200 if "l" in action else 0
        time.sleep(0.002)
        return frames

    def close(self):
        self.closed = True


class Worlds:
    def __init__(self):
        self.made = []

    def __call__(self):
        w = FakeWorld([])
        self.made.append(w)
        return w


def serve(tmp_path, **kw):
    worlds = Worlds()
    opts = SessionOptions(prompt="start", seed=1, record_dir=tmp_path / "rec", idle=kw.pop("idle", "pause"),
                          image=kw.pop("image", None))
    return worlds, BackgroundServer(create_app(worlds, options=opts, **kw))


def ws_url(srv):
    return f"ws://127.0.0.1:{srv.port}/ws"


def recv(ws, timeout=5.0):
    m = ws.recv(timeout=timeout)
    return json.loads(m) if isinstance(m, str) else protocol.decode_frame(m)


def until(ws, pred, timeout=5.0):
    """Messages up to and including the first for which pred holds."""
    seen, end = [], time.monotonic() + timeout
    while True:
        m = recv(ws, max(0.01, end - time.monotonic()))
        seen.append(m)
        if pred(m):
            return seen


def is_frame(m):
    return isinstance(m, tuple)


def is_type(t):
    return lambda m: isinstance(m, dict) and m.get("type") == t


def frame_with(keys):
    return lambda m: is_frame(m) and m[0]["keys"] == keys


def test_hello_first_picture_and_held_keys_repeat(tmp_path):
    worlds, srv = serve(tmp_path)
    with srv, connect(ws_url(srv)) as ws:
        hello = recv(ws)
        assert hello["type"] == "hello"
        assert (hello["height"], hello["width"], hello["fps"], hello["chunk_frames"]) == (24, 40, 400, 2)
        assert hello["prompt"] == "start" and hello["seed"] == 1 and hello["idle"] == "pause"
        # A text start shows one still chunk before any key is pressed.
        msgs = until(ws, lambda m: is_frame(m) and m[0]["i"] == m[0]["n"] - 1)
        assert is_type("state")(msgs[0])
        frames = [m for m in msgs if is_frame(m)]
        assert [h["index"] for h, _ in frames] == list(range(5)) and frames[0][0]["keys"] == "_"
        img = cv2.imdecode(np.frombuffer(frames[0][1], np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (24, 40, 3)
        # Paused while idle: nothing more arrives.
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.3)

        ws.send(json.dumps({"type": "keys", "keys": ["w", "l"], "seq": 5}))
        msgs = until(ws, lambda m: is_frame(m) and m[0]["chunk"] == 3)
        frames = [m for m in msgs if is_frame(m)]
        assert {h["keys"] for h, _ in frames} == {"w+l"} and {h["seq"] for h, _ in frames} == {5}
        assert [h["index"] for h, _ in frames] == list(range(5, 5 + len(frames)))
        h = frames[0][0]
        assert h["step_ms"] > 0 and h["latency_ms"] >= 0 and h["gen_fps"] > 0
        assert set(h["timings_ms"]) == {"denoise_s", "refresh_s", "decode_s"}
        rgb = cv2.imdecode(np.frombuffer(frames[-1][1], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        assert abs(int(rgb[..., 0].mean()) - 120) < 6 and rgb[..., 1].mean() > 190

        ws.send(json.dumps({"type": "keys", "keys": ["a"], "seq": 6}))
        until(ws, frame_with("a"))
        ws.send(json.dumps({"type": "keys", "keys": [], "seq": 7}))
        time.sleep(0.2)
        n_steps = len(worlds.made[0].log)
        time.sleep(0.3)
        assert len(worlds.made[0].log) == n_steps          # released: paused
    log = worlds.made[0].log
    assert log[0] == ("reset", "start", 1)
    assert ("step", "w+l") in log and ("step", "a") in log
    assert worlds.made[0].closed                         # the socket closed: its world was released


def test_idle_noop_keeps_generating(tmp_path):
    worlds, srv = serve(tmp_path, idle="noop")
    with srv, connect(ws_url(srv)) as ws:
        msgs = until(ws, lambda m: is_frame(m) and m[0]["chunk"] == 2)
        assert {m[0]["keys"] for m in msgs if is_frame(m)} == {"_"}


def test_bad_messages_get_errors_and_the_session_goes_on(tmp_path):
    worlds, srv = serve(tmp_path)
    with srv, connect(ws_url(srv)) as ws, connect(ws_url(srv)) as other:
        until(ws, is_frame)
        bad = ["{nope", b"\x00\x01binary", json.dumps({"type": "keys", "keys": ["z"]}),
               json.dumps({"type": "teleport"}), "x" * (protocol.MAX_MESSAGE_BYTES + 10),
               json.dumps({"type": "prompt", "prompt": "p" * 300_000})]
        for m in bad:
            ws.send(m)
            err = until(ws, is_type("error"))[-1]
            assert err["message"] and "\n" not in err["message"]
        # A step the model refuses is reported and the keys are dropped, not retried forever.
        ws.send(json.dumps({"type": "keys", "keys": ["i", "k"]}))
        assert "cannot look up" in until(ws, is_type("error"))[-1]["message"]
        ws.send(json.dumps({"type": "keys", "keys": ["d"]}))
        until(ws, frame_with("d"))
        # The other session never saw any of it.
        msgs = until(other, is_frame)
        other.send(json.dumps({"type": "keys", "keys": ["q"]}))
        msgs += until(other, frame_with("q"))
        assert not any(is_type("error")(m) for m in msgs)


def test_message_beyond_the_transport_limit_closes_only_that_socket(tmp_path):
    worlds, srv = serve(tmp_path)
    with srv:
        with connect(ws_url(srv), max_size=None) as ws:
            until(ws, is_frame)
            ws.send("y" * (2 * 1024 * 1024))
            with pytest.raises(ConnectionClosed) as e:
                until(ws, lambda m: False)
            assert e.value.rcvd.code == 1009
        with connect(ws_url(srv)) as ws:                 # the server still serves
            assert recv(ws)["type"] == "hello"


def test_reset_prompt_and_seed(tmp_path):
    worlds, srv = serve(tmp_path)
    with srv, connect(ws_url(srv)) as ws:
        until(ws, is_frame)
        ws.send(json.dumps({"type": "keys", "keys": ["w"]}))
        until(ws, frame_with("w"))
        ws.send(json.dumps({"type": "reset", "prompt": "a beach", "seed": 9}))
        state = until(ws, is_type("state"))[-1]
        assert (state["prompt"], state["seed"], state["frame_index"]) == ("a beach", 9, 0)
        first = until(ws, is_frame)[-1][0]
        assert first["index"] == 0
        ws.send(json.dumps({"type": "prompt", "prompt": "a forest"}))
        state = until(ws, is_type("state"))[-1]
        assert (state["prompt"], state["seed"]) == ("a forest", 9)
    resets = [e for e in worlds.made[0].log if e[0] == "reset"]
    assert resets == [("reset", "start", 1), ("reset", "a beach", 9), ("reset", "a forest", 9)]


@pytest.mark.parametrize("given", [None, 77])
def test_image_to_video_world_starts_from_an_image(tmp_path, given, monkeypatch):
    """An image-to-video world gets the --image on every reset, else a procedural render for the reset's seed."""
    monkeypatch.setattr(FakeWorld, "needs_image", True)
    image = None if given is None else np.full((24, 40, 3), given, np.uint8)
    worlds, srv = serve(tmp_path, image=image)
    with srv, connect(ws_url(srv)) as ws:
        until(ws, is_frame)
        ws.send(json.dumps({"type": "reset", "prompt": "a beach", "seed": 9}))
        until(ws, is_type("state"))
        until(ws, is_frame)
    assert worlds.made[0].images == ([1, 9] if given is None else [given, given])


def test_session_cap_and_isolation(tmp_path):
    worlds, srv = serve(tmp_path, max_sessions=2)
    with srv, connect(ws_url(srv)) as a, connect(ws_url(srv)) as b:
        assert recv(a)["type"] == "hello" and recv(b)["type"] == "hello"
        with connect(ws_url(srv)) as c:
            err = recv(c)
            assert err["type"] == "error" and "busy" in err["message"] and "2" in err["message"]
            with pytest.raises(ConnectionClosed) as e:
                recv(c)
            assert e.value.rcvd.code == 1013
        a.send(json.dumps({"type": "keys", "keys": ["j"]}))
        b.send(json.dumps({"type": "keys", "keys": ["s"]}))
        assert {m[0]["keys"] for m in until(a, frame_with("j")) if is_frame(m)} <= {"_", "j"}
        assert {m[0]["keys"] for m in until(b, frame_with("s")) if is_frame(m)} <= {"_", "s"}
        a.close()
        deadline = time.monotonic() + 5
        while len(worlds.made) < 3 and time.monotonic() < deadline:
            try:                                         # a's slot frees once its session is torn down
                with connect(ws_url(srv)) as d:
                    if recv(d)["type"] == "hello":
                        break
            except ConnectionClosed:
                time.sleep(0.05)
        else:
            pytest.fail("a closed session's slot was not freed")
    steps = [{e[1] for e in w.log if e[0] == "step"} for w in worlds.made[:2]]
    assert steps[0] <= {"_", "j"} and steps[1] <= {"_", "s"}     # each world saw only its own keys


def test_recording_to_mp4_and_download(tmp_path):
    import urllib.error
    import urllib.request

    import av

    worlds, srv = serve(tmp_path)
    with srv, connect(ws_url(srv)) as ws:
        until(ws, is_frame)
        ws.send(json.dumps({"type": "record", "on": True}))
        started = until(ws, is_type("recording"))[-1]
        assert started["on"] and started["path"].endswith(".mp4")
        ws.send(json.dumps({"type": "keys", "keys": ["w"]}))
        msgs = until(ws, lambda m: is_frame(m) and m[0]["chunk"] == 3)
        ws.send(json.dumps({"type": "keys", "keys": []}))
        ws.send(json.dumps({"type": "record", "on": False}))
        msgs += until(ws, is_type("recording"))
        done = msgs[-1]
        shown = sum(1 for m in msgs if is_frame(m) and m[0]["recording"])
        assert not done["on"] and done["frames"] == shown >= 24
        with av.open(done["path"]) as c:
            assert sum(1 for _ in c.decode(video=0)) == shown
        with urllib.request.urlopen(srv.url + done["url"], timeout=5) as r:
            assert r.headers["content-type"] == "video/mp4" and r.read()[4:8] == b"ftyp"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(srv.url + "/recordings/..%2F..%2Fetc%2Fpasswd", timeout=5)
        assert e.value.code == 404
        # Recording left on when the socket closes is still saved.
        ws.send(json.dumps({"type": "record", "on": True}))
        until(ws, is_type("recording"))
        ws.send(json.dumps({"type": "keys", "keys": ["d"]}))
        until(ws, frame_with("d"))
    assert len(list((tmp_path / "rec").glob("*.mp4"))) == 2


def test_page_is_served_and_foreign_origins_are_refused(tmp_path):
    import urllib.request

    worlds, srv = serve(tmp_path)
    with srv:
        page = urllib.request.urlopen(srv.url + "/", timeout=5).read().decode()
        assert 'id="view"' in page and "/static/app.js" in page
        js = urllib.request.urlopen(srv.url + "/static/app.js", timeout=5).read().decode()
        assert "ArrowLeft" in js
        with pytest.raises(InvalidStatus):
            connect(ws_url(srv), origin="http://evil.example")
        with connect(ws_url(srv), origin=srv.url) as ws:
            assert recv(ws)["type"] == "hello"


def test_listens_only_on_the_given_host():
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
        with pytest.raises(MinwmError, match="cannot listen on 127.0.0.1"):
            bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()


def test_world_that_fails_to_load_is_reported(tmp_path):
    def factory():
        raise MinwmError("ckpt: model.safetensors: missing")

    app = create_app(factory, options=SessionOptions(record_dir=tmp_path))
    with BackgroundServer(app) as srv, connect(ws_url(srv)) as ws:
        err = recv(ws)
        assert err == {"type": "error", "message": "ckpt: model.safetensors: missing"}
        with pytest.raises(ConnectionClosed):
            recv(ws)
    with pytest.raises(MinwmError, match="max_sessions"):
        create_app(factory, max_sessions=0)


def test_cli_play_refuses_a_missing_checkpoint(tmp_path, capsys):
    from minwm.cli import main

    assert main(["play", "--ckpt", str(tmp_path / "nope"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minwm: error:") and "nope" in err and "\n" not in err
