import json

import numpy as np
import pytest

from gstalk.config import PrepareOptions
from gstalk.errors import FileFormatError, GstalkError, OutputError
from gstalk.face.regions import FACE_OVAL
from gstalk.head.standin import photo_landmarks
from gstalk.io.dataset import Dataset
from gstalk.prepare import ClipTooShortError, NoFaceError, prepare
from gstalk.prepare.common import _follow_subject, _subject_boxes
from synthclip import make_clip

RES = 128


def opts(**kw):
    return PrepareOptions(resolution=RES, **kw)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip") / "phone.mp4", seconds=3.0)


@pytest.fixture(scope="module")
def dataset(clip, tmp_path_factory):
    return prepare(clip.path, tmp_path_factory.mktemp("ds") / "ds", opts(), log=lambda m: None)


def expected_landmarks(clip, ds: Dataset) -> np.ndarray:
    """The photo's own landmarks carried by the known per-frame transform into crop pixels."""
    ref = photo_landmarks()[:, :2].astype(np.float64)
    n = ds.num_frames
    out = np.empty((n, 478, 2))
    box = ds.crops()
    for k in range(n):
        # the constant-rate frame k shows the source frame nearest to time k / fps
        j = int(np.argmin(np.abs(clip.times - k / ds.fps)))
        m = clip.transforms[j]
        p = ref @ m[:, :2].T + m[:, 2]
        out[k] = (p - box[k, :2]) * (RES / box[k, 2])
    return out


def test_frames_timing_and_rotation(clip, dataset):
    m = dataset.manifest
    assert m["num_frames"] == round(clip.duration * 25) == 75 and m["fps"] == 25.0
    assert m["source"]["rotation"] == 90 and (m["source"]["width"], m["source"]["height"]) == clip.display_size
    assert dataset.frame(0).shape == (RES, RES, 3) and dataset.mask(0).shape == (RES, RES)
    assert m["split"] == {"train": [0, 68], "test": [68, 75]}  # last 1/11 held out
    assert m["face_fraction"] == 1.0 and m["landmark_fraction"] == 1.0
    assert (dataset.root / "preview.mp4").is_file() and (dataset.root / "background.png").is_file()


def test_landmarks_follow_the_known_motion(clip, dataset):
    lm = dataset.landmarks()
    assert lm["lmk"].shape == (75, 478, 3) and lm["valid"].all()
    err = np.linalg.norm(lm["lmk"][..., :2] - expected_landmarks(clip, dataset), axis=-1)
    # the photo's face is ~40 px wide at 128 px; rotation metadata, VFR and the crop are all
    # undone correctly only if these agree
    assert np.median(err) < 1.5, np.median(err)
    assert np.percentile(err.mean(axis=1), 95) < 3.0


def test_masks_cover_the_face(clip, dataset):
    import cv2

    exp = expected_landmarks(clip, dataset)
    for k in (0, 37, 74):
        lab = dataset.mask(k)
        oval = np.zeros((RES, RES), np.uint8)
        cv2.fillPoly(oval, [np.round(exp[k][FACE_OVAL]).astype(np.int32)], 1)
        face = (lab == 3) | (lab == 4)
        assert face[oval == 1].mean() > 0.9
        assert (lab[oval == 1] > 0).mean() > 0.98  # the person mask covers it too
        assert (lab == 2).sum() > 0.05 * RES * RES  # shoulders / torso present


def test_audio_aligned_to_frames(clip, dataset):
    a = dataset.audio()
    assert abs(len(a) / 16000 - dataset.num_frames / dataset.fps) <= 1 / dataset.fps
    rms = np.sqrt(np.convolve(a**2, np.ones(160) / 160, mode="same"))  # 10 ms windows
    env = rms > 0.1
    on = np.flatnonzero(env[1:] & ~env[:-1]) / 16000
    assert len(on) == len(clip.bursts)
    for (start, _), t in zip(clip.bursts, on):
        assert abs(t - start) < 1 / 25  # within one frame
    sig = dataset.signals()
    assert sig["blink"].shape == (75,) and np.all((sig["blink"] >= 0) & (sig["blink"] <= 1))
    assert np.all(np.isfinite(sig["mouth_open"]))


