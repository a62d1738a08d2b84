import json
import math
from pathlib import Path

import pytest
import torch

from minwm.cameras import Cameras, detect_format, load_cameras, save_cameras
from minwm.cameras.nerfstudio import parse_nerfstudio
from minwm.errors import MinwmError

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "re10k").glob("*.txt"))


def assert_same(a: Cameras, b: Cameras, tol: float = 1e-6):
    assert len(a) == len(b)
    assert (a.w2c - b.w2c).abs().max() <= tol
    assert (a.intrinsics - b.intrinsics).abs().max() <= tol


def read_rows(path: Path) -> list[list[float]]:
    return [[float(x) for x in ln.split()] for ln in path.read_text().splitlines()[1:] if ln.strip()]


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_re10k_fixture_loads(path):
    assert len(FIXTURES) == 2
    cams, meta = load_cameras(path)
    rows = read_rows(path)
    assert meta["format"] == "re10k" and meta["source"].startswith("https://www.youtube.com/")
    assert len(cams) == len(rows) == 16
    assert meta["timestamps_us"] == [int(r[0]) for r in rows]
    assert torch.allclose(cams.w2c[:, :3].reshape(-1, 12), torch.tensor(rows, dtype=torch.float64)[:, 7:])
    assert torch.allclose(cams.intrinsics, torch.tensor(rows, dtype=torch.float64)[:, 1:5])


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_re10k_to_json_to_re10k_round_trip(path, tmp_path):
    cams, meta = load_cameras(path)
    save_cameras(tmp_path / "c.json", cams, meta=meta)
    mid, mid_meta = load_cameras(tmp_path / "c.json")
    assert mid_meta["format"] == "json" and mid_meta["source"] == meta["source"]
    save_cameras(tmp_path / "back.txt", mid, meta=mid_meta)
    back, back_meta = load_cameras(tmp_path / "back.txt")
    assert_same(cams, back)
    assert back_meta["timestamps_us"] == meta["timestamps_us"] and back_meta["source"] == meta["source"]
    # Every number of every row comes back (URL line included).
    assert (tmp_path / "back.txt").read_text().splitlines()[0] == path.read_text().splitlines()[0]
    a, b = torch.tensor(read_rows(path)), torch.tensor(read_rows(tmp_path / "back.txt"))
    assert (a - b).abs().max() <= 1e-6


def nerfstudio_doc(cams: Cameras, H: int, W: int, per_frame: bool = False) -> dict:
    gl = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
    frames = []
    for i in range(len(cams)):
        fr = {"file_path": f"images/{i:03d}.jpg", "transform_matrix": (cams.c2w[i] @ gl).tolist(), "colmap_im_id": i}
        if per_frame:
            k = cams.intrinsics[i]
            fr.update(fl_x=k[0].item() * W, fl_y=k[1].item() * H, cx=k[2].item() * W, cy=k[3].item() * H, w=W, h=H)
        frames.append(fr)
    doc = {"camera_model": "OPENCV", "k1": 0.01, "frames": frames}
    if not per_frame:
        k = cams.intrinsics[0]
        doc.update(fl_x=k[0].item() * W, fl_y=k[1].item() * H, cx=k[2].item() * W, cy=k[3].item() * H, w=W, h=H)
    return doc


