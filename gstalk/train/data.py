"""What training reads: the frames and masks at the training size through a bounded cache,
the mouth close-ups at the dataset's resolution with their cameras, the background, and the
first frame's colours for the Gaussians' start."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch

from gstalk.avatar.views import nearest_of
from gstalk.errors import GstalkError
from gstalk.io.dataset import Dataset
from gstalk.render import Cameras


class TrainingError(GstalkError):
    """The dataset cannot be trained on as asked."""


def crop_camera(K: torch.Tensor, viewmat: torch.Tensor, x0: int, y0: int, side: int, size: int) -> Cameras:
    """The camera that sees the ``side``-pixel square at (x0, y0) of camera (K, viewmat)'s
    image, at ``size`` x ``size`` pixels: a pixel edge u of the full image lands on
    (u - x0) * size / side."""
    k = K.float().clone()
    k[0, 2] -= x0
    k[1, 2] -= y0
    k[:2] *= size / side
    return Cameras(viewmat.float()[None], k[None], size, size)


def cut_image(img: np.ndarray, x0: int, y0: int, side: int, size: int) -> np.ndarray:
    """The ``side``-pixel square at (x0, y0) of ``img`` (edge pixels repeated outside it),
    area-resampled to ``size`` pixels: what :func:`crop_camera` sees."""
    import cv2

    pad = [(max(0, -y0), max(0, y0 + side - img.shape[0])), (max(0, -x0), max(0, x0 + side - img.shape[1]))]
    if any(a or b for a, b in pad):
        img = np.pad(img, pad + [(0, 0)] * (img.ndim - 2), mode="edge")
        x0, y0 = x0 + pad[1][0], y0 + pad[0][0]
    out = img[y0:y0 + side, x0:x0 + side]
    if size != side:
        out = cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)
    return out


class MouthCrops:
    """Close-ups of the mouth at the dataset's full resolution, for the mouth-crop loss.

    Training renders the whole frame at a reduced size on a CPU (128 px), where the lips span
    a dozen pixels and the residual lip motion the head model misses is below a pixel. A
    crop around the lips (centre: the frame's lip landmarks; side: 1.6 times the largest lip
    extent over the training frames, in dataset pixels) is rendered at up to ``size`` pixels
    through a camera cut from the full-resolution one, and compared with the same cut of the
    full-resolution frame (area-resampled), so the mouth is seen at full detail whatever the
    training size.
    """

    def __init__(self, ds: Dataset, K: torch.Tensor, viewmat: torch.Tensor, src: int, train_idx, size: int,
                 cache: int, device):
        from gstalk.face.regions import LIPS

        lm = ds.landmarks()
        lips = lm["lmk"][:, LIPS, :2].astype(np.float64)  # dataset pixels
        ok = np.isfinite(lips).all((1, 2)) & lm["valid"].astype(bool)
        self.ds, self.dev, self.cache = ds, device, cache
        self.res = ds.resolution
        self.K = K.float() * torch.tensor([[self.res / src], [self.res / src], [1.0]])
        self.viewmat = viewmat.float()
        self.valid = ok
        tr = np.asarray(train_idx)
        ext = (lips.max(1) - lips.min(1)).max(-1)
        ext_train = ext[tr][ok[tr]]
        self.side = 0
        if len(ext_train):
            self.side = int(min(self.res, max(16, math.ceil(1.6 * float(ext_train.max())))))
        self.size = min(size, self.side)
        self.centre = np.where(ok[:, None], np.nan_to_num(lips.mean(1)), np.nan)
        self.bg_full: np.ndarray | None = None
        self._lru: OrderedDict[int, tuple[Cameras, torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def usable(self) -> bool:
        return self.size >= 8

    def box(self, i: int) -> tuple[int, int]:
        """Top-left corner (dataset pixels) of frame i's crop."""
        cx, cy = self.centre[i]
        h = self.side / 2
        return int(round(cx - h)), int(round(cy - h))

    def get(self, i: int, background: str) -> tuple[Cameras, torch.Tensor, torch.Tensor] | None:
        """(crop camera, ground-truth crop [C, C, 3], background crop [C, C, 3]) or None
        where frame i has no lip landmarks."""
        if not self.valid[i]:
            return None
        if i in self._lru:
            self._lru.move_to_end(i)
            return self._lru[i]
        x0, y0 = self.box(i)
        cam = crop_camera(self.K, self.viewmat, x0, y0, self.side, self.size).to(self.dev)
        gt = torch.from_numpy(cut_image(self.ds.frame(i), x0, y0, self.side, self.size)).float().div(255)
        gt = gt.to(self.dev)
        if background == "plate":
            if self.bg_full is None:
                self.bg_full = self.ds.background()
            bg = torch.from_numpy(cut_image(self.bg_full, x0, y0, self.side, self.size)).float().div(255)
            bg = bg.to(self.dev)
        else:
            bg = torch.full_like(gt, 1.0 if background == "white" else 0.0)
        item = (cam, gt, bg)
        self._lru[i] = item
        if len(self._lru) > self.cache:
            self._lru.popitem(last=False)
        return item


