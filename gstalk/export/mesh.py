"""The tracked head mesh for game engines: per-frame OBJ/PLY sequences (trimesh) and one
glTF binary (GLB) with morph targets and an animation.

Axes: glTF's and gstalk's are the same (y up, +z toward the viewer, metres), so meshes are
written in gstalk's world without conversion.

The GLB holds one mesh, the head model at the avatar's identity in its rest pose, with one
morph target per expression direction of the head model (``expr_00`` ..) and one for the
jaw (``jaw_open``: the jaw turned down by ``JAW_REF`` radians, so its weight is the jaw
pitch / ``JAW_REF``; a linearisation, exact at 0 and at ``JAW_REF``). An animation named
``talk`` keys, at every frame, the morph weights (LINEAR) and the node's rotation and
translation from the head model's root transform, so an engine plays the talking head with
its head motion. Neck and eye rotations and pose correctives are not representable by
morph targets and are left out; the OBJ/PLY sequences carry every frame exactly.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from gstalk.avatar.binding import rotmat_to_quat
from gstalk.head.flame import HeadModel
from gstalk.head.lbs import FlameParams, flame_forward
from gstalk.io.atomic import atomic_path, ensure_dir

JAW_REF = 0.2
MESH_FORMATS = ("obj", "ply")


def mesh_vertices(head: HeadModel, shape: torch.Tensor, params: FlameParams, batch: int = 64) -> np.ndarray:
    """[n, V, 3] posed head-model vertices of every frame (float32)."""
    n = params.batch_size()
    out = []
    with torch.no_grad():
        for s in range(0, n, batch):
            sl = slice(s, min(n, s + batch))
            p = FlameParams(**{k: (None if v is None else v[sl]) for k, v in params.__dict__.items()})
            p.shape = shape[None].expand(sl.stop - sl.start, -1).to(shape.device)
            out.append(flame_forward(head, p).vertices.cpu().numpy().astype(np.float32))
    return np.concatenate(out, 0)


def write_mesh_sequence(verts: np.ndarray, faces: np.ndarray, folder: str | os.PathLike, fmt: str) -> list[Path]:
    """One ``frame_NNNNN.{obj,ply}`` a frame, each written atomically."""
    import trimesh

    if fmt not in MESH_FORMATS:
        raise ValueError(fmt)
    out = ensure_dir(folder)
    paths = []
    for k, v in enumerate(verts):
        m = trimesh.Trimesh(vertices=v, faces=faces, process=False)
        path = out / f"frame_{k:05d}.{fmt}"
        with atomic_path(path) as tmp:
            m.export(str(tmp), file_type=fmt)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------- GLB
class _Bin:
    """Accumulates the GLB binary chunk, its buffer views and accessors."""

    def __init__(self):
        self.data = bytearray()
        self.views: list[dict] = []
        self.accessors: list[dict] = []

    def add(self, arr: np.ndarray, kind: str, component: int, target: int | None = None,
            minmax: bool = False) -> int:
        while len(self.data) % 4:
            self.data.append(0)
        raw = np.ascontiguousarray(arr).tobytes()
        view = {"buffer": 0, "byteOffset": len(self.data), "byteLength": len(raw)}
        if target is not None:
            view["target"] = target
        self.views.append(view)
        self.data += raw
        count = arr.size if kind == "SCALAR" else arr.shape[0]
        acc = {"bufferView": len(self.views) - 1, "componentType": component, "count": int(count), "type": kind}
        if minmax:
            a2 = arr.reshape(count, -1)
            acc["min"] = [float(x) for x in a2.min(0)]
            acc["max"] = [float(x) for x in a2.max(0)]
        self.accessors.append(acc)
        return len(self.accessors) - 1


FLOAT, UINT = 5126, 5125
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963


def morph_basis(head: HeadModel, shape: torch.Tensor) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(rest vertices [V, 3], morph deltas [T, V, 3], target names) at the identity ``shape``."""
    with torch.no_grad():
        s = shape[None].float()
        base = flame_forward(head, FlameParams(shape=s)).vertices[0]
        deltas = [head.exprdirs[:, :, k] for k in range(head.n_expr)]
        jaw = flame_forward(head, FlameParams(shape=s, jaw=torch.tensor([[JAW_REF, 0.0, 0.0]]))).vertices[0]
        deltas.append(jaw - base)
    names = [f"expr_{k:02d}" for k in range(head.n_expr)] + ["jaw_open"]
    return base.cpu().numpy().astype(np.float32), torch.stack(deltas).cpu().numpy().astype(np.float32), names


