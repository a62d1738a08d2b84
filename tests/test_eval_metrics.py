import math

import numpy as np
import pytest
import torch

from minwm.cameras import ActionConfig, Cameras, actions_to_cameras
from minwm.cameras.actions import _rot_y
from minwm.errors import MinwmError
from minwm.eval.metrics import camera_metrics, commanded_signs, direction_accuracy, direction_checks, psnr, ssim

K = (0.8, 0.8, 0.5, 0.5)


def cams_from(Rs, ts) -> Cameras:
    """Cameras from c2w rotations / centres (frame 0 first)."""
    c2w = torch.eye(4, dtype=torch.float64).repeat(len(Rs), 1, 1)
    c2w[:, :3, :3] = torch.stack([torch.as_tensor(R, dtype=torch.float64) for R in Rs])
    c2w[:, :3, 3] = torch.as_tensor(ts, dtype=torch.float64)
    return Cameras.from_c2w(c2w, K)


def test_identical_trajectories_score_zero_and_scale_does_not_matter():
    ref = actions_to_cameras("w*3,l*2,d*2", intrinsics=K)
    m = camera_metrics(ref, ref)
    assert m["rot_err"] == pytest.approx(0, abs=1e-6) and m["trans_err"] == pytest.approx(0, abs=1e-9)
    assert m["cam_mc"] == pytest.approx(0, abs=1e-6)
    # The same path at 7x the scale and in another world frame: still a perfect estimate.
    big = Cameras(ref.w2c.clone(), ref.intrinsics)
    big.w2c[:, :3, 3] *= 7
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = _rot_y(0.4)
    T[:3, 3] = torch.tensor([1.0, -2.0, 3.0])
    m = camera_metrics(big.transform_world(T), ref)
    assert m["trans_err"] == pytest.approx(0, abs=1e-6) and m["rot_err"] == pytest.approx(0, abs=1e-6)


def test_hand_computed_values():
    # Reference: frame 1 yawed by 10 degrees, frame 2 by 20; centres (0,0,0), (0,0,1), (0,0,2).
    # Estimate: every rotation off by 2 degrees about y except frame 0; centres (0,0,0), (1,0,0), (0,0,4).
    d = math.radians
    ref = cams_from([_rot_y(0), _rot_y(d(10)), _rot_y(d(20))], [[0, 0, 0], [0, 0, 1], [0, 0, 2]])
    est = cams_from([_rot_y(0), _rot_y(d(12)), _rot_y(d(22))], [[0, 0, 0], [1, 0, 0], [0, 0, 4]])
    m = camera_metrics(est, ref)
    assert m["rot_err"] == pytest.approx(2 * d(2), abs=1e-9)           # summed radians
    assert m["rot_err_deg"] == pytest.approx(2.0, abs=1e-6)            # mean over frames 1..
    # Normalised: ref t = (0,0,.5), (0,0,1); est t = (.25,0,0), (0,0,1) -> |.| = sqrt(.0625+.25) and 0.
    assert m["trans_err"] == pytest.approx(math.sqrt(0.0625 + 0.25), abs=1e-6)
    # CamMC per frame: sqrt(|dR|_F^2 + |dt|^2); |R_y(a) - R_y(b)|_F^2 = 8 sin^2((a-b)/2).
    dR2 = 8 * math.sin(d(1)) ** 2
    want = math.sqrt(dR2 + 0.3125) + math.sqrt(dR2)
    assert m["cam_mc"] == pytest.approx(want, abs=1e-6)
    assert m["per_frame"]["rot_deg"][0] == pytest.approx(0, abs=1e-6)


def test_relative_to_first_is_applied():
    # Both trajectories start somewhere else; only motion relative to frame 0 counts.
    ref = actions_to_cameras("l*3", intrinsics=K)
    shifted = cams_from([_rot_y(1.0)] * 4, [[5, 0, 0]] * 4)              # a still camera
    still = cams_from([np.eye(3)] * 4, [[0, 0, 0]] * 4)
    assert camera_metrics(shifted, still)["rot_err"] == pytest.approx(0, abs=1e-9)
    m = camera_metrics(still, ref)
    assert m["rot_err_deg"] == pytest.approx((3 + 6 + 9) / 3, abs=1e-6)
    assert m["trans_err"] == pytest.approx(0, abs=1e-9)                  # neither translates


def test_metric_errors():
    ref = actions_to_cameras("w*3", intrinsics=K)
    with pytest.raises(MinwmError, match="4 frames"):
        camera_metrics(ref, ref[:3])


