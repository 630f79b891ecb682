"""FLAME-format head models: loading (official pickles without chumpy, or .npz) and the model.

The official FLAME 2020 / 2023 files are Python-2 pickles whose arrays are partly chumpy
objects and whose joint regressor is a scipy sparse matrix. They are read here through a
restricted unpickler that builds only numpy arrays, scipy sparse matrices and inert
placeholders for chumpy objects, and refuses every other class (a pickle can otherwise
run arbitrary code). gstalk never needs chumpy or smplx.

Fields (FLAME names): ``v_template`` [V,3], ``shapedirs`` [V,3,S+E] (identity directions
first, then expression), ``posedirs`` [V,3,36] (pose correctives from the 4 non-root
joints' rotation matrices minus identity), ``J_regressor`` [5,V], ``weights`` [V,5],
``kintree_table`` [2,5], ``f`` [F,3]; optional ``l_eyelid`` / ``r_eyelid`` [V,3].
Joints: 0 global, 1 neck, 2 jaw, 3 left eye, 4 right eye.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gstalk.errors import GstalkError

FLAME_ENV = "GSTALK_FLAME"
"""Environment variable naming an official FLAME file to use instead of the stand-in."""

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "flame"
STANDIN_PATH = ASSETS / "standin_head.npz"
REQUIRED = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")
JOINT_NAMES = ("global", "neck", "jaw", "left_eye", "right_eye")
FLAME_URL = "https://flame.is.tue.mpg.de (register, then download FLAME 2020 or 2023)"


class FlameFileError(GstalkError):
    """A FLAME-format file is missing, unreadable, or lacks a required field."""


class _ChumpyPlaceholder:
    """Stands in for a chumpy object during unpickling; keeps only its state dict."""

    def __init__(self, *args, **kwargs):
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"x": state}

    def array(self) -> np.ndarray:
        for key in ("x", "a", "_x"):
            if key in self.state:
                v = self.state[key]
                return v.array() if isinstance(v, _ChumpyPlaceholder) else np.asarray(v)
        raise FlameFileError(f"a chumpy object in the FLAME file holds no array (keys: {sorted(self.state)})")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"), ("copyreg", "_reconstructor"), ("builtins", "object"),
    ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 wrap byte strings this way
}
_SPARSE = {"csc_matrix", "csr_matrix", "coo_matrix"}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles arrays only; ``what`` names the file in its refusal ('the FLAME file', or a
    DECA landmark embedding's path)."""

    def __init__(self, *args, what: str = "the FLAME file", **kwargs):
        super().__init__(*args, **kwargs)
        self.what = what

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module.startswith("scipy.sparse") and name in _SPARSE:
            import scipy.sparse

            return getattr(scipy.sparse, name)
        if module.split(".")[0] == "chumpy":
            return _ChumpyPlaceholder
        raise FlameFileError(f"{self.what} asks to load '{module}.{name}', which gstalk refuses "
                             "(only numpy arrays, scipy sparse matrices and chumpy arrays are accepted)")


def _to_array(v) -> np.ndarray:
    if isinstance(v, _ChumpyPlaceholder):
        return v.array()
    if hasattr(v, "toarray"):  # scipy sparse
        return v.toarray()
    return np.asarray(v)