def write_glb(head: HeadModel, shape: torch.Tensor, params: FlameParams, fps: float,
              path: str | os.PathLike) -> Path:
    """The head mesh with morph targets and a per-frame animation, as one GLB file."""
    base, deltas, names = morph_basis(head, shape)
    faces = head.faces.cpu().numpy().astype(np.uint32)
    n = params.batch_size()
    E = head.n_expr
    dev = head.v_template.device
    z = lambda k: torch.zeros(n, k, device=dev)  # noqa: E731
    expr = params.expr if params.expr is not None else z(E)
    jaw = params.jaw if params.jaw is not None else z(3)
    weights = torch.cat([expr[:, :E], jaw[:, :1] / JAW_REF], 1).cpu().numpy().astype(np.float32)
    with torch.no_grad():
        root = flame_forward(head, FlameParams(shape=shape[None].expand(n, -1).to(dev), global_rot=params.global_rot,
                                               translation=params.translation)).transforms[:, 0]
    rot = rotmat_to_quat(root[:, :3, :3]).cpu().numpy()  # (w, x, y, z)
    rot_xyzw = np.ascontiguousarray(rot[:, [1, 2, 3, 0]]).astype(np.float32)
    trans = root[:, :3, 3].cpu().numpy().astype(np.float32)
    times = (np.arange(n, dtype=np.float32) / np.float32(fps))

    b = _Bin()
    pos = b.add(base, "VEC3", FLOAT, ARRAY_BUFFER, minmax=True)
    idx = b.add(faces.reshape(-1), "SCALAR", UINT, ELEMENT_ARRAY_BUFFER)
    targets = [{"POSITION": b.add(d, "VEC3", FLOAT, ARRAY_BUFFER, minmax=True)} for d in deltas]
    t_in = b.add(times, "SCALAR", FLOAT, minmax=True)
    w_out = b.add(weights.reshape(-1), "SCALAR", FLOAT)
    r_out = b.add(rot_xyzw, "VEC4", FLOAT)
    p_out = b.add(trans, "VEC3", FLOAT)
    doc = {
        "asset": {"version": "2.0", "generator": "gstalk"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"name": "head", "mesh": 0}],
        "meshes": [{"name": "head", "primitives": [{"attributes": {"POSITION": pos}, "indices": idx, "mode": 4,
                                                     "targets": targets}],
                    "weights": [0.0] * len(names), "extras": {"targetNames": names}}],
        "animations": [{"name": "talk", "samplers": [
            {"input": t_in, "output": w_out, "interpolation": "LINEAR"},
            {"input": t_in, "output": r_out, "interpolation": "LINEAR"},
            {"input": t_in, "output": p_out, "interpolation": "LINEAR"}],
            "channels": [{"sampler": 0, "target": {"node": 0, "path": "weights"}},
                         {"sampler": 1, "target": {"node": 0, "path": "rotation"}},
                         {"sampler": 2, "target": {"node": 0, "path": "translation"}}]}],
        "buffers": [{"byteLength": 0}],
        "bufferViews": b.views,
        "accessors": b.accessors,
    }
    while len(b.data) % 4:
        b.data.append(0)
    doc["buffers"][0]["byteLength"] = len(b.data)
    js = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    js += b" " * ((4 - len(js) % 4) % 4)
    total = 12 + 8 + len(js) + 8 + len(b.data)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<4sII", b"glTF", 2, total))
            f.write(struct.pack("<I4s", len(js), b"JSON"))
            f.write(js)
            f.write(struct.pack("<I4s", len(b.data), b"BIN\x00"))
            f.write(bytes(b.data))
    return Path(path)
