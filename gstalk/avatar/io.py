"""The avatar folder: everything needed to render, nothing from the dataset's frames.

    config.json          format, version, AvatarConfig (feature kind, sizes, head-model reference)
    gaussians.ply        canonical Gaussians, 3DGS layout; bound ones in their triangle's
                         local frame (``binding`` = parent triangle, -1 = free/torso), ``region``
    networks.safetensors deformation field, audio encoder (with its feature normalisation),
                         audio-to-motion network, viseme lip model's calibration
    motion.npz           identity shape, camera (K, viewmat), and the training clip's head
                         motion (poses, eyes) used to animate new audio
    background.png       the background plate (when the background mode is 'plate')
    views.safetensors    what other viewpoints show (:mod:`gstalk.avatar.views`: the view fill
                         and the ray cut), computed as the avatar is saved; a folder without it
                         has them computed at load

Loading never executes code from the folder (safetensors, plyfile, numpy without pickle,
JSON). A folder of another format version is refused with a clear message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from gstalk.audio.phones import PHONE_SOURCES
from gstalk.avatar.model import AVATAR_VERSION, Avatar, AvatarConfig
from gstalk.errors import FileFormatError, GstalkError, OutputError
from gstalk.gaussians.ply import check_finite_file, load_ply, save_ply
from gstalk.head.flame import STANDIN_PATH, load_head_model
from gstalk.io.atomic import atomic_path, check_own_folder, ensure_dir, write_json
from gstalk.io.schema import Bool, Choice, Int, Number, Optional, Point, Record, Text, check_arrays, check_fields

AVATAR_FORMAT = "gstalk-avatar"

READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8, AVATAR_VERSION)
# what motion.npz must hold: the identity and camera, and the training clip's motion that
# drives new audio and chooses the view fill
MOTION_KEYS = ("shape", "K", "viewmat", "global_rot", "neck", "translation", "eyes", "jaw", "expr")
# their shapes: S identity and E expression directions of the head model, T frames
MOTION_SHAPES = {"shape": ("S",), "K": (3, 3), "viewmat": (4, 4), "global_rot": ("T", 3), "neck": ("T", 3),
                 "translation": ("T", 3), "eyes": ("T", 6), "eyelids": ("T", 2), "jaw": ("T", 3), "expr": ("T", "E")}
REFIT = "re-fit the avatar ('gstalk train')"

_COUNT = Int(0, 10_000)
#: every config.json field: its type and range (what a reader of the folder may rely on)
CONFIG_RULES = {
    "fps": Number(1, 1000),
    "resolution": Int(16, 16384),
    "feature_kind": Choice(("mel", "phoneme", "mel+phoneme", "none")),
    "window": Int(1, 1024),
    "code_dim": Int(1, 4096),
    "expr_cond": _COUNT,
    "sh_degree": Int(0, 3),
    "encoding": Choice(("hash", "triplane")),
    "background": Choice(("plate", "alpha", "white", "black")),
    "head_model": Record({"name": Text(), "source": Text(), "digest": Optional(Text()), "n_shape": Optional(_COUNT),
                          "n_expr": Optional(_COUNT)}, required=("name",)),
    "n_shape": _COUNT,
    "n_expr": _COUNT,
    "feature_dim": Int(1, 4096),
    "seed": Int(-(2 ** 63), 2 ** 64 - 1),
    "field_relative": Bool(),
    "mouth_centre": Point(3, optional=True),
    "mouth_radius": Number(0, 10),
    "expr_prior": Bool(),
    "lip_motion": Choice(("visemes", "learned", "none")),
    "phones": Choice(PHONE_SOURCES),
}


def check_config(raw: dict, path: Path) -> None:
    """config.json's fields by :data:`CONFIG_RULES`, and those that must agree with each other."""
    from gstalk.audio.features import feature_dim

    check_fields(raw, CONFIG_RULES, path, REFIT)
    kind = raw.get("feature_kind", "phoneme")
    if kind != "none" and "feature_dim" in raw and raw["feature_dim"] != feature_dim(kind):
        raise FileFormatError(f"{path}: 'feature_dim' must be {feature_dim(kind)} for feature_kind '{kind}', got "
                              f"{raw['feature_dim']}; {REFIT}")
    if "expr_cond" in raw and "n_expr" in raw and raw["expr_cond"] > raw["n_expr"]:
        raise FileFormatError(f"{path}: 'expr_cond' ({raw['expr_cond']}) must be at most 'n_expr' ({raw['n_expr']}); "
                              f"{REFIT}")


#: the files of a finished avatar (see the module's docstring); a fit under way adds checkpoint.pt
AVATAR_FILES = ("config.json", "gaussians.ply", "networks.safetensors", "motion.npz", "background.png",
                "views.safetensors")


