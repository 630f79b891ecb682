"""Read and write Gaussian sets in the standard 3DGS PLY layout.

The vertex element holds, in this order (float32, pre-activation values, as the original
3D Gaussian Splatting code writes them and as splat viewers expect)::

    x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 f_rest_0 .. f_rest_{3(K-1)-1} opacity
    scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3

``f_rest`` is channel-major: all higher-order coefficients of red, then green, then blue.
``opacity`` is the logit, ``scale_*`` the log standard deviations, ``rot_*`` the
quaternion (w, x, y, z). Normals are written as zeros.

gstalk appends its own per-Gaussian properties after these (viewers ignore unknown
properties): ``binding`` (int32 parent-triangle index) and each ``extra`` array, as
``name`` or ``name_0 .. name_{k-1}``. A header comment ``gstalk-extra NAME DTYPE K``
records each so that the round-trip restores names and shapes exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData, PlyElement

from gstalk.errors import FileFormatError, InputError
from gstalk.gaussians.set import GaussianSet, sh_degree_from_bases
from gstalk.io.atomic import atomic_path

_HEAD = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
_TAIL = ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
_EXTRA_DTYPES = {"float32": "f4", "int32": "i4"}


def standard_property_names(sh_degree: int) -> list[str]:
    """The standard 3DGS vertex property names, in file order, for ``sh_degree``."""
    n_rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return _HEAD + [f"f_rest_{i}" for i in range(n_rest)] + _TAIL


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype, copy=False)


def save_ply(gaussians: GaussianSet, path: str | os.PathLike, comments: list[str] = ()) -> Path:
    """Write ``gaussians`` to ``path`` atomically (float values stored as float32); ``comments``
    go into the header after gstalk's own."""
    g = gaussians
    g.check_finite(str(path))
    n = len(g)
    k = g.sh.shape[1]
    cols: list[tuple[str, np.ndarray]] = []
    means = _np(g.means, np.float32)
    cols += [("x", means[:, 0]), ("y", means[:, 1]), ("z", means[:, 2])]
    zeros = np.zeros(n, np.float32)
    cols += [("nx", zeros), ("ny", zeros), ("nz", zeros)]
    sh = _np(g.sh, np.float32)
    cols += [(f"f_dc_{c}", sh[:, 0, c]) for c in range(3)]
    rest = np.ascontiguousarray(sh[:, 1:, :].transpose(0, 2, 1)).reshape(n, 3 * (k - 1))
    cols += [(f"f_rest_{i}", rest[:, i]) for i in range(rest.shape[1])]
    cols.append(("opacity", _np(g.opacity_logits, np.float32)))
    ls = _np(g.log_scales, np.float32)
    cols += [(f"scale_{i}", ls[:, i]) for i in range(3)]
    q = _np(g.quats, np.float32)
    cols += [(f"rot_{i}", q[:, i]) for i in range(4)]

    comments = ["created by gstalk", f"sh_degree {g.sh_degree}", *comments]
    extras: list[tuple[str, torch.Tensor]] = []
    if g.binding is not None:
        extras.append(("binding", g.binding))
    extras += list(g.extra.items())
    taken = {name for name, _ in cols}
    for name, t in extras:
        if not name.isidentifier():
            raise InputError(f"extra property name {name!r} must be a plain identifier")
        dt = "float32" if t.is_floating_point() else "int32"
        arr = _np(t, np.float32 if dt == "float32" else np.int32)
        width = 1 if arr.ndim == 1 else arr.shape[1]
        names = [name] if arr.ndim == 1 else [f"{name}_{i}" for i in range(width)]
        if taken & set(names):
            raise InputError(f"extra property {name!r} clashes with a standard PLY property")
        taken |= set(names)
        comments.append(f"gstalk-extra {name} {dt} {width if arr.ndim == 2 else 0}")
        arr2 = arr.reshape(n, -1)
        cols += [(nm, arr2[:, i]) for i, nm in enumerate(names)]

    dtype = [(name, "i4" if col.dtype == np.int32 else "f4") for name, col in cols]
    data = np.empty(n, dtype=dtype)
    for name, col in cols:
        data[name] = col
    el = PlyElement.describe(data, "vertex")
    with atomic_path(path) as tmp:
        PlyData([el], text=False, byte_order="<", comments=comments).write(str(tmp))
    return Path(path)


