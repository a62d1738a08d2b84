import math

import pytest
import torch

from minwm.cameras import Cameras, crop_intrinsics, latent_cameras, plucker_rays, resize_crop_intrinsics
from minwm.cameras.camera import invert_rigid
from minwm.errors import MinwmError


def random_cameras(F: int, seed: int = 0) -> Cameras:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(F, 3, 3, generator=g, dtype=torch.float64))
    Q = Q * torch.linalg.det(Q).sign()[:, None, None]      # det +1
    w2c = torch.eye(4, dtype=torch.float64).repeat(F, 1, 1)
    w2c[:, :3, :3] = Q
    w2c[:, :3, 3] = torch.randn(F, 3, generator=g, dtype=torch.float64)
    K = torch.tensor([0.6, 1.0, 0.47, 0.52], dtype=torch.float64)
    return Cameras(w2c, K).validate()


def test_inverse_and_relative_to_first():
    cams = random_cameras(5)
    assert torch.allclose(cams.inverse() @ cams.w2c, torch.eye(4, dtype=torch.float64).expand(5, 4, 4), atol=1e-12)
    rel = cams.relative_to_first()
    assert torch.allclose(rel.w2c[0], torch.eye(4, dtype=torch.float64), atol=1e-12)
    # Relative poses between frames are unchanged.
    a = cams.w2c[3] @ invert_rigid(cams.w2c[1])
    b = rel.w2c[3] @ invert_rigid(rel.w2c[1])
    assert torch.allclose(a, b, atol=1e-12)


def project(cams: Cameras, X: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Pixel coordinates [F, 2] of world point X [3]."""
    Xc = cams.w2c[:, :3, :3] @ X + cams.w2c[:, :3, 3]
    uv = (cams.K_pixels(H, W) @ Xc[..., None])[..., 0]
    return uv[:, :2] / uv[:, 2:]


def test_resize_keeps_normalised_intrinsics_and_projection():
    cams = random_cameras(2)
    X = cams.positions[0] + cams.c2w[0, :3, 2] * 3 + cams.c2w[0, :3, 0] * 0.4
    uv_big = project(cams.resized()[:1], X, 480, 832)
    uv_small = project(cams.resized()[:1], X, 240, 416)
    assert torch.allclose(uv_big / 2, uv_small, atol=1e-9)


def test_center_crop_moves_principal_point_and_keeps_pixels():
    cams = random_cameras(1)
    H, W, h, w = 480, 832, 480, 480
    X = cams.positions[0] + cams.c2w[0, :3, 2] * 3 + cams.c2w[0, :3, 0] * 0.2
    uv = project(cams, X, H, W)
    cropped = cams.center_cropped((H, W), (h, w))
    uv_c = project(cropped, X, h, w)
    # The same world point lands on the same source pixel, shifted by the crop offset.
    assert torch.allclose(uv_c, uv - torch.tensor([(W - w) / 2, (H - h) / 2], dtype=torch.float64), atol=1e-9)
    fx, fy, cx, cy = cropped.intrinsics[0].tolist()
    assert fx == pytest.approx(0.6 * W / w) and fy == pytest.approx(1.0)
    assert cx == pytest.approx((0.47 * W - (W - w) / 2) / w)
    with pytest.raises(MinwmError, match="fit inside"):
        crop_intrinsics(cams.intrinsics, (H, W), (H + 1, w))


def test_resize_then_center_crop():
    K = torch.tensor([0.5, 0.5 * 16 / 9, 0.5, 0.5], dtype=torch.float64)
    out = resize_crop_intrinsics(K, (720, 1280), (256, 256))
    # 720x1280 -> 256x455.1 -> crop 256x256: horizontal focal in pixels 0.5*455.1, over 256.
    assert out[0].item() == pytest.approx(0.5 * 1280 * (256 / 720) / 256)
    assert out[1].item() == pytest.approx(K[1].item())
    assert out[2:].tolist() == pytest.approx([0.5, 0.5])


def test_latent_cameras_picks_every_fourth_frame():
    cams = random_cameras(13)
    lat = latent_cameras(cams)
    assert len(lat) == 4
    for i in range(4):
        assert torch.equal(lat.w2c[i], cams.w2c[4 * i])
    assert len(latent_cameras(cams[:1])) == 1
    with pytest.raises(MinwmError, match="expected 1 \\+ 4\\*k"):
        latent_cameras(cams[:12])


def test_plucker_rays_geometry():
    cams = random_cameras(3)
    H, W = 5, 7
    P = plucker_rays(cams, H, W, dtype=torch.float64)
    assert P.shape == (3, 6, H, W)
    m, d = P[:, :3], P[:, 3:]
    assert torch.allclose(d.norm(dim=1), torch.ones(3, H, W, dtype=torch.float64), atol=1e-12)
    o = cams.positions[:, :, None, None]
    # Each moment is o x d, so it is orthogonal to d and to o.
    assert torch.allclose(torch.linalg.cross(o.expand_as(d), d, dim=1), m, atol=1e-12)
    # A point along the ray of pixel (row 1, col 4) projects back onto that pixel's centre.
    X = cams.positions + 2.5 * d[:, :, 1, 4]
    for f in range(3):
        uv = project(cams[f], X[f], H, W)[0]
        assert torch.allclose(uv, torch.tensor([4.5, 1.5], dtype=torch.float64), atol=1e-9)


def test_plucker_rays_at_the_principal_point_look_forward():
    cams = Cameras(torch.eye(4).expand(1, 4, 4), torch.tensor([0.5, 0.5, 0.5, 0.5]))
    P = plucker_rays(cams, 2, 2)            # the principal point lies between the four pixel centres
    d = P[0, 3:].reshape(3, 4)
    assert torch.allclose(d.mean(1), torch.tensor([0.0, 0.0, d[2].mean().item()]), atol=1e-6)
    # Pixel (0, 0) is up-left of centre: -x and -y in OpenCV axes.
    assert P[0, 3, 0, 0] < 0 and P[0, 4, 0, 0] < 0 and P[0, 5, 0, 0] > 0
    expected = torch.tensor([-0.5, -0.5, 1.0]) / math.sqrt(1.5)
    assert torch.allclose(P[0, 3:, 0, 0], expected, atol=1e-6)
    assert torch.allclose(P[0, :3], torch.zeros(3, 2, 2))  # camera at the origin: zero moment


def test_standing_still_keeps_intrinsics_and_puts_every_frame_at_the_start():
    from minwm.cameras.camera import standing_still
    from minwm.inference.config import InferenceConfig

    w2c = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    K = torch.rand(2, 3, 4)
    still, K2 = standing_still((w2c, K))
    assert still.shape == w2c.shape and still.dtype == w2c.dtype and K2 is K
    assert torch.equal(still, torch.eye(4, dtype=torch.float64).expand(2, 3, 4, 4))
    assert standing_still(None) is None
    assert InferenceConfig().uncond_cameras((w2c, K))[0] is w2c                     # off: the same cameras
    assert torch.equal(InferenceConfig(camera_guidance=True).uncond_cameras((w2c, K))[0], still)
