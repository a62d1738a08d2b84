// minwm play page: keyboard -> {"type":"keys"} messages; binary frame messages -> canvas, paced at the model's fps.
// Frame message: uint32 big-endian header length, UTF-8 JSON header, JPEG bytes (minwm/serve/protocol.py).
"use strict";
(() => {
  // event.code, not event.key: the same physical keys on any keyboard layout. Arrows are yaw / pitch.
  const KEYMAP = {
    KeyW: "w", KeyS: "s", KeyA: "a", KeyD: "d", KeyQ: "q", KeyE: "e",
    KeyJ: "j", KeyL: "l", KeyI: "i", KeyK: "k",
    ArrowLeft: "j", ArrowRight: "l", ArrowUp: "i", ArrowDown: "k",
  };
  const ORDER = "wsadqejlik";
  const $ = (id) => document.getElementById(id);
  const canvas = $("view"), ctx = canvas.getContext("2d");

  const stats = { received: 0, drawn: 0, errors: [], hello: null, last: null, latencyMs: null, fps: 0 };
  const held = new Map();          // event.code -> key; "l" and ArrowRight may both be down
  const sentAt = new Map();        // keys seq -> time sent, until the first frame made with it is drawn
  let ws = null, seq = 0, fps = 16, queue = [], nextDue = 0, drawnTimes = [], recording = false, errorTimer = 0;

  function heldKeys() {
    const keys = new Set(held.values());
    return [...ORDER].filter((k) => keys.has(k));
  }

  function send(obj) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
  }

  function sendKeys() {
    const keys = heldKeys();
    seq += 1;
    sentAt.set(seq, performance.now());
    send({ type: "keys", keys, seq });
    $("hud-keys").textContent = keys.length ? keys.join("+") : "none";
  }

  function typing(e) {
    const t = e.target;
    return t && (t.tagName === "TEXTAREA" || t.tagName === "INPUT" || t.isContentEditable);
  }

  window.addEventListener("keydown", (e) => {
    const key = KEYMAP[e.code];
    if (!key || typing(e) || e.ctrlKey || e.metaKey || e.altKey) return;
    e.preventDefault();                       // arrows would scroll the page
    if (held.has(e.code)) return;             // auto-repeat: the server already repeats every chunk
    held.set(e.code, key);
    sendKeys();
  });
  window.addEventListener("keyup", (e) => {
    if (!held.has(e.code)) return;
    e.preventDefault();
    held.delete(e.code);
    sendKeys();
  });
  // A key released while the page had no focus never sends keyup: drop everything instead of walking forever.
  const releaseAll = () => { if (held.size) { held.clear(); sendKeys(); } };
  window.addEventListener("blur", releaseAll);
  document.addEventListener("visibilitychange", () => { if (document.hidden) releaseAll(); });

  function showError(msg) {
    stats.errors.push(msg);
    $("error").textContent = msg;
    clearTimeout(errorTimer);
    errorTimer = setTimeout(() => { $("error").textContent = ""; }, 8000);
  }

  function onFrame(buf) {
    const view = new DataView(buf);
    const n = view.getUint32(0, false);
    const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, n)));
    const item = { header, bmp: null, failed: false };
    queue.push(item);
    stats.received += 1;
    createImageBitmap(new Blob([new Uint8Array(buf, 4 + n)], { type: "image/jpeg" }))
      .then((b) => { item.bmp = b; }, () => { item.failed = true; });
  }

  function draw(item, now) {
    const h = item.header;
    ctx.drawImage(item.bmp, 0, 0);
    item.bmp.close();
    stats.drawn += 1;
    stats.last = h;
    drawnTimes.push(now);
    while (drawnTimes.length && drawnTimes[0] < now - 1000) drawnTimes.shift();
    stats.fps = drawnTimes.length;
    // Input latency: key change sent -> first frame made with it on screen.
    if (h.i === 0 && h.seq !== null && sentAt.has(h.seq)) {
      stats.latencyMs = now - sentAt.get(h.seq);
      $("hud-latency").textContent = stats.latencyMs.toFixed(0);
    }
    for (const s of sentAt.keys()) if (h.seq !== null && s <= h.seq) sentAt.delete(s);
    $("hud-fps").textContent = String(stats.fps);
    $("hud-gen").textContent = h.gen_fps === null ? "-" : h.gen_fps.toFixed(1);
    $("hud-server").textContent = h.latency_ms.toFixed(0);
    $("hud-step").textContent = h.step_ms.toFixed(0);
    $("hud-frame").textContent = String(h.index);
    $("hud-action").textContent = h.keys;
  }

  // Frames of a chunk arrive together; show them at the model's fps. More than two chunks behind
  // (a slow tab): skip ahead rather than show stale video.
  function tick(now) {
    while (queue.length && queue[0].failed) queue.shift();
    const perChunk = stats.hello ? stats.hello.frames_per_chunk : 16;
    while (queue.length > 2 * perChunk && queue[0].bmp) queue.shift().bmp.close();
    if (queue.length && queue[0].bmp && now >= nextDue) {
      draw(queue.shift(), now);
      nextDue = Math.max(nextDue + 1000 / fps, now - 1000 / fps);
    }
    if (!queue.length && now - (drawnTimes[drawnTimes.length - 1] || 0) > 1000) $("hud-fps").textContent = "0";
    requestAnimationFrame(tick);
  }
  requestAnimationFrame(tick);

  function onMessage(msg) {
    if (msg.type === "hello") {
      stats.hello = msg;
      fps = msg.fps;
      canvas.width = msg.width;
      canvas.height = msg.height;
      canvas.style.aspectRatio = `${msg.width} / ${msg.height}`;
      $("prompt").value = msg.prompt;
      $("seed").value = msg.seed === null ? "" : msg.seed;
      $("idle-help").textContent = msg.idle === "pause"
        ? "The world pauses while no key is held." : "The world keeps running while no key is held.";
      $("status").textContent = `session ${msg.session}: ${msg.width}x${msg.height} at ${msg.fps} fps, ` +
        `${msg.frames_per_chunk} frames per chunk`;
      canvas.focus();
    } else if (msg.type === "error") {
      showError(msg.message);
    } else if (msg.type === "state") {
      if (msg.frame_index === 0) { queue.forEach((it) => it.bmp && it.bmp.close()); queue = []; }
      $("prompt").value = msg.prompt;
      $("seed").value = msg.seed === null ? "" : msg.seed;
      setRecording(msg.recording);
    } else if (msg.type === "recording") {
      setRecording(msg.on);
      if (msg.on) {
        $("record-info").textContent = `recording to ${msg.path}`;
      } else if (msg.path) {
        $("record-info").textContent = `saved ${msg.frames} frames to ${msg.path}`;
        const a = $("download");
        a.href = msg.url;
        a.download = msg.url.split("/").pop();
        a.hidden = false;
      } else {
        $("record-info").textContent = "nothing was recorded (no frames while recording)";
      }
    }
  }

  function setRecording(on) {
    recording = on;
    const b = $("record");
    b.classList.toggle("on", on);
    b.innerHTML = on ? "&#9632; Stop recording" : "&#9679; Record";
  }

  function seedValue() {
    const v = $("seed").value.trim();
    return v === "" ? null : Number(v);
  }

  $("prompt-form").addEventListener("submit", (e) => {
    e.preventDefault();
    send({ type: "prompt", prompt: $("prompt").value });
    canvas.focus();
  });
  $("reset").addEventListener("click", () => {
    const msg = { type: "reset", seed: seedValue() };
    if ($("prompt").value.trim()) msg.prompt = $("prompt").value;
    send(msg);
    canvas.focus();
  });
  $("record").addEventListener("click", () => { send({ type: "record", on: !recording }); canvas.focus(); });

  function connect() {
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
    ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") onMessage(JSON.parse(ev.data));
      else onFrame(ev.data);
    };
    ws.onclose = (ev) => {
      $("status").textContent = `disconnected (code ${ev.code}${ev.reason ? ": " + ev.reason : ""}); reload to reconnect`;
    };
  }
  connect();

  // For the browser test and for poking at the protocol from the console.
  window.minwmPlay = { stats, send, get socket() { return ws; } };
})();
