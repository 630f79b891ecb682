"""gstalk's open stand-in head model (``assets/flame/standin_head.npz``): its names and
constants. It is NOT FLAME. ``scripts/make_standin_head.py`` generates it, with the builder in
``scripts/standin_builder.py``, outside the runtime package.

It has FLAME's format (fields, five joints, linear blend skinning, identity and expression
directions) so that everything downstream works without the registration-only official
FLAME files, and a user who has FLAME can switch to it by configuration.

How it is built (deterministic):
- Face surface: the 468 points of the landmark detector's face-mesh topology, so that
  detector landmark i *is* vertex i (an exact landmark embedding). Their rest positions are
  the detector's own 3D landmark estimate on the face photo that scikit-image ships
  (``skimage.data.astronaut()``, a public-domain NASA portrait), frontalised, made
  left-right symmetric, the mouth closed, and scaled to 93 mm between the outer eye corners.
  Triangles are the 3-cliques of the detector's tessellation edges, oriented outward.
- Closed with generated geometry: a skull (rings from the face outline to a back pole on
  an anthropometric ellipsoid), a mouth pocket behind the lips, eye sockets, two eyeballs
  whose front carries the 10 iris landmarks (468..477), and a capped neck tube.
- Joints: global (neck base), neck (skull base), jaw (hinge), left and right eye; skinning
  weights by construction, the jaw weight diffused over the mesh between the lips.
- 20 identity directions and 16 expression directions, as smooth displacement fields
  localised with Gaussian falloffs (mm-scale, one unit = a full expression), no pose
  correctives (posedirs are zero).
"""

from __future__ import annotations

import numpy as np


IOD = 0.093  # metres between outer eye corners
RIGHT_EYE_LOOP = [33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7]
LEFT_EYE_LOOP = [263, 466, 388, 387, 386, 385, 384, 398, 362, 382, 381, 380, 374, 373, 390, 249]
UPPER_INNER = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
LOWER_INNER = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308]
UPPER_OUTER = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291]
LOWER_OUTER = [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291]
EXPRESSIONS = ["mouth_open", "lip_press", "pucker", "smile", "stretch", "frown", "cheek_puff", "brow_raise",
               "brow_lower", "blink_left", "blink_right", "squint", "upper_lip_raise", "lower_lip_depress",
               "nose_wrinkle", "mouth_side"]
SHAPES = ["head_width", "head_height", "head_depth", "face_width", "jaw_width", "chin_length", "nose_length",
          "nose_width", "nose_projection", "eye_spacing", "eye_height", "brow_ridge", "lip_thickness",
          "mouth_width", "cheekbones", "forehead_slope", "smooth_1", "smooth_2", "smooth_3", "smooth_4"]
REGIONS = {"face": 0, "skull": 1, "mouth": 2, "eye_socket": 3, "eyeball": 4, "neck": 5}


def photo_landmarks() -> np.ndarray:
    """The detector's 478 landmarks on skimage's astronaut photo (static mode), [478, 3] pixels."""
    from skimage import data

    from gstalk.face.mediapipe_models import FaceMesh

    mesh = FaceMesh(track=False)
    try:
        lmk, _ = mesh(data.astronaut())
    finally:
        mesh.close()
    if lmk is None:
        raise RuntimeError("the face mesh found no face in skimage's astronaut photo")
    return lmk.astype(np.float64)
