"""Drawing a head mesh over an image (for previews and overlays): flat-shaded triangles in
depth order with back faces culled, and landmark dots."""

from __future__ import annotations

import numpy as np


def project_points(verts: np.ndarray, K: np.ndarray, viewmat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points [N,3] -> pixel coordinates [N,2] and camera depth [N] (OpenCV camera)."""
    pc = verts @ viewmat[:3, :3].T + viewmat[:3, 3]
    z = pc[:, 2]
    uv = (pc[:, :2] / np.maximum(z[:, None], 1e-9)) * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]]
    return uv, z


def draw_mesh(img: np.ndarray, verts: np.ndarray, faces: np.ndarray, K: np.ndarray, viewmat: np.ndarray,
              color=(200, 200, 255), alpha: float = 0.5) -> np.ndarray:
    """Blend a flat-shaded rendering of the mesh over ``img`` (uint8 RGB), painter's order."""
    import cv2

    uv, z = project_points(verts, K, viewmat)
    pc = verts @ viewmat[:3, :3].T + viewmat[:3, 3]
    tri = pc[faces]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    view = -tri.mean(1)
    view /= np.maximum(np.linalg.norm(view, axis=1, keepdims=True), 1e-12)
    facing = (n * view).sum(1)
    keep = (facing > 0) & (z[faces].min(1) > 1e-3)
    order = np.argsort(-z[faces].mean(1)[keep])
    canvas = img.copy()
    mask = np.zeros(img.shape[:2], np.uint8)
    pts = np.round(uv[faces[keep][order]] * 16).astype(np.int32)  # 4 bits of sub-pixel precision
    shade = (0.25 + 0.75 * facing[keep][order])[:, None] * np.asarray(color, np.float64)
    for p, c in zip(pts, shade):
        cv2.fillConvexPoly(canvas, p, c.tolist(), lineType=cv2.LINE_AA, shift=4)
        cv2.fillConvexPoly(mask, p, 255, shift=4)
    m = (mask[..., None] > 0) * alpha
    return (img * (1 - m) + canvas * m).astype(np.uint8)


def draw_points(img: np.ndarray, uv: np.ndarray, color=(255, 255, 255), radius: int = 1) -> np.ndarray:
    import cv2

    out = img.copy()
    for x, y in uv:
        if np.isfinite(x) and np.isfinite(y):
            cv2.circle(out, (int(round(x)), int(round(y))), radius, color, -1, lineType=cv2.LINE_AA)
    return out
