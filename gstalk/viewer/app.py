"""``gstalk view AVATAR``: look at and play with a fitted avatar in the browser (viser).

The browser draws the splats itself (viser's Gaussian splats, updated with
``set_gaussians`` each frame), so orbiting stays smooth when the server has no GPU; the
server only runs the per-frame step (audio code -> head model -> bound Gaussians ->
deformation) when the frame changes. ``--render server`` instead rasterizes on the server
(gsplat on CUDA, gstalk's PyTorch renderer otherwise) from each browser's camera, with the
full spherical-harmonic colour, and sends the image as the background.

Controls: play/pause, timeline, speed, an audio upload (wav/mp3/m4a/...) that re-drives
the avatar and plays in the page in sync, manual jaw / expression / blink sliders, camera
presets (front, profile, orbit), background colour, "export frame" (a 3DGS PLY, written and
offered as a download) and "render video" (mp4 with the sound, with a progress bar), and a
readout of the deformation step's frames per second.

The server listens on 127.0.0.1 unless ``--host`` says otherwise: a face is private data.
"""

from __future__ import annotations

import base64
import io
import math
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from gstalk.errors import InputError, between, check_value

SPEEDS = (0.25, 0.5, 1.0, 1.5, 2.0)
N_EXPR_SLIDERS = 3


def decode_audio(data: bytes, name: str) -> np.ndarray:
    """Speech from an uploaded file's contents (any format PyAV reads), or
    :class:`GstalkError` naming the upload ``name``, not the temporary copy decoded."""
    from gstalk.audio.features import check_speech
    from gstalk.io.video import load_audio

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / ("upload" + (Path(name).suffix or ".wav"))
        p.write_bytes(data)
        audio = load_audio(p, name=name)
    check_speech(audio, name)
    return audio


