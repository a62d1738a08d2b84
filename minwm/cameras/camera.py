"""The one camera type: per-frame world-to-camera 4x4 (OpenCV axes: x right, y down, z forward) and
intrinsics normalised by image size (fx/W, fy/H, cx/W, cy/H), so they survive resizing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from minwm.errors import MinwmError

ORTHONORMAL_TOL = 1e-3


@dataclass(frozen=True)
class Cameras:
    """A trajectory of F cameras.

    w2c:        [F, 4, 4] float64, world-to-camera, OpenCV axes.
    intrinsics: [F, 4] float64, (fx/W, fy/H, cx/W, cy/H).
    """

    w2c: torch.Tensor
    intrinsics: torch.Tensor

    def __post_init__(self):
        w2c = torch.as_tensor(self.w2c, dtype=torch.float64)
        K = torch.as_tensor(self.intrinsics, dtype=torch.float64)
        if K.ndim == 1:
            K = K.expand(w2c.shape[0], 4).clone()
        object.__setattr__(self, "w2c", w2c)
        object.__setattr__(self, "intrinsics", K)

    # ---- construction and checks -------------------------------------------------------------
    @classmethod
    def from_c2w(cls, c2w: torch.Tensor, intrinsics: torch.Tensor) -> "Cameras":
        return cls(invert_rigid(torch.as_tensor(c2w, dtype=torch.float64)), intrinsics)

    def validate(self, where: str = "cameras") -> "Cameras":
        """Raise a one-line MinwmError naming `where` if shapes, finiteness or rotations are wrong."""
        F = self.w2c.shape[0] if self.w2c.ndim == 3 else -1
        if self.w2c.ndim != 3 or self.w2c.shape[1:] != (4, 4):
            raise MinwmError(f"{where}: w2c has shape {tuple(self.w2c.shape)}, expected [F, 4, 4]")
        if tuple(self.intrinsics.shape) != (F, 4):
            raise MinwmError(f"{where}: intrinsics have shape {tuple(self.intrinsics.shape)}, expected [{F}, 4]")
        if F == 0:
            raise MinwmError(f"{where}: no cameras")
        for name, t in (("w2c", self.w2c), ("intrinsics", self.intrinsics)):
            bad = (~torch.isfinite(t)).flatten(1).any(1).nonzero()
            if len(bad):
                raise MinwmError(f"{where}: frame {int(bad[0])}: non-finite value in {name}")
        bad = (self.intrinsics[:, :2] <= 0).any(1).nonzero()
        if len(bad):
            raise MinwmError(f"{where}: frame {int(bad[0])}: focal lengths must be positive")
        bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
        bad = (self.w2c[:, 3] - bottom).abs().amax(1).gt(1e-6).nonzero()
        if len(bad):
            raise MinwmError(f"{where}: frame {int(bad[0])}: last row of w2c must be [0, 0, 0, 1]")
        i = orthonormal_violation(self.w2c[:, :3, :3])
        if i is not None:
            raise MinwmError(f"{where}: frame {i}: rotation is not orthonormal with det +1 (tolerance {ORTHONORMAL_TOL})")
        return self

    # ---- basic algebra -----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.w2c.shape[0]

    def __getitem__(self, idx) -> "Cameras":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        return Cameras(self.w2c[idx], self.intrinsics[idx])

    @property
    def c2w(self) -> torch.Tensor:
        return invert_rigid(self.w2c)

    @property
    def positions(self) -> torch.Tensor:
        """Camera centres in world coordinates, [F, 3]."""
        return self.c2w[:, :3, 3]

    def relative_to_first(self) -> "Cameras":
        """Re-express the trajectory in the first camera's frame: w2c_0 becomes the identity."""
        return Cameras(self.w2c @ invert_rigid(self.w2c[:1]), self.intrinsics)

    def transform_world(self, T: torch.Tensor) -> "Cameras":
        """Apply a rigid transform T (new_world <- old_world) to the world: w2c' = w2c T^-1."""
        return Cameras(self.w2c @ invert_rigid(torch.as_tensor(T, dtype=torch.float64)), self.intrinsics)

    def K_pixels(self, height: int, width: int) -> torch.Tensor:
        """3x3 pixel intrinsics [F, 3, 3] for an image of the given size."""
        fx, fy, cx, cy = self.intrinsics.unbind(-1)
        K = torch.zeros(len(self), 3, 3, dtype=torch.float64)
        K[:, 0, 0], K[:, 1, 1] = fx * width, fy * height
        K[:, 0, 2], K[:, 1, 2] = cx * width, cy * height
        K[:, 2, 2] = 1.0
        return K

    def to(self, dtype: torch.dtype = torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(w2c, intrinsics) as tensors for a model."""
        return self.w2c.to(device=device, dtype=dtype), self.intrinsics.to(device=device, dtype=dtype)

    @staticmethod
    def cat(items: list["Cameras"]) -> "Cameras":
        return Cameras(torch.cat([c.w2c for c in items]), torch.cat([c.intrinsics for c in items]))

    # ---- image-geometry changes --------------------------------------------------------------
    def inverse(self) -> torch.Tensor:
        """Camera-to-world [F, 4, 4] (the exact rigid inverse of w2c); same as `c2w`."""
        return invert_rigid(self.w2c)

    def resized(self) -> "Cameras":
        """Cameras after a plain resize (any aspect change included): normalised intrinsics scale with
        the image, so nothing changes. Exists so call sites say what they did."""
        return Cameras(self.w2c, self.intrinsics.clone())

    def center_cropped(self, src_hw: tuple[int, int], crop_hw: tuple[int, int]) -> "Cameras":
        """Cameras after cutting the centred crop_hw window out of src_hw images."""
        return Cameras(self.w2c, crop_intrinsics(self.intrinsics, src_hw, crop_hw))

    def resize_center_cropped(self, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> "Cameras":
        """Cameras after the usual video preprocessing: scale so dst_hw is covered, then centre-crop."""
        return Cameras(self.w2c, resize_crop_intrinsics(self.intrinsics, src_hw, dst_hw))


def standing_still(cameras: Optional[tuple[torch.Tensor, torch.Tensor]]
                   ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Model camera input (w2c [..., F, 4, 4], intrinsics [..., F, 4]), relative to the first frame, with every
    frame put back at the first frame's camera (identity w2c; intrinsics kept): "the camera does not move".
    The unconditional branch of camera guidance and the no-camera baseline of evaluation. None stays None."""
    if cameras is None:
        return None
    w2c, K = cameras
    eye = torch.eye(4, dtype=w2c.dtype, device=w2c.device)
    return eye.expand(w2c.shape).clone(), K


def crop_intrinsics(intrinsics: torch.Tensor, src_hw: tuple[int, int], crop_hw: tuple[int, int],
                    offset_yx: tuple[float, float] | None = None) -> torch.Tensor:
    """Normalised intrinsics [..., 4] after cropping a crop_hw window (top-left at offset_yx pixels,
    centred when None) out of a src_hw image. Pixel focal lengths stay, the principal point shifts by
    the offset, and everything is re-normalised by the smaller image."""
    (H, W), (h, w) = src_hw, crop_hw
    if not (0 < h <= H and 0 < w <= W):
        raise MinwmError(f"crop: size {h}x{w} must be positive and fit inside {H}x{W}")
    oy, ox = offset_yx if offset_yx is not None else ((H - h) / 2, (W - w) / 2)
    K = torch.as_tensor(intrinsics, dtype=torch.float64)
    fx, fy, cx, cy = K.unbind(-1)
    return torch.stack([fx * W / w, fy * H / h, (cx * W - ox) / w, (cy * H - oy) / h], -1)


def resize_crop_intrinsics(intrinsics: torch.Tensor, src_hw: tuple[int, int],
                           dst_hw: tuple[int, int]) -> torch.Tensor:
    """Normalised intrinsics after scaling src_hw by max(h/H, w/W) (aspect kept, dst covered) and
    centre-cropping to dst_hw. The resize leaves normalised intrinsics alone; only the crop counts."""
    (H, W), (h, w) = src_hw, dst_hw
    s = max(h / H, w / W)
    return crop_intrinsics(intrinsics, (H * s, W * s), (h, w))


def latent_cameras(cams: Cameras, temporal_factor: int = 4) -> Cameras:
    """The camera of each latent frame of a causal temporal VAE that maps 1 + t*k pixel frames to
    1 + k latents: latent 0 is pixel frame 0 alone and latent i summarises pixel frames t*i-t+1 .. t*i;
    DESIGN.md fixes its camera as that of pixel frame t*i (the group's last frame)."""
    F = len(cams)
    if temporal_factor < 1 or (F - 1) % temporal_factor != 0:
        raise MinwmError(f"latent_cameras: {F} frames, expected 1 + {temporal_factor}*k for a temporal "
                         f"factor of {temporal_factor}")
    return cams[::temporal_factor]


def invert_rigid(T: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid 4x4 transforms [..., 4, 4] (exact: R^T, -R^T t)."""
    R, t = T[..., :3, :3], T[..., :3, 3:]
    out = torch.zeros_like(T)
    out[..., :3, :3] = R.transpose(-1, -2)
    out[..., :3, 3:] = -R.transpose(-1, -2) @ t
    out[..., 3, 3] = 1.0
    return out


def orthonormal_violation(R: torch.Tensor, tol: float = ORTHONORMAL_TOL) -> int | None:
    """Index of the first rotation [F, 3, 3] that is not orthonormal with det +1, else None."""
    eye = torch.eye(3, dtype=R.dtype)
    err = (R @ R.transpose(-1, -2) - eye).abs().flatten(1).amax(1)
    det = torch.linalg.det(R)
    bad = (err > tol) | ((det - 1).abs() > tol)
    idx = bad.nonzero()
    return int(idx[0]) if len(idx) else None
