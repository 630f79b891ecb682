"""``gstalk export AVATAR --format ... --out DIR``: the avatar in the formats other tools read.

Static (one frame: the canonical avatar, or ``--frame k`` of the driving sequence)
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

Splat formats are written in ``--axes`` (default ``rdf``, the axes splat viewers expect;
``rub`` keeps gstalk's), meshes always in gstalk's axes, which are glTF's. See
``gstalk/gaussians/axes.py`` and docs/export.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gstalk.errors import AT_LEAST_0, InputError, check_value
from gstalk.gaussians.ply import save_ply
from gstalk.gaussians.set import GaussianTensors, splat_colors, to_gaussian_set
from gstalk.render.project import covariances
from gstalk.io.atomic import ensure_dir, write_json

STATIC = ("ply", "splat", "compressed-ply")
ANIMATED = ("ply-sequence", "viser")
GEOMETRY = ("mesh-obj", "mesh-ply", "glb")
FORMATS = STATIC + ANIMATED + GEOMETRY
SEQUENCE_FORMAT = "gstalk-splat-sequence"

Progress = Callable[[str, int, int], None]


def canonical_gaussians(av) -> GaussianTensors:
    """The avatar at its identity, rest pose, neutral expression, at the origin, undeformed."""
    from gstalk.avatar.model import Frame
    from gstalk.head.lbs import FlameParams

    with torch.no_grad():
        return av.gaussians_at(Frame(FlameParams(shape=av.shape[None]), deform=False))[0]


@dataclass
class ExportResult:
    out: Path
    files: dict[str, list[Path]] = field(default_factory=dict)
    frames: int = 0
    fps: float = 0.0
    gaussians: int = 0
    seconds: float = 0.0

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


def write_viser_recording(frames, fps: float, path: Path, progress: Progress | None = None, n: int = 0) -> Path:
    """A viser scene recording (``.viser``): the splats updated every frame, timed at ``fps``; and
    beside it the same recording in a standalone HTML player (``.html``)."""
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
        handle = None
        rec = None
        for k, g in enumerate(frames):
            c, cov = g.means.detach().cpu().numpy().astype(np.float32), covariances(g)
            rgb, op = splat_colors(g), g.opacities.detach().cpu().numpy()[:, None]
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


def export(avatar_dir: str | Path, out: str | Path, formats: tuple[str, ...] = STATIC,
           audio_path: str | Path | None = None, expressions_path: str | Path | None = None,
           frame: int = -1, max_frames: int = 0, fps: float = 0.0, head: str = "track", axes: str = "rdf",
           deform: bool = True, device: str = "auto", progress: Progress | None = None) -> ExportResult:
    from gstalk.avatar.io import load_avatar
    from gstalk.config import resolve_device
    from gstalk.avatar.conditions import conditions_for, load_driver, posed_iter, training_expressions
    from gstalk.gaussians.axes import AXES, convert_axes
    from gstalk.export.mesh import mesh_vertices, write_glb, write_mesh_sequence
    from gstalk.export.splats import write_compressed_ply, write_splat
    from gstalk.io.video import write_wav

    formats = tuple(dict.fromkeys(FORMATS if "all" in formats else formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise InputError(f"unknown export format {', '.join(bad) or '(none)'}: choose from {', '.join(FORMATS)} or all")
    if axes not in AXES:
        raise InputError(f"--axes must be one of {', '.join(AXES)}")
    check_value(frame, (lambda v: v >= -1, "-1 (the canonical avatar) or a frame number from 0"), "--frame")
    check_value(max_frames, AT_LEAST_0, "--max-frames")
    t0 = time.perf_counter()
    av, motion = load_avatar(avatar_dir, resolve_device(device))
    fps = fps or av.cfg.fps
    audio, expressions, n, fps = load_driver(audio_path, expressions_path, fps, required=False)
    if audio is None and expressions is None:
        expressions = training_expressions(motion)
        n = len(motion["jaw"])
    if max_frames > 0:
        n = min(n, max_frames)
    needs_sequence = frame >= 0 or any(f in formats for f in ANIMATED + GEOMETRY)
    if frame >= n and needs_sequence:
        raise InputError(f"--frame {frame} is past the end of the driving sequence ({n} frames)")
    cond = conditions_for(av, motion, n, fps, audio, expressions, head) if needs_sequence else None
    out = ensure_dir(out)  # only once the inputs are known to be good
    res = ExportResult(out, gaussians=av.num_gaussians)
    res.frames, res.fps = n, fps

    if any(f in formats for f in STATIC):
        if frame >= 0:
            g = next(posed_iter(av, cond.slice(slice(frame, frame + 1)), deform))
        else:
            g = canonical_gaussians(av)
        gs = convert_axes(to_gaussian_set(g), axes)
        writers = {"ply": (save_ply, "avatar.ply"), "splat": (write_splat, "avatar.splat"),
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
            files.append(save_ply(convert_axes(to_gaussian_set(g), axes), seq / f"frame_{k:05d}.ply"))
            if progress:
                progress("ply frames", k + 1, n)
        wav = audio_copy(seq)
        manifest = write_json(seq / "manifest.json", {
            "format": SEQUENCE_FORMAT, "version": 1, "fps": fps, "num_frames": n, "axes": axes,
            "gaussians": av.num_gaussians, "sh_degree": av.cfg.sh_degree, "files": [p.name for p in files],
            "audio": wav.name if wav else None, "seconds": n / fps})
        res.files["ply-sequence"] = files + [manifest] + ([wav] if wav else [])

    if "viser" in formats:
        def viser_frames():
            from gstalk.avatar.views import other_view

            for g in posed_iter(av, cond, deform):
                rgb = other_view(av, g).colors  # the colours the training camera saw
                c = convert_axes(to_gaussian_set(g), axes).activated()
                yield GaussianTensors(c.means, c.quats, c.scales, c.opacities, rgb.cpu())

        path = write_viser_recording(viser_frames(), fps, out / "avatar.viser", progress, n)
        res.files["viser"] = [path, path.with_suffix(".html")]
        wav = audio_copy(out)
        if wav:
            res.files["viser"].append(wav)

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


__all__ = ["ANIMATED", "FORMATS", "GEOMETRY", "STATIC", "ExportResult", "canonical_gaussians", "export",
           "write_viser_recording"]