class AvatarViewer:
    """The viewer's state and its viser server. ``serve_forever`` blocks; tests use ``start``."""

    def __init__(self, avatar_dir: str | Path, host: str = "127.0.0.1", port: int = 8080,
                 audio: str | Path | None = None, device: str = "auto", out: str | Path = "out/view",
                 render: str = "browser", size: int = 256, log=print, compile_field: bool = False,
                 precision: str = "float32"):
        import contextlib

        import viser

        from gstalk.avatar.io import load_avatar
        from gstalk.config import resolve_device
        from gstalk.avatar.conditions import training_expressions
        from gstalk.io.media import check_size

        if render not in ("browser", "server"):
            raise InputError("--render must be browser or server")
        check_value(port, between(0, 65535), "--port")  # viser would fail in its thread and leave the command hanging
        check_size(size)
        self.dev = resolve_device(device)
        self.av, self.motion = load_avatar(avatar_dir, self.dev)
        self.av.set_precision(precision)
        if compile_field:  # the first frame pays the compile
            self.av.compile_field(mode="reduce-overhead" if self.dev.type == "cuda" else None)
        self.out = Path(out)
        self.render_mode = render
        self.size = size
        self.log = log
        self.lock = threading.RLock()
        self.fps = float(self.av.cfg.fps)
        self.audio: np.ndarray | None = None
        self.audio_name = "training motion"
        self._expressions = training_expressions(self.motion)
        self.frame = 0
        self.playing = False
        self.speed = 1.0
        self.orbit = False
        self.orbit_angle = 0.0
        self.deform_ms: list[float] = []
        self._shown = -1
        self._dirty = True
        self._stop = threading.Event()
        start_audio = None  # read before the server starts: a bad file stops here
        if audio is not None:
            from gstalk.audio.features import check_speech
            from gstalk.io.video import load_audio

            start_audio = load_audio(audio)
            check_speech(start_audio, str(audio))
        self._rebuild(None)
        self._centre = self._head_centre()
        with contextlib.redirect_stdout(io.StringIO()):
            self.server = viser.ViserServer(host=host, port=port, verbose=False)
        self.host, self.port = host, self.server.get_port()
        self.server.scene.set_up_direction("+y")
        self._build_gui()
        if start_audio is not None:
            self._use_audio(start_audio, Path(audio).name)
        self._splats = None
        self._fill_shown = 0.0  # the view fill's weight in the browser's splats
        self.server.on_client_connect(self._on_connect)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ driving sequence
    def _rebuild(self, audio: np.ndarray | None) -> None:
        from gstalk.avatar.conditions import conditions_for

        if audio is None:
            n = len(self.motion["jaw"])
            self.cond = conditions_for(self.av, self.motion, n, self.fps, None, self._expressions)
        else:
            n = max(1, int(round(len(audio) / 16000 * self.fps)))
            self.cond = conditions_for(self.av, self.motion, n, self.fps, audio)
        self.num_frames = n

    def set_audio(self, data: bytes, name: str) -> None:
        """Re-drive the avatar with an uploaded audio file (any format PyAV reads)."""
        self._use_audio(decode_audio(data, name), name)

    def _use_audio(self, audio: np.ndarray, name: str) -> None:
        with self.lock:
            self._rebuild(audio)
            self.audio, self.audio_name = audio, name
            self.frame = 0
            self._dirty = True
            self.timeline.max = self.num_frames - 1
            self.timeline.value = 0
            self.source_text.value = f"{name}: {self.num_frames} frames, {self.num_frames / self.fps:.1f} s"
        self._sound(False)

    def _head_centre(self) -> np.ndarray:
        """Where the head is (median of the bound Gaussians at frame 0): the viewer's origin."""
        from gstalk.avatar.model import Frame

        with torch.no_grad():
            g = self.av.gaussians_at(Frame(self.cond.slice(slice(0, 1)).params, deform=False))[0]
        bound = (self.av.binding >= 0).cpu()
        pts = g.means.detach().cpu()[bound] if bool(bound.any()) else g.means.detach().cpu()
        return pts.median(0).values.numpy().astype(np.float32)

    # ------------------------------------------------------------------ one frame
    def frame_gaussians(self, k: int):
        """Posed Gaussians of frame ``k`` (with manual overrides), and the step's time in ms."""
        from gstalk.avatar.model import Frame

        with self.lock:
            c = self.cond.slice(slice(k, k + 1))
            p = c.params
            blink = c.blink
            if self.manual.value:
                p.jaw = torch.tensor([[self.jaw.value, 0.0, 0.0]], device=self.dev)
                e = torch.zeros_like(p.expr)
                for i, s in enumerate(self.expr_sliders):
                    if i < e.shape[1]:
                        e[0, i] = s.value
                p.expr = e
                blink = torch.tensor([self.blink.value], device=self.dev)
            t0 = time.perf_counter()
            with torch.no_grad():
                g = self.av.gaussians_at(Frame(p, audio=c.codes, blink=blink, deform=self.deform.value))[0]
            if self.dev.type == "cuda":
                torch.cuda.synchronize()
            ms = 1000 * (time.perf_counter() - t0)
        return g, ms

    def _eye(self, client=None) -> torch.Tensor | None:
        """[1, 3] where ``client``'s camera (default: the first browser's) is, in the avatar's
        world; None without a browser."""
        if client is None:
            clients = list(self.server.get_clients().values())
            if not clients:
                return None
            client = clients[0]
        pos = np.asarray(client.camera.position, dtype=np.float32) + self._centre
        return torch.as_tensor(pos, device=self.dev)[None]

    def _splat_arrays(self, g):
        from gstalk.avatar.views import fill_weight, other_view
        from gstalk.render.project import splat_arrays

        # the colours the training camera saw, and the view fill as far as the (first) browser's
        # camera is from the training camera's
        eye = self._eye()
        self._fill_shown = 0.0 if eye is None else float(fill_weight(self.av, eye)[0])
        centres, cov, rgb, opacity = splat_arrays(other_view(self.av, g, eye))  # one copy to the host
        return centres - self._centre, cov, rgb, opacity

    def _camera_moved(self, client) -> None:
        """Server renders follow every move; browser splats only need new colours when the
        view fill's weight changes."""
        from gstalk.avatar.views import fill_weight

        if self.render_mode == "server":
            self._dirty = True
        elif self.av.changes_other_views:
            w = float(fill_weight(self.av, self._eye(client))[0])
            if abs(w - self._fill_shown) > 0.05 or (w in (0.0, 1.0) and w != self._fill_shown):
                self._dirty = True

    def show(self, k: int) -> None:
        g, ms = self.frame_gaussians(k)
        self.deform_ms = (self.deform_ms + [ms])[-30:]
        med = float(np.median(self.deform_ms))
        self.rate_text.value = (f"{1000 / max(med, 1e-6):.1f} fps ({med:.1f} ms, {self.av.num_gaussians} Gaussians, "
                                f"{self.dev.type})")
        self._last = g
        if self.render_mode == "browser":
            c, cov, rgb, op = self._splat_arrays(g)
            if self._splats is None:
                self._splats = self.server.scene.add_gaussian_splats("/avatar", centers=c, covariances=cov, rgbs=rgb,
                                                                      opacities=op)
            else:
                self._splats.set_gaussians(c, cov, rgb, op)
        else:
            for client in self.server.get_clients().values():
                self._server_render(client, g)
        self._shown = k

    def _server_render(self, client, g) -> None:
        from gstalk.avatar.views import other_view
        from gstalk.gaussians.set import GaussianTensors
        from gstalk.render import Cameras, rasterize
        from gstalk.render.project import quat_to_rotmat

        cam = client.camera
        h = self.size
        w = max(16, int(round(h * float(cam.aspect))))
        c2w = torch.eye(4, dtype=torch.float64)  # viser's camera: OpenCV axes, camera-to-world
        c2w[:3, :3] = quat_to_rotmat(torch.as_tensor(np.asarray(cam.wxyz), dtype=torch.float64))
        c2w[:3, 3] = torch.as_tensor(np.asarray(cam.position), dtype=torch.float64)
        vm = torch.linalg.inv(c2w).float().to(self.dev)
        f = 0.5 * h / math.tan(0.5 * float(cam.fov))
        K = torch.tensor([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1.0]], device=self.dev)
        g = other_view(self.av, g, self._eye(client))  # the training camera's colours, filled and ray-cut
        shifted = GaussianTensors(g.means - torch.as_tensor(self._centre, device=g.means.device), g.quats, g.scales,
                                  g.opacities, g.colors)
        bg = torch.tensor(self.bg_colour.value, dtype=torch.float32, device=self.dev) / 255.0
        with torch.no_grad():
            out = rasterize(shifted, Cameras(vm[None], K[None], w, h), sh_degree=None)
            img = out.colors[0] + (1 - out.alphas[0]) * bg
        client.scene.set_background_image((img.clamp(0, 1).cpu().numpy() * 255).astype(np.uint8), format="jpeg")

    # ------------------------------------------------------------------ GUI
    def _build_gui(self) -> None:
        gui = self.server.gui
        with gui.add_folder("Playback"):
            self.source_text = gui.add_text("Driving", initial_value=f"{self.audio_name}: {self.num_frames} frames",
                                            disabled=True)
            self.play_button = gui.add_button("Play", icon=None)
            self.timeline = gui.add_slider("Frame", min=0, max=max(1, self.num_frames - 1), step=1, initial_value=0)
            self.speed_slider = gui.add_dropdown("Speed", [f"{s:g}x" for s in SPEEDS], initial_value="1x")
            self.upload = gui.add_upload_button("Upload audio", mime_type="audio/*,video/*,.wav,.mp3,.m4a,.flac,.ogg")
            self.deform = gui.add_checkbox("Audio deformation", True)
        with gui.add_folder("Manual"):
            self.manual = gui.add_checkbox("Manual control", False)
            self.jaw = gui.add_slider("Jaw", min=-0.1, max=0.5, step=0.01, initial_value=0.0)
            n = min(N_EXPR_SLIDERS, self.av.head_model.n_expr)
            self.expr_sliders = [gui.add_slider(f"Expression {i}", min=-3.0, max=3.0, step=0.05, initial_value=0.0)
                                 for i in range(n)]
            self.blink = gui.add_slider("Blink", min=0.0, max=1.0, step=0.05, initial_value=0.0)
        with gui.add_folder("View"):
            self.presets = gui.add_button_group("Camera", ("Front", "Profile", "Orbit"))
            self.bg_colour = gui.add_rgb("Background", (255, 255, 255))
            self.rate_text = gui.add_text("Deformation", initial_value="", disabled=True)
        with gui.add_folder("Export"):
            self.export_button = gui.add_button("Export frame (PLY)")
            self.render_button = gui.add_button("Render video (mp4)")
            self.progress = gui.add_progress_bar(0.0, visible=False)
            self.status = gui.add_text("Status", initial_value="", disabled=True)
        self.audio_html = gui.add_html("")
        self._set_background()

        @self.play_button.on_click
        def _(_):
            self.set_playing(not self.playing)

        @self.timeline.on_update
        def _(_):
            with self.lock:
                if int(self.timeline.value) != self.frame:
                    self.frame = int(self.timeline.value)
                    self._dirty = True
                    if self.playing:
                        self._sound(True)

        @self.speed_slider.on_update
        def _(_):
            self.speed = float(self.speed_slider.value.rstrip("x"))
            if self.playing:
                self._sound(True)

        @self.upload.on_upload
        def _(event):
            f = event.target.value
            try:
                self.set_audio(f.content, f.name)
                self.status.value = f"driving with {f.name}"
            except Exception as e:  # a bad upload must not take the viewer down
                self.status.value = f"could not use {f.name}: {e}"

        for h in [self.manual, self.jaw, self.blink, self.deform, *self.expr_sliders]:
            h.on_update(lambda _: self._mark_dirty())

        @self.presets.on_click
        def _(event):
            self.camera_preset(self.presets.value)

        @self.bg_colour.on_update
        def _(_):
            self._set_background()
            self._dirty = True

        @self.export_button.on_click
        def _(event):
            path = self.export_frame()
            self.status.value = f"wrote {path}"
            if event.client is not None:
                event.client.send_file_download(path.name, path.read_bytes())

        @self.render_button.on_click
        def _(_):
            threading.Thread(target=self.render_video, daemon=True).start()

    def _mark_dirty(self) -> None:
        self._dirty = True

    def set_background(self, rgb: tuple[int, int, int]) -> None:
        self.bg_colour.value = tuple(int(c) for c in rgb)
        self._set_background()
        self._dirty = True

    def _set_background(self) -> None:
        if self.render_mode == "browser":
            col = np.asarray(self.bg_colour.value, np.uint8)
            self.server.scene.set_background_image(np.broadcast_to(col, (4, 4, 3)).copy(), format="png")

    def _sound(self, on: bool) -> None:
        """Play the driving audio in the page from the current frame (at 1x), or stop it."""
        if not on or self.audio is None or abs(self.speed - 1.0) > 1e-6:
            self.audio_html.content = ""
            return
        start = int(round(self.frame / self.fps * 16000))
        from gstalk.io.video import wav_bytes

        data = base64.b64encode(wav_bytes(self.audio[start:])).decode("ascii")
        self.audio_html.content = f'<audio autoplay src="data:audio/wav;base64,{data}"></audio>'

    def set_playing(self, on: bool) -> None:
        self.playing = on
        self.play_button.label = "Pause" if on else "Play"
        self._t_play = time.perf_counter()
        self._f_play = self.frame
        self._sound(on)

    def camera_preset(self, name: str) -> None:
        d = self._view_distance()
        eyes = {"Front": np.array([0.0, 0.0, d]), "Profile": np.array([d, 0.0, 0.0])}
        self.orbit = name == "Orbit"
        for client in self.server.get_clients().values():
            if name in eyes:
                self._place(client, eyes[name])

    def _view_distance(self) -> float:
        """Far enough for a 0.5 m tall view through the tracked camera's field of view."""
        f = float(self.av.K[0, 0]) / float(self.av.cfg.resolution)
        return max(0.3, 0.5 * f)

    def _place(self, client, eye: np.ndarray) -> None:
        with client.atomic():
            client.camera.up_direction = (0.0, 1.0, 0.0)
            client.camera.position = tuple(float(x) for x in eye)
            client.camera.look_at = (0.0, 0.0, 0.0)

    def _on_connect(self, client) -> None:
        client.camera.fov = 2 * math.atan(0.5 / (float(self.av.K[0, 0]) / float(self.av.cfg.resolution)))
        self._place(client, np.array([0.0, 0.0, self._view_distance()]))
        client.camera.on_update(lambda _: self._camera_moved(client))
        self._dirty = True

    # ------------------------------------------------------------------ actions
    def export_frame(self) -> Path:
        from gstalk.gaussians.axes import convert_axes
        from gstalk.gaussians.set import to_gaussian_set
        from gstalk.gaussians.ply import save_ply
        from gstalk.io.atomic import ensure_dir

        g, _ = self.frame_gaussians(self.frame)
        return save_ply(convert_axes(to_gaussian_set(g), "rdf"), ensure_dir(self.out) / f"frame_{self.frame:05d}.ply")

    def render_video(self) -> Path:
        """The current driving sequence from the tracked camera, as an mp4 with its sound."""
        from gstalk.avatar.render import render_frame
        from gstalk.avatar.cameras import cameras_for
        from gstalk.io.atomic import ensure_dir
        from gstalk.io.media import write_video

        self.progress.visible = True
        self.progress.value = 0.0
        n, size = self.num_frames, self.size
        cams = cameras_for(self.av, self.motion, n, "track", size)
        bg = torch.tensor(self.bg_colour.value, dtype=torch.float32, device=self.dev).div(255).expand(size, size, 3)

        def frames():
            for k in range(n):
                g, _ = self.frame_gaussians(k)
                with torch.no_grad():
                    yield render_frame(self.av, g, cams[k].to(self.dev), bg)[0]
                self.progress.value = 100.0 * (k + 1) / n

        path = write_video(ensure_dir(self.out) / "render.mp4", frames(), self.fps, self.audio, n_frames=n)
        self.progress.visible = False
        self.status.value = f"wrote {path}"
        return path

    # ------------------------------------------------------------------ loop
    def step(self) -> None:
        """Advance playback by the clock and push the frame when it changed."""
        with self.lock:
            if self.playing:
                k = self._f_play + int((time.perf_counter() - self._t_play) * self.fps * self.speed)
                if k >= self.num_frames:  # loop
                    self._t_play, self._f_play, k = time.perf_counter(), 0, 0
                    self._sound(True)
                if k != self.frame:
                    self.frame = k
                    self.timeline.value = k
                    self._dirty = True
            if self.orbit:
                self.orbit_angle += 0.02
                d = self._view_distance()
                eye = np.array([d * math.sin(self.orbit_angle), 0.0, d * math.cos(self.orbit_angle)])
                for client in self.server.get_clients().values():
                    self._place(client, eye)
            dirty, k = self._dirty, self.frame
            self._dirty = False
        if dirty:
            self.show(k)

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                self.step()
            except Exception as e:  # keep serving; say what went wrong
                self.status.value = f"error: {e}"
            time.sleep(max(0.0, 1.0 / 60 - (time.perf_counter() - t0)))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "AvatarViewer":
        self.show(0)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        import contextlib

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.redirect_stdout(io.StringIO()):
            self.server.stop()

    def serve_forever(self) -> None:
        self.start()
        try:
            while True:
                time.sleep(1.0)
        finally:
            self.stop()


__all__ = ["AvatarViewer"]
