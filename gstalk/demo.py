"""The built-in demo, and a turntable renderer for any Gaussian PLY.

``gstalk demo`` runs the whole real pipeline on a clip it builds itself (nothing is
downloaded): the face photo that ships with scikit-image is projected onto gstalk's stand-in
head, which is animated (jaw, lips, blinks, small head motion) by a synthesized speech-like
audio track and rendered to an mp4 with sound. Then prepare (face detection included),
track, train, an evaluation on the held-out tail, driving the avatar with *another*
synthesized voice from the tracked camera and from an orbit, and a PLY export.
``gstalk demo --clip my.mp4`` runs the same on a user's clip. On a GPU it uses full size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gstalk.config import DemoConfig, PrepareOptions, TrackOptions, TrainOptions, resolve_device
from gstalk.errors import AT_LEAST_0, AT_LEAST_1, InputError, check_value
from gstalk.gaussians import load_ply, rgb_to_sh
from gstalk.io.atomic import ensure_dir
from gstalk.io.media import check_size, write_image, write_video
from gstalk.render import orbit_cameras, rasterize

SR = 16000
# vowel formants (F1, F2 in Hz) and how each shapes the mouth: jaw (rad), pucker, stretch
VOWELS = {"a": (730, 1090, 0.28, 0.0, 0.0), "e": (530, 1840, 0.16, 0.0, 0.5), "i": (270, 2290, 0.08, 0.0, 0.8),
          "o": (570, 840, 0.2, 0.7, 0.0), "u": (300, 870, 0.1, 1.0, 0.0)}


# ---------------------------------------------------------------------- synthetic speech
def synth_speech(seconds: float, seed: int = 0, f0: float = 130.0) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """Speech-like audio (voiced syllables with vowel formants, consonant noise, pauses) and
    its syllables (start, end, vowel)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    audio = np.zeros(n)
    sylls = []
    t = 0.3
    while t < seconds - 0.4:
        for _ in range(rng.integers(2, 6)):  # a word
            dur = rng.uniform(0.14, 0.3)
            if t + dur > seconds - 0.2:
                break
            v = rng.choice(list(VOWELS))
            f1, f2 = VOWELS[v][:2]
            i0, i1 = int(t * SR), int((t + dur) * SR)
            tt = np.arange(i1 - i0) / SR
            pitch = f0 * (1 + 0.08 * np.sin(2 * np.pi * 3 * tt + rng.uniform(0, 6)))
            phase = 2 * np.pi * np.cumsum(pitch) / SR
            sig = np.zeros_like(tt)
            for h in range(1, 30):
                fh = h * f0
                g = np.exp(-((fh - f1) / 120) ** 2) + 0.7 * np.exp(-((fh - f2) / 180) ** 2) + 0.05 / h
                sig += g * np.sin(h * phase)
            env = np.minimum(1, np.minimum(tt / 0.03, (dur - tt) / 0.05)).clip(0, 1)
            audio[i0:i1] += 0.25 * sig * env / max(np.abs(sig).max(), 1e-6)
            c = int(0.05 * SR)  # a consonant: a short noise burst before the vowel
            if i0 - c > 0 and rng.random() < 0.6:
                audio[i0 - c:i0] += 0.04 * rng.normal(size=c) * np.hanning(c)
            sylls.append((t, t + dur, str(v)))
            t += dur + rng.uniform(0.0, 0.05)
        t += rng.uniform(0.2, 0.45)  # a pause between words
    return audio.astype(np.float32), sylls


