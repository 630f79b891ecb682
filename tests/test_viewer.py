"""The browser viewer, driven in headless Chromium (Debian's chromium, software WebGL via
SwiftShader) with Playwright: the head is on screen (pixel statistics in the expected
region), the timeline and an audio upload drive it, presets move the camera.

.ci/run installs chromium; without it (or Playwright) these tests skip and say why."""

import os
import shutil
import time

import numpy as np
import pytest

from tinyavatar import make_avatar, tone_speech

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

W, H = 1200, 600  # the GUI panel sits at the right; the head is drawn around the canvas centre
GREEN = (0, 170, 0)


def _wait(cond, timeout=30.0, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium (.ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync",
            "--autoplay-policy=no-user-gesture-required"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def avatar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer")
    return make_avatar(root / "avatar", n_frames=12), tone_speech(root / "speech.wav", seconds=1.0), root


def _shot(page, path):
    page.screenshot(path=str(path))
    import imageio.v3 as iio

    return iio.imread(path)[..., :3].astype(np.int16)


def _head_stats(img):
    """(share of non-background pixels around the canvas centre, share of background pixels in
    a strip at the left edge, away from the head)."""
    g = np.array(GREEN)
    off = np.abs(img - g).sum(-1) > 60
    cy, cx = H // 2, W // 2
    centre = off[cy - 80: cy + 80, cx - 60: cx + 60].mean()
    edge = 1.0 - off[150: H - 150, 40: 140].mean()
    return float(centre), float(edge)


def _open(browser, viewer):
    page = browser.new_page(viewport={"width": W, "height": H})
    page.goto(viewer.url)
    _wait(lambda: len(viewer.server.get_clients()) > 0, what="the page to connect")
    viewer.set_background(GREEN)
    # let the background and the splats arrive and the first sort run: on a loaded machine
    # this takes longer than the 3 s that suffice on an idle one (the checks come after)
    import io
    import time

    import imageio.v3 as iio

    page.wait_for_timeout(3000)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        img = iio.imread(io.BytesIO(page.screenshot()))[..., :3].astype(np.int16)
        if _head_stats(img)[1] > 0.9:
            break
        page.wait_for_timeout(500)
    page.wait_for_timeout(1000)
    return page


def test_viewer_shows_plays_and_drives_the_head(browser, avatar_dir, tmp_path):
    from gstalk.viewer.app import AvatarViewer

    av_dir, wav, root = avatar_dir
    v = AvatarViewer(av_dir, port=0, device="cpu", out=tmp_path / "out").start()
    try:
        assert v.host == "127.0.0.1" and v.url.startswith("http://127.0.0.1:")
        page = _open(browser, v)
        front = _shot(page, tmp_path / "front.png")
        centre, edge = _head_stats(front)
        assert centre > 0.6 and edge > 0.9, (centre, edge)

        # the timeline: drag it to the end with the keyboard, the server shows that frame
        thumb = page.get_by_role("slider").first
        thumb.focus()
        page.keyboard.press("End")
        _wait(lambda: v._shown == v.num_frames - 1, what="the last frame to be shown")

        # camera presets: profile and orbit move the view; the head stays in the picture
        page.get_by_role("button", name="Profile").click()
        page.wait_for_timeout(1500)
        profile = _shot(page, tmp_path / "profile.png")
        # seen from the side, the splats the clip never showed face-on take the view fill
        assert v.av.view_fill is not None
        _wait(lambda: v._fill_shown == 1.0, what="the profile's splats to take the view fill")
        page.get_by_role("button", name="Orbit").click()
        page.wait_for_timeout(2000)
        orbit = _shot(page, tmp_path / "orbit.png")
        for img in (profile, orbit):
            c, e = _head_stats(img)
            assert c > 0.4 and e > 0.9, (c, e)
        cy, cx = H // 2, W // 2
        box = (slice(cy - 150, cy + 150), slice(cx - 150, cx + 150))
        assert np.abs(profile[box] - front[box]).mean() > 5  # a different view of the head

        # an upload re-drives the avatar; playing puts its sound in the page
        n_before = v.num_frames
        page.locator("input[type=file]").first.set_input_files(str(wav))
        _wait(lambda: v.audio_name == wav.name, what="the uploaded audio to drive the avatar")
        assert v.num_frames == round(1.0 * 25) != n_before
        page.get_by_role("button", name="Play").click()
        _wait(lambda: v.playing and page.locator("audio").count() == 1, what="playback with sound")
        assert page.locator("audio").first.get_attribute("src").startswith("data:audio/wav;base64,")
        _wait(lambda: v._shown > 3, what="playback to advance")
        page.get_by_role("button", name="Pause").click()
        _wait(lambda: not v.playing and page.locator("audio").count() == 0, what="pause to stop the sound")

        # export the current frame; the readout says how fast the deformation step is
        page.get_by_role("button", name="Export frame (PLY)").click()
        _wait(lambda: any((tmp_path / "out").glob("frame_*.ply")), what="the exported frame")
        assert "fps" in v.rate_text.value and float(v.rate_text.value.split()[0]) > 0
        page.close()
    finally:
        v.stop()


def test_viewer_server_rendering_and_video(browser, avatar_dir, tmp_path):
    from gstalk.io.media import probe_video
    from gstalk.viewer.app import AvatarViewer

    av_dir, wav, _ = avatar_dir
    v = AvatarViewer(av_dir, port=0, device="cpu", out=tmp_path / "out", render="server", size=96, audio=wav).start()
    try:
        page = _open(browser, v)
        _wait(lambda: v._shown >= 0, what="a server render")
        page.wait_for_timeout(2000)
        img = _shot(page, tmp_path / "server.png")
        centre, edge = _head_stats(img)
        assert centre > 0.6 and edge > 0.9, (centre, edge)
        path = v.render_video()
        assert probe_video(path)["frames"] == v.num_frames == 25
        from gstalk.io.video import load_audio

        assert abs(len(load_audio(path)) / 16000 - 1.0) < 0.05  # the sound is muxed in
        page.close()
    finally:
        v.stop()


def test_view_command_binds_to_localhost_and_prints_the_url(avatar_dir):
    import socket
    import subprocess
    import sys

    av_dir, _, _ = avatar_dir
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gstalk", "view", str(av_dir), "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        t0 = time.time()
        while "gstalk viewer:" not in line and time.time() - t0 < 60:
            line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it serves on loopback
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    r = subprocess.run([sys.executable, "-m", "gstalk", "view", os.devnull], capture_output=True, text=True)
    assert r.returncode == 2 and "gstalk error" in r.stderr and "Traceback" not in r.stderr


def test_a_bad_audio_file_stops_the_viewer_before_its_server_starts(avatar_dir, tmp_path, monkeypatch):
    """--audio that is missing or not audio ends 'gstalk view' with a message naming it, before
    a server is started; an upload's errors name the upload, not the temporary copy decoded."""
    import viser

    from gstalk.errors import GstalkError
    from gstalk.viewer.app import AvatarViewer, decode_audio

    av_dir, wav, _ = avatar_dir
    started = []
    monkeypatch.setattr(viser, "ViserServer", lambda *a, **k: started.append(k))
    (tmp_path / "bad.wav").write_text("not audio")
    for path, match in ((tmp_path / "gone.wav", "no such file: .*gone.wav"),
                        (tmp_path / "bad.wav", "cannot read .*bad.wav as a media file")):
        with pytest.raises(GstalkError, match=match):
            AvatarViewer(av_dir, port=0, device="cpu", audio=path)
    assert not started
    with pytest.raises(GstalkError, match="cannot read speech.mp3 as a media file") as e:
        decode_audio(b"not audio", "speech.mp3")
    assert "upload" not in str(e.value) and "/tmp" not in str(e.value)
    assert decode_audio(wav.read_bytes(), "speech.wav").size == 16000  # tone_speech: 1 s at 16 kHz