def test_resume_after_interruption(clip, tmp_path):
    out = tmp_path / "ds"

    def stop_at_40(stage, done, total):
        if stage == "frames" and done == 40:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(clip.path, out, opts(preview=False), progress=stop_at_40, log=lambda m: None)
    frames = sorted((out / "frames").glob("*.jpg"))
    assert len(frames) == 40 and not (out / "manifest.json").exists()
    assert not list(out.rglob(".tmp-*"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in frames}
    seen, logs = [], []
    ds = prepare(clip.path, out, opts(preview=False), progress=lambda s, d, t: seen.append((s, d)),
                 log=logs.append)
    assert ("scan", 1) not in seen  # the finished scan stage was not redone
    assert min(d for s, d in seen if s == "frames") == 41  # frames resumed after the last written
    assert all((out / "frames" / k).stat().st_mtime_ns == v for k, v in mtimes.items())
    assert ds.num_frames == 75 and len(list((out / "frames").glob("*.jpg"))) == 75
    assert any("resuming the unfinished" in m for m in logs)
    # a finished folder is reused as it is, and says so
    logs, seen = [], []
    prepare(clip.path, out, opts(preview=False), progress=lambda s, d, t: seen.append((s, d)), log=logs.append)
    assert not seen and any("already prepared" in m for m in logs), (seen, logs)


def test_no_audio_several_faces(tmp_path):
    c = make_clip(tmp_path / "two.mp4", seconds=2.2, audio=False, n_faces=2, rotation=0, vfr=False)
    ds = prepare(c.path, tmp_path / "ds", opts(preview=False), log=lambda m: None)
    w = " ".join(ds.manifest["warnings"])
    assert "no audio" in w and "several faces" in w and not ds.has_audio
    with pytest.raises(FileFormatError, match="no audio"):
        ds.audio()
    # the filmed face was followed: on every frame with landmarks they lie near the crop
    # centre, never on the small face in the corner
    raw = ds.landmarks()["lmk_raw"]
    ok = np.isfinite(raw[:, 0, 0])
    assert ok.mean() > 0.9
    assert np.all(np.abs(raw[ok][..., :2].mean(1) - RES / 2) < RES / 4)


def test_subject_track_outlasts_other_faces():
    n = 20
    subject = [[50 + k, 60, 40, 40, 0.9] for k in range(n)]
    found = []
    for k in range(n):
        faces = [[150, 10, 25, 25, 0.8]]  # a face in a poster, on every frame
        if not 5 <= k < 9:  # the detector misses the subject on frames 5..8
            faces.append(subject[k])
        if 10 <= k < 13:  # a passer-by, larger than the subject, for three frames
            faces.append([0, 100, 60, 60, 0.9])
        found.append(faces)
    boxes = _subject_boxes(found)
    miss = np.zeros(n, bool)
    miss[5:9] = True
    assert np.isnan(boxes[miss]).all()
    np.testing.assert_allclose(boxes[~miss], np.float32(subject)[~miss])
    assert np.isnan(_subject_boxes([[], []])).all()


def test_follow_subject_refuses_a_stranger():
    def face(cx, cy, w):
        g = np.stack(np.meshgrid(np.linspace(-0.5, 0.5, 3), np.linspace(-0.6, 0.6, 3)), -1).reshape(-1, 2)
        return np.concatenate([g * w + [cx, cy], np.zeros((9, 1))], 1).astype(np.float32)

    me, stranger, big = face(64, 70, 60), face(110, 15, 20), face(30, 100, 70)
    centre = (64.0, 64.0, 0.3 * 128)  # where the crop frames the subject
    assert _follow_subject([stranger, me], None, centre) is me
    assert _follow_subject([stranger], None, centre) is None  # not the subject's landmarks
    assert _follow_subject([stranger], (66.0, 68.0, 58.0), centre) is None
    assert _follow_subject([big, me], (60.0, 66.0, 58.0), None) is me  # the face where the subject was
    assert _follow_subject([me, big], None, None) is big  # no reference: the largest
    moved = face(80, 75, 60)  # a jump of more than half a face since the last frame: the framed one
    assert _follow_subject([stranger, moved], (40.0, 60.0, 60.0), centre) is moved
    assert _follow_subject([], None, centre) is None


def test_bad_inputs(tmp_path):
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(FileFormatError, match="cannot read"):
        prepare(tmp_path / "junk.mp4", tmp_path / "a", opts())
    with pytest.raises(FileFormatError, match="no such file"):
        prepare(tmp_path / "missing.mp4", tmp_path / "a", opts())
    short = make_clip(tmp_path / "short.mp4", seconds=1.2, vfr=False)
    with pytest.raises(ClipTooShortError, match="at least 2"):
        prepare(short.path, tmp_path / "b", opts(), log=lambda m: None)
    noface = make_clip(tmp_path / "noface.mp4", seconds=2.2, face=False, vfr=False)
    with pytest.raises(NoFaceError, match="no face"):
        prepare(noface.path, tmp_path / "c", opts(), log=lambda m: None)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        prepare(short.path, blocker / "d", opts())
    # a refused clip leaves no output folder (nothing in it could be resumed)
    assert not any(p.is_dir() for p in tmp_path.iterdir()), sorted(tmp_path.iterdir())
    # one that existed before is kept, with what was in it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / ".keep").write_text("")
    with pytest.raises(NoFaceError):
        prepare(noface.path, tmp_path / "mine", opts(), log=lambda m: None)
    assert (tmp_path / "mine" / ".keep").is_file()


def test_truncated_clip(clip, tmp_path):
    data = clip.path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(GstalkError):  # the moov atom is at the end: nothing is readable
        prepare(cut, tmp_path / "x", opts(), log=lambda m: None)


def test_dataset_version_check(dataset, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(dataset.root, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["version"] = 0
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FileFormatError, match="version 0"):
        Dataset(copy)
    with pytest.raises(FileFormatError, match="not a gstalk dataset"):
        Dataset(tmp_path)


def test_cli_prepare(clip, tmp_path):
    from gstalk.cli import main

    assert main(["prepare", str(clip.path), str(tmp_path / "ds"), "--resolution", "64", "--no-preview"]) == 0
    assert Dataset(tmp_path / "ds").resolution == 64
    assert main(["prepare", str(tmp_path / "nothing.mp4"), str(tmp_path / "x")]) == 2


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_holding_files_gstalk_did_not_write_is_refused_and_kept(clip, tmp_path, capsys):
    """prepare, import-dataset and fit refuse an output folder with someone else's files (here
    an audio.wav and a manifest.json of the same names gstalk would write), before any work,
    and leave it byte-identical; a dataset folder of gstalk's is reused, keeping a file the
    user added to it."""
    from gstalk.cli import main
    from gstalk.prepare import import_nerf_dataset

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "audio.wav").write_bytes(b"RIFF my own recording")
    (theirs / "manifest.json").write_text('{"project": "mine"}')
    before = _snapshot(theirs)
    with pytest.raises(OutputError, match="already holds files gstalk did not write .*audio.wav, manifest.json"):
        prepare(clip.path, theirs, opts(), log=lambda m: None)
    nerf = tmp_path / "nerf"
    (nerf / "ori_imgs").mkdir(parents=True)
    with pytest.raises(OutputError, match="gstalk did not write"):
        import_nerf_dataset(nerf, theirs)
    assert main(["fit", str(clip.path), str(tmp_path / "av"), "--dataset", str(theirs)]) == 2
    err = capsys.readouterr().err
    assert "gstalk did not write" in err and "Traceback" not in err
    assert _snapshot(theirs) == before and not (tmp_path / "av").exists()

    ours = tmp_path / "ours"
    prepare(clip.path, ours, opts(), log=lambda m: None)
    (ours / "notes.txt").write_text("kept")
    log = []
    prepare(clip.path, ours, opts(), log=log.append)
    assert any("reusing it" in m for m in log) and (ours / "notes.txt").read_text() == "kept"


def test_a_clip_filmed_sideways_without_rotation_metadata_is_turned(clip, tmp_path):
    """A phone clip whose rotation was lost shows the face lying on its side: the scan finds too
    few faces, tries the other three orientations, prepares it turned and says so; its frames
    are the same as those of the clip that kept its rotation."""
    side = make_clip(tmp_path / "side.mp4", seconds=2.4, vfr=False, record_rotation=False)
    upright = make_clip(tmp_path / "upright.mp4", seconds=2.4, vfr=False)
    a = prepare(side.path, tmp_path / "a", opts(preview=False), log=lambda m: None)
    b = prepare(upright.path, tmp_path / "b", opts(preview=False), log=lambda m: None)
    assert any("turned by 90 degrees" in w for w in a.manifest["warnings"])
    assert not any("turned" in w for w in b.manifest["warnings"])
    assert a.manifest["source"]["rotation"] == 90 and (a.manifest["source"]["width"], a.manifest["source"]["height"]) \
        == (b.manifest["source"]["width"], b.manifest["source"]["height"])
    fa, fb = a.frame(5).astype(float), b.frame(5).astype(float)
    assert np.abs(fa - fb).mean() < 3, np.abs(fa - fb).mean()


def test_a_truncated_clip_that_still_decodes_and_a_tiny_source_are_warned_about(tmp_path):
    """A clip cut short after its header (which declares the full length) is prepared with a
    warning saying how much decoded; a head far smaller than the dataset's resolution too."""
    import av

    full = make_clip(tmp_path / "full.mp4", seconds=4.0, vfr=False)
    fast = tmp_path / "fast.mp4"  # the header (moov) first, as phones and web uploads write it
    with av.open(str(full.path)) as src, av.open(str(fast), "w", options={"movflags": "faststart"}) as dst:
        streams = {s.index: dst.add_stream_from_template(s) for s in src.streams}
        for packet in src.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                dst.mux(packet)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(fast.read_bytes()[: int(fast.stat().st_size * 0.6)])
    ds = prepare(cut, tmp_path / "ds", opts(preview=False), log=lambda m: None)
    said = [w for w in ds.manifest["warnings"] if "truncated" in w]
    assert said and "of the 4.0 s" in said[0], ds.manifest["warnings"]
    assert 2.0 <= ds.manifest["duration"] < 3.6
    whole = prepare(full.path, tmp_path / "whole", opts(preview=False), log=lambda m: None)
    assert not any("truncated" in w for w in whole.manifest["warnings"])
    assert not any("upscaled" in w for w in whole.manifest["warnings"])

    tiny = prepare(full.path, tmp_path / "tiny", PrepareOptions(resolution=512, preview=False), log=lambda m: None)
    said = [w for w in tiny.manifest["warnings"] if "upscaled" in w]
    assert said and "--resolution" in said[0], tiny.manifest["warnings"]


@pytest.mark.parametrize("hdr", ["HLG", "PQ"])
def test_hdr_phone_video_is_tone_mapped_to_standard_range(hdr, tmp_path):
    """HDR video (10-bit HEVC, BT.2020, HLG or PQ: what phones film by default) decodes to the
    picture an SDR screen shows: the same clip filmed in standard range gives the same frames
    within a few grey levels, where a plain conversion of its signal is dim and grey (over 15
    levels off); the user is told. The HLG clip is prepared whole, upright from its rotation."""
    import av

    from gstalk.io.video import iter_frames, probe, standard_range

    secs = 2.4 if hdr == "HLG" else 0.6
    sdr = make_clip(tmp_path / "sdr.mp4", seconds=secs, vfr=False)
    hd = make_clip(tmp_path / "hdr.mp4", seconds=secs, vfr=False, hdr=hdr)
    info, plain = probe(hd.path), probe(sdr.path)
    assert (info.transfer, plain.transfer) == (hdr, "")
    assert any(f"HDR video ({hdr}" in w for w in info.warnings) and not plain.warnings
    ours = dict(iter_frames(hd.path, 25, info))
    truth = dict(iter_frames(sdr.path, 25, plain))
    sig = dict(iter_frames(hd.path, 25, info, signal=True))  # what prepare shrinks before tone-mapping
    assert sig[3].dtype == np.uint16 and np.array_equal(standard_range(sig[3], info), ours[3])
    assert standard_range(truth[3], plain) is truth[3]
    assert ours.keys() == truth.keys() and ours[3].shape == truth[3].shape == (256, 192, 3)
    err = np.mean([np.abs(ours[k].astype(float) - truth[k]).mean() for k in ours])
    assert err < 5, err
    with av.open(str(hd.path)) as c:  # the signal converted as if it were standard range
        raw = np.rot90(next(c.decode(video=0)).to_ndarray(format="rgb24"), k=1).astype(float)
    assert np.abs(raw - truth[0]).mean() > 15
    if hdr == "HLG":
        a = prepare(hd.path, tmp_path / "a", opts(preview=False), log=lambda m: None)
        b = prepare(sdr.path, tmp_path / "b", opts(preview=False), log=lambda m: None)
        assert any("HDR video (HLG" in w for w in a.manifest["warnings"])
        assert (a.manifest["source"]["transfer"], b.manifest["source"]["transfer"]) == ("HLG", "SDR")
        fa, fb = a.frame(5).astype(float), b.frame(5).astype(float)
        assert np.abs(fa - fb).mean() < 5, np.abs(fa - fb).mean()