def load_ply(path: str | os.PathLike, device: torch.device | str = "cpu") -> GaussianSet:
    """Read a 3DGS PLY (gstalk's or any viewer-compatible one) into a :class:`GaussianSet`."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"no such PLY file: {path}")
    try:
        ply = PlyData.read(str(path))
        v = ply["vertex"]
    except Exception as e:  # plyfile raises several types for malformed files
        raise FileFormatError(f"{path} is not a readable PLY file ({e})") from None
    names = [p.name for p in v.properties]
    missing = [p for p in _HEAD[:3] + ["f_dc_0", "f_dc_1", "f_dc_2"] + _TAIL if p not in names]
    if missing:
        raise FileFormatError(f"{path} is not a Gaussian-splat PLY: missing properties {missing}")
    d = v.data
    n = len(d)

    def col(name: str) -> np.ndarray:
        return np.asarray(d[name])

    def stack(cols: list[str]) -> torch.Tensor:
        if not cols:
            return torch.zeros(n, 0)
        return torch.from_numpy(np.stack([col(c).astype(np.float32) for c in cols], axis=1))

    rest_names = sorted((p for p in names if p.startswith("f_rest_")), key=lambda s: int(s[7:]))
    if len(rest_names) % 3:
        raise FileFormatError(f"{path}: {len(rest_names)} f_rest properties is not a multiple of 3")
    k = 1 + len(rest_names) // 3
    try:
        sh_degree_from_bases(k)
    except InputError:
        raise FileFormatError(f"{path}: {len(rest_names)} f_rest properties do not match an SH degree 0..3") from None
    sh = torch.empty(n, k, 3)
    sh[:, 0] = stack([f"f_dc_{c}" for c in range(3)])
    if k > 1:
        sh[:, 1:] = stack(rest_names).reshape(n, 3, k - 1).transpose(1, 2)

    binding = None
    extra: dict[str, torch.Tensor] = {}
    for c in ply.comments:
        parts = c.split()
        if len(parts) == 4 and parts[0] == "gstalk-extra":
            name, dt, width = parts[1], parts[2], int(parts[3])
            cols = [name] if width == 0 else [f"{name}_{i}" for i in range(width)]
            if any(cn not in names for cn in cols):
                raise FileFormatError(f"{path}: header names extra {name!r} but its properties are missing")
            npdt = np.float32 if dt == "float32" else np.int32
            arr = np.stack([col(cn).astype(npdt) for cn in cols], axis=1)
            t = torch.from_numpy(arr[:, 0] if width == 0 else arr)
            if name == "binding":
                binding = t.long()
            else:
                extra[name] = t
    g = GaussianSet(
        means=stack(["x", "y", "z"]),
        quats=stack([f"rot_{i}" for i in range(4)]),
        log_scales=stack([f"scale_{i}" for i in range(3)]),
        opacity_logits=torch.from_numpy(col("opacity").astype(np.float32).copy()),
        sh=sh,
        binding=binding,
        extra=extra,
    )
    return g.to(device)


def check_finite_file(g: GaussianSet, path: str | os.PathLike, fix: str = "") -> None:
    """Refuse (:class:`FileFormatError`) Gaussians read from ``path`` that hold NaN or infinite
    values, naming the file, how many and the first."""
    bad = g.nonfinite()
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise FileFormatError(f"{path}: {int(bad.sum())} of its {len(g)} Gaussians hold NaN or infinite values (the "
                              f"first is Gaussian {first}): a diverged fit or a damaged file"
                              + (f"; {fix}" if fix else ""))