def read_flame_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The raw fields of a FLAME-format .pkl or .npz as numpy arrays."""
    p = Path(path)
    if not p.is_file():
        raise FlameFileError(f"FLAME file not found: {p}. Get the official model from {FLAME_URL}, "
                             f"and point {FLAME_ENV} (or --flame) at generic_model.pkl / flame2023.pkl")
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (ValueError, OSError) as e:
            raise FlameFileError(f"cannot read {p} as a FLAME .npz ({e})") from None
    data = p.read_bytes()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except FlameFileError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise FlameFileError(f"cannot read {p} as a FLAME pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise FlameFileError(f"{p} does not hold a FLAME model (a dict of arrays), but a {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, (str, bytes)):
            continue
        try:
            out[k] = _to_array(v)
        except FlameFileError:
            raise
        except Exception:
            continue
    return out


@dataclass
class HeadModel:
    """A FLAME-format model as torch tensors (float32 on ``device``).

    ``n_shape`` / ``n_expr``: how many identity / expression directions are used (the
    file's first ``n_shape`` columns of ``shapedirs`` are identity, the next ``n_expr``
    expression, as in FLAME).
    """

    v_template: torch.Tensor
    shapedirs: torch.Tensor  # [V, 3, n_shape]
    exprdirs: torch.Tensor  # [V, 3, n_expr]
    posedirs: torch.Tensor  # [36, V*3]
    J_regressor: torch.Tensor  # [5, V]
    weights: torch.Tensor  # [V, 5]
    parents: torch.Tensor  # [5]
    faces: torch.Tensor  # [F, 3] long
    eyelids: torch.Tensor | None = None  # [2, V, 3] left, right
    name: str = "flame"
    source: str = ""
    digest: str = ""
    meta: dict = field(default_factory=dict)
    #: ``parents`` as host integers, always set from ``parents`` when the model is made (read
    #: on every skinning, where ``.tolist()`` of a GPU tensor would wait for the device)
    parent_list: tuple = ()
    #: the joint regressor applied to the template and to every blendshape, [5, 3], [5, 3,
    #: n_shape], [5, 3, n_expr], [2, 5, 3] or None: the rest joints are linear in the
    #: parameters, so each skinning gets them from these without the shaped mesh. Always
    #: computed from the fields above when the model is made (a value passed in is ignored).
    J_template: torch.Tensor | None = None
    J_shapedirs: torch.Tensor | None = None
    J_exprdirs: torch.Tensor | None = None
    J_eyelids: torch.Tensor | None = None

    def __post_init__(self):
        self.parent_list = tuple(int(i) for i in self.parents.tolist())
        jr = self.J_regressor.to(self.v_template.dtype)
        self.J_template = jr @ self.v_template
        self.J_shapedirs = torch.einsum("jv,vck->jck", jr, self.shapedirs.to(jr))
        self.J_exprdirs = torch.einsum("jv,vck->jck", jr, self.exprdirs.to(jr))
        self.J_eyelids = None if self.eyelids is None else torch.einsum("jv,kvc->kjc", jr, self.eyelids.to(jr))

    @property
    def num_vertices(self) -> int:
        return self.v_template.shape[0]

    @property
    def n_shape(self) -> int:
        return self.shapedirs.shape[-1]

    @property
    def n_expr(self) -> int:
        return self.exprdirs.shape[-1]

    @property
    def is_standin(self) -> bool:
        return self.name == "gstalk-standin"

    def to(self, device) -> "HeadModel":
        kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return HeadModel(**kw)

    def with_identity(self, shape: torch.Tensor) -> "HeadModel":
        """This model with the identity ``shape`` [>= n_shape] added to its template and no
        identity directions left: the same vertices for any pose and expression of that
        identity, without its blendshapes in every skinning (an avatar's identity is fixed)."""
        sd = self.shapedirs
        v = self.v_template + torch.einsum("vck,k->vc", sd, shape[: self.n_shape].to(sd))
        return HeadModel(**{**self.__dict__, "v_template": v, "shapedirs": sd[..., :0]})

    def reference(self) -> dict:
        """What a track or avatar records about the model it was made with."""
        return {"name": self.name, "source": self.source, "digest": self.digest, "n_shape": self.n_shape,
                "n_expr": self.n_expr, "num_vertices": self.num_vertices}


def load_head_model(path: str | os.PathLike | None = None, n_shape: int | None = None, n_expr: int | None = None,
                    device: str | torch.device = "cpu") -> HeadModel:
    """Load a FLAME-format model.

    ``path`` None: the file named by $GSTALK_FLAME if set, otherwise gstalk's open stand-in
    head (``assets/flame/standin_head.npz``). ``n_shape`` / ``n_expr`` default to 300 / 100
    for official FLAME files (capped at what the file has) and to all directions for the
    stand-in.
    """
    if path is None:
        env = os.environ.get(FLAME_ENV)
        path = Path(env) if env else STANDIN_PATH
        if not env and not STANDIN_PATH.is_file():
            raise FlameFileError(f"the stand-in head model is missing at {STANDIN_PATH}; regenerate it with "
                                 "'python scripts/make_standin_head.py'")
    path = Path(path)
    raw = read_flame_file(path)
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise FlameFileError(f"{path} is not a complete FLAME model: missing {', '.join(missing)}. Expected the "
                             f"official generic_model.pkl / flame2023.pkl from {FLAME_URL}")
    v = raw["v_template"].astype(np.float32)
    V = v.shape[0]
    sd = raw["shapedirs"].astype(np.float32)
    if v.ndim != 2 or v.shape[1] != 3 or sd.ndim != 3 or sd.shape[:2] != (V, 3):
        raise FlameFileError(f"{path}: v_template {v.shape} / shapedirs {sd.shape} are not [V,3] / [V,3,K]")
    standin = "n_shape" in raw  # the stand-in records its split; FLAME has 300 identity directions
    file_shape = int(raw["n_shape"]) if standin else min(300, sd.shape[2])
    file_expr = sd.shape[2] - file_shape
    ns = file_shape if n_shape is None else min(n_shape, file_shape)
    ne = (file_expr if standin else min(100, file_expr)) if n_expr is None else min(n_expr, file_expr)
    pd = raw["posedirs"].astype(np.float32)
    if pd.shape[:2] == (V, 3):
        pd = pd.reshape(V * 3, -1).T  # [36, V*3]
    if pd.shape != (36, V * 3):
        raise FlameFileError(f"{path}: posedirs has shape {raw['posedirs'].shape}, expected [V,3,36]")
    jr = raw["J_regressor"].astype(np.float32)
    w = raw["weights"].astype(np.float32)
    kt = raw["kintree_table"].astype(np.int64)
    f = raw["f"].astype(np.int64)
    if jr.shape != (5, V) or w.shape != (V, 5) or kt.shape != (2, 5):
        raise FlameFileError(f"{path}: J_regressor {jr.shape}, weights {w.shape}, kintree_table {kt.shape} do not "
                             f"describe the 5 FLAME joints for {V} vertices")
    parents = kt[0].copy()
    parents[0] = -1
    eyelids = None
    if "l_eyelid" in raw and "r_eyelid" in raw:
        eyelids = torch.from_numpy(np.stack([raw["l_eyelid"], raw["r_eyelid"]]).astype(np.float32))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    meta = {k: raw[k] for k in raw if k not in REQUIRED and k not in ("l_eyelid", "r_eyelid")}
    name = str(raw["name"]) if "name" in raw else "flame"
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return HeadModel(
        v_template=t(v), shapedirs=t(sd[:, :, :ns]), exprdirs=t(sd[:, :, file_shape:file_shape + ne]),
        posedirs=t(pd), J_regressor=t(jr), weights=t(w), parents=t(parents), faces=t(f), eyelids=eyelids,
        name=name, source=str(path), digest=digest, meta=meta,
    ).to(device)
