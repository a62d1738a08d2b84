import math

import pytest
import torch

from minwm.cameras import ActionConfig, actions_to_cameras, cameras_to_actions, format_actions, parse_actions
from minwm.config import parse_config
from minwm.errors import MinwmError

CFG = ActionConfig()


def point_in_camera(cams, f: int, X) -> torch.Tensor:
    X = torch.tensor([*X, 1.0], dtype=torch.float64)
    return (cams.w2c[f] @ X)[:3]


def test_parse_grammar():
    steps = parse_actions("w*4,w+l*3,a*2")
    assert steps == [frozenset("w")] * 4 + [frozenset("wl")] * 3 + [frozenset("a")] * 2
    assert parse_actions(" W + L * 2 , u , dn, _*2 ") == [frozenset("wl")] * 2 + [frozenset("q"), frozenset("e")] + [frozenset()] * 2
    # "d" followed by "n" is the alias dn; "d" alone is right.
    assert parse_actions("d,dn,d+dn") == [frozenset("d"), frozenset("e"), frozenset("de")]


def test_format_actions_round_trips():
    for dsl in ["w*4,w+l*3,a*2", "_*3,i+j,k", "q,e*2,s+d+k"]:
        steps = parse_actions(dsl)
        assert parse_actions(format_actions(steps)) == steps
    assert format_actions(parse_actions("w,w,w,l+w")) == "w*3,w+l"


@pytest.mark.parametrize("dsl, msg", [
    ("w*", "actions: position 2: expected a repeat count after '*', got end of input"),
    ("x*3", "actions: position 0: expected a key (w s a d q e u dn j l i k _) at the start of a step, got 'x'"),
    ("w*-1", "actions: position 2: expected a repeat count after '*', got '-'"),
    ("w**2", "actions: position 2: expected a repeat count after '*', got '*'"),
    ("w*100000", "actions: position 2: repeat count 100000 takes the program to 100000 steps, above the cap of 4096"),
    ("", "actions: empty action string"),
    ("   ", "actions: empty action string"),
    ("w++a", "actions: position 2: expected a key (w s a d q e u dn j l i k _) after '+', got '+'"),
    ("w,", "actions: position 2: expected a key after ','"),
    ("w*0", "actions: position 2: expected a repeat count of at least 1"),
    ("w+w", "actions: position 2: key 'w' appears twice in one step"),
    ("w a", "actions: position 2: expected ',', '+', '*' or end of input, got 'a'"),
    ("_+w", "actions: position 0: '_' (no motion) cannot be joined"),
    ("w*4000,w*97", "actions: position 9: repeat count 97 takes the program to 4097 steps"),
])
def test_parse_errors(dsl, msg):
    with pytest.raises(MinwmError) as e:
        parse_actions(dsl)
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)


def test_cap_follows_config():
    assert len(parse_actions("w*4096")) == 4096
    with pytest.raises(MinwmError, match="above the cap of 10"):
        actions_to_cameras("w*11", ActionConfig(max_steps=10))


def test_one_camera_per_step_plus_start():
    cams = actions_to_cameras(parse_actions("w*3,_"), CFG, (0.5, 0.9, 0.5, 0.5))
    assert len(cams) == 5
    assert torch.equal(cams.w2c[0], torch.eye(4, dtype=torch.float64))
    assert torch.equal(cams.w2c[3], cams.w2c[4])                  # "_" holds still
    assert cams.intrinsics.tolist() == [[0.5, 0.9, 0.5, 0.5]] * 5


def test_forward_moves_along_plus_z():
    cams = actions_to_cameras("w*4")
    assert cams.positions[-1].tolist() == pytest.approx([0.0, 0.0, 4 * 0.08], abs=1e-12)
    # From a rotated start, "forward" is the start camera's own +z.
    start = actions_to_cameras("l*15,i*5")[-1]
    cams = actions_to_cameras("w*4", start=start)
    delta = cams.positions[-1] - cams.positions[0]
    assert torch.allclose(delta, start.c2w[0, :3, 2] * 0.32, atol=1e-12)
    assert torch.allclose(cams.c2w[-1, :3, :3], start.c2w[0, :3, :3], atol=1e-12)


def test_yaw_right_90_degrees():
    cams = actions_to_cameras("l*30")
    right = (1.0, 0.0, 0.0)                                       # on the start camera's right
    assert point_in_camera(cams, 0, right).tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-12)
    assert point_in_camera(cams, -1, right).tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-12)
    assert cams.positions[-1].abs().max() < 1e-12                 # turning in place
    # j turns the other way: the point on the left comes to the front.
    cams = actions_to_cameras("j*30")
    assert point_in_camera(cams, -1, (-1.0, 0.0, 0.0)).tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-12)


def test_pitch_up_and_down():
    up = (0.0, -1.0, 0.0)                                         # OpenCV: up is -y
    cams = actions_to_cameras("i*30")
    assert point_in_camera(cams, -1, up).tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-12)
    cams = actions_to_cameras("k*30")
    assert point_in_camera(cams, -1, (0.0, 1.0, 0.0)).tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-12)


def test_forward_and_yaw_together_apply_both_each_step():
    cams = actions_to_cameras("w+l*2")
    a = math.radians(3.0)
    # Step 1: forward 0.08 along +z, then turn 3 degrees; step 2: forward along the turned axis.
    expected = torch.tensor([0.08 * math.sin(a), 0.0, 0.08 + 0.08 * math.cos(a)], dtype=torch.float64)
    assert torch.allclose(cams.positions[-1], expected, atol=1e-12)
    assert cams.c2w[-1, :3, 2].tolist() == pytest.approx([math.sin(2 * a), 0.0, math.cos(2 * a)], abs=1e-12)
    assert len(cams) == 3


@pytest.mark.parametrize("key, direction", [("q", (0, -1, 0)), ("u", (0, -1, 0)), ("e", (0, 1, 0)),
                                            ("dn", (0, 1, 0)), ("a", (-1, 0, 0)), ("d", (1, 0, 0)),
                                            ("s", (0, 0, -1))])
def test_translations(key, direction):
    cams = actions_to_cameras(f"{key}*2")
    assert cams.positions[-1].tolist() == pytest.approx([0.16 * x for x in direction], abs=1e-12)


def test_step_sizes_from_config():
    cfg = parse_config({"actions": {"translation_step": 0.5, "rotation_step_deg": 45.0}}).actions
    assert isinstance(cfg, ActionConfig)
    cams = actions_to_cameras("w,l*2", cfg)
    assert cams.positions[-1].tolist() == pytest.approx([0.0, 0.0, 0.5])
    assert cams.c2w[-1, :3, 2].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-12)
    with pytest.raises(MinwmError, match="actions.translation_step: expected a number"):
        parse_config({"actions": {"translation_step": "big"}})


def test_cameras_to_actions_inverts():
    steps = parse_actions("w*3,w+l*2,a+i,_,s+e+k,j*2,q+d")
    assert cameras_to_actions(actions_to_cameras(steps)) == steps
    start = actions_to_cameras("l*7,i*3,w*2")[-1]
    assert cameras_to_actions(actions_to_cameras(steps, start=start)) == steps
