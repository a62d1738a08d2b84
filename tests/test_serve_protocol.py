"""Play protocol validation, frame message layout, pacing and the mp4 recorder."""

import json

import av
import cv2
import numpy as np
import pytest

from minwm.serve import protocol
from minwm.serve.protocol import Keys, Prompt, ProtocolError, Record, Reset, parse_client_message
from minwm.serve.recording import Mp4Recorder
from minwm.serve.session import SessionOptions, action_string, encode_jpeg, next_start
from minwm.errors import MinwmError


def test_valid_messages_parse():
    assert parse_client_message('{"type": "keys", "keys": ["w", "l"], "seq": 3}') == Keys(frozenset("wl"), 3)
    assert parse_client_message('{"type": "keys", "keys": []}') == Keys(frozenset(), None)
    assert parse_client_message('{"type": "reset"}') == Reset(None, None)
    assert parse_client_message('{"type": "reset", "prompt": " a street ", "seed": 7}') == Reset("a street", 7)
    assert parse_client_message('{"type": "reset", "seed": null}') == Reset(None, None)
    assert parse_client_message('{"type": "prompt", "prompt": "a beach"}') == Prompt("a beach")
    assert parse_client_message('{"type": "record", "on": false}') == Record(False)


@pytest.mark.parametrize("raw, words", [
    (b"\x00\x01", "binary"),
    (None, "binary"),
    ("not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"keys": ["w"]}', "type"),
    ('{"type": "fly"}', "type"),
    ('{"type": "keys"}', "missing field 'keys'"),
    ('{"type": "keys", "keys": ["w"], "extra": 1}', "unknown field 'extra'"),
    ('{"type": "keys", "keys": "w"}', "list"),
    ('{"type": "keys", "keys": ["x"]}', "'x'"),
    ('{"type": "keys", "keys": ["W"]}', "'W'"),
    ('{"type": "keys", "keys": [1]}', "expected keys"),
    ('{"type": "keys", "keys": ["w"], "seq": -1}', "seq"),
    ('{"type": "keys", "keys": ["w"], "seq": true}', "seq"),
    ('{"type": "reset", "seed": 1.5}', "reset.seed"),
    ('{"type": "reset", "seed": 4294967296}', "reset.seed"),
    ('{"type": "reset", "prompt": 3}', "reset.prompt"),
    ('{"type": "prompt", "prompt": "   "}', "non-empty"),
    ('{"type": "prompt", "prompt": "' + "x" * 2001 + '"}', "limit of 2000"),
    ('{"type": "record", "on": 1}', "record.on"),
    ("[" * 100000, "above the limit"),
    ('{"type": "prompt", "prompt": "' + "é" * 40000 + '"}', "bytes, above the limit"),
])
def test_bad_messages_are_refused_with_one_line(raw, words):
    with pytest.raises(ProtocolError) as e:
        parse_client_message(raw)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and len(msg) < 200


def test_deeply_nested_json_under_the_size_limit_is_refused_not_crashing():
    with pytest.raises(ProtocolError, match="JSON"):
        parse_client_message("[" * 60000)


def test_frame_message_round_trips():
    header = {"index": 12, "keys": "w+l", "seq": None, "step_ms": 3.5}
    data = protocol.encode_frame(header, b"\xff\xd8jpeg")
    assert int.from_bytes(data[:4], "big") == len(json.dumps(header, separators=(",", ":")))
    assert protocol.decode_frame(data) == (header, b"\xff\xd8jpeg")
    with pytest.raises(ProtocolError):
        protocol.decode_frame(data[:3])
    with pytest.raises(ProtocolError):
        protocol.decode_frame(b"\x00\x00\x10\x00{}")


def test_action_string_is_the_action_language():
    assert action_string(frozenset({"l", "w"})) == "w+l"
    assert action_string(frozenset()) == "_"
    assert action_string(frozenset({"k", "j", "a"})) == "a+j+k"


def test_next_start_is_just_in_time():
    # 16 frames at 16 fps = 1 s of video; a 0.3 s step starts 0.7 s after the last chunk was ready.
    assert next_start(10.0, 0.3, 1.0) == pytest.approx(10.7)
    # Slower than real time: the next chunk is already late, so it starts at once.
    assert next_start(10.0, 1.5, 1.0) < 10.0


def test_jpeg_encoding_keeps_colours_in_rgb_order():
    frame = np.zeros((16, 24, 3), np.uint8)
    frame[..., 0] = 200                      # red
    back = cv2.imdecode(np.frombuffer(encode_jpeg(frame, 90), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    assert back.shape == (16, 24, 3)
    assert abs(int(back[..., 0].mean()) - 200) < 4 and back[..., 2].mean() < 4


def test_session_options_are_checked():
    with pytest.raises(MinwmError, match="idle"):
        SessionOptions(idle="spin")
    with pytest.raises(MinwmError, match="jpeg_quality"):
        SessionOptions(jpeg_quality=0)


def _read_mp4(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_recorder_writes_an_mp4_of_odd_sized_frames(tmp_path):
    path = tmp_path / "rec" / "a.mp4"
    rec = Mp4Recorder(path, fps=16)
    frames = np.zeros((5, 17, 23, 3), np.uint8)
    frames[:, :, :, 1] = np.arange(5, dtype=np.uint8)[:, None, None] * 50
    rec.append(frames[:2])
    rec.append(frames[2])                    # a single [H, W, 3] frame
    rec.append(frames[3:])
    assert not path.exists()                 # only the finished file appears
    assert rec.close() == path
    back = _read_mp4(path)
    assert back.shape == (5, 18, 24, 3)      # padded to even sides for yuv420p
    assert np.abs(back[:, :17, :23, 1].astype(int).mean(axis=(1, 2)) - frames[:, 0, 0, 1]).max() < 6
    assert list(path.parent.iterdir()) == [path]


def test_recorder_refuses_bad_frames_and_leaves_nothing_when_empty(tmp_path):
    rec = Mp4Recorder(tmp_path / "b.mp4", fps=12.5)
    with pytest.raises(MinwmError, match="uint8"):
        rec.append(np.zeros((4, 4, 3), np.float32))
    rec.append(np.zeros((4, 6, 3), np.uint8))
    with pytest.raises(MinwmError, match="differs"):
        rec.append(np.zeros((6, 6, 3), np.uint8))
    rec.abort()
    assert list(tmp_path.iterdir()) == []
    empty = Mp4Recorder(tmp_path / "c.mp4", fps=16)
    assert empty.close() is None
    assert list(tmp_path.iterdir()) == []
