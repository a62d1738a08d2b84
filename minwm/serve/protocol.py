"""The play WebSocket protocol: what a page may send, and how the server's messages are laid out.

Client -> server: one JSON object per text message, at most MAX_MESSAGE_BYTES, unknown fields rejected::

    {"type": "keys",   "keys": ["w", "l"], "seq": 7}   # the keys held now ([] = none); seq is echoed back
    {"type": "reset",  "prompt": "...", "seed": 0}     # restart the world; both fields optional
    {"type": "prompt", "prompt": "..."}                # set the prompt and restart the world with it
    {"type": "record", "on": true}                     # start / stop recording the session to mp4

Server -> client: JSON text for control ("hello", "error", "state", "recording"), and one binary
message per generated frame: a 4-byte big-endian header length, the header as UTF-8 JSON, then the
JPEG. Binary keeps a frame at its JPEG size (base64 would add a third) and needs no parse of the image.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from minwm.cameras.actions import KEYS
from minwm.errors import MinwmError

# Far above any message the page sends (a long prompt is a few KiB); anything larger is refused before
# it is parsed. uvicorn's own frame limit (server.WS_MAX_SIZE) sits above this, so an oversized message
# gets an error reply and the session goes on instead of the socket being dropped.
MAX_MESSAGE_BYTES = 64 * 1024
MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1
MAX_SEQ = 2**53 - 1          # exact in a JavaScript number
_HEADER = struct.Struct(">I")


class ProtocolError(MinwmError):
    """A client message that breaks the protocol; the server answers it with an "error" message."""


@dataclass(frozen=True)
class Keys:
    keys: frozenset[str]
    seq: int | None = None


@dataclass(frozen=True)
class Reset:
    prompt: str | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Prompt:
    prompt: str


@dataclass(frozen=True)
class Record:
    on: bool


ClientMessage = Keys | Reset | Prompt | Record

# type -> (required fields, optional fields)
_FIELDS = {
    "keys": ({"keys"}, {"seq"}),
    "reset": (set(), {"prompt", "seed"}),
    "prompt": ({"prompt"}, set()),
    "record": ({"on"}, set()),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _prompt(v, where: str) -> str:
    if not isinstance(v, str):
        raise ProtocolError(f"{where}: expected a string, got {type(v).__name__}")
    v = v.strip()
    if not v:
        raise ProtocolError(f"{where}: expected a non-empty prompt")
    if len(v) > MAX_PROMPT_CHARS:
        raise ProtocolError(f"{where}: prompt of {len(v)} characters, above the limit of {MAX_PROMPT_CHARS}")
    return v


def parse_client_message(raw: str | bytes | None) -> ClientMessage:
    """Validate one WebSocket message from a page; raise ProtocolError (one line) when it is not one."""
    if raw is None or isinstance(raw, (bytes, bytearray)):
        raise ProtocolError("expected a JSON text message, got binary data")
    size = len(raw.encode("utf-8", "surrogatepass"))
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {size} bytes, above the limit of {MAX_MESSAGE_BYTES}")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"message is not valid JSON ({str(e)[:80]})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a JSON object with a 'type', got {type(obj).__name__}")
    kind = obj.get("type")
    if kind not in _FIELDS:
        raise ProtocolError(f"type: expected one of {', '.join(sorted(_FIELDS))}, got {str(kind)[:40]!r}")
    required, optional = _FIELDS[kind]
    fields = set(obj) - {"type"}
    if required - fields:
        raise ProtocolError(f"{kind}: missing field '{sorted(required - fields)[0]}'")
    if fields - required - optional:
        raise ProtocolError(f"{kind}: unknown field '{str(sorted(fields - required - optional)[0])[:40]}'")

    if kind == "keys":
        keys = obj["keys"]
        if not isinstance(keys, list) or len(keys) > len(KEYS):
            raise ProtocolError(f"keys.keys: expected a list of at most {len(KEYS)} keys")
        for k in keys:
            if k not in KEYS:
                raise ProtocolError(f"keys.keys: expected keys among {' '.join(KEYS)}, got {str(k)[:20]!r}")
        seq = obj.get("seq")
        if seq is not None and not (_is_int(seq) and 0 <= seq <= MAX_SEQ):
            raise ProtocolError("keys.seq: expected an integer >= 0")
        return Keys(frozenset(keys), seq)
    if kind == "reset":
        prompt = obj.get("prompt")
        seed = obj.get("seed")
        if seed is not None and not (_is_int(seed) and 0 <= seed <= MAX_SEED):
            raise ProtocolError(f"reset.seed: expected an integer in [0, {MAX_SEED}] or null")
        return Reset(None if prompt is None else _prompt(prompt, "reset.prompt"), seed)
    if kind == "prompt":
        return Prompt(_prompt(obj["prompt"], "prompt.prompt"))
    if not isinstance(obj["on"], bool):
        raise ProtocolError("record.on: expected true or false")
    return Record(obj["on"])


def encode_frame(header: dict, jpeg: bytes) -> bytes:
    """A binary frame message: uint32 big-endian header length, UTF-8 JSON header, JPEG bytes."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return _HEADER.pack(len(head)) + head + bytes(jpeg)


def decode_frame(data: bytes) -> tuple[dict, bytes]:
    """Inverse of encode_frame (the page does the same in app.js; tests use this)."""
    if len(data) < _HEADER.size:
        raise ProtocolError(f"frame message of {len(data)} bytes is shorter than its header length")
    (n,) = _HEADER.unpack_from(data)
    if _HEADER.size + n > len(data):
        raise ProtocolError(f"frame header length {n} runs past the message ({len(data)} bytes)")
    return json.loads(data[_HEADER.size:_HEADER.size + n]), bytes(data[_HEADER.size + n:])


def error(message: str) -> dict:
    return {"type": "error", "message": " ".join(str(message).split())}
