"""``gstalk export AVATAR --format ... --out DIR``: the avatar in the formats other tools read.

Static (one frame: the avatar at rest, or ``--frame k`` of the driving sequence; ``--origin``: where it sits)
    ply             standard 3DGS PLY with all SH (``avatar.ply``)
    splat           antimatter15 ``.splat``, 32 bytes a splat (``avatar.splat``)
    compressed-ply  PlayCanvas compressed PLY (``avatar.compressed.ply``)
Animated (every frame of the driving sequence: ``--audio``, ``--expressions``, or the
training clip's own motion when neither is given)
    ply-sequence    ``sequence/frame_NNNNN.ply`` + ``sequence/manifest.json`` + the audio
    viser           ``avatar.viser``, a viser scene recording, and ``avatar.html``, a standalone
                    page that replays it offline in a browser
Geometry (the tracked head mesh)
    mesh-obj, mesh-ply  ``mesh_obj/frame_NNNNN.obj`` / ``mesh_ply/frame_NNNNN.ply``
    glb             ``head.glb``, the mesh with morph targets and a ``talk`` animation
Web player (the driving sequence, played in a browser: gstalk/export/web.py)
    web             ``index.html``, ``player.js``, ``lib/`` (three.js, Spark), ``avatar.json`` +
                    ``avatar.bin`` (every frame's Gaussians, compressed) and ``audio.wav``

Splat formats are written in ``--axes`` (default ``rdf``, the axes splat viewers expect;
``rub`` keeps gstalk's), meshes always in gstalk's axes, which are glTF's. See
``gstalk/gaussians/axes.py`` and docs/export.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gstalk.errors import AT_LEAST_0, InputError, check_value
from gstalk.gaussians.ply import save_ply
from gstalk.gaussians.set import GaussianTensors, to_gaussian_set
from gstalk.render.project import splat_arrays
from gstalk.io.atomic import ensure_dir, write_json

STATIC = ("ply", "splat", "compressed-ply")
ANIMATED = ("ply-sequence", "viser")
GEOMETRY = ("mesh-obj", "mesh-ply", "glb")
WEB = ("web",)
#: what --format all writes: every format but the web player (which needs its libraries, npm's)
ALL = STATIC + ANIMATED + GEOMETRY
FORMATS = ALL + WEB
SEQUENCE_FORMAT = "gstalk-splat-sequence"

Progress = Callable[[str, int, int], None]


ORIGINS = ("head", "camera")


def rest_gaussians(av, motion: dict) -> GaussianTensors:
    """The static export: the avatar as the camera saw it, its head held at the training clip's
    median pose, neutral expression and closed jaw, undeformed (head and torso together)."""
    from gstalk.avatar.conditions import head_motion
    from gstalk.avatar.model import Frame
    from gstalk.head.lbs import FlameParams

    still = head_motion(motion, 1, "still")
    t = {k: torch.as_tensor(v, dtype=torch.float32, device=av.shape.device) for k, v in still.items()}
    with torch.no_grad():
        return av.gaussians_at(Frame(FlameParams(shape=av.shape[None], **t), deform=False))[0]


def head_centre(av, g: GaussianTensors) -> torch.Tensor:
    """[3] the opacity-weighted centre of the head's (bound) Gaussians of ``g``."""
    bound = av.binding >= 0
    if not bool(bound.any()):
        bound = torch.ones_like(bound)
    w = g.opacities.detach().reshape(-1)[bound].clamp_min(1e-6)
    return (g.means.detach()[bound] * w[:, None]).sum(0) / w.sum()


def _moved(g: GaussianTensors, offset: torch.Tensor) -> GaussianTensors:
    return GaussianTensors(g.means - offset.to(g.means), g.quats, g.scales, g.opacities, g.colors)


def placement_note(origin: str, axes: str, offset) -> str:
    """What the files say about where they put the avatar (a PLY header comment, the manifest)."""
    o = ", ".join(f"{float(v):.4f}" for v in offset)
    if origin == "head":
        return (f"gstalk origin head: the head's centre is at (0, 0, 0), axes {axes}; the tracked camera's space "
                f"is shifted by -({o}) m")
    return f"gstalk origin camera: the tracked camera's space (the camera at the origin), axes {axes}"


@dataclass
class ExportResult:
    out: Path
    files: dict[str, list[Path]] = field(default_factory=dict)
    frames: int = 0
    fps: float = 0.0
    gaussians: int = 0
    seconds: float = 0.0
    origin: str = "head"
    offset: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # what was subtracted (gstalk's axes, metres)
    notes: list[str] = field(default_factory=list)  # what the user should know (printed by the CLI)

    def sizes(self) -> dict[str, int]:
        return {k: sum(p.stat().st_size for p in v) for k, v in self.files.items()}


def standalone_player(recording: bytes) -> str:
    """One HTML file that replays a viser recording offline: viser's bundled client with the
    recording embedded where the client looks for it (``window.__VISER_EMBED_DATA__``)."""
    import base64

    import viser

    page = (Path(viser.__file__).parent / "client" / "build" / "index.html").read_text()
    data = base64.b64encode(recording).decode("ascii")
    script = f'<script>window.__VISER_EMBED_DATA__="{data}";window.__VISER_EMBED_CONFIG__={{darkMode:false}};</script>'
    cut = page.index("</head>")
    return page[:cut] + script + page[cut:]


