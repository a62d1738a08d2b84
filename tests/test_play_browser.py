"""`minwm play` end to end in headless Chromium (Playwright driving the system's chromium binary).

test_page_plays_from_the_keyboard runs the real CLI on a tiny random-weight checkpoint: frames arrive,
the HUD follows the keys, recording and reset work, and garbage / oversized / binary messages on the
page's own socket get error replies while the server goes on serving.

test_keys_move_the_camera_the_right_way needs a trained checkpoint (random weights make no coherent
motion): tests/assets/toy_world, a toy trained by this repo's own pipeline and exported with
scripts/export_checkpoint.py (README, "The play test's checkpoint"), or the directory in MINWM_PLAY_CKPT.
It holds `l` then `j` and checks with optical flow that the image moves opposite to the yaw (turning
right moves the scene left).

Chromium comes from the system (Debian: `apt-get install -y chromium`; the Makefile's test target
installs it when missing). `playwright install` is never used: it downloads a browser build.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = next((p for p in (os.environ.get("MINWM_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary found (install it: apt-get install -y "
                                "chromium, or set MINWM_CHROMIUM); the browser test cannot run without one")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
        "--disable-extensions", "--disable-background-networking", "--mute-audio"]


def make_tiny_checkpoint(d: Path) -> Path:
    """A random-weight checkpoint laid out as a stage writes one: model.safetensors + model_config.json,
    config.yaml, and the VAE it names. 32x48 pixels, 2 latent frames per chunk, 2 steps."""
    import torch

    from minwm.codecs.config import tiny_wan_vae
    from minwm.codecs.vae import VideoCodec
    from minwm.config import parse_config
    from minwm.models.backbone import build_backbone

    cfg = parse_config({
        "model": {"arch": "wan", "diffusers": {
            "patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 16,
            "out_channels": 16, "text_dim": 32, "freq_dim": 32, "ffn_dim": 64, "num_layers": 1,
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6},
            "camera": {"kind": "prope"}, "chunk_frames": 2, "window_frames": 6},
        "codec": {"vae": "vae"},
        # 32 fps: a chunk of 8 frames plays in 0.25 s, about what it takes to make, so pacing adds little.
        "inference": {"height": 32, "width": 48, "steps": [1000, 500], "fps": 32},
    })
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        build_backbone(cfg["model"]).save_pretrained(d)
    VideoCodec.from_config(tiny_wan_vae(), seed=0).save_pretrained(d / "vae")
    (d / "config.yaml").write_text(cfg.dump())
    return d


class PlayServer:
    """`minwm play` in a subprocess on 127.0.0.1 and a free port; stopped with ctrl-c (SIGINT)."""

    def __init__(self, ckpt: Path, record_dir: Path, *extra: str):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "minwm", "play", "--ckpt", str(ckpt), "--port", "0", "--threads", "1",
             "--record-dir", str(record_dir), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"open (http://127\.0\.0\.1:\d+)/", line)
            if m:
                self.url = m.group(1)
                return
        self.stop()
        raise AssertionError("minwm play did not start:\n" + "".join(self.lines))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.lines += self.proc.stdout.readlines()
        return self.proc.returncode


def open_page(p, url):
    browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    page = browser.new_page()
    page.goto(url + "/")
    page.wait_for_function("window.minwmPlay && window.minwmPlay.stats.hello !== null", timeout=30_000)
    return browser, page


def wait_for_action(page, action, timeout=30_000):
    """Until a frame generated with `action` is on the canvas."""
    page.wait_for_function(f"(s => s.last && s.last.keys === {action!r})(window.minwmPlay.stats)", timeout=timeout)


def hud(page, name) -> str:
    return page.text_content(f"#hud-{name}")


@needs_chromium
def test_page_plays_from_the_keyboard(tmp_path):
    from playwright.sync_api import sync_playwright

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    server = PlayServer(ckpt, tmp_path / "rec", "--max-sessions", "2")
    try:
        with sync_playwright() as p:
            browser, page = open_page(p, server.url)
            hello = page.evaluate("window.minwmPlay.stats.hello")
            assert (hello["height"], hello["width"], hello["chunk_frames"]) == (32, 48, 2)
            assert page.evaluate("[document.getElementById('view').width, document.getElementById('view').height]") == [48, 32]
            page.wait_for_function("window.minwmPlay.stats.drawn >= 5")        # the still first chunk

            # Hold w, then add l: compound action w+l, repeated every chunk while held.
            page.keyboard.down("w")
            wait_for_action(page, "w")
            assert hud(page, "keys") == "w"
            page.keyboard.down("l")
            wait_for_action(page, "w+l")
            assert hud(page, "keys") == "w+l" and hud(page, "action") == "w+l"
            chunk = page.evaluate("window.minwmPlay.stats.last.chunk")
            page.wait_for_function(f"window.minwmPlay.stats.last.chunk >= {chunk + 2}")
            assert page.evaluate("window.minwmPlay.stats.last.keys") == "w+l"
            assert int(hud(page, "fps")) > 0
            assert float(hud(page, "latency")) > 0 and float(hud(page, "step")) > 0
            assert int(hud(page, "frame")) > 5
            page.keyboard.up("w")
            page.keyboard.up("l")
            assert hud(page, "keys") == "none"
            # Arrow keys turn: right arrow is yaw right ("l"), down arrow pitch down ("k").
            page.keyboard.down("ArrowRight")
            page.keyboard.down("ArrowDown")
            wait_for_action(page, "l+k")
            page.keyboard.up("ArrowRight")
            page.keyboard.up("ArrowDown")

            # Garbage, oversized and binary messages on the page's own socket: each gets an error, the
            # session goes on.
            page.evaluate("""() => {
                const ws = window.minwmPlay.socket;
                ws.send("this is not json");
                ws.send(JSON.stringify({type: "keys", keys: ["w", "w", "x"]}));
                ws.send("x".repeat(200000));
                ws.send(new Uint8Array([1, 2, 3]));
            }""")
            page.wait_for_function("window.minwmPlay.stats.errors.length >= 4")
            errors = page.evaluate("window.minwmPlay.stats.errors")
            assert any("JSON" in e for e in errors) and any("above the limit" in e for e in errors)
            assert any("binary" in e for e in errors)
            assert page.text_content("#error")
            page.keyboard.down("d")
            wait_for_action(page, "d")
            page.keyboard.up("d")

            # Record a few chunks, stop, and download the mp4 through the page's link.
            page.click("#record")
            page.wait_for_function("document.getElementById('record').classList.contains('on')")
            page.focus("#view")
            page.keyboard.down("s")
            chunk = page.evaluate("window.minwmPlay.stats.last.chunk")
            page.wait_for_function(f"window.minwmPlay.stats.last.chunk >= {chunk + 2}")
            page.click("#record")
            page.keyboard.up("s")
            page.wait_for_selector("#download:not([hidden])")
            href = page.get_attribute("#download", "href")
            r = page.request.get(server.url + href)
            assert r.status == 200 and r.body()[4:8] == b"ftyp"
            assert len(list((tmp_path / "rec").glob("*.mp4"))) == 1

            # Reset with a new prompt and seed: the picture starts over from frame 0.
            page.fill("#prompt", "a red room")
            page.fill("#seed", "3")
            page.click("#reset")
            page.wait_for_function("window.minwmPlay.stats.last.index < 5")
            assert page.input_value("#prompt") == "a red room"

            # A second page is its own session, and the server still serves after all of the above.
            other = browser.new_page()
            other.goto(server.url + "/")
            other.wait_for_function("window.minwmPlay.stats.drawn >= 1", timeout=30_000)
            other.close()
            browser.close()
    finally:
        code = server.stop()
    log = "".join(server.lines)
    assert code == 0 and "Finished server process" in log, log     # ctrl-c is the normal way to stop
    assert "Traceback" not in log and "ERROR" not in log, log


def _mean_flow_x(frames: np.ndarray) -> np.ndarray:
    """Median horizontal optical flow (pixels) between consecutive frames, one value per pair.
    Consecutive frames keep the shift to a pixel or two, which Farneback tracks well on small images."""
    import cv2

    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    return np.array([float(np.median(cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 9, 3, 5, 1.1, 0)[..., 0]))
                     for a, b in zip(grey[:-1], grey[1:])])


def _record_holding(page, key, chunks) -> np.ndarray:
    import av

    page.click("#record")
    page.wait_for_function("document.getElementById('record').classList.contains('on')")
    page.focus("#view")
    page.keyboard.down(key)
    wait_for_action(page, key, timeout=120_000)
    chunk = page.evaluate("window.minwmPlay.stats.last.chunk")
    page.wait_for_function(f"window.minwmPlay.stats.last.chunk >= {chunk + chunks}", timeout=300_000)
    page.click("#record")
    page.keyboard.up(key)
    page.wait_for_function("document.getElementById('record-info').textContent.startsWith('saved')",
                           timeout=60_000)
    path = page.text_content("#record-info").split(" to ", 1)[1]     # "saved N frames to PATH"
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


TRAINED = Path(os.environ.get("MINWM_PLAY_CKPT") or Path(__file__).parent / "assets" / "toy_world")


@needs_chromium
@pytest.mark.skipif(not (TRAINED / "model.safetensors").is_file(),
                    reason=f"no trained checkpoint at {TRAINED} (set MINWM_PLAY_CKPT) to check motion direction")
def test_keys_move_the_camera_the_right_way(tmp_path):
    from playwright.sync_api import sync_playwright

    server = PlayServer(TRAINED, tmp_path / "rec")
    try:
        with sync_playwright() as p:
            browser, page = open_page(p, server.url)
            page.wait_for_function("window.minwmPlay.stats.drawn >= 1", timeout=120_000)
            right = _record_holding(page, "l", 3)
            # From the same start again: an autoregressive world carries its motion on for a chunk or so after
            # the key changes, which is right, but would blur which key moved what.
            page.click("#reset")
            page.wait_for_function("window.minwmPlay.stats.last.index < 5")
            left = _record_holding(page, "j", 3)
            browser.close()
    finally:
        server.stop()
    # The default yaw step is 3 degrees per latent frame (4 pixel frames): about a pixel per frame at
    # toy sizes. Yaw right (l): the scene slides left, flow < 0; yaw left (j): flow > 0.
    fr, fl = _mean_flow_x(right), _mean_flow_x(left)
    assert np.median(fr) < -0.1 and (fr < 0).mean() > 0.7, f"yaw right: x-flow per frame {np.round(fr, 2)}"
    assert np.median(fl) > 0.1 and (fl > 0).mean() > 0.7, f"yaw left: x-flow per frame {np.round(fl, 2)}"


def test_flow_measure_reads_a_leftward_slide_as_negative():
    """The sign convention the motion check relies on: content moving left gives negative x-flow."""
    import cv2

    rng = np.random.default_rng(0)
    world = cv2.GaussianBlur(rng.integers(0, 255, (48, 400, 3), dtype=np.uint8), (9, 9), 0)
    # Frame t shows the world shifted right by 1.5 t pixels.
    frames = np.stack([cv2.warpAffine(world, np.float32([[1, 0, 1.5 * t - 100], [0, 1, 0]]), (64, 48))
                       for t in range(6)])
    assert np.median(_mean_flow_x(frames)) == pytest.approx(1.5, abs=0.2)
    assert np.median(_mean_flow_x(frames[::-1])) == pytest.approx(-1.5, abs=0.2)


def test_play_sessions_share_weights_but_not_state(tmp_path):
    """The CLI's factory: one loaded backbone for every session, each with its own cache and RNG, so
    one player's steps never change what another sees."""
    import torch

    from minwm.serve.cli import shared_weights_factory

    torch.set_num_threads(1)
    config, factory = shared_weights_factory(make_tiny_checkpoint(tmp_path / "ckpt"), "cpu", torch.float32)
    a, b = factory(), factory()
    assert a.backbone is b.backbone and a.codec is b.codec and a._caches[0] is not b._caches[0]
    a.reset("a room", seed=1)
    b.reset("a room", seed=1)
    first_a = a.step("_")
    b.step("_")
    b.step("w+l")                          # b moves on; a must not notice
    assert (a.frame_index, b.frame_index) == (2, 4)
    c = factory()
    c.reset("a room", seed=1)
    assert np.array_equal(c.step("_"), first_a)
    assert np.array_equal(a.step("j"), factory_step_after(factory, "j"))
    for w in (a, b, c):
        w.close()


def factory_step_after(factory, action):
    """A fresh session's second chunk after a "_" chunk, for comparison with a session that was not disturbed."""
    w = factory()
    w.reset("a room", seed=1)
    w.step("_")
    out = w.step(action)
    w.close()
    return out
