"""Landmark embedding: which point of the head mesh each detector landmark is.

An embedding maps detector landmark indices (the 478-point face mesh) to a mesh triangle
and barycentric coordinates. Sources, in order of preference:

1. a file the user gives: MICA/metrical-tracker style ``.npz`` (``lmk_face_idx``,
   ``lmk_b_coords``, ``landmark_indices``) or DECA's ``landmark_embedding.npy`` (its
   68-point ``full_lmk_faces_idx`` / ``full_lmk_bary_coords``, used through the usual
   iBUG-68 -> face-mesh index correspondence);
2. the model's own (the stand-in ships an exact one: landmark i is vertex i);
3. derived automatically for any other FLAME-format model by registering the stand-in's
   neutral landmark cloud (the detector's 3D landmarks in metres) to the model's template
   with a similarity ICP and projecting each landmark onto the nearest surface point;
   cached under ``$GSTALK_CACHE`` (default ``~/.cache/gstalk``) by the model's digest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gstalk.errors import FileFormatError, GstalkError
from gstalk.head.flame import STANDIN_PATH, HeadModel

# iBUG-68 landmark k -> face-mesh index (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67)
IBUG68_TO_MESH = [162, 234, 93, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 323, 454, 389,
                  71, 63, 105, 66, 107, 336, 296, 334, 293, 301,
                  168, 197, 5, 4, 75, 97, 2, 326, 305,
                  33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
                  61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181, 78, 82, 13, 312, 308, 317, 14, 87]


@dataclass
class LandmarkEmbedding:
    """face_idx [L] triangle per landmark, bary [L, 3], landmark_indices [L] detector indices."""

    face_idx: torch.Tensor
    bary: torch.Tensor
    landmark_indices: torch.Tensor
    source: str = ""

    def points(self, vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """[B, V, 3] mesh vertices -> [B, L, 3] landmark positions."""
        tri = faces[self.face_idx]  # [L, 3]
        return (vertices[:, tri] * self.bary[None, :, :, None]).sum(2)

    def vertex_ids(self, faces: torch.Tensor) -> torch.Tensor:
        """Vertices the embedding touches (to pose only those)."""
        return torch.unique(faces[self.face_idx].reshape(-1))

    def remapped(self, faces: torch.Tensor) -> tuple["LandmarkEmbedding", torch.Tensor, torch.Tensor]:
        """An embedding over a vertex subset: (embedding with local faces, vertex ids, local faces)."""
        ids = self.vertex_ids(faces)
        lut = torch.full((int(faces.max()) + 1,), -1, dtype=torch.long)
        lut[ids] = torch.arange(len(ids))
        local = lut[faces[self.face_idx]]
        emb = LandmarkEmbedding(torch.arange(len(self.face_idx)), self.bary, self.landmark_indices, self.source)
        return emb, ids, local


def _from_arrays(face_idx, bary, idx, source) -> LandmarkEmbedding:
    face_idx = np.asarray(face_idx, np.int64).reshape(-1)
    bary = np.asarray(bary, np.float32).reshape(-1, 3)
    idx = np.asarray(idx, np.int64).reshape(-1)
    if not (len(face_idx) == len(bary) == len(idx)):
        raise FileFormatError(f"landmark embedding {source}: {len(face_idx)} faces, {len(bary)} barycentrics and "
                              f"{len(idx)} landmark indices do not match")
    return LandmarkEmbedding(torch.from_numpy(face_idx), torch.from_numpy(bary), torch.from_numpy(idx), source)


def read_embedding_file(path: str | os.PathLike) -> LandmarkEmbedding:
    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"landmark embedding file not found: {p}")
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            if {"lmk_face_idx", "lmk_b_coords"} <= set(z.files):
                idx = z["landmark_indices"] if "landmark_indices" in z.files else np.arange(len(z["lmk_face_idx"]))
                return _from_arrays(z["lmk_face_idx"], z["lmk_b_coords"], idx, str(p))
        raise FileFormatError(f"{p}: expected lmk_face_idx, lmk_b_coords (and landmark_indices) arrays")
    if p.suffix == ".npy":
        # DECA stores a pickled dict inside the .npy; read it with the same restricted unpickler
        import io

        from gstalk.head.flame import _RestrictedUnpickler

        raw = p.read_bytes()
        try:
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
            raise FileFormatError(f"{p} holds a plain array {arr.shape}, not a DECA landmark embedding dict")
        except ValueError:
            pass
        from numpy.lib import format as npformat

        f = io.BytesIO(raw)
        version = npformat.read_magic(f)
        if version == (1, 0):
            npformat.read_array_header_1_0(f)
        else:
            npformat.read_array_header_2_0(f)
        try:
            d = _RestrictedUnpickler(f, encoding="latin1", what=f"the DECA landmark embedding {p}").load()
        except GstalkError:  # the unpickler's own refusal, which names the file
            raise
        except Exception as e:
            raise FileFormatError(f"cannot read {p} as a DECA landmark embedding ({e})") from None
        if isinstance(d, np.ndarray) and d.dtype == object:
            d = d.item()
        if not isinstance(d, dict) or "full_lmk_faces_idx" not in d:
            raise FileFormatError(f"{p} is not a DECA landmark embedding (no full_lmk_faces_idx)")
        return _from_arrays(d["full_lmk_faces_idx"], d["full_lmk_bary_coords"], IBUG68_TO_MESH, str(p))
    raise FileFormatError(f"{p}: landmark embeddings are .npz (MICA style) or .npy (DECA)")


def _standin_landmarks() -> np.ndarray:
    with np.load(STANDIN_PATH) as z:
        return z["v_template"][:478].astype(np.float64)


def _closest_on_triangles(p: np.ndarray, tri: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closest point on each of T triangles [T,3,3] to each point [P,3]: (face, bary, point)."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    best_d = np.full(len(p), np.inf)
    best = (np.zeros(len(p), np.int64), np.zeros((len(p), 3)), np.zeros((len(p), 3)))
    for start in range(0, len(tri), 2048):
        sl = slice(start, start + 2048)
        A, B, C = a[sl], b[sl], c[sl]
        ab, ac = B - A, C - A
        n = np.cross(ab, ac)
        nn = (n * n).sum(1) + 1e-20
        ap = p[:, None] - A[None]
        # barycentrics of the projection onto the plane, clamped into the triangle
        v = (np.cross(ap, ac[None]) * n[None]).sum(-1) / nn
        w = (np.cross(ab[None], ap) * n[None]).sum(-1) / nn
        u = 1 - v - w
        bc = np.clip(np.stack([u, v, w], -1), 0, None)
        bc /= np.maximum(bc.sum(-1, keepdims=True), 1e-12)
        q = bc[..., 0:1] * A[None] + bc[..., 1:2] * B[None] + bc[..., 2:3] * C[None]
        d = ((q - p[:, None]) ** 2).sum(-1)
        j = d.argmin(1)
        dj = d[np.arange(len(p)), j]
        better = dj < best_d
        best_d[better] = dj[better]
        best[0][better] = start + j[better]
        best[1][better] = bc[np.arange(len(p)), j][better]
        best[2][better] = q[np.arange(len(p)), j][better]
    return best


def derive_embedding(model: HeadModel, iters: int = 30) -> LandmarkEmbedding:
    """Register the stand-in's neutral landmarks to ``model``'s template (similarity ICP)."""
    src = _standin_landmarks()
    v = model.v_template.detach().cpu().numpy().astype(np.float64)
    f = model.faces.cpu().numpy()
    tri = v[f]
    # both are y up and face +z: anchor the detector's nose tip (landmark 4) on the
    # template's frontmost point, guess the scale from the head width, then refine the
    # similarity by ICP from a few scales and keep the best fit
    nose = v[np.argmax(v[:, 2])]
    s0 = np.ptp(v[:, 0]) / max(np.ptp(src[:, 0]), 1e-9) / 1.12
    best = None
    for k in (0.85, 1.0, 1.15):
        s = s0 * k
        rot = np.eye(3)
        t = nose - s * src[4]
        for _ in range(iters):
            _, _, q = _closest_on_triangles(s * src @ rot.T + t, tri)
            mu_s, mu_q = src.mean(0), q.mean(0)
            xs, xq = src - mu_s, q - mu_q
            u, sig, vt = np.linalg.svd(xq.T @ xs / len(src))
            dd = np.eye(3)
            dd[2, 2] = np.sign(np.linalg.det(u @ vt))
            rot = u @ dd @ vt
            s = float((sig * np.diag(dd)).sum() / ((xs**2).sum() / len(src)))
            t = mu_q - s * rot @ mu_s
        cur = s * src @ rot.T + t
        err = float(np.linalg.norm(_closest_on_triangles(cur, tri)[2] - cur, axis=1).mean())
        if best is None or err < best[0]:
            best = (err, s, rot, t)
    _, s, rot, t = best
    face, bary, _ = _closest_on_triangles(s * src @ rot.T + t, tri)
    return _from_arrays(face, bary, np.arange(478), f"derived by registration to {model.source}")


def cache_dir() -> Path:
    return Path(os.environ.get("GSTALK_CACHE", Path.home() / ".cache" / "gstalk"))


def load_embedding(model: HeadModel, path: str | os.PathLike | None = None) -> LandmarkEmbedding:
    """The landmark embedding for ``model`` (see the module docstring for the order)."""
    if path is not None:
        return read_embedding_file(path)
    m = model.meta
    if "lmk_face_idx" in m and "lmk_b_coords" in m:
        idx = m.get("landmark_indices", np.arange(len(m["lmk_face_idx"])))
        return _from_arrays(m["lmk_face_idx"], m["lmk_b_coords"], idx, f"{model.source} (own)")
    cached = cache_dir() / "embeddings" / f"{model.digest}.npz"
    if cached.is_file():
        return read_embedding_file(cached)
    emb = derive_embedding(model)
    try:
        from gstalk.io.dataset import save_npz

        cached.parent.mkdir(parents=True, exist_ok=True)
        save_npz(cached, lmk_face_idx=emb.face_idx.numpy(), lmk_b_coords=emb.bary.numpy(),
                 landmark_indices=emb.landmark_indices.numpy())
    except OSError:
        pass  # an unwritable cache only costs the derivation next time
    return emb