def is_finished_avatar(folder: Path) -> bool:
    """Whether ``folder`` holds a finished avatar of this format (its config.json says so)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("format") == AVATAR_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def is_avatar_folder(folder: Path) -> bool:
    """Whether gstalk wrote ``folder``: a finished avatar, or a fit under way (its checkpoint)."""
    return is_finished_avatar(folder) or (folder / "checkpoint.pt").is_file()


def claim_avatar_folder(folder: str | os.PathLike, overwrite: bool, flag: str = "--overwrite") -> bool:
    """Check, before any work, that a fit may write ``folder``: new, empty, or a fit under way
    (resumed). A finished avatar is refused unless ``overwrite``; a folder holding files gstalk
    did not write is refused (OutputError). Returns whether a finished avatar is to be replaced
    (:func:`remove_avatar`, once the fit's inputs have been read)."""
    root = Path(folder)
    if not check_own_folder(root, is_avatar_folder, "avatar"):
        return False
    if (root / "checkpoint.pt").is_file() or not is_finished_avatar(root):
        return False  # a fit under way: it resumes
    if not overwrite:
        raise OutputError(f"{root} holds a finished avatar; give {flag} to fit it again (the avatar and its eval/ "
                          "are replaced), or another folder")
    return True


def remove_avatar(folder: str | os.PathLike, log=print) -> None:
    """Remove the finished avatar in ``folder`` and its eval/ (which would describe the wrong
    avatar). Files there that gstalk did not write are kept."""
    import shutil

    root = Path(folder)
    try:
        for name in AVATAR_FILES:  # config.json first: a half-removed folder is no longer a finished avatar
            (root / name).unlink(missing_ok=True)
        if (root / "eval").is_dir():
            shutil.rmtree(root / "eval")
    except OSError as e:
        raise OutputError(f"cannot remove the old avatar in {root}: {e.strerror or e}") from None
    log(f"{root}: the finished avatar there and its evaluation are replaced")


def save_avatar(avatar: Avatar, folder: str | os.PathLike, motion: dict[str, np.ndarray],
                background: np.ndarray | None = None) -> Path:
    from safetensors.torch import save_file

    out = ensure_dir(folder)
    save_ply(avatar.gaussian_set(), out / "gaussians.ply")
    tensors = {}
    for prefix, mod in (("field", avatar.field), ("audio", avatar.audio), ("a2m", avatar.a2m),
                        ("visemes", avatar.visemes)):
        for k, v in mod.state_dict().items():
            tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
    with atomic_path(out / "networks.safetensors") as tmp:
        save_file(tensors, str(tmp))
    from gstalk.io.dataset import save_npz, write_image_file

    save_npz(out / "motion.npz", shape=avatar.shape.cpu().numpy(), K=avatar.K.cpu().numpy(),
             viewmat=avatar.viewmat.cpu().numpy(), **{k: np.asarray(v, np.float32) for k, v in motion.items()})
    if background is not None:
        write_image_file(out / "background.png", background)
    from gstalk.avatar.views import save_views

    avatar.set_ray_cut(motion)  # what other viewpoints show, computed once here instead of at every load
    avatar.set_view_fill(motion)
    save_views(avatar, out)
    write_json(out / "config.json", {"format": AVATAR_FORMAT, **avatar.cfg.to_json()})
    return out


def head_for(ref: dict):
    """The head model a track or avatar recorded (stand-in, or the user's FLAME file)."""
    if ref.get("name") == "gstalk-standin":
        return load_head_model(STANDIN_PATH, n_shape=ref.get("n_shape"), n_expr=ref.get("n_expr"))
    src = ref.get("source", "")
    if not src or not Path(src).is_file():
        raise GstalkError(f"this avatar was fitted with the head model file {src or '(unknown)'}, which is not "
                          "there; put the same FLAME file back or set GSTALK_FLAME to it")
    model = load_head_model(src, n_shape=ref.get("n_shape"), n_expr=ref.get("n_expr"))
    if ref.get("digest") and model.digest != ref["digest"]:
        raise GstalkError(f"{src} is not the head-model file this avatar was fitted with (digest differs)")
    return model


def _visemes_of_version_7(sd: dict) -> dict:
    """Format 7's viseme model had no pre- and post-speech classes: they get the resting
    mouth's target and no window, which gives that model's lips unchanged."""
    from gstalk.audio.visemes import PRE, SIL, VISEMES

    t = sd.get("targets")
    if t is not None and t.ndim == 2 and t.shape[0] == PRE:
        sd = {**sd, "targets": torch.cat([t, t[SIL:SIL + 1].expand(len(VISEMES) - PRE, -1)]),
              "pre_s": torch.zeros(()), "post_s": torch.zeros(())}
    return sd


def load_avatar(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Avatar, dict]:
    """(avatar, motion arrays) from an avatar folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from gstalk.io.dataset import load_npz

    root = Path(folder)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise FileFormatError(f"{root} is not a gstalk avatar (no config.json); fit one with 'gstalk train' or "
                              "'gstalk fit'")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{cfg_path} is not valid JSON ({e})") from None
    if raw.get("format") != AVATAR_FORMAT:
        raise FileFormatError(f"{cfg_path} does not describe a gstalk avatar")
    if raw.get("version") not in READABLE_VERSIONS:
        raise FileFormatError(f"{root} was written in avatar format version {raw.get('version')}; this gstalk reads "
                              f"versions {', '.join(map(str, READABLE_VERSIONS))}. Re-fit the avatar with this version "
                              "('gstalk train').")
    raw.pop("format")
    check_config(raw, cfg_path)
    if raw["version"] == 1:  # version 1 fields gave absolute offsets and had no mouth prior
        raw.update(field_relative=False, mouth_centre=None, mouth_radius=0.0)
    if raw["version"] <= 2:  # no expression prior before version 3
        raw.update(expr_prior=False)
    if raw["version"] <= 3:  # no viseme lip model before version 4
        raw.update(lip_motion="learned")
    old_visemes = 4 <= raw["version"] <= 6 and raw.get("lip_motion") == "visemes"
    if old_visemes:  # versions 4-6 calibrated another viseme model; its lips are the learned network's now
        raw.update(lip_motion="learned")
    try:
        cfg = AvatarConfig(**raw)
    except TypeError as e:  # fields this version does not know, or lacks
        raise FileFormatError(f"{cfg_path} does not match avatar format version {raw['version']} ({e})") from None
    head = head_for(cfg.head_model)
    if "n_shape" in raw and "n_expr" in raw and (head.n_shape, head.n_expr) != (cfg.n_shape, cfg.n_expr):
        raise FileFormatError(f"{cfg_path}: 'n_shape' and 'n_expr' ({cfg.n_shape}, {cfg.n_expr}) must be the head "
                              f"model's ({head.n_shape}, {head.n_expr}); {REFIT}")
    ply = root / "gaussians.ply"
    g = load_ply(ply)
    if g.binding is None or "region" not in g.extra:
        raise FileFormatError(f"{ply} lacks gstalk's binding/region properties")
    check_finite_file(g, ply, REFIT)
    if g.sh_degree != cfg.sh_degree:
        raise FileFormatError(f"{ply} holds colour of SH degree {g.sh_degree}, but {cfg_path} says 'sh_degree' "
                              f"{cfg.sh_degree}; {REFIT}")
    n_faces = int(head.faces.shape[0])
    bad = (g.binding < -1) | (g.binding >= n_faces)
    if bool(bad.any()):
        raise FileFormatError(f"{ply}: 'binding' must be a triangle of the head model (0 to {n_faces - 1}) or -1, "
                              f"got {int(g.binding[bad][0])} at Gaussian {int(bad.nonzero()[0, 0])}; {REFIT}")
    region = g.extra["region"]
    if region.numel() != len(g) or not bool(((region >= 0) & (region <= 2) & (region == region.round())).all()):
        raise FileFormatError(f"{ply}: 'region' must be 0 (face), 1 (mouth) or 2 (torso) for every Gaussian; {REFIT}")
    motion = load_npz(root / "motion.npz", REFIT)
    missing = [k for k in MOTION_KEYS if k not in motion]
    if missing:
        raise FileFormatError(f"{root / 'motion.npz'} lacks {', '.join(missing)}; {REFIT}")
    dims = check_arrays(motion, MOTION_SHAPES, root / "motion.npz", REFIT, dims={"S": head.n_shape})
    if dims["T"] == 0:
        raise FileFormatError(f"{root / 'motion.npz'} holds no frames; {REFIT}")
    av = Avatar(cfg, head, torch.from_numpy(motion.pop("shape")), g, g.extra["region"].long(),
                torch.from_numpy(motion.pop("K")), torch.from_numpy(motion.pop("viewmat")))
    try:
        tensors = load_file(str(root / "networks.safetensors"))
    except (OSError, SafetensorError) as e:  # missing, truncated, not safetensors
        raise FileFormatError(f"{root / 'networks.safetensors'} cannot be read ({e}); re-fit the avatar "
                              "('gstalk train')") from None
    nets = [("field", av.field), ("audio", av.audio), ("a2m", av.a2m)]
    if raw["version"] >= 7:  # this viseme lip model came with version 7
        nets.append(("visemes", av.visemes))
    for prefix, mod in nets:
        sd = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if prefix == "visemes" and raw["version"] == 7:
            sd = _visemes_of_version_7(sd)
        try:
            missing, unexpected = mod.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # a tensor of another shape (an edited or damaged file)
            first = str(e).strip().splitlines()[-1].strip()
            raise FileFormatError(f"{root / 'networks.safetensors'}: network '{prefix}' does not match this avatar's "
                                  f"config.json ({first}); re-fit the avatar ('gstalk train')") from None
        if missing or unexpected:
            raise FileFormatError(f"{root}: network '{prefix}' does not match this gstalk "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if (root / "background.png").is_file():
        from gstalk.io.dataset import read_image_file

        motion["background"] = read_image_file(root / "background.png")
    av = av.to(device)
    if old_visemes:
        av.notes.append(f"{root} was fitted with an older viseme lip model (avatar format {raw['version']}); new audio "
                        "moves its lips with the learned network. Re-fit it for the current lip model.")
    from gstalk.avatar.views import load_views

    if not load_views(av, root):  # what the fit stored (views.safetensors); a folder without it: computed here
        av.set_ray_cut(motion)
        av.set_view_fill(motion)
    return av, motion