@pytest.mark.parametrize("per_frame", [False, True])
def test_nerfstudio_to_json_to_nerfstudio_round_trip(tmp_path, per_frame):
    cams, _ = load_cameras(FIXTURES[0])
    if per_frame:
        cams = Cameras(cams.w2c, cams.intrinsics * torch.linspace(1.0, 1.1, len(cams), dtype=torch.float64)[:, None])
    src = tmp_path / "transforms.json"
    src.write_text(json.dumps(nerfstudio_doc(cams, 540, 960, per_frame)))
    assert detect_format(src) == "nerfstudio" and detect_format(tmp_path) == "nerfstudio"
    ns, meta = load_cameras(src)
    assert_same(cams, ns)
    assert meta["image_size"] == [540, 960] and meta["file_paths"][2] == "images/002.jpg"
    save_cameras(tmp_path / "c.json", ns, meta=meta)
    mid, mid_meta = load_cameras(tmp_path / "c.json")
    save_cameras(tmp_path / "out" / "transforms.json", mid, meta=mid_meta)
    back, _ = load_cameras(tmp_path / "out" / "transforms.json")
    assert_same(cams, back)
    a = json.loads(src.read_text())
    b = json.loads((tmp_path / "out" / "transforms.json").read_text())
    for fa, fb in zip(a["frames"], b["frames"]):
        assert fa["file_path"] == fb["file_path"]
        assert torch.allclose(torch.tensor(fa["transform_matrix"]), torch.tensor(fb["transform_matrix"]), atol=1e-6)
    for k in ("fl_x", "fl_y", "cx", "cy", "w", "h"):
        va = a[k] if not per_frame else a["frames"][3][k]
        vb = b[k] if not per_frame else b["frames"][3][k]
        assert va == pytest.approx(vb, abs=1e-6)
    # Keys we do not interpret survive when the path goes straight from nerfstudio to nerfstudio.
    save_cameras(tmp_path / "direct" / "transforms.json", ns, meta=meta)
    c = json.loads((tmp_path / "direct" / "transforms.json").read_text())
    assert c["k1"] == 0.01 and c["frames"][4]["colmap_im_id"] == 4


def test_opengl_camera_looking_down_minus_z_looks_down_plus_z_in_opencv():
    # OpenGL camera at (0, 0, 5) with identity rotation looks down world -z, towards the origin.
    doc = {"fl_x": 500, "fl_y": 500, "cx": 320, "cy": 240, "w": 640, "h": 480,
           "frames": [{"file_path": "a.png", "transform_matrix": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 5], [0, 0, 0, 1]]}]}
    cams, _ = parse_nerfstudio(doc)
    origin = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    assert (cams.w2c[0] @ origin)[2].item() == pytest.approx(5.0)          # in front: positive camera z
    assert cams.c2w[0, :3, 2].tolist() == pytest.approx([0.0, 0.0, -1.0])   # view direction is world -z
    # World +y (OpenGL up) is camera -y (OpenCV: y down): a point above is above in the image.
    above = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    assert (cams.w2c[0] @ above)[1].item() < 0
    assert cams.intrinsics[0].tolist() == pytest.approx([500 / 640, 500 / 480, 0.5, 0.5])


def test_nerfstudio_camera_angle_x():
    M = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    cams, meta = parse_nerfstudio({"camera_angle_x": math.radians(90), "frames": [{"transform_matrix": M}]})
    assert cams.intrinsics[0].tolist() == pytest.approx([0.5, 0.5, 0.5, 0.5])   # square (NeRF-synthetic)
    cams, meta = parse_nerfstudio({"camera_angle_x": math.radians(90), "w": 800, "h": 400,
                                   "frames": [{"transform_matrix": M}]})
    assert cams.intrinsics[0].tolist() == pytest.approx([0.5, 1.0, 0.5, 0.5]) and meta["image_size"] == [400, 800]
    cams, _ = parse_nerfstudio({"camera_angle_x": math.radians(90), "camera_angle_y": math.radians(60),
                                "frames": [{"transform_matrix": M}]})
    assert cams.intrinsics[0, 1].item() == pytest.approx(0.5 / math.tan(math.radians(30)))


def test_nerfstudio_export_needs_image_size(tmp_path):
    cams, meta = load_cameras(FIXTURES[0])
    with pytest.raises(MinwmError, match="image size"):
        save_cameras(tmp_path / "transforms.json", cams, "nerfstudio", meta)
    assert not (tmp_path / "transforms.json").exists()
    save_cameras(tmp_path / "transforms.json", cams, "nerfstudio", meta, image_size=(360, 640))
    back, m = load_cameras(tmp_path / "transforms.json")
    assert_same(cams, back) and m["image_size"] == [360, 640]


def write_lines(tmp_path, rows: list[str]) -> Path:
    p = tmp_path / "bad.txt"
    p.write_text("https://example.com/v\n" + "\n".join(rows) + "\n")
    return p


