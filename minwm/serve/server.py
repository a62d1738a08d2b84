"""The play server: the page (GET /), its WebSocket (/ws), finished recordings (GET /recordings/NAME).

Each WebSocket is one PlaySession with its own WorldModel state (made by `world_factory`, which may
share weights between sessions). At most `max_sessions` run at once; one more is accepted only to be
told so ({"type": "error"}) and closed with code 1013 (try again later). A message the protocol
refuses gets an "error" reply and the session goes on. Messages over WS_MAX_SIZE are cut off by
uvicorn itself (close code 1009): that bound stops a client from making the server buffer without
limit, and sits well above protocol.MAX_MESSAGE_BYTES so ordinary oversized messages get a reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import threading
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, WebSocket
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from minwm.errors import MinwmError
from minwm.serve import protocol
from minwm.serve.session import PlaySession, SessionOptions

log = logging.getLogger("minwm.serve")

STATIC = Path(__file__).parent / "static"
WS_MAX_SIZE = 1024 * 1024
BUSY_CLOSE_CODE = 1013   # RFC 6455 "try again later"
ERROR_CLOSE_CODE = 1011  # internal error


def _origin_ok(ws: WebSocket) -> bool:
    """Only the page this server sent may open a session: a browser tab on another site could otherwise
    drive the local model (and read its recordings) through the player's browser. Clients that are not
    browsers send no Origin and are let in: they could reach the port directly anyway."""
    origin = ws.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == ws.headers.get("host", "").lower()


def create_app(world_factory: Callable[[], object], max_sessions: int = 2,
               options: SessionOptions | None = None) -> FastAPI:
    """The play app. `world_factory()` returns a fresh WorldModel (or an object with its protocol:
    reset, step, close, height, width, fps, chunk_frames, frames_per_chunk, last_timings)."""
    if max_sessions < 1:
        raise MinwmError(f"play: max_sessions: expected >= 1, got {max_sessions}")
    options = options or SessionOptions()
    app = FastAPI(title="minwm play", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.active = 0
    app.state.max_sessions = max_sessions
    app.state.recordings: dict[str, Path] = {}
    model_lock = threading.Lock()

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse((STATIC / "index.html").read_text())

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz")
    async def healthz():
        return {"ok": True, "sessions": app.state.active, "max_sessions": max_sessions}

    @app.get("/recordings/{name}")
    async def recording(name: str):
        # Only files this server wrote, looked up by name: no path from the request reaches the disk.
        path = app.state.recordings.get(name)
        if path is None or not path.is_file():
            raise HTTPException(404, "no such recording")
        return FileResponse(path, media_type="video/mp4", filename=name)

    def on_recorded(path: Path) -> str:
        app.state.recordings[path.name] = path
        return f"/recordings/{path.name}"

    @app.websocket("/ws")
    async def play(ws: WebSocket):
        if not _origin_ok(ws):
            log.warning("refused a WebSocket from origin %s", ws.headers.get("origin"))
            await ws.close(code=1008)
            return
        await ws.accept()
        if app.state.active >= max_sessions:
            await ws.send_text(json.dumps(protocol.error(
                f"server busy: all {max_sessions} play session(s) are in use; try again later")))
            await ws.close(code=BUSY_CLOSE_CODE)
            return
        app.state.active += 1
        sid = secrets.token_hex(4)
        log.info("session %s opened (%d/%d)", sid, app.state.active, max_sessions)
        send_lock = asyncio.Lock()

        async def send(msg: dict | bytes) -> None:
            async with send_lock:   # frames and error replies come from two tasks
                if isinstance(msg, (bytes, bytearray)):
                    await ws.send_bytes(bytes(msg))
                else:
                    await ws.send_text(json.dumps(msg))

        session = PlaySession(world_factory, send, options, sid, on_recorded, model_lock)
        gen = asyncio.create_task(session.run())
        recv = asyncio.create_task(_receive(ws, session, send))
        try:
            done, _ = await asyncio.wait({gen, recv}, return_when=asyncio.FIRST_COMPLETED)
            if gen in done and not recv.done():
                exc = gen.exception()
                if isinstance(exc, MinwmError):
                    msg = str(exc)
                else:
                    log.error("session %s failed", sid, exc_info=exc)
                    msg = f"internal error: {type(exc).__name__}: {exc}"
                with contextlib.suppress(Exception):   # the socket may be gone as well
                    await send(protocol.error(msg))
                    await ws.close(code=ERROR_CLOSE_CODE)
        finally:
            for t in (gen, recv):
                t.cancel()
            await asyncio.gather(gen, recv, return_exceptions=True)
            await session.close()
            app.state.active -= 1
            log.info("session %s closed", sid)

    return app


async def _receive(ws: WebSocket, session: PlaySession, send) -> None:
    """Validate every message; answer a bad one with an error and keep going. Returns on disconnect."""
    while True:
        m = await ws.receive()
        if m["type"] == "websocket.disconnect":
            return
        raw = m.get("text") if m.get("text") is not None else m.get("bytes")
        try:
            msg = protocol.parse_client_message(raw)
        except protocol.ProtocolError as e:
            await send(protocol.error(str(e)))
            continue
        session.handle(msg)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on exactly `host` (never a wildcard unless asked for), port 0 = a free
    one. Binding here rather than in uvicorn turns "address in use" into a one-line error."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise MinwmError(f"play: --host {host!r}: cannot resolve it ({e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise MinwmError(f"play: cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def make_server(app: FastAPI, sock: socket.socket, log_level: str = "info"):
    import uvicorn

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, ws_max_size=WS_MAX_SIZE, log_level=log_level,
                            access_log=False, lifespan="off")
    return uvicorn.Server(config)


class BackgroundServer:
    """Serve `app` from a thread on host:port (port 0 = a free one); for tests and notebooks. uvicorn
    leaves signal handling to the main thread when run from another one.

        with BackgroundServer(app) as srv:
            url = srv.url
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = make_server(app, self.sock, log_level)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="minwm-play-server", daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        for _ in range(1000):
            if self.server.started:
                return self
            if not self._thread.is_alive():
                break
            self._thread.join(0.01)
        self.__exit__()
        raise MinwmError(f"play: the server did not start on {self.host}:{self.port}")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(10)
        self.sock.close()