class FrameSource:
    """Training frames, masks and conditions, read from disk through an LRU cache."""

    def __init__(self, ds: Dataset, size: int, cache: int, device):
        self.ds, self.size, self.cache, self.dev = ds, size, cache, device
        self._lru: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image [S, S, 3] float, labels [S, S] uint8) at the training size."""
        if i in self._lru:
            self._lru.move_to_end(i)
            return self._lru[i]
        import cv2

        img, lab = self.ds.frame(i), self.ds.mask(i)
        if img.shape[0] != self.size:
            img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
            lab = cv2.resize(lab, (self.size, self.size), interpolation=cv2.INTER_NEAREST)
        item = (torch.from_numpy(img).float().div(255).to(self.dev), torch.from_numpy(lab).to(self.dev))
        self._lru[i] = item
        if len(self._lru) > self.cache:
            self._lru.popitem(last=False)
        return item


def scaled_camera(K: torch.Tensor, viewmat: torch.Tensor, src: int, size: int) -> Cameras:
    """Camera (K, viewmat) of a ``src``-pixel image, for the whole image at ``size`` pixels."""
    return crop_camera(K, viewmat, 0, 0, src, size)


def background_image(ds: Dataset, mode: str, size: int, device) -> torch.Tensor:
    import cv2

    if mode == "plate":
        bg = ds.background()
        if bg.shape[0] != size:
            bg = cv2.resize(bg, (size, size), interpolation=cv2.INTER_AREA)
        return torch.from_numpy(bg).float().div(255).to(device)
    if mode in ("white", "black"):
        return torch.full((size, size, 3), 1.0 if mode == "white" else 0.0, device=device)
    raise TrainingError(f"unknown background mode {mode!r}: plate, white or black")


def first_frame_colours(means: torch.Tensor, normals: torch.Tensor, cam: Cameras, img: torch.Tensor) -> torch.Tensor:
    """[N, 3] starting colours of head Gaussians at ``means`` [N, 3] (world) on triangles with
    outward ``normals`` [N, 3], from the frame ``img`` [H, W, 3] seen by ``cam``: the pixel each
    projects to where the frame shows it (its triangle faces the camera and it falls inside the
    picture), else the colour given to the nearest Gaussian it shows. A Gaussian on the back of
    the head projects onto the face; with the face's colour it stays a blurred face seen from
    behind, since no later frame shows it either."""
    vm, K = cam.viewmats[0], cam.Ks[0]
    pc = means @ vm[:3, :3].T + vm[:3, 3]
    uv = pc[:, :2] / pc[:, 2:].clamp_min(1e-6) * K[[0, 1], [0, 1]] + K[:2, 2]
    h, w = img.shape[:2]
    col = img[uv[:, 1].long().clamp(0, h - 1), uv[:, 0].long().clamp(0, w - 1)]
    inside = (pc[:, 2] > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
    seen = inside & ((cam.centers[0] - means) * normals).sum(-1).gt(0)
    if seen.any() and not seen.all():
        col[~seen] = col[nearest_of(means, seen, ~seen)]
    return col


