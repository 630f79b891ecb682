"""Offline 2D face models from the mediapipe wheel (0.10.14 ships the .tflite files):
face detection, the 478-point face mesh (with iris) and selfie (person) segmentation.

Nothing is downloaded: if the installed mediapipe lacks its bundled models, a clear
:class:`GstalkError` says which version to install.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np

from gstalk.errors import GstalkError

os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


warnings.filterwarnings("ignore", message=r".*SymbolDatabase\.GetPrototype\(\) is deprecated.*")


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C-level stderr (TFLite's start-up INFO lines) while models start."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


class FaceModelError(GstalkError):
    """The bundled face models are missing or failed to start."""


def _mp():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mediapipe as mp
        return mp
    except ImportError as e:
        raise FaceModelError(f"mediapipe is not installed ({e}); install gstalk's dependencies "
                             "(mediapipe==0.10.14 ships the face models)") from None


def _solution(name: str):
    mp = _mp()
    try:
        return getattr(mp.solutions, name)
    except AttributeError:
        raise FaceModelError(f"this mediapipe ({getattr(mp, '__version__', '?')}) has no '{name}' solution: "
                             "install mediapipe==0.10.14, whose wheel ships the face models") from None


@dataclass
class FaceBox:
    """A detected face in pixels: top-left (x, y), size (w, h), confidence."""

    x: float
    y: float
    w: float
    h: float
    score: float

    @property
    def area(self) -> float:
        return self.w * self.h

    @property
    def center(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y + self.h / 2


class FaceDetector:
    """BlazeFace (full range) detector. ``detect(rgb uint8)`` -> faces, largest first."""

    def __init__(self, min_confidence: float = 0.5):
        try:
            with _quiet_stderr():
                self._impl = _solution("face_detection").FaceDetection(model_selection=1,
                                                                        min_detection_confidence=min_confidence)
                self._impl.process(np.zeros((64, 64, 3), np.uint8))
        except Exception as e:  # missing .tflite, broken install
            raise FaceModelError(f"the face detector could not start ({e})") from None

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        h, w = rgb.shape[:2]
        res = self._impl.process(np.ascontiguousarray(rgb))
        boxes = []
        for d in res.detections or []:
            b = d.location_data.relative_bounding_box
            boxes.append(FaceBox(b.xmin * w, b.ymin * h, b.width * w, b.height * h, float(d.score[0])))
        return sorted(boxes, key=lambda b: -b.area)

    def close(self) -> None:
        self._impl.close()


def face_area(lmk: np.ndarray) -> float:
    """Area of the bounding box of a face's landmarks [P, 2+]."""
    return float(np.ptp(lmk[:, 0]) * np.ptp(lmk[:, 1]))


class FaceMesh:
    """478-point face mesh with iris. ``track=True`` reuses the previous frame's face
    (video mode); ``__call__(rgb)`` -> (landmarks [478, 3] of the largest face or None,
    number of faces). x, y in pixels; z in pixels at the same scale (relative depth,
    smaller = nearer the camera)."""

    def __init__(self, track: bool = True, max_faces: int = 3, min_confidence: float = 0.5):
        try:
            with _quiet_stderr():
                self._impl = _solution("face_mesh").FaceMesh(
                    static_image_mode=not track, max_num_faces=max_faces, refine_landmarks=True,
                    min_detection_confidence=min_confidence, min_tracking_confidence=min_confidence)
                self._impl.process(np.zeros((64, 64, 3), np.uint8))
        except Exception as e:
            raise FaceModelError(f"the face mesh could not start ({e})") from None

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray | None, int]:
        arrs = self.faces(rgb)
        if not arrs:
            return None, 0
        return max(arrs, key=face_area), len(arrs)

    def faces(self, rgb: np.ndarray) -> list[np.ndarray]:
        """Landmarks [478, 3] of every face found, in the detector's order."""
        h, w = rgb.shape[:2]
        res = self._impl.process(np.ascontiguousarray(rgb))
        return [np.array([[p.x * w, p.y * h, p.z * w] for p in f.landmark], np.float32)
                for f in res.multi_face_landmarks or []]

    def close(self) -> None:
        self._impl.close()


class PersonSegmenter:
    """Selfie segmentation: ``__call__(rgb)`` -> person probability [H, W] float32."""

    def __init__(self):
        try:
            with _quiet_stderr():
                self._impl = _solution("selfie_segmentation").SelfieSegmentation(model_selection=0)
                self._impl.process(np.zeros((64, 64, 3), np.uint8))
        except Exception as e:
            raise FaceModelError(f"the person segmenter could not start ({e})") from None

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        res = self._impl.process(np.ascontiguousarray(rgb))
        return np.asarray(res.segmentation_mask, np.float32)

    def close(self) -> None:
        self._impl.close()
