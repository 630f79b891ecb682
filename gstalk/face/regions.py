"""Regions of the 478-point face-mesh topology, and masks and signals computed from them.

Indices are those of the MediaPipe face mesh (468 surface points + 10 iris points).
"""

from __future__ import annotations

import numpy as np

# closed contours, in order
FACE_OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148,
             176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]
INNER_LIPS = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95]
OUTER_LIPS = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146]
LIPS = sorted(set(INNER_LIPS + OUTER_LIPS))  # every lip landmark, once
# eye-aspect-ratio points (p1..p6): corners p1, p4; upper lid p2, p3; lower lid p6, p5
RIGHT_EYE_EAR = [33, 160, 158, 133, 153, 144]  # subject's right eye (image left)
LEFT_EYE_EAR = [362, 385, 387, 263, 373, 380]
RIGHT_IRIS = [468, 469, 470, 471, 472]
LEFT_IRIS = [473, 474, 475, 476, 477]
UPPER_LIP_INNER_MID, LOWER_LIP_INNER_MID = 13, 14
MOUTH_CORNERS = (61, 291)
CHIN = 152
EYE_OUTER_CORNERS = (33, 263)

# label values of the per-frame mask image
BACKGROUND, HEAD_OTHER, TORSO, FACE, MOUTH = 0, 1, 2, 3, 4
LABELS = {"background": BACKGROUND, "head_other": HEAD_OTHER, "torso": TORSO, "face": FACE, "mouth": MOUTH}


def eye_aspect_ratio(lmk: np.ndarray, idx: list[int]) -> np.ndarray:
    """EAR = (|p2-p6| + |p3-p5|) / (2 |p1-p4|) over [..., 478, 2+] landmarks."""
    p = lmk[..., idx, :2]
    v = np.linalg.norm(p[..., 1, :] - p[..., 5, :], axis=-1) + np.linalg.norm(p[..., 2, :] - p[..., 4, :], axis=-1)
    h = np.linalg.norm(p[..., 0, :] - p[..., 3, :], axis=-1)
    return v / np.maximum(2 * h, 1e-6)


def blink_signal(lmk: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, dict]:
    """Per-frame eye closure in [0, 1] (0 open, 1 closed) from the eye aspect ratio.

    The open-eye EAR is the clip's 90th percentile; an EAR of 35% of it (lids nearly
    together) counts as closed. Frames without landmarks are NaN.
    """
    ear = 0.5 * (eye_aspect_ratio(lmk, LEFT_EYE_EAR) + eye_aspect_ratio(lmk, RIGHT_EYE_EAR))
    ear = np.where(valid, ear, np.nan)
    if not np.isfinite(ear).any():
        return np.full(ear.shape, np.nan, np.float32), {"ear_open": None}
    open_ear = float(np.nanpercentile(ear, 90))
    closed = 0.35 * open_ear
    blink = np.clip((open_ear - ear) / max(open_ear - closed, 1e-6), 0.0, 1.0)
    return blink.astype(np.float32), {"ear_open": open_ear, "ear_closed": closed}


def _over_eye_span(lmk: np.ndarray, a: int, b: int) -> np.ndarray:
    """Distance of landmarks ``a`` and ``b`` over the outer-eye-corner distance ([..., 478, 2+])."""
    d = np.linalg.norm(lmk[..., a, :2] - lmk[..., b, :2], axis=-1)
    iod = np.linalg.norm(lmk[..., EYE_OUTER_CORNERS[0], :2] - lmk[..., EYE_OUTER_CORNERS[1], :2], axis=-1)
    return (d / np.maximum(iod, 1e-6)).astype(np.float32)


def mouth_opening(lmk: np.ndarray) -> np.ndarray:
    """Inner-lip gap divided by the outer-eye-corner distance ([..., 478, 2+] landmarks)."""
    return _over_eye_span(lmk, UPPER_LIP_INNER_MID, LOWER_LIP_INNER_MID)


def mouth_width(lmk: np.ndarray) -> np.ndarray:
    """Mouth-corner distance divided by the outer-eye-corner distance ([..., 478, 2+] landmarks)."""
    return _over_eye_span(lmk, *MOUTH_CORNERS)


def label_mask(person: np.ndarray | None, lmk: np.ndarray | None, threshold: float = 0.5,
               base: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel labels (uint8 [H, W]) from a person probability map and the landmarks.

    background; face (inside the face oval); mouth (inside the inner lip contour);
    torso (person below the chin line, outside the face: neck, shoulders, clothes);
    head_other (the rest of the person: hair, ears). ``base`` may give labels from
    elsewhere (background / head_other / torso, e.g. an imported face parsing) instead of
    ``person``; the face and mouth are then drawn from the landmarks on top.
    """
    import cv2

    if base is not None:
        out = base.astype(np.uint8).copy()
    else:
        out = np.where(person >= threshold, HEAD_OTHER, BACKGROUND).astype(np.uint8)
    h, w = out.shape
    if lmk is None:
        return out
    pts = lmk[:, :2]
    face = np.zeros((h, w), np.uint8)
    cv2.fillPoly(face, [np.round(pts[FACE_OVAL]).astype(np.int32)], 1)
    if base is None:  # person pixels below the chin line are neck / torso
        chin_y = pts[CHIN, 1]
        ys = np.arange(h)[:, None]
        torso = (ys > chin_y - 0.02 * h) & (out == HEAD_OTHER) & (face == 0)
        out[torso] = TORSO
    out[face == 1] = FACE
    mouth = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mouth, [np.round(pts[INNER_LIPS]).astype(np.int32)], 1)
    out[mouth == 1] = MOUTH
    return out
