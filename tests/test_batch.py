"""``gstalk fit-batch`` on a local Ray: tiny synthetic clips, a bad one among them, re-runs and
a worker killed in the middle of its fit."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from gstalk.batch import collect_clips  # noqa: E402
from gstalk.cli import main  # noqa: E402
from gstalk.errors import InputError  # noqa: E402

# the few iterations of the end-to-end tests, as 'gstalk fit' flags
TINY = ["--prepare.resolution", "64", "--prepare.no-preview", "--track.iters-rigid", "60", "--track.iters-shape", "60",
        "--track.iters-all", "80", "--track.no-focal-search", "--track.no-preview", "--track.n-expr", "1",
        "--train.iters-static", "60", "--train.iters-audio", "60", "--train.iters-joint", "30", "--train.iters-a2m",
        "30", "--train.per-triangle", "1", "--train.torso-points", "100", "--train.densify-every", "60",
        "--train.feature-kind", "mel", "--train.device", "cpu"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from gstalk.demo import make_talking_clip

    root = tmp_path_factory.mktemp("batch") / "clips"
    make_talking_clip(root / "anna.mp4", seconds=2.0, size=96)
    make_talking_clip(root / "ben.mp4", seconds=2.0, size=96)
    (root / "broken.mp4").write_text("not a video")
    return root


def _summary(out: Path) -> dict:
    return {j["name"]: j for j in json.loads((out / "batch.json").read_text())["jobs"]}


def test_a_batch_fits_every_good_clip_and_a_bad_one_fails_alone_then_a_rerun_skips_them(clips, tmp_path, capsys):
    from gstalk.avatar.io import load_avatar

    out = tmp_path / "avatars"
    assert main(["fit-batch", str(clips), "--out", str(out), "--eval", *TINY]) == 1  # one clip failed
    rows = _summary(out)
    assert set(rows) == {"anna", "ben", "broken"}
    for name in ("anna", "ben"):  # the folders 'gstalk fit' writes, evaluated
        r = rows[name]
        assert r["state"] == "done" and r["attempts"] == 1 and r["error"] == ""
        assert 10 < r["psnr"] < 60 and r["seconds"] > 0
        av, _ = load_avatar(out / name)
        assert av.num_gaussians > 0 and (out / f"{name}.dataset" / "track.npz").is_file()
        assert (out / name / "eval" / "eval.json").is_file()
    bad = rows["broken"]
    assert bad["state"] == "failed" and "broken.mp4" in bad["error"] and "media file" in bad["error"]
    assert "gstalk error:" in (out / "broken.log").read_text()
    text = capsys.readouterr().err
    assert "Traceback" not in text and "broken" in text and "failed" in text

    stamp = (out / "anna" / "gaussians.ply").stat().st_mtime_ns
    assert main(["fit-batch", str(clips / "anna.mp4"), str(clips / "ben.mp4"), "--out", str(out), *TINY]) == 0
    rows = _summary(out)
    assert {rows[n]["state"] for n in ("anna", "ben")} == {"skipped"}
    assert rows["anna"]["psnr"] is not None  # from the earlier evaluation
    assert (out / "anna" / "gaussians.ply").stat().st_mtime_ns == stamp  # not fitted again


def test_a_worker_killed_mid_fit_is_retried_and_the_retry_resumes_from_the_checkpoint(clips, tmp_path):
    out = tmp_path / "avatars"
    flags = list(TINY)
    flags[flags.index("--train.iters-static") + 1] = "400"
    cmd = [sys.executable, "-m", "gstalk.cli", "fit-batch", str(clips / "anna.mp4"), "--out", str(out), *flags,
           "--train.checkpoint-every", "20", "--retries", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ckpt, log = out / "anna" / "checkpoint.pt", out / "anna.log"
        deadline = time.monotonic() + 400
        while not ckpt.is_file():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.2)
        pid = int(re.findall(r"worker pid (\d+)", log.read_text())[-1])
        os.kill(pid, signal.SIGKILL)  # as an out-of-memory kill or a lost machine would
        text, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, text
    row = _summary(out)["anna"]
    assert row["state"] == "done" and row["attempts"] == 2, row
    log_text = log.read_text()
    assert "attempt 2" in log_text and "resuming from" in log_text, log_text
    assert "Traceback" not in text


def test_clips_come_from_files_folders_and_lists(clips, tmp_path):
    lst = tmp_path / "users.txt"
    lst.write_text(f"# one clip per line\n{clips / 'anna.mp4'}\n\n../{tmp_path.name}/missing.mp4  # fails alone\n")
    got = collect_clips([clips / "ben.mp4", lst, clips])  # ben twice: fitted once
    assert [p.name for p in got] == ["ben.mp4", "anna.mp4", "missing.mp4", "broken.mp4"]
    assert got[2].resolve() == (tmp_path / "missing.mp4").resolve()
    other = tmp_path / "other"
    other.mkdir()
    (other / "anna.mp4").write_bytes(b"")
    with pytest.raises(InputError, match="both be fitted into the avatar folder anna/"):
        collect_clips([clips, other])
    with pytest.raises(InputError, match="no such clip, folder of clips or list"):
        collect_clips([tmp_path / "nowhere.mp4"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="a folder without clips"):
        collect_clips([empty])
    (tmp_path / "none.txt").write_text("# nobody yet\n")
    with pytest.raises(InputError, match=r"no clips to fit.*\(the lists given are empty\)"):
        collect_clips([tmp_path / "none.txt"])
    with pytest.raises(InputError, match="no clips to fit: give clips, folders of clips or lists of clips$"):
        collect_clips([])


def test_bad_fit_options_are_refused_before_any_task(clips, tmp_path, capsys):
    out = tmp_path / "avatars"
    assert main(["fit-batch", str(clips), "--out", str(out), "--track.keyframes", "0"]) == 2
    assert main(["fit-batch", str(clips), "--out", str(out), "--retries", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--track.keyframes must be at least 1" in err and "--retries must be 0 or more" in err
    assert not out.exists()  # nothing started, nothing written
