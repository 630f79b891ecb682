"""The avatar folder: everything needed to render, nothing from the dataset's frames.

    config.json          format, version, AvatarConfig (feature kind, sizes, head-model reference)
    gaussians.ply        canonical Gaussians, 3DGS layout; bound ones in their triangle's
                         local frame (``binding`` = parent triangle, -1 = free/torso), ``region``
    networks.safetensors deformation field, audio encoder (with its feature normalisation),
                         audio-to-motion network, viseme lip model's calibration
    motion.npz           identity shape, camera (K, viewmat), and the training clip's head
                         motion (poses, eyes) used to animate new audio
    background.png       the background plate (when the background mode is 'plate')

Loading never executes code from the folder (safetensors, plyfile, numpy without pickle,
JSON). A folder of another format version is refused with a clear message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from gstalk.avatar.model import AVATAR_VERSION, Avatar, AvatarConfig
from gstalk.errors import FileFormatError, GstalkError
from gstalk.gaussians.ply import load_ply, save_ply
from gstalk.head.flame import STANDIN_PATH, load_head_model
from gstalk.io.atomic import atomic_path, ensure_dir, write_json

AVATAR_FORMAT = "gstalk-avatar"

READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, AVATAR_VERSION)
# what motion.npz must hold: the identity and camera, and the training clip's motion that
# drives new audio and chooses the view fill
MOTION_KEYS = ("shape", "K", "viewmat", "global_rot", "neck", "translation", "eyes", "jaw", "expr")


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
    g = load_ply(root / "gaussians.ply")
    if g.binding is None or "region" not in g.extra:
        raise FileFormatError(f"{root / 'gaussians.ply'} lacks gstalk's binding/region properties")
    motion = load_npz(root / "motion.npz", "re-fit the avatar ('gstalk train')")
    missing = [k for k in MOTION_KEYS if k not in motion]
    if missing:
        raise FileFormatError(f"{root / 'motion.npz'} lacks {', '.join(missing)}; re-fit the avatar ('gstalk train')")
    rows = {k: int(np.shape(motion[k])[0]) if np.ndim(motion[k]) else 0 for k in MOTION_KEYS[3:]}
    if min(rows.values()) == 0 or len(set(rows.values())) > 1:
        counts = ", ".join(f"{k}: {n}" for k, n in rows.items())
        raise FileFormatError(f"{root / 'motion.npz'} holds no frames or frames of different counts ({counts}); "
                              "re-fit the avatar ('gstalk train')")
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
    av.set_ray_cut(motion)
    av.set_view_fill(motion)
    return av, motion