def _opening_camera(av, head: torch.Tensor, offset: torch.Tensor, axes: str) -> dict:
    """Where a player of the recording starts: at the tracked camera, looking at the head's
    centre ``head`` (gstalk's world), upright, with the tracked camera's field of view; all in
    the file's coordinates (shifted by -``offset``, in ``axes``)."""
    import math

    vm = av.viewmat.detach().cpu().double()
    flip = torch.tensor([1.0, -1.0, -1.0] if axes == "rdf" else [1.0, 1.0, 1.0], dtype=torch.float64)
    off = offset.detach().cpu().double()
    camera = -(vm[:3, :3].T @ vm[:3, 3])  # the camera's position in gstalk's world
    up = -vm[1, :3]  # the camera's up (OpenCV's -y) in gstalk's world
    fy = float(av.K[1, 1])
    fov = 2 * math.atan(0.5 * float(av.cfg.resolution) / fy) if fy > 0 else math.radians(30)
    look_at = (head.detach().cpu().double() - off) * flip
    return {"position": ((camera - off) * flip).tolist(), "look_at": look_at.tolist(), "up": (up * flip).tolist(),
            "fov": fov}


def write_viser_recording(frames, fps: float, path: Path, progress: Progress | None = None, n: int = 0,
                          camera: dict | None = None) -> Path:
    """A viser scene recording (``.viser``): the splats updated every frame, timed at ``fps``; and
    beside it the same recording in a standalone HTML player (``.html``). ``camera``: where the
    player opens (position, look_at, up, fov in radians), else viser's default."""
    import contextlib
    import io
    import socket

    import viser

    from gstalk.io.atomic import write_bytes, write_text

    with socket.socket() as s:  # a free loopback port for the (never visited) server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with contextlib.redirect_stdout(io.StringIO()):  # its banner is for people visiting it
        server = viser.ViserServer(host="127.0.0.1", port=port, verbose=False)
    try:
        if camera:
            ic = server.initial_camera
            ic.position, ic.look_at, ic.up, ic.fov = (camera["position"], camera["look_at"], camera["up"],
                                                      camera["fov"])
        handle = None
        rec = None
        for k, g in enumerate(frames):
            c, cov, rgb, op = splat_arrays(g)  # one copy to the host
            if handle is None:
                handle = server.scene.add_gaussian_splats("/avatar", centers=c, covariances=cov, rgbs=rgb,
                                                          opacities=op)
                rec = server.get_scene_serializer()
            else:
                handle.set_gaussians(c, cov, rgb, op)
            rec.insert_sleep(1.0 / fps)
            if progress:
                progress("viser", k + 1, n or k + 1)
        if rec is None:
            raise InputError("there are no frames to record")
        data = rec.serialize()
        write_bytes(path, data)
        write_text(path.with_suffix(".html"), standalone_player(data))
        return path
    finally:
        with contextlib.redirect_stdout(io.StringIO()):
            server.stop()


def _formats(formats: tuple[str, ...]) -> tuple[str, ...]:
    """The formats asked for ('all' expanded), each known; the web player's libraries there."""
    formats = tuple(dict.fromkeys(sum(((ALL if f == "all" else (f,)) for f in formats), ())))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise InputError(f"unknown export format {', '.join(bad) or '(none)'}: choose from {', '.join(FORMATS)} or all")
    if "web" in formats:
        from gstalk.export.web import viewer_folder

        viewer_folder()  # before any work
    return formats