def mouth_curves(sylls, n_frames: int, fps: float, expr_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame jaw [T,3] and expression [T,E] following the syllables."""
    jaw = np.zeros((n_frames, 3))
    expr = np.zeros((n_frames, len(expr_names)))
    t = np.arange(n_frames) / fps
    for a, b, v in sylls:
        shape = np.clip(np.minimum((t - a) / 0.06, (b - t) / 0.08), 0, 1)
        j, pk, st = VOWELS[v][2:]
        jaw[:, 0] = np.maximum(jaw[:, 0], j * shape)
        for name, val in (("pucker", pk), ("stretch", st), ("mouth_open", 0.5 * j / 0.28)):
            if name in expr_names:
                k = expr_names.index(name)
                expr[:, k] = np.maximum(expr[:, k], val * shape)
    return jaw, expr


# ---------------------------------------------------------------------- the synthetic clip
def _photo_head(per_triangle: int = 3):
    """Stand-in head Gaussians coloured by projecting skimage's astronaut photo onto the face."""
    import cv2
    from skimage import data

    from gstalk.avatar.binding import bind_to_world, triangle_frames
    from gstalk.avatar.init import init_gaussians
    from gstalk.head.flame import STANDIN_PATH, load_head_model
    from gstalk.head.lbs import FlameParams, flame_forward
    from gstalk.head.standin import REGIONS, photo_landmarks

    head = load_head_model(STANDIN_PATH)
    photo = data.astronaut().astype(np.float32) / 255
    lmk = photo_landmarks()[:468, :2]
    v = head.v_template[:468].double().numpy()
    # an affine camera from the rest-pose face to the photo (least squares)
    A = np.linalg.lstsq(np.c_[v, np.ones(468)], lmk, rcond=None)[0]  # [4, 2]
    shape = torch.zeros(head.n_shape)
    g, region = init_gaussians(head, shape, per_triangle, sh_degree=0, seed=1)
    o, r, s = triangle_frames(flame_forward(head, FlameParams(shape=shape[None])).vertices, head.faces)
    pos = bind_to_world(g.means, g.quats, g.log_scales, g.binding, o, r, s)[0][0].numpy()
    uv = np.c_[pos, np.ones(len(pos))] @ A
    cols = cv2.remap(photo, uv[:, 0:1].astype(np.float32), uv[:, 1:2].astype(np.float32), cv2.INTER_LINEAR)[:, 0]
    vreg = np.asarray(head.meta["vertex_region"])[head.faces.numpy()[g.binding.numpy(), 0]]
    face_front = v[:, 2].min() - 0.01
    hair = photo[int(lmk[10, 1]) - 12, int(lmk[10, 0])]
    skin = photo[int(lmk[152, 1]) - 6, int(lmk[152, 0])]
    back = pos[:, 2] < face_front
    cols[back & (vreg == REGIONS["skull"])] = hair
    cols[vreg == REGIONS["neck"]] = skin * 0.9
    cols[vreg == REGIONS["mouth"]] = (0.35, 0.08, 0.08)
    g.sh[:, 0] = rgb_to_sh(torch.from_numpy(cols).float())
    g.opacity_logits[:] = 4.0
    return head, g


def make_talking_clip(path: Path, seconds: float = 8.0, size: int = 256, fps: float = 25.0, seed: int = 0) -> Path:
    """Render the photo head speaking synthesized audio to an mp4 with sound."""
    from gstalk.avatar.model import Avatar, AvatarConfig, Frame
    from gstalk.head.lbs import FlameParams
    from gstalk.head.tracker import VIEWMAT
    from gstalk.render import Cameras, intrinsics_from_fov

    head, g = _photo_head()
    audio, sylls = synth_speech(seconds, seed)
    n = int(round(seconds * fps))
    names = list(head.meta["expression_names"])
    jaw, expr = mouth_curves(sylls, n, fps, names)
    t = np.arange(n) / fps
    for tb in np.arange(1.3, seconds, 2.7):  # blinks
        k = names.index("blink_left"), names.index("blink_right")
        b = np.clip(1 - np.abs(t - tb) / 0.08, 0, 1)
        expr[:, k[0]] = np.maximum(expr[:, k[0]], b)
        expr[:, k[1]] = np.maximum(expr[:, k[1]], b)
    rot = np.stack([0.05 * np.sin(2 * np.pi * t / 3.1), 0.12 * np.sin(2 * np.pi * t / 4.3), 0.02 * np.sin(t)], 1)
    trans = np.stack([0.005 * np.sin(t), np.full(n, 0.01), np.full(n, -0.62)], 1)
    cfg = AvatarConfig(sh_degree=0, code_dim=8, expr_cond=0, feature_dim=4, window=4)
    av = Avatar(cfg, head, torch.zeros(head.n_shape), g, torch.zeros(len(g), dtype=torch.long),
                intrinsics_from_fov(size, size, 25.0), torch.from_numpy(VIEWMAT).float())
    cam = Cameras(av.viewmat[None], av.K[None], size, size)
    yy = torch.linspace(0, 1, size)[:, None, None]
    bg = (torch.tensor([0.55, 0.62, 0.7]) * (1 - 0.3 * yy)).expand(size, size, 3)
    f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731

    def frames():
        with torch.no_grad():
            for k in range(n):
                p = FlameParams(expr=f32(expr[k:k + 1]), jaw=f32(jaw[k:k + 1]), global_rot=f32(rot[k:k + 1]),
                                translation=f32(trans[k:k + 1]))
                gk = av.gaussians_at(Frame(p, deform=False))[0]
                out = rasterize(gk, cam, sh_degree=0, background=0.0)
                yield out.colors[0] + (1 - out.alphas[0]) * bg

    return write_video(Path(path), frames(), fps, audio)


# ---------------------------------------------------------------------- the demo
@dataclass
class DemoResult:
    clip: Path
    dataset: Path
    avatar: Path
    videos: list[Path]
    ply: Path
    timings: dict
    eval: dict


#: The shortest built-in clip (seconds).
MIN_SECONDS = 3.0


def run_demo(cfg: DemoConfig, progress=None, log: Callable[[str], None] = print) -> DemoResult:
    from gstalk.drive.render import drive
    from gstalk.eval.evaluate import evaluate
    from gstalk.head.tracker import track_dataset
    from gstalk.io.video import write_wav
    from gstalk.prepare import prepare
    from gstalk.train.trainer import train

    if cfg.size:
        check_size(cfg.size, 32)
    if not cfg.effort > 0:
        raise InputError("--effort must be above 0 (1.0 is the full CPU schedule)")
    if cfg.clip is None and not cfg.seconds >= MIN_SECONDS:
        raise InputError(f"--seconds must be at least {MIN_SECONDS:g} (the held-out tail needs frames of its own)")
    device = resolve_device(cfg.device)
    gpu = device.type == "cuda"
    out = ensure_dir(cfg.out)
    prog = progress or (lambda *a: None)
    timings = {}
    t0 = time.perf_counter()
    if cfg.clip is not None:
        clip = Path(cfg.clip)
        if not clip.is_file():
            raise InputError(f"no such clip: {clip}")
    else:
        log("building a synthetic talking clip (skimage's face photo on the stand-in head, synthesized speech) ...")
        clip = make_talking_clip(out / "demo_clip.mp4", seconds=cfg.seconds, size=192)
    timings["clip_s"] = time.perf_counter() - t0
    res = cfg.size or (512 if gpu else 128)
    ds_dir = out / "dataset"
    t = time.perf_counter()
    prepare(clip, ds_dir, PrepareOptions(resolution=res), progress=prog, log=log)
    timings["prepare_s"] = time.perf_counter() - t
    t = time.perf_counter()
    topts = TrackOptions(device=cfg.device) if gpu else TrackOptions(iters_rigid=150, iters_shape=150, iters_all=250,
                                                                     device=cfg.device)
    if cfg.clip is None:
        # the built-in clip was made with the stand-in itself, so a full track would explain all
        # of it; tracking only the first expression directions (mouth open, lip press) leaves
        # the lips' rounding and spreading to the audio-driven deformation, as real lips are
        topts = replace(topts, n_expr=2)
    track_dataset(ds_dir, topts, progress=prog, log=log)
    timings["track_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tr_opts = TrainOptions(device=cfg.device)
    if not gpu:
        k = cfg.effort
        tr_opts = replace(tr_opts, iters_static=int(600 * k), iters_audio=int(300 * k), iters_joint=int(200 * k),
                          iters_a2m=300, densify_every=150, checkpoint_every=200)
    avatar = train(ds_dir, out / "avatar", tr_opts, progress=prog, log=log)
    timings["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ev = evaluate(avatar, ds_dir, size=res, device=cfg.device, progress=prog)
    timings["eval_s"] = time.perf_counter() - t
    speech = ev["lip_model"] != "none"
    if speech:  # another voice: a different seed and pitch
        voice, _ = synth_speech(5.0, seed=7, f0=190.0)
        write_wav(out / "other_voice.wav", voice)
        driver = dict(audio_path=out / "other_voice.wav")
    else:  # a clip without speech gives an avatar that tracked expressions drive: its own
        log("the clip has no speech: driving the avatar with its own tracked expressions instead of another voice")
        driver = dict(expressions_path=ds_dir / "track.npz")
    t = time.perf_counter()
    talk = drive(avatar, out / "demo_talk.mp4", **driver, size=res, device=cfg.device, progress=prog)
    orbit = drive(avatar, out / "demo_orbit.mp4", **driver, camera="orbit", head="still", size=res,
                  device=cfg.device, progress=prog)
    timings["drive_s"] = time.perf_counter() - t
    timings["drive_fps"] = talk.render_fps
    from gstalk.export.exporter import export

    exp = export(avatar, out / "export", ("ply", "splat", "compressed-ply"), frame=0, device=cfg.device)
    ply = exp.files["ply"][0]
    timings["total_s"] = time.perf_counter() - t0
    r = DemoResult(clip, ds_dir, avatar, [talk.video, orbit.video], ply, timings, ev)
    d, b = ev["deformation"], ev["no_deformation"]
    log(f"clip      : {clip}\ndataset   : {ds_dir}\navatar    : {avatar}\nvideos    : {talk.video}, {orbit.video}\n"
        f"export    : {ply.parent} (avatar.ply, .splat, .compressed.ply: frame 0, viewer axes)\n"
        f"held-out  : PSNR {d['psnr']:.2f} dB (no deformation {b['psnr']:.2f}), face PSNR "
        f"{d['face_psnr']:.2f} ({b['face_psnr']:.2f}), mouth PSNR {d['mouth_psnr']:.2f} ({b['mouth_psnr']:.2f}), "
        f"LMD {d['lmd_px512']:.2f} px ({b['lmd_px512']:.2f}"
        + (f"; driven by audio alone {ev['audio_driven']['lmd_px512']:.2f})\n" if speech else ")\n") +
        f"eval      : {ev['files']['json']}, {ev['files']['video']}\n"
        f"time      : " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + f"  [{device}]")
    return r


# ---------------------------------------------------------------------- PLY turntable
@dataclass
class TurntableResult:
    image: Path
    video: Path
    gaussians: int
    size: int
    device: str
    backend: str
    ms_per_frame: float


def render_ply_turntable(ply: Path, out: Path, size: int = 256, frames: int = 48, fps: float = 24.0,
                         radius: float = 0.0, axes: str = "rdf", device: str = "auto") -> TurntableResult:
    """A turntable (y up) of a 3DGS PLY whose axes are ``axes`` (see gstalk/export/axes.py)."""
    from gstalk.gaussians.axes import convert_axes

    dev = resolve_device(device)
    from gstalk.gaussians.ply import check_finite_file

    g = load_ply(ply)
    g = convert_axes(g, axes)  # the RUB<->RDF turn is its own inverse
    if len(g) == 0:
        raise InputError(f"{ply} holds no Gaussians")
    check_finite_file(g, ply)
    check_size(size)
    check_value(frames, AT_LEAST_1, "--frames")
    check_value(radius, AT_LEAST_0, "--radius")  # 0: fit the scene
    out = ensure_dir(out)
    g = g.to(dev)
    center = g.means.median(dim=0).values
    extent = float((g.means - center).norm(dim=-1).quantile(0.95)) if len(g) > 1 else 1.0
    radius = radius or max(extent, 1e-3) / math.tan(math.radians(15.0)) * 1.1
    cams = orbit_cameras(frames, radius, size, size, fov_y_deg=30.0, target=center.tolist(), elevation_deg=10.0)
    times: list[float] = []
    backend = ""

    def frame_iter():
        nonlocal backend
        with torch.no_grad():
            for i in range(frames):
                t0 = time.perf_counter()
                r = rasterize(g, cams[i], background=1.0)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                backend = r.backend
                yield r.colors[0]

    video = write_video(out / f"{ply.stem}_turntable.mp4", frame_iter(), fps=fps)
    with torch.no_grad():
        still = rasterize(g, cams[0], background=1.0).colors[0]
    image = write_image(out / f"{ply.stem}.png", still)
    return TurntableResult(image, video, len(g), size, str(dev), backend, 1000.0 * sorted(times)[len(times) // 2])
