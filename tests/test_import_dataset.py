import json

import numpy as np
import pytest

from gstalk.cli import main
from gstalk.config import PrepareOptions
from gstalk.errors import FileFormatError
from gstalk.prepare import import_nerf_dataset
from gstalk.io.video import iter_frames, write_wav
from synthclip import make_clip


@pytest.fixture(scope="module")
def nerf_folder(tmp_path_factory):
    """A folder laid out like ER-NeRF's data/<name>, built from the synthetic clip."""
    import cv2

    root = tmp_path_factory.mktemp("nerf")
    clip = make_clip(root / "clip.mp4", seconds=2.2, vfr=False, rotation=0, size=(160, 160))
    (root / "ori_imgs").mkdir()
    (root / "parsing").mkdir()
    n = 0
    for k, img in iter_frames(clip.path, 25):
        cv2.imwrite(str(root / "ori_imgs" / f"{k}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        seg = np.full((160, 160, 3), 255, np.uint8)  # white background
        seg[20:100, 40:120] = (255, 0, 0)  # head (BGR as cv2 writes)
        seg[100:160, 20:140] = (0, 0, 255)  # torso
        seg[95:105, 60:100] = (0, 255, 0)  # neck
        cv2.imwrite(str(root / "parsing" / f"{k}.png"), seg)
        n += 1
    split = int(n * 10 / 11)
    for name, ids in (("train", range(split)), ("val", range(split, n))):
        frames = [{"img_id": i, "aud_id": i, "transform_matrix": np.eye(4).tolist()} for i in ids]
        (root / f"transforms_{name}.json").write_text(json.dumps({"focal_len": 1200.0, "cx": 80.0, "cy": 80.0,
                                                                  "frames": frames}))
    t = np.arange(int(n / 25 * 16000)) / 16000
    write_wav(root / "aud.wav", 0.3 * np.sin(2 * np.pi * 220 * t), 16000)
    np.save(root / "aud_ds.npy", np.zeros((n, 16, 29), np.float32))
    au = np.zeros(n)
    au[10:13] = 3.0  # a blink
    with open(root / "au.csv", "w") as f:
        f.write("frame, face_id, timestamp, confidence, success, AU01_r, AU45_r\n")
        for i in range(n):
            f.write(f"{i + 1}, 0, {i / 25:.3f}, 0.98, 1, 0.1, {au[i]:.2f}\n")
    return root, n, split


def test_import_nerf_layout(nerf_folder, tmp_path):
    root, n, split = nerf_folder
    ds = import_nerf_dataset(root, tmp_path / "ds", PrepareOptions(resolution=96, preview=False), log=lambda m: None)
    m = ds.manifest
    assert ds.num_frames == n and ds.resolution == 96
    assert m["split"] == {"train": [0, split], "test": [split, n]}
    assert m["features"] == {"deepspeech": "features/deepspeech.npy"}
    assert np.load(ds.root / "features" / "deepspeech.npy").shape == (n, 16, 29)
    assert abs(len(ds.audio()) / 16000 - n / 25) < 1 / 25
    blink = ds.signals()["blink"]
    assert np.all(blink[10:13] == 1.0) and np.all(blink[:10] == 0)  # clip(AU45_r, 0, 2) / 2
    lab = ds.mask(0)
    assert (lab[80:, :] == 2).mean() > 0.5  # torso from the parsing
    assert (lab[:8, :] == 0).all()  # background from the parsing
    assert ((lab == 3) | (lab == 4)).sum() > 100  # face from our landmarks
    poses = np.load(ds.root / "imported_poses.npz")
    assert poses["c2w"].shape == (n, 4, 4) and float(poses["focal"]) == 1200.0
    assert m["landmark_fraction"] > 0.9


def test_import_errors(tmp_path):
    with pytest.raises(FileFormatError, match="ori_imgs"):
        import_nerf_dataset(tmp_path, tmp_path / "out")
    assert main(["import-dataset", str(tmp_path), str(tmp_path / "out")]) == 2


def test_damaged_transforms_and_au_files_are_named(tmp_path):
    """A transforms file whose frames lack img_id or a 4x4 transform_matrix, or that is not an
    object at all, and an au.csv whose AU45_r column is not numbers: refused, naming the file."""
    import cv2

    from gstalk.prepare.nerf import _read_au45

    (tmp_path / "ori_imgs").mkdir()
    for i in range(60):  # 2.4 s at 25 fps: past the shortest clip
        cv2.imwrite(str(tmp_path / "ori_imgs" / f"{i}.jpg"), np.zeros((16, 16, 3), np.uint8))
    for bad in ({"frames": [{"transform_matrix": np.eye(4).tolist()}]},
                {"frames": [{"img_id": 0, "transform_matrix": [[1, 0], [0, 1]]}]},
                [1, 2, 3], {"focal_len": "long"}):
        (tmp_path / "transforms_train.json").write_text(json.dumps(bad))
        with pytest.raises(FileFormatError, match="transforms_train.json is not a transforms file"):
            import_nerf_dataset(tmp_path, tmp_path / "out", log=lambda m: None)
    (tmp_path / "au.csv").write_text("frame, AU45_r\n1, 0.5\n2, closed\n")
    with pytest.raises(FileFormatError, match="au.csv: the AU45_r column holds something that is not a number"):
        _read_au45(tmp_path / "au.csv")
    (tmp_path / "au.csv").write_text("frame, AU45_r\n1, 0.5\n2, 1.5\n")
    np.testing.assert_allclose(_read_au45(tmp_path / "au.csv"), [0.5, 1.5])
