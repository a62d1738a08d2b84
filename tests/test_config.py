import pytest

from minwm.config import parse_config
from minwm.errors import MinwmError


def test_unknown_section_and_key_are_one_line_errors():
    with pytest.raises(MinwmError, match="unknown section 'modle'"):
        parse_config({"modle": {}}, "x.yaml")
    with pytest.raises(MinwmError, match=r"model\.chunk_frame: unknown key"):
        parse_config({"model": {"chunk_frame": 4}}, "x.yaml")
    with pytest.raises(MinwmError, match=r"model\.chunk_frames: expected an integer"):
        parse_config({"model": {"chunk_frames": "four"}}, "x.yaml")


def test_nested_dataclass_and_validation():
    cfg = parse_config({"model": {"camera": {"kind": "plucker"}, "chunk_frames": 2}}, "x.yaml")
    assert cfg.model.camera.kind == "plucker" and cfg.model.chunk_frames == 2
    with pytest.raises(MinwmError, match="prope_layout"):
        parse_config({"model": {"camera": {"prope_layout": "weird"}}}, "x.yaml")
