import pytest

from minwm.io import atomic_path, write_json


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_existing(tmp_path):
    target = tmp_path / "ckpt"
    for payload in ("a", "b"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "x").write_text(payload)
    assert (target / "x").read_text() == "b" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").read_text().strip().startswith("{")


def test_read_json_names_the_file_on_bad_input(tmp_path):
    from minwm.errors import MinwmError
    from minwm.io import read_json

    good = tmp_path / "a.json"
    good.write_text('{"x": [1, 2]}')
    assert read_json(good) == {"x": [1, 2]}
    bad = tmp_path / "b.json"
    bad.write_text("{not json")
    for path, needle in ((bad, "not valid JSON"), (tmp_path / "missing.json", "not found")):
        with pytest.raises(MinwmError) as e:
            read_json(path)
        assert str(path) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)