GOOD = FIXTURES[0].read_text().splitlines()[1] if FIXTURES else ""


@pytest.mark.parametrize("row, match", [
    (" ".join(GOOD.split()[:-1]), r"bad\.txt:3: expected 19 columns .* got 18"),
    (" ".join(GOOD.split()[:5] + ["nan"] + GOOD.split()[6:]), r"bad\.txt:3: column 6: non-finite value 'nan'"),
    (" ".join(GOOD.split()[:10] + ["inf"] + GOOD.split()[11:]), r"bad\.txt:3: column 11: non-finite"),
    (" ".join(GOOD.split()[:7] + ["0.9"] + GOOD.split()[8:]), r"bad\.txt:3: rotation .* not orthonormal"),
    (" ".join(GOOD.split()[:3] + ["x"] + GOOD.split()[4:]), r"bad\.txt:3: column 4: expected a number, got 'x'"),
])
def test_re10k_bad_rows(tmp_path, row, match):
    p = write_lines(tmp_path, [GOOD, row])
    with pytest.raises(MinwmError, match=match) as e:
        load_cameras(p)
    assert "\n" not in str(e.value)


def test_re10k_small_rotation_error_is_accepted(tmp_path):
    cols = GOOD.split()
    cols[7] = f"{float(cols[7]) + 5e-4:.9f}"       # within the 1e-3 tolerance
    load_cameras(write_lines(tmp_path, [" ".join(cols)]))


@pytest.mark.parametrize("doc, match", [
    ({"frames": [{"transform_matrix": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]}]},
     r"frames\[0\]: no intrinsics \(expected fl_x"),
    ({"fl_x": 500, "frames": [{"transform_matrix": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]}]},
     r"frames\[0\]: fl_x needs the image size w and h"),
    ({"camera_angle_x": 1.0, "frames": [{"transform_matrix": [[1, 0, 0], [0, 1, 0]]}]},
     r"frames\[0\]\.transform_matrix: expected a 4x4"),
    ({"camera_angle_x": 1.0, "frames": [{"transform_matrix": [[2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]}]},
     r"frames\[0\]\.transform_matrix: rotation is not orthonormal"),
    ({"camera_angle_x": 1.0, "frames": []}, r"frames: expected a non-empty list"),
])
def test_nerfstudio_bad_files(tmp_path, doc, match):
    p = tmp_path / "transforms.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(MinwmError, match=match):
        load_cameras(p, "nerfstudio")


def test_json_schema_errors(tmp_path):
    cams, meta = load_cameras(FIXTURES[0])
    save_cameras(tmp_path / "c.json", cams, meta=meta)
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["format"] == "minwm.cameras/1" and len(doc["frames"][0]["w2c"]) == 4
    cases = [
        (lambda d: d.update(colour=1), r"colour: unknown key"),
        (lambda d: d["frames"][2].update(w2c=[[1, 0, 0], [0, 1, 0]]), r"frames\[2\]\.w2c: expected a 4x4 list"),
        (lambda d: d["frames"][1].update(intrinsics=[0.5, -1, 0.5, 0.5]), r"frames\[1\]\.intrinsics: focal"),
        (lambda d: d["frames"][1].pop("timestamp_us"), r"frames\[1\]: missing timestamp_us"),
        (lambda d: d.update(format="minwm.cameras/9"), r"format: expected 'minwm.cameras/1'"),
    ]
    for edit, match in cases:
        d = json.loads(json.dumps(doc))
        edit(d)
        (tmp_path / "e.json").write_text(json.dumps(d))
        with pytest.raises(MinwmError, match=match):
            load_cameras(tmp_path / "e.json", "json")
    (tmp_path / "nan.json").write_text((tmp_path / "c.json").read_text().replace("0.5", "NaN", 1))
    with pytest.raises(MinwmError, match="non-finite"):
        load_cameras(tmp_path / "nan.json")


def test_detect_format_errors(tmp_path):
    with pytest.raises(MinwmError, match="file not found"):
        load_cameras(tmp_path / "missing.txt")
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(MinwmError, match="cannot tell the camera format"):
        load_cameras(tmp_path / "x.json")
