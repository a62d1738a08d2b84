"""The one camera type: per-frame world-to-camera 4x4 (OpenCV axes: x right, y down, z forward) and
intrinsics normalised by image size (fx/W, fy/H, cx/W, cy/H), so they survive resizing."""

from __future__ import annotations

from dataclasses import dataclass

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
