import subprocess
import sys

import numpy as np
import pytest

from gstalk.cli import main
from gstalk.gaussians import GaussianSet, save_ply
from gstalk.io.media import probe_video


def test_render_ply_turntable(tmp_path):
    g = GaussianSet.random(200, sh_degree=0, extent=0.3)
    save_ply(g, tmp_path / "scene.ply")
    assert main(["render", str(tmp_path / "scene.ply"), "--out", str(tmp_path / "r"), "--size", "32",
                 "--frames", "2"]) == 0
    import imageio.v3 as iio

    img = iio.imread(tmp_path / "r" / "scene.png")
    assert img.shape == (32, 32, 3) and img[14:18, 14:18].mean() < img[:2, :2].mean()  # scene darker than white bg
    assert probe_video(tmp_path / "r" / "scene_turntable.mp4")["frames"] == 2
    assert (tmp_path / "r" / "scene.png").is_file()
    # a camera distance that cannot be (0 fits the scene) is refused before anything is written
    for radius in ("-1", "nan"):
        assert main(["render", str(tmp_path / "scene.ply"), "--out", str(tmp_path / "bad"), "--radius", radius]) == 2
    assert not (tmp_path / "bad").exists()


def test_bad_input_is_a_message_not_a_traceback(tmp_path):
    (tmp_path / "bad.ply").write_text("nonsense")
    r = subprocess.run([sys.executable, "-m", "gstalk", "render", str(tmp_path / "bad.ply")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "gstalk error" in r.stderr and "not a readable PLY" in r.stderr
    assert "Traceback" not in r.stderr


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    save_ply(GaussianSet.random(5), tmp_path / "s.ply")
    r = subprocess.run([sys.executable, "-m", "gstalk", "render", str(tmp_path / "s.ply"),
                        "--out", str(blocker / "sub"), "--size", "16", "--frames", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "cannot create output folder" in r.stderr and "Traceback" not in r.stderr


def test_cli_help_lists_every_verb():
    r = subprocess.run([sys.executable, "-m", "gstalk", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for verb in ["prepare", "import-dataset", "track", "train", "fit", "fit-batch", "render", "view", "export", "eval", "demo"]:
        assert verb in r.stdout
    r = subprocess.run([sys.executable, "-m", "gstalk", "demo", "--help"], capture_output=True, text=True)
    assert "--clip" in r.stdout and "--size" in r.stdout
    r = subprocess.run([sys.executable, "-m", "gstalk", "render", "x", "--help"], capture_output=True, text=True)
    assert "--audio" in r.stdout and "--camera" in r.stdout


def test_video_writer_pads_odd_sizes(tmp_path):
    from gstalk.io.media import write_video

    frames = [np.full((15, 21, 3), i / 3, np.float32) for i in range(3)]
    info = probe_video(write_video(tmp_path / "v.mp4", frames, fps=10))
    assert info["frames"] == 3 and (info["width"], info["height"]) == (22, 16) and info["fps"] == 10


def test_video_writer_encodes_in_a_thread_what_it_was_handed_and_fails_cleanly(tmp_path):
    """Frames are encoded in a worker thread while the caller makes the next ones: the video
    holds the frames as handed over, even when the caller reuses its buffers as HostFrames'
    ring does (rewriting the frame handed over ENCODE_QUEUE + 2 frames earlier); an error on
    either side (a bad frame from the caller, a failing encoder) leaves no video and no
    temporary, and the thread ends."""
    import threading

    import av

    from gstalk.errors import InputError
    from gstalk.io.media import ENCODE_QUEUE, write_video

    ring = [np.zeros((32, 48, 3), np.uint8) for _ in range(ENCODE_QUEUE + 2)]
    levels = [20 * i + 10 for i in range(10)]

    def frames():
        for i, v in enumerate(levels):
            buf = ring[i % len(ring)]
            buf[:] = v
            yield buf

    path = write_video(tmp_path / "grey.mp4", frames(), fps=10)
    with av.open(str(path)) as c:
        got = [f.to_ndarray(format="rgb24").mean() for f in c.decode(video=0)]
    np.testing.assert_allclose(got, levels, atol=2)

    def bad():
        yield np.zeros((32, 48, 3), np.uint8)
        yield np.zeros((16, 16, 3), np.uint8)

    with pytest.raises(InputError, match="same size"):
        write_video(tmp_path / "bad.mp4", bad(), fps=10)

    class Broken(Exception):
        pass

    real = av.VideoFrame.from_ndarray

    def broken(arr, format):
        if arr.mean() > 100:
            raise Broken("encoder failed")
        return real(arr, format=format)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(av.VideoFrame, "from_ndarray", staticmethod(broken))
        with pytest.raises(Broken):
            write_video(tmp_path / "broken.mp4", (np.full((32, 48, 3), v, np.uint8) for v in levels), fps=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.mp4"]
    assert not [t for t in threading.enumerate() if t.name == "gstalk-encode"]


def test_options_no_run_can_use_are_refused_before_any_work(tmp_path, capsys):
    """Demo sizes, efforts and lengths that cannot make an avatar, image sizes that would fill
    the machine's memory or that no face detector reads, a port no socket has, and preparation,
    tracking and training options no run can use (all three checked before 'gstalk fit'
    prepares anything, and named as its flags) end in one message and exit status 2 before
    anything is written."""
    save_ply(GaussianSet.random(5), tmp_path / "s.ply")
    out = tmp_path / "out"
    clip, ds, av, to = str(tmp_path / "clip.mp4"), str(out / "ds"), str(out / "av"), ["--out", str(out)]
    cases = [(["fit", clip, av, "--track.keyframes", "0"], "--track.keyframes must be at least 1"),
             (["fit", clip, av, "--train.lr-means", "nan"], "--train.lr-means must be 0 or more"),
             (["fit", clip, av, "--prepare.holdout", "0.9"], "--prepare.holdout must be between 0 and 0.5"),
             (["prepare", clip, ds, "--jpeg-quality", "0"], "--jpeg-quality must be between 1 and 100"),
             (["import-dataset", str(tmp_path), ds, "--fps", "0"], "--fps must be between 1 and"),
             (["track", ds, "--n-expr", "0"], "--n-expr must be at least 1"),
             (["track", ds, "--init-fov-deg", "80"], "--init-fov-deg must be between 10 and 60"),
             (["render", str(tmp_path / "s.ply"), "--size", "40000", *to], "--size must be between 16 and 4096 pixels"),
             (["render", str(tmp_path / "s.ply"), "--audio", clip, "--no-deform", *to],
              "--audio, --deform are for an avatar folder"),
             (["render", av, "--frames", "10", *to], "--frames is for a .ply turntable"),
             (["eval", av, ds, "--size", "8", *to], "--size must be between 32 and"),
             (["demo", "--size", "8", *to], "--size must be between 32 and 4096 pixels"),
             (["demo", "--effort", "0", *to], "--effort must be above 0"),
             (["demo", "--seconds", "1", *to], "--seconds must be at least 3"),
             (["view", av, "--port", "70000", *to], "--port must be between 0 and 65535")]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not out.exists()


def test_a_folder_that_takes_no_new_files_is_an_output_error(tmp_path, monkeypatch):
    """Where the temporary file beside the target cannot be made (a full disk, /proc), or the
    disk fills while it is written, the write says which file and why, and the old file stays."""
    import errno
    import tempfile

    import pytest

    from gstalk.errors import OutputError
    from gstalk.io.atomic import atomic_path, write_text

    target = tmp_path / "kept.txt"
    write_text(target, "old")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", full)
        with pytest.raises(OutputError, match="cannot write .*kept.txt: No space left on device"):
            write_text(target, "new")
    assert target.read_text() == "old"
    # the disk fills while writing: the same, and no temporary file is left behind
    with pytest.raises(OutputError, match="cannot write .*kept.txt: No space left on device.*kept"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            full()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["kept.txt"]


def test_threads_option_and_environment(tmp_path, monkeypatch, capsys):
    """gstalk --threads N (or $GSTALK_THREADS, or $OMP_NUM_THREADS) sets the CPU threads every
    verb computes with; a count that is not one is refused with the flag named."""
    import torch

    from gstalk.config import cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("GSTALK_THREADS", raising=False)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert cpu_threads() == 3 and cpu_threads(2) == 2
        monkeypatch.setenv("GSTALK_THREADS", "1")
        assert cpu_threads() == 1  # gstalk's own variable first
        assert main(["--threads", "2", "render", str(tmp_path / "missing.ply")]) == 2  # the verb's own error
        assert torch.get_num_threads() == 2
        for bad in (["--threads", "0"], ["--threads=many"], ["--threads", "2.5"]):
            assert main(bad + ["render", str(tmp_path / "x.ply")]) == 2
            assert "--threads" in capsys.readouterr().err
        monkeypatch.setenv("GSTALK_THREADS", "lots")
        assert main(["render", str(tmp_path / "x.ply")]) == 2
        assert "GSTALK_THREADS" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_default_threads_count_gstalk_processes_not_their_wrappers(tmp_path):
    """The default thread count shares the cores among the Python processes running gstalk;
    a wrapper whose arguments name gstalk (GNU time, nohup, a shell) is not one of them (it
    was, and every timed run computed on half the cores)."""
    from gstalk.config import is_gstalk_command

    def cmd(*a):
        return [x.encode() for x in a]

    assert is_gstalk_command(cmd("/repo/.venv/bin/python3", "/repo/.venv/bin/gstalk", "track", "ds"))
    assert is_gstalk_command(cmd("python", "-m", "gstalk.cli", "fit", "a.mp4", "av"))
    assert is_gstalk_command(cmd("/usr/bin/python3.11", "-m", "gstalk", "demo"))
    assert not is_gstalk_command(cmd("/usr/bin/time", "-v", ".venv/bin/gstalk", "track", "ds"))
    assert not is_gstalk_command(cmd("nohup", "gstalk", "train", "ds", "av"))
    assert not is_gstalk_command(cmd("bash", "-c", "gstalk track ds"))
    assert not is_gstalk_command(cmd("python", "scripts/bench_lips.py", "eval", "--work", "gstalk"))
    assert not is_gstalk_command([])
    # counted over a process table: this process, a wrapped run (wrapper and interpreter), a shell
    import os

    from gstalk.config import _other_gstalk_processes

    proc = tmp_path / "proc"
    for pid, argv in ((os.getpid(), ("python", "-m", "gstalk.cli", "track", "ds")),
                      (101, ("/usr/bin/time", "-v", ".venv/bin/gstalk", "train", "ds", "av")),
                      (102, ("/repo/.venv/bin/python", ".venv/bin/gstalk", "train", "ds", "av")),
                      (103, ("bash", "-c", "gstalk render av")), (104, ("sleep", "9"))):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (proc / "self").mkdir()
    assert _other_gstalk_processes(proc) == 1


def test_render_out_must_be_a_video_and_is_checked_first(tmp_path, capsys):
    """`gstalk render AVATAR --out NAME` refuses a name it cannot write a video to (no
    extension, .ply, .gif, a folder) with exit 2 and the flag named, before it reads the
    avatar (here there is none), and leaves nothing behind."""
    folder = tmp_path / "videos"
    folder.mkdir()
    for out in (tmp_path / "talk", tmp_path / "talk.ply", tmp_path / "talk.gif", folder):
        assert main(["render", str(tmp_path / "no_avatar"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "--out" in err and "Traceback" not in err and "no_avatar" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["videos"] and not any(folder.iterdir())


def test_fit_checks_the_flame_file_before_it_prepares(tmp_path, capsys):
    """`gstalk fit` reads --track.flame before any stage's work: a missing or broken file is
    exit 2 with the file named, and no dataset folder is started (the clip here does not even
    exist, which prepare would have said first)."""
    broken = tmp_path / "flame.pkl"
    broken.write_bytes(b"not a pickle")
    for flame in (tmp_path / "missing.pkl", broken):
        assert main(["fit", str(tmp_path / "clip.mp4"), str(tmp_path / "av"), "--track.flame", str(flame)]) == 2
        err = capsys.readouterr().err
        assert flame.name in err and "Traceback" not in err and "clip.mp4" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flame.pkl"]


def test_sigterm_removes_the_temporary_as_ctrl_c_does(tmp_path):
    """A process told to stop (SIGTERM) while it writes an output leaves neither the
    half-written temporary nor a changed output: the old file is kept, the exit status is
    143 and the message one line."""
    target = tmp_path / "talk.mp4"
    target.write_bytes(b"the user's old video")
    code = f"""
import os, signal, sys, time
from gstalk.cli import Terminated, terminate_like_interrupt
from gstalk.io.atomic import atomic_path
with terminate_like_interrupt():
    try:
        with atomic_path({str(target)!r}) as tmp:
            tmp.write_bytes(b"half a video")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
    except Terminated:
        print("terminated")
        sys.exit(143)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 143 and r.stdout.strip() == "terminated", (r.returncode, r.stdout, r.stderr)
    assert [p.name for p in tmp_path.iterdir()] == ["talk.mp4"] and target.read_bytes() == b"the user's old video"


def test_main_turns_sigterm_into_a_clean_exit(monkeypatch, capsys):
    """gstalk's entry point handles SIGTERM like Ctrl-C (exit 143, no traceback) and gives the
    previous handler back afterwards."""
    import os
    import signal

    import gstalk.cli as cli

    before = signal.getsignal(signal.SIGTERM)

    def verb(cfg, console):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM was not raised here")

    monkeypatch.setattr(cli, "HANDLERS", {k: verb for k in cli.HANDLERS})
    assert cli.main(["track", "nowhere"]) == 143
    err = capsys.readouterr()
    assert "terminated" in err.out + err.err and "Traceback" not in err.err
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_rerun_sweeps_the_temporaries_a_killed_run_left(tmp_path):
    """kill -9 leaves a temporary behind; the next write of the same output removes it (and
    only those of that output)."""
    from gstalk.io.atomic import write_bytes

    import os
    import time

    left = tmp_path / ".tmp-avatar-abc123.html"
    left.write_bytes(b"16 MB of a killed export")
    other = tmp_path / ".tmp-other-xyz.html"
    other.write_bytes(b"another output's")
    hour_ago = time.time() - 3600  # left before this run started
    for p in (left, other):
        os.utime(p, (hour_ago, hour_ago))
    write_bytes(tmp_path / "avatar.html", b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-other-xyz.html", "avatar.html"]


def test_import_dataset_says_when_the_folder_is_missing(tmp_path, capsys):
    """import-dataset on a folder that does not exist (or a file) says so, not that it has no
    ori_imgs/; exit 2, nothing written."""
    f = tmp_path / "clip.mp4"
    f.write_bytes(b"x")
    for src, says in ((tmp_path / "nowhere", "does not exist"), (f, "is a file")):
        assert main(["import-dataset", str(src), str(tmp_path / "ds")]) == 2
        err = capsys.readouterr()
        assert says in err.out + err.err and "ori_imgs/ folder" not in err.out + err.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_a_nan_ply_is_named_and_a_failed_render_leaves_no_folder(tmp_path, capsys):
    """render x.ply of a PLY with NaN Gaussians says which file and how many (it said "camera
    viewmats contain NaN"), exit 2, and leaves no (empty) output folder behind."""
    from plyfile import PlyData

    save_ply(GaussianSet.random(50, sh_degree=0, extent=0.3), tmp_path / "nan.ply")
    ply = PlyData.read(str(tmp_path / "nan.ply"), mmap=False)
    ply["vertex"].data["y"][7] = np.nan  # as a diverged fit writes it (gstalk itself refuses to)
    ply.write(str(tmp_path / "nan.ply"))
    out = tmp_path / "new" / "renders"
    assert main(["render", str(tmp_path / "nan.ply"), "--out", str(out), "--size", "32", "--frames", "2"]) == 2
    err = capsys.readouterr().err
    assert "nan.ply: 1 of its 50 Gaussians hold NaN" in err and "viewmats" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.ply"]


def test_a_failed_command_leaves_no_empty_folder_it_created(tmp_path, monkeypatch, capsys):
    """Folders a command created and left without a file are removed when it fails (a GstalkError,
    SIGTERM, Ctrl-C); a folder that holds a file, or that was there before, stays."""
    import gstalk.cli as cli
    from gstalk.config import RenderConfig
    from gstalk.errors import InputError
    from gstalk.io.atomic import atomic_path, ensure_dir

    (tmp_path / "before").mkdir()

    def failing(cfg, console):
        ensure_dir(tmp_path / "before" / "sub")
        ensure_dir(tmp_path / "a" / "b" / "c")
        with atomic_path(tmp_path / "kept" / "one.txt") as tmp:
            tmp.write_text("done")
        try:
            with atomic_path(tmp_path / "half" / "x.mp4") as tmp:
                tmp.write_bytes(b"half")
                raise InputError("the audio ran out")
        finally:
            assert (tmp_path / "half").is_dir()

    monkeypatch.setitem(cli.HANDLERS, RenderConfig, failing)
    assert main(["render", str(tmp_path / "av"), "--out", str(tmp_path / "o.mp4")]) == 2
    assert "the audio ran out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["before", "kept"]
    assert not any((tmp_path / "before").iterdir()) and (tmp_path / "kept" / "one.txt").read_text() == "done"


def test_a_truncated_wav_is_warned_about_and_library_warnings_are_hidden(tmp_path, monkeypatch, capsys):
    """A wav cut short (its header declares more) renders what is there with one warning line;
    warnings of the libraries below gstalk do not print around its messages."""
    import warnings

    import gstalk.cli as cli
    from gstalk.config import RenderConfig
    from gstalk.errors import GstalkWarning
    from gstalk.io.video import load_audio, write_wav

    wav = write_wav(tmp_path / "speech.wav", np.sin(np.linspace(0, 2000, 32000)).astype(np.float32) * 0.3)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(wav.read_bytes()[:20000])
    with pytest.warns(GstalkWarning, match="cut.wav: the audio stops at 0.62 s of the 2.00 s"):
        assert len(load_audio(cut)) == (20000 - 44) // 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_audio(wav)  # a whole file: no warning

    def handler(cfg, console):
        warnings.warn("torch.load: weights_only hint", FutureWarning)
        load_audio(cfg.audio)
        return 0

    monkeypatch.setitem(cli.HANDLERS, RenderConfig, handler)
    assert main(["render", str(tmp_path / "av"), "--audio", str(cut)]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "may be truncated" in err and "weights_only" not in err, err


def test_host_frames_round_as_the_video_writer_does():
    """Batches converted to uint8 on the device (HostFrames) hold what to_uint8 makes of each
    frame on the host, out-of-range values clamped."""
    import torch

    from gstalk.avatar.render import HostFrames
    from gstalk.io.media import to_uint8

    rgb = torch.rand(3, 8, 8, 3) * 1.2 - 0.1
    rgb[0, 0, 0] = torch.tensor([0.5 / 255, 1.5 / 255, 254.5 / 255])
    got = HostFrames()(rgb)
    assert got.dtype == np.uint8 and got.shape == (3, 8, 8, 3)
    for b in range(3):
        np.testing.assert_array_equal(got[b], to_uint8(rgb[b]))