def export(avatar_dir: str | Path, out: str | Path, formats: tuple[str, ...] = STATIC,
           audio_path: str | Path | None = None, expressions_path: str | Path | None = None,
           frame: int = -1, max_frames: int = 0, fps: float = 0.0, head: str = "track", axes: str = "rdf",
           deform: bool = True, device: str = "auto", progress: Progress | None = None,
           origin: str = "head") -> ExportResult:
    from gstalk.avatar.io import load_avatar
    from gstalk.config import resolve_device
    from gstalk.avatar.conditions import conditions_for, load_driver, posed_iter, training_expressions
    from gstalk.gaussians.axes import AXES, convert_axes
    from gstalk.export.mesh import mesh_vertices, write_glb, write_mesh_sequence
    from gstalk.export.splats import write_compressed_ply, write_splat
    from gstalk.io.video import write_wav

    formats = _formats(formats)
    if axes not in AXES:
        raise InputError(f"--axes must be one of {', '.join(AXES)}")
    if origin not in ORIGINS:
        raise InputError(f"--origin must be one of {', '.join(ORIGINS)}")
    check_value(frame, (lambda v: v >= -1, "-1 (the avatar at rest) or a frame number from 0"), "--frame")
    check_value(max_frames, AT_LEAST_0, "--max-frames")
    t0 = time.perf_counter()
    av, motion = load_avatar(avatar_dir, resolve_device(device))
    fps = fps or av.cfg.fps
    audio, expressions, n, fps = load_driver(audio_path, expressions_path, fps, required=False)
    if audio is not None:
        from gstalk.avatar.conditions import lip_model

        lip_model(av)  # an avatar fitted without audio cannot be driven by speech, as in gstalk render
    if audio is None and expressions is None:
        expressions = training_expressions(motion)
        n = len(motion["jaw"])
    if max_frames > 0:
        n = min(n, max_frames)
    needs_sequence = frame >= 0 or any(f in formats for f in ANIMATED + GEOMETRY + WEB)
    if frame >= n and needs_sequence:
        raise InputError(f"--frame {frame} is past the end of the driving sequence ({n} frames)")
    cond = conditions_for(av, motion, n, fps, audio, expressions, head) if needs_sequence else None
    out = ensure_dir(out)  # only once the inputs are known to be good
    res = ExportResult(out, gaussians=av.num_gaussians)
    res.frames, res.fps = n, fps

    rest = rest_gaussians(av, motion)
    # one shift for every format and frame: the head's centre at the origin (the head moves
    # about it in the animated formats as it did in the clip), or none
    centre = head_centre(av, rest)
    offset = centre if origin == "head" else torch.zeros_like(centre)
    res.origin, res.offset = origin, offset.cpu().tolist()
    note = placement_note(origin, axes, res.offset)

    if any(f in formats for f in STATIC):
        g = next(posed_iter(av, cond.slice(slice(frame, frame + 1)), deform)) if frame >= 0 else rest
        gs = convert_axes(to_gaussian_set(_moved(g, offset)), axes)
        writers = {"ply": (lambda g, p: save_ply(g, p, [note]), "avatar.ply"), "splat": (write_splat, "avatar.splat"),
                   "compressed-ply": (write_compressed_ply, "avatar.compressed.ply")}
        for f in STATIC:
            if f in formats:
                fn, name = writers[f]
                res.files[f] = [fn(gs, out / name)]

    def audio_copy(folder: Path) -> Path | None:
        if audio is None:
            return None
        return write_wav(folder / "audio.wav", audio[: int(round(n / fps * 16000))])

    if "ply-sequence" in formats:
        seq = ensure_dir(out / "sequence")
        for old in seq.glob("frame_*.ply"):  # a shorter re-export must not leave stale frames
            old.unlink()
        files = []
        for k, g in enumerate(posed_iter(av, cond, deform)):
            files.append(save_ply(convert_axes(to_gaussian_set(_moved(g, offset)), axes), seq / f"frame_{k:05d}.ply",
                                  [note]))
            if progress:
                progress("ply frames", k + 1, n)
        wav = audio_copy(seq)
        manifest = write_json(seq / "manifest.json", {
            "format": SEQUENCE_FORMAT, "version": 1, "fps": fps, "num_frames": n, "axes": axes,
            "origin": origin, "offset": res.offset,
            "gaussians": av.num_gaussians, "sh_degree": av.cfg.sh_degree, "files": [p.name for p in files],
            "audio": wav.name if wav else None, "seconds": n / fps})
        res.files["ply-sequence"] = files + [manifest] + ([wav] if wav else [])

    if "viser" in formats:
        def viser_frames():
            from gstalk.avatar.views import other_view

            for g in posed_iter(av, cond, deform):
                rgb = other_view(av, g).colors  # the colours the training camera saw
                c = convert_axes(to_gaussian_set(_moved(g, offset)), axes).activated()
                yield GaussianTensors(c.means, c.quats, c.scales, c.opacities, rgb.cpu())

        path = write_viser_recording(viser_frames(), fps, out / "avatar.viser", progress, n,
                                     camera=_opening_camera(av, centre, offset, axes))
        res.files["viser"] = [path, path.with_suffix(".html")]
        wav = audio_copy(out)
        if wav:
            res.files["viser"].append(wav)

    if "web" in formats:
        from gstalk.avatar.conditions import posed_batches
        from gstalk.export.web import export_web

        res.files["web"], note = export_web(av, motion, posed_batches(av, cond, deform), offset, fps, n,
                                            audio_copy(out), out, progress)
        res.notes.append(note)

    if any(f in formats for f in GEOMETRY):
        verts = mesh_vertices(av.head_model, av.shape, cond.params)
        faces = av.head_model.faces.cpu().numpy()
        for f, fmt in (("mesh-obj", "obj"), ("mesh-ply", "ply")):
            if f in formats:
                res.files[f] = write_mesh_sequence(verts, faces, out / f"mesh_{fmt}", fmt)
                if progress:
                    progress(f, n, n)
        if "glb" in formats:
            res.files["glb"] = [write_glb(av.head_model, av.shape, cond.params, fps, out / "head.glb")]
    res.seconds = time.perf_counter() - t0
    return res


__all__ = ["ALL", "ANIMATED", "FORMATS", "WEB", "GEOMETRY", "STATIC", "ExportResult", "export", "rest_gaussians",
           "write_viser_recording"]