def test_commanded_signs():
    assert commanded_signs(frozenset("w")) == {"forward": 1}
    assert commanded_signs(frozenset({"a", "l"})) == {"strafe": -1, "yaw": 1}
    assert commanded_signs(frozenset({"q", "k"})) == {"vertical": -1, "pitch": -1}
    assert commanded_signs(frozenset({"w", "s"})) == {}                  # opposite keys cancel
    assert commanded_signs(frozenset()) == {}


@pytest.mark.parametrize("prog", ["w*4", "s*4", "a*4", "d*4", "q*4", "e*4", "j*4", "l*4", "i*4", "k*4", "w+l*2,d+i*2"])
def test_direction_accuracy_of_the_commanded_path_is_one(prog):
    cfg = ActionConfig()
    latent = actions_to_cameras(prog, cfg, K)
    assert direction_accuracy(latent, prog) == 1.0
    # Pixel-rate trajectory (3 frames between latents, here just repeats shifted in time) and a scaled copy.
    scaled = Cameras(latent.w2c.clone(), latent.intrinsics)
    scaled.w2c[:, :3, 3] *= 0.01
    assert direction_accuracy(scaled, prog) == 1.0


def test_direction_accuracy_counts_wrong_signs():
    est = actions_to_cameras("w*2,s*2", intrinsics=K)
    assert direction_accuracy(est, "w*4") == 0.5
    checks = direction_checks(est, "w*4")
    assert [c["agree"] for c in checks] == [True, True, False, False]
    assert all(c["axis"] == "forward" for c in checks)
    still = actions_to_cameras("_*4", intrinsics=K)
    assert direction_accuracy(still, "l*4") == 0.0                       # no motion never agrees
    assert math.isnan(direction_accuracy(still, "_*4"))                  # nothing commanded


def test_direction_accuracy_frames_per_step():
    from minwm.worlds.trajectories import program_cameras
    cams = program_cameras("l*2,w*2", 17, K)                             # 4 pixel frames per step
    assert direction_accuracy(cams, "l*2,w*2") == 1.0
    assert direction_accuracy(cams, "l*2,w*2", frames_per_step=4) == 1.0
    with pytest.raises(MinwmError, match="do not split"):
        direction_accuracy(cams[:16], "l*2,w*2")


def test_psnr_known_values():
    a = np.zeros((2, 8, 8, 3), np.uint8)
    b = a.copy()
    b[0] = 10                                                            # MSE 100 -> 10 log10(255^2/100)
    b[1] = 255                                                           # MSE 255^2 -> 0 dB
    per = psnr(a, b, reduction="none")
    assert per[0].item() == pytest.approx(10 * math.log10(255 ** 2 / 100))
    assert per[1].item() == pytest.approx(0.0)
    assert psnr(a, b) == pytest.approx(per.mean().item())
    assert math.isinf(psnr(a, a))
    f = a.astype(np.float32) / 255
    assert psnr(f, f + 0.1) == pytest.approx(20.0, abs=1e-4)             # float range 1: 10 log10(1/0.01)
    with pytest.raises(MinwmError, match="shapes differ"):
        psnr(a, b[:1])


def test_ssim_known_values():
    # Two constant images p and q: sigma terms vanish, so SSIM = (2pq + C1) / (p^2 + q^2 + C1) exactly.
    p, q = 100, 140
    a = np.full((16, 16, 3), p, np.uint8)
    b = np.full((16, 16, 3), q, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * p * q + c1) / (p * p + q * q + c1), rel=1e-9)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    # Inverted noise is strongly anti-correlated: SSIM well below 0.
    assert ssim(x, 255 - x) < -0.5


def test_ssim_matches_a_direct_window_loop():
    """Independent check: one window position computed directly from the definition."""
    from minwm.eval.metrics import gaussian_window
    rng = np.random.default_rng(1)
    x = rng.random((11, 11, 1))
    y = np.clip(x + 0.2 * rng.standard_normal((11, 11, 1)), 0, 1)
    g = gaussian_window().numpy()
    w = np.outer(g, g)
    mx, my = (w * x[..., 0]).sum(), (w * y[..., 0]).sum()
    vx = (w * (x[..., 0] - mx) ** 2).sum()
    vy = (w * (y[..., 0] - my) ** 2).sum()
    cxy = (w * (x[..., 0] - mx) * (y[..., 0] - my)).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    want = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    assert ssim(x, y) == pytest.approx(want, rel=1e-9)
    with pytest.raises(MinwmError, match="smaller than"):
        ssim(x[:10], y[:10])
