"""An avatar folder whose files were edited or damaged is refused at load with a message naming
the file, the field and what was expected (exit 2, no traceback), by every command that reads
avatars: render, eval, view (start-up) and export."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from gstalk.avatar.io import CONFIG_RULES, load_avatar
from gstalk.cli import main
from gstalk.errors import FileFormatError
from tinyavatar import make_avatar, tone_speech

# each config.json field: a value of the wrong type and one out of range (or disagreeing with
# the rest of the folder); bools have no range, so both of theirs are of the wrong type
BAD_VALUES = {
    "fps": ("25", 0),
    "resolution": ("128", 0),
    "feature_kind": (3, "wav"),
    "window": (3.5, -3),
    "code_dim": ("32", 0),
    "expr_cond": (None, 5),  # the avatar has 4 expressions
    "sh_degree": ("one", 4),
    "encoding": (1, "grid"),
    "background": (None, "green"),
    "head_model": (None, {"source": "x"}),  # an object without the head model's name
    "n_shape": ("6", -1),
    "n_expr": (4.0, 10_001),
    "feature_dim": ("15", 1000),
    "seed": (1.5, 2 ** 70),
    "field_relative": ("yes", 1),
    "mouth_centre": ("x", [0.0, 0.0]),
    "mouth_radius": ("0.1", -1),
    "expr_prior": ("no", 0),
    "lip_motion": (2, "talk"),
    "phones": (None, "words"),
}
# in range, but disagreeing with the other files of the folder
DISAGREEING = {"sh_degree": 2, "code_dim": 16, "n_shape": 5, "feature_dim": 16}


@pytest.fixture(scope="module")
def avatar(tmp_path_factory):
    return make_avatar(tmp_path_factory.mktemp("schema") / "av", n_frames=6, resolution=32)


def test_every_config_field_has_a_rule():
    from dataclasses import fields

    from gstalk.avatar.model import AvatarConfig

    assert set(CONFIG_RULES) == {f.name for f in fields(AvatarConfig)} - {"version"} == set(BAD_VALUES)


def _edited(avatar, tmp_path, name, value):
    folder = tmp_path / f"av_{name}"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(avatar, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[name] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _commands(folder, tmp_path, wav):
    out = tmp_path / "out"
    return {"render": ["render", str(folder), "--audio", str(wav), "--out", str(out / "r.mp4")],
            "eval": ["eval", str(folder), str(tmp_path / "no_dataset"), "--out", str(out / "eval")],
            "view": ["view", str(folder), "--port", "0"],
            "export": ["export", str(folder), "--out", str(out / "export")]}


def test_each_field_of_the_wrong_type_or_out_of_range_is_refused_by_every_command(avatar, tmp_path, capsys):
    wav = tone_speech(tmp_path / "speech.wav")
    cases = [(n, v) for n, vals in BAD_VALUES.items() for v in vals] + list(DISAGREEING.items())
    for name, value in cases:
        folder = _edited(avatar, tmp_path, name, value)
        with pytest.raises(FileFormatError) as e:
            load_avatar(folder)
        msg = str(e.value)
        assert f"'{name}'" in msg or "'head_model.name'" in msg or "networks.safetensors" in msg, (name, msg)
        for verb, argv in _commands(folder, tmp_path, wav).items():
            assert main(argv) == 2, (name, value, verb)
            err = capsys.readouterr().err
            # the message is the avatar's (eval's dataset is missing too, and must not be what it reports)
            assert "gstalk error" in err and "Traceback" not in err and folder.name in err, (name, verb, err)
        assert not (tmp_path / "out").exists(), (name, value)  # nothing written for a refused avatar


def test_a_field_of_the_right_type_in_range_loads(avatar, tmp_path):
    folder = _edited(avatar, tmp_path, "fps", 30)
    av, _ = load_avatar(folder)
    assert av.cfg.fps == 30


def test_a_binding_past_the_mesh_and_a_bad_motion_array_are_refused(avatar, tmp_path, capsys):
    from plyfile import PlyData

    folder = tmp_path / "av"
    shutil.copytree(avatar, folder)
    ply = PlyData.read(str(folder / "gaussians.ply"), mmap=False)
    v = ply["vertex"].data
    v["binding"][3] = 10 ** 6
    ply.write(str(folder / "gaussians.ply"))
    with pytest.raises(FileFormatError, match="gaussians.ply: 'binding' must be a triangle"):
        load_avatar(folder)
    assert main(["export", str(folder), "--out", str(tmp_path / "o")]) == 2
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "o").exists()
    v["binding"][3] = 0
    v["opacity"][5] = np.nan
    ply.write(str(folder / "gaussians.ply"))
    with pytest.raises(FileFormatError, match="gaussians.ply: 1 of its .* Gaussians hold NaN .*Gaussian 5"):
        load_avatar(folder)

    folder = tmp_path / "av2"
    shutil.copytree(avatar, folder)
    with np.load(folder / "motion.npz") as z:
        m = dict(z)
    m["eyes"] = m["eyes"][:, :5]
    np.savez(folder / "motion.npz", **m)
    with pytest.raises(FileFormatError, match="motion.npz: 'eyes' has 5 along axis 1, expected 6"):
        load_avatar(folder)
    m["eyes"] = np.full((m["jaw"].shape[0], 6), np.nan)
    np.savez(folder / "motion.npz", **m)
    with pytest.raises(FileFormatError, match="'eyes' holds NaN"):
        load_avatar(folder)
    m["eyes"] = np.zeros((m["jaw"].shape[0] + 1, 6))
    np.savez(folder / "motion.npz", **m)
    with pytest.raises(FileFormatError, match="'eyes' has .* along axis 0, expected T = "):
        load_avatar(folder)


def test_dataset_manifests_and_tracks_are_checked_where_they_are_read(tmp_path):
    from gstalk.head.tracker import Track, load_track, save_track
    from gstalk.io.dataset import DATASET_FORMAT, DATASET_VERSION, Dataset

    good = {"format": DATASET_FORMAT, "version": DATASET_VERSION, "num_frames": 10, "fps": 25.0, "resolution": 64,
            "split": {"train": [0, 8], "test": [8, 10]}, "audio": {"present": True, "sample_rate": 16000}}
    (tmp_path / "manifest.json").write_text(json.dumps(good))
    assert Dataset(tmp_path).num_frames == 10
    for key, value, said in (("num_frames", "10", "'num_frames' must be an integer"),
                             ("fps", 0, "'fps' must be a number from 1"),
                             ("resolution", None, "'resolution' must be"),
                             ("split", {"train": [0, 8], "test": [8, 12]}, "'split.test' must be"),
                             ("split", {"train": [0, 8]}, "'split' must be an object with train, test"),
                             ("audio", {"present": "yes"}, "'audio.present' must be true or false")):
        (tmp_path / "manifest.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(FileFormatError, match=said):
            Dataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({k: v for k, v in good.items() if k != "fps"}))
    with pytest.raises(FileFormatError, match="lacks fps"):
        Dataset(tmp_path)

    T = 5
    arrays = dict(shape=np.zeros(6), expr=np.zeros((T, 4)), jaw=np.zeros((T, 3)), neck=np.zeros((T, 3)),
                  eyes=np.zeros((T, 6)), eyelids=np.zeros((T, 2)), global_rot=np.zeros((T, 3)),
                  translation=np.zeros((T, 3)), K=np.eye(3), viewmat=np.eye(4), valid=np.ones(T, bool),
                  residual_px=np.full(T, np.nan))
    track = Track(**arrays, width=64, height=64, model={"name": "gstalk-standin"})
    path = save_track(track, tmp_path / "track.npz")
    assert load_track(path).num_frames == T  # NaN residuals (frames without landmarks) are allowed
    for key, value, said in (("jaw", np.zeros((T, 2)), "'jaw' has 2 along axis 1, expected 3"),
                             ("neck", np.zeros((T + 1, 3)), "'neck' has 6 along axis 0, expected T = 5"),
                             ("K", np.full((3, 3), np.inf), "'K' holds NaN or infinite"),
                             ("viewmat", np.eye(3), "'viewmat' has 3 along axis 0, expected 4")):
        save_track(Track(**{**arrays, key: value}, width=64, height=64, model={"name": "gstalk-standin"}), path)
        with pytest.raises(FileFormatError, match=said):
            load_track(path)
    save_track(Track(**arrays, width=0, height=64, model={"name": "gstalk-standin"}), path)
    with pytest.raises(FileFormatError, match="'width' must be an integer from 1"):
        load_track(path)


def test_the_view_fill_and_ray_cut_are_stored_by_the_fit_and_checked_when_read(tmp_path):
    """save_avatar stores what other viewpoints show (views.safetensors), so a load need not
    compute it; it is what computing gives. A folder without the file (fitted before it
    existed) computes it at load as before; a damaged one is refused, naming the file."""
    import torch

    from gstalk.avatar.views import VIEWS_FILE

    folder = make_avatar(tmp_path / "av")
    assert (folder / VIEWS_FILE).is_file()
    stored, _ = load_avatar(folder)
    assert stored.view_fill is not None and len(stored.view_fill) > 0  # the back of the stand-in's head
    keep = tmp_path / "views.keep"
    shutil.move(folder / VIEWS_FILE, keep)
    computed, _ = load_avatar(folder)
    for k in ("view_centre", "view_fill", "view_fill_rgb", "view_fill_scale", "ray_cut", "ray_cut_scale"):
        a, b = getattr(stored, k), getattr(computed, k)
        assert (a is None) == (b is None), k
        if a is not None:
            torch.testing.assert_close(a, b, msg=k)
    from safetensors.torch import load_file, save_file

    t = load_file(str(keep))
    for key, value, words in (("view_fill", t["view_fill"] + 10 ** 6, "indices of this avatar's"),
                              ("view_fill_rgb", t["view_fill_rgb"][:1], r"view_fill_rgb must be \[\d+, 3\]"),
                              ("view_centre", torch.full((3,), float("nan")), "3 finite numbers")):
        save_file({**t, key: value.contiguous()}, str(folder / VIEWS_FILE))
        with pytest.raises(FileFormatError, match=f"{VIEWS_FILE}: .*{words}.*delete it"):
            load_avatar(folder)
