"""Pinhole cameras in the OpenCV convention (x right, y down, z forward).

A camera is a world-to-camera 4x4 matrix (``viewmat``) and intrinsics ``K`` in pixels
for an image of ``width`` x ``height``. Pixel (u, v) covers [u, u+1) x [v, v+1); its
centre is (u + 0.5, v + 0.5).
"""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass
from typing import Sequence

import torch
from torch import Tensor

from gstalk.errors import InputError


@dataclass
class Cameras:
    """C cameras sharing one image size.

    Attributes:
        viewmats: [C, 4, 4] world-to-camera transforms.
        Ks: [C, 3, 3] intrinsics (fx, fy, cx, cy in pixels).
        width, height: image size in pixels.
    """

    viewmats: Tensor
    Ks: Tensor
    width: int
    height: int
    #: the values come from cameras already validated (a slice, a copy on another device):
    #: only the shapes are checked, since the values' checks wait for a GPU each time
    checked: InitVar[bool] = False

    def __post_init__(self, checked: bool = False) -> None:
        if self.viewmats.dim() == 2:
            self.viewmats = self.viewmats[None]
        if self.Ks.dim() == 2:
            self.Ks = self.Ks[None]
        self.validate(values=not checked)

    def validate(self, values: bool = True) -> None:
        """Shapes and image size; with ``values`` also finite matrices and positive focal lengths."""
        v, k = self.viewmats, self.Ks
        if v.dim() != 3 or tuple(v.shape[1:]) != (4, 4):
            raise InputError(f"camera viewmats must be [C, 4, 4], got {tuple(v.shape)}")
        if k.dim() != 3 or tuple(k.shape[1:]) != (3, 3):
            raise InputError(f"camera intrinsics Ks must be [C, 3, 3], got {tuple(k.shape)}")
        if v.shape[0] != k.shape[0]:
            raise InputError(f"{v.shape[0]} viewmats but {k.shape[0]} intrinsics: give one K per camera")
        if not (isinstance(self.width, int) and isinstance(self.height, int)) or self.width <= 0 or self.height <= 0:
            raise InputError(f"image size must be positive integers, got {self.width}x{self.height}")
        if not values:
            return
        if not bool(torch.isfinite(v).all()):
            raise InputError("camera viewmats contain NaN or infinite values")
        if not bool(torch.isfinite(k).all()):
            raise InputError("camera intrinsics contain NaN or infinite values")
        if bool((k[:, 0, 0] <= 0).any()) or bool((k[:, 1, 1] <= 0).any()):
            raise InputError("camera focal lengths (K[0,0], K[1,1]) must be positive")

    def __len__(self) -> int:
        return self.viewmats.shape[0]

    def __getitem__(self, i: int | slice) -> "Cameras":
        s = slice(i, i + 1) if isinstance(i, int) else i
        return Cameras(self.viewmats[s], self.Ks[s], self.width, self.height, checked=True)

    @property
    def centers(self) -> Tensor:
        """[C, 3] camera centres in world coordinates (-R^T t)."""
        r = self.viewmats[:, :3, :3]
        t = self.viewmats[:, :3, 3]
        return -(r.transpose(1, 2) @ t[..., None])[..., 0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Cameras":
        return Cameras(self.viewmats.to(device=device, dtype=dtype), self.Ks.to(device=device, dtype=dtype),
                       self.width, self.height, checked=dtype in (None, torch.float32, torch.float64))

    @staticmethod
    def cat(cams: Sequence["Cameras"]) -> "Cameras":
        if not cams:
            raise InputError("no cameras given")
        w, h = cams[0].width, cams[0].height
        if any(c.width != w or c.height != h for c in cams):
            raise InputError("cameras rendered together must share one image size")
        return Cameras(torch.cat([c.viewmats for c in cams]), torch.cat([c.Ks for c in cams]), w, h, checked=True)


def intrinsics_from_fov(width: int, height: int, fov_y_deg: float, dtype=torch.float32) -> Tensor:
    """[3, 3] K with square pixels, principal point at the image centre."""
    if not 0.0 < fov_y_deg < 180.0:
        raise InputError(f"vertical field of view must be in (0, 180) degrees, got {fov_y_deg}")
    f = 0.5 * height / math.tan(math.radians(fov_y_deg) / 2)
    return torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]], dtype=dtype)


def look_at(eye: Tensor, target: Tensor, up: Tensor | None = None) -> Tensor:
    """[4, 4] OpenCV world-to-camera matrix for a camera at ``eye`` looking at ``target``.

    ``up`` is the world direction that should appear up in the image (default +y up in the
    world, which is -y in OpenCV image space).
    """
    eye = torch.as_tensor(eye, dtype=torch.float64)
    target = torch.as_tensor(target, dtype=torch.float64)
    up = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64) if up is None else torch.as_tensor(up, dtype=torch.float64)
    z = target - eye
    if float(z.norm()) < 1e-12:
        raise InputError("look_at: eye and target coincide")
    z = z / z.norm()
    x = torch.linalg.cross(-up, z)  # image x (right) = down x forward
    if float(x.norm()) < 1e-9:
        raise InputError("look_at: viewing direction is parallel to up")
    x = x / x.norm()
    y = torch.linalg.cross(z, x)  # image y (down) = forward x right
    r = torch.stack([x, y, z])  # rows: camera axes in world coordinates
    m = torch.eye(4, dtype=torch.float64)
    m[:3, :3] = r
    m[:3, 3] = -r @ eye
    return m.float()


def orbit_cameras(n: int, radius: float, width: int, height: int, fov_y_deg: float = 30.0,
                  target=(0.0, 0.0, 0.0), elevation_deg: float = 0.0, start_deg: float = 0.0,
                  arc_deg: float = 360.0) -> Cameras:
    """``n`` cameras on a horizontal circle around ``target`` (y up), looking at it.

    Azimuth 0 puts the camera on +z looking towards -z (a face looking along +z is seen
    from the front).
    """
    if n <= 0:
        raise InputError("orbit needs at least one camera")
    tgt = torch.tensor(target, dtype=torch.float64)
    el = math.radians(elevation_deg)
    mats = []
    for i in range(n):
        az = math.radians(start_deg + arc_deg * i / n)
        eye = tgt + radius * torch.tensor([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)],
                                          dtype=torch.float64)
        mats.append(look_at(eye, tgt))
    k = intrinsics_from_fov(width, height, fov_y_deg)
    return Cameras(torch.stack(mats), k.expand(n, 3, 3).clone(), width, height)
