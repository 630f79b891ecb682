"""Typed configuration: one dataclass per command; the CLI options are generated from these.

Field docstrings (the string literal under each field) become the ``--help`` text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tyro
from typing_extensions import Annotated

Positional = tyro.conf.Positional
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["float32", "half", "float16", "bfloat16"]  # gstalk.deform.frozen.PRECISIONS


@dataclass
class DemoConfig:
    """The whole pipeline on a built-in talking clip (or --clip yours): prepare, track, train,
    evaluate, drive with another voice (tracked camera and orbit), export a PLY."""

    out: Path = Path("out/demo")
    """Folder for everything the demo writes."""
    clip: Path | None = None
    """Your own clip instead of the built-in synthetic one."""
    seconds: float = 8.0
    """Length of the built-in clip (at least 3 s)."""
    size: int = 0
    """Working resolution; 0 = 512 on a GPU, 128 on a CPU."""
    effort: float = 1.0
    """Scales the training iterations on a CPU (1.0 fits the 10-minute budget on 2 cores)."""
    device: Device = "auto"


@dataclass
class RenderConfig:
    """Drive an avatar with new audio (or a tracked expression sequence) to an mp4 with sound;
    or, given a .ply file, render a turntable of it."""

    target: Annotated[Path, tyro.conf.Positional]
    """An avatar folder (from 'gstalk train' / 'gstalk fit'), or a 3DGS .ply file."""
    audio: Path | None = None
    """Speech to drive the avatar with (wav, mp3, m4a, or a video's audio)."""
    expressions: Path | None = None
    """Instead of audio: a track.npz from another tracked clip (jaw and expression)."""
    out: Path = Path("out/render.mp4")
    """The mp4 to write (for a .ply: a folder)."""
    camera: str = "track"
    """track (the fitted camera), still, orbit (one turn around the head), or a JSON path file."""
    head: Literal["track", "still"] = "track"
    """Head motion for new audio: track (the training clip's, back and forth) or still."""
    size: int = 0
    """Output size in pixels (square); 0 = the avatar's resolution (256 for a .ply)."""
    fps: float = 0.0
    """Frame rate; 0 = the avatar's (24 for a .ply)."""
    deform: bool = True
    """Apply the audio-conditioned deformation (off = the baseline)."""
    lips: Literal["auto", "visemes", "learned"] = "auto"
    """Lip model for new audio: auto (the avatar's), visemes (speaker-independent, calibrated to
    the clip) or learned (the network trained on the clip's audio)."""
    frames: int = 48
    """For a .ply: frames of the turntable."""
    radius: float = 0.0
    """For a .ply: camera distance (0 = fit the scene)."""
    axes: Literal["rdf", "rub"] = "rdf"
    """For a .ply: its axes, rdf (y down, as 3DGS training and 'gstalk export' write) or rub (y up)."""
    compile: bool = False
    """torch.compile the deformation field (faster per frame after a one-off compile of tens of seconds)."""
    precision: Precision = "float32"
    """The deformation field's precision: half (float16 on a GPU, bfloat16 on a CPU) is faster and
    changes a fraction of a percent of the 8-bit pixel values (docs/benchmarks.md)."""
    device: Device = "auto"


@dataclass
class PrepareOptions:
    """How a clip becomes a dataset folder (see docs/dataset.md)."""

    fps: float = 25.0
    """Constant output frame rate; variable-rate clips are resampled to it."""
    resolution: int = 512
    """Working resolution of the square crop, in pixels."""
    crop_scale: float = 3.2
    """Crop size as a multiple of the detected face box (head and shoulders)."""
    crop_down: float = 0.25
    """Shift of the crop centre below the face centre, in face heights (towards the shoulders)."""
    holdout: float = 1 / 11
    """Fraction of frames at the end held out for evaluation."""
    min_face_fraction: float = 0.5
    """Fail if a face is found in fewer frames than this."""
    min_seconds: float = 2.0
    """Fail on clips shorter than this."""
    smooth_seconds: float = 0.6
    """Time scale of the crop-centre smoothing (larger = steadier crop)."""
    landmark_sigma: float = 0.7
    """Temporal Gaussian smoothing of landmarks, in frames (0 = off)."""
    jpeg_quality: int = 95
    preview: bool = True
    """Write preview.mp4 (landmarks and masks over the frames)."""
    detect_size: int = 384
    """Longest side of the downscaled frame used for face detection."""


@dataclass
class PrepareConfig:
    """Turn a phone clip into a dataset folder: frames, audio, landmarks, masks, signals."""

    clip: Annotated[Path, tyro.conf.Positional]
    """The video (mp4/mov/webm/mkv)."""
    out: Annotated[Path, tyro.conf.Positional]
    """The dataset folder to create (an unfinished one is resumed)."""
    opts: Annotated[PrepareOptions, tyro.conf.arg(name="")] = field(default_factory=PrepareOptions)


@dataclass
class ImportConfig:
    """Import a folder laid out for the NeRF/3DGS talking-head projects (ori_imgs/, parsing/,
    transforms_train/val.json, aud.wav, aud_*.npy, au.csv) as a gstalk dataset."""

    src: Annotated[Path, tyro.conf.Positional]
    """The source folder (e.g. ER-NeRF's data/<name>)."""
    out: Annotated[Path, tyro.conf.Positional]
    """The gstalk dataset folder to create."""
    opts: Annotated[PrepareOptions, tyro.conf.arg(name="")] = field(default_factory=PrepareOptions)


@dataclass
class TrackOptions:
    """How the head model is fitted to a dataset's landmarks."""

    flame: Path | None = None
    """A FLAME-format model (official generic_model.pkl / flame2023.pkl, or .npz). Default:
    $GSTALK_FLAME if set, otherwise gstalk's open stand-in head."""
    embedding: Path | None = None
    """A landmark embedding file (MICA-style .npz or DECA .npy); default: the model's own or a
    derived one."""
    n_shape: int = 100
    """Identity coefficients to fit (capped at what the model has)."""
    n_expr: int = 50
    """Expression coefficients to fit (capped at what the model has)."""
    keyframes: int = 16
    """Frames used to fit the identity shape."""
    iters_rigid: int = 250
    iters_shape: int = 300
    iters_all: int = 400
    iters_silhouette: int = 100
    """Stage 4, refinement against the dataset's person masks (0 = off; skipped without masks)."""
    w_silhouette: float = 0.5
    """Weight of the silhouette term (squared distance outside the person mask per head vertex, in
    1/256 of the image height)."""
    init_fov_deg: float = 28.0
    """Initial vertical field of view of the (cropped) camera; refined during tracking."""
    min_fov_deg: float = 10.0
    max_fov_deg: float = 60.0
    """The focal length stays within these vertical fields of view."""
    focal_search: bool = True
    """Choose the focal length by a grid search on keyframes (else start from init_fov_deg)."""
    w_focal_prior: float = 0.01
    """Pull of the focal length toward the initial field of view (log scale)."""
    huber_px: float = 2.0
    """Landmark errors above this many pixels count linearly (robust to outliers)."""
    w_shape: float = 1e-3
    w_expr: float = 1e-3
    w_jaw: float = 1e-2
    w_neck: float = 1.0
    w_eyes: float = 1e-2
    w_smooth: float = 1.0
    """Weight of temporal smoothness (first and second differences) on per-frame parameters."""
    device: Device = "auto"
    preview: bool = True
    """Write track_preview.mp4 (mesh and landmarks over the frames)."""


@dataclass
class TrackConfig:
    """Fit the head model (FLAME or the stand-in) to every frame of a dataset: track.npz."""

    dataset: Annotated[Path, tyro.conf.Positional]
    """A dataset folder made by 'gstalk prepare'."""
    opts: Annotated[TrackOptions, tyro.conf.arg(name="")] = field(default_factory=TrackOptions)


@dataclass
class TrainOptions:
    """How an avatar is fitted to a tracked dataset."""

    iters_static: int = 1500
    """Stage 1: canonical Gaussians on the tracked mesh, no deformation."""
    iters_audio: int = 1500
    """Stage 2: the audio-conditioned deformation field (Gaussians at a lower rate)."""
    iters_joint: int = 1000
    """Stage 3: everything together, extra weight on the mouth."""
    iters_a2m: int = 600
    """Audio-to-motion model (jaw, expression, blink from audio), trained on the track."""
    audio: Literal["auto", "on", "off"] = "auto"
    """Fit with the clip's speech (on), without it (off: a deformation field on expression,
    blink and neck only, no lip model; the avatar is driven by tracked expressions, not audio),
    or on when the clip has speech and off when its audio is silent or missing (auto)."""
    lip_motion: Literal["visemes", "learned"] = "visemes"
    """What moves the lips for new audio: visemes (phonetic lip shapes of any voice, calibrated
    to the clip's mouth; needs phone features, else learned is used) or learned (the
    audio-to-motion network). See docs/avatar.md."""
    phones: Literal["choose", "auto", "phones"] = "choose"
    """Where the phones come from, for this avatar's training clip and every audio it is later
    driven with: auto (recognised English words, force-aligned; free phone decoding where
    recognition fails), phones (free phone decoding always), or choose: whichever of the two
    predicts this clip's lips better on held-back blocks of its training frames (free phones
    only where they beat the words by more than 1.645 standard errors, a one-sided test at 5%)."""
    scale: float = 0.0
    """Render at this fraction of the dataset resolution (0 = 1.0 on a GPU, 128 px on a CPU)."""
    per_triangle: int = 0
    """Gaussians per mesh triangle at the start (0 = 8 on a GPU, 2 on a CPU)."""
    torso_points: int = 0
    """Free Gaussians for neck/shoulders/torso (0 = 4000 on a GPU, 800 on a CPU)."""
    sh_degree: int = 1
    feature_kind: str = "phoneme"
    """Audio features for the avatar: phoneme (transfers best to new voices), mel, mel+phoneme."""
    background: str = "plate"
    """'plate': composite over the dataset's background plate; 'white' / 'black'."""
    lr_means: float = 0.005
    """Learning rate of Gaussian positions, in triangle-local units (a mesh triangle's size); free
    Gaussians (torso), placed in metres, step by the same distance in the world."""
    lr_field: float = 2e-3
    w_ssim: float = 0.2
    w_alpha: float = 0.1
    w_mouth: float = 2.0
    mouth_crop: int = 96
    """Audio and joint stages, when frames train below the dataset's resolution: also render a
    close-up of the mouth at the full resolution, at most this many pixels a side (0 = off);
    see docs/avatar.md."""
    w_mouth_crop: float = 1.0
    field_expr: int = 8
    """Tracked expression coefficients the deformation field is conditioned on (0 = audio and
    blink only)."""
    audio_prior: float = 1.0
    """Fall-off of the audio's reach around the mouth, in mouth widths (0 = audio may act
    anywhere on the face)."""
    expr_prior: bool = True
    """The field's blink and expression streams act only where the head model's expressions
    move the mesh (not on hair, scalp or neck); see docs/avatar.md."""
    w_offsets: float = 1.0
    densify_every: int = 200
    densify_grad: float = 0.0004
    max_gaussians: int = 200_000
    checkpoint_every: int = 500
    cache_frames: int = 64
    """Frames kept in memory (the rest are read from disk when needed)."""
    seed: int = 0
    device: Device = "auto"
    overwrite: bool = False
    """Fit again into a folder that holds a finished avatar (it and its eval/ are removed first;
    without this such a folder is refused). An unfinished fit there resumes either way."""


@dataclass
class TrainConfig:
    """Fit an avatar to a prepared and tracked dataset (resumes from its checkpoint)."""

    dataset: Annotated[Path, tyro.conf.Positional]
    avatar: Annotated[Path, tyro.conf.Positional]
    """The avatar folder to write."""
    opts: Annotated[TrainOptions, tyro.conf.arg(name="")] = field(default_factory=TrainOptions)


@dataclass
class FitConfig:
    """prepare + track + train: from a phone clip to an avatar, with sensible defaults."""

    clip: Annotated[Path, tyro.conf.Positional]
    avatar: Annotated[Path, tyro.conf.Positional]
    """The avatar folder to write."""
    dataset: Path | None = None
    """Where the dataset folder goes (default: AVATAR.dataset beside the avatar)."""
    prepare: PrepareOptions = field(default_factory=PrepareOptions)
    track: TrackOptions = field(default_factory=TrackOptions)
    train: TrainOptions = field(default_factory=TrainOptions)


@dataclass
class FitBatchConfig:
    """Fit an avatar to each of many clips: one fit per Ray task, on a local Ray sized to this
    machine or on an existing Ray cluster. Re-running skips finished avatars and resumes the rest."""

    clips: Annotated[tuple[Path, ...], tyro.conf.Positional]
    """Clips, folders of clips, or list files (.txt: one clip per line, relative to the list)."""
    out: Path = Path("avatars")
    """Folder of the avatars: OUT/NAME/ (the folder 'gstalk fit' writes), its dataset
    OUT/NAME.dataset/ and its log OUT/NAME.log, NAME the clip's file name without extension;
    the summary goes to OUT/batch.json."""
    address: str | None = None
    """An existing Ray cluster: 'auto' or 'ray://HOST:PORT' (default: a local Ray on this machine)."""
    cpus_per_fit: int = 0
    """CPU threads per fit (0: the CPUs shared among the clips; with GPUs, one GPU and its share of the CPUs each)."""
    retries: int = 2
    """How often Ray retries a fit whose worker died; the retry resumes from the fit's checkpoints."""
    eval: bool = False
    """Evaluate each new avatar on its held-out frames (the summary's PSNR)."""
    prepare: PrepareOptions = field(default_factory=PrepareOptions)
    track: TrackOptions = field(default_factory=TrackOptions)
    train: TrainOptions = field(default_factory=TrainOptions)


@dataclass
class EvalConfig:
    """Evaluate an avatar on its dataset's held-out tail (and lip sync on other speakers' audio)."""

    avatar: Annotated[Path, tyro.conf.Positional]
    dataset: Annotated[Path, tyro.conf.Positional]
    audio: tuple[Path, ...] = ()
    """Other speakers' recordings for the sync score."""
    size: int = 0
    """Evaluation size in pixels (0 = the dataset's, at most 256 on a CPU)."""
    out: Path | None = None
    """Folder for eval.json and side_by_side.mp4 (default AVATAR/eval)."""
    device: Device = "auto"


ExportFormat = Literal["ply", "splat", "compressed-ply", "ply-sequence", "viser", "mesh-obj", "mesh-ply", "glb", "web",
                       "all"]


@dataclass
class ExportConfig:
    """Write an avatar in the formats other tools read: 3DGS PLY, .splat, PlayCanvas compressed
    PLY, a per-frame PLY sequence, a viser recording, head-mesh OBJ/PLY sequences, a GLB, and a web player (a
    static folder that plays the talking avatar in a browser, with its audio)."""

    avatar: Annotated[Path, tyro.conf.Positional]
    """The avatar folder."""
    format: tuple[ExportFormat, ...] = ("ply", "splat", "compressed-ply")
    """One or more formats; all = every one but web (the browser player, which needs 'npm ci' in viewer/)."""
    out: Path = Path("out/export")
    """Folder to write into."""
    audio: Path | None = None
    """Speech that drives the animated formats (default: the training clip's own motion)."""
    expressions: Path | None = None
    """Instead of audio: a track.npz to drive the animated formats."""
    frame: int = -1
    """Static formats: -1 = the avatar at rest (the clip's median head pose, neutral, undeformed); k = frame k of
    the sequence."""
    origin: Literal["head", "camera"] = "head"
    """Where the files put the avatar: head (the head's centre at the origin, what viewers look at first) or camera
    (the tracked camera's space: the camera at the origin, the head where the clip had it)."""
    max_frames: int = 0
    """Cap on the frames of animated formats (0 = all)."""
    fps: float = 0.0
    """Frame rate of animated formats for audio (0 = the avatar's)."""
    head: Literal["track", "still"] = "track"
    """Head motion for audio: track or still."""
    axes: Literal["rdf", "rub"] = "rdf"
    """Axes of splat files: rdf (x right, y down, z forward, what splat viewers expect) or rub (gstalk's, y up)."""
    deform: bool = True
    """Apply the audio-conditioned deformation."""
    device: Device = "auto"


@dataclass
class ViewConfig:
    """Open a fitted avatar in a local browser viewer: play, scrub, drive with uploaded audio,
    manual jaw/expression/blink, camera presets, export a frame, render a video."""

    avatar: Annotated[Path, tyro.conf.Positional]
    """The avatar folder."""
    audio: Path | None = None
    """Speech to drive it with at start (default: the training clip's own motion)."""
    host: str = "127.0.0.1"
    """Address to listen on. The default is this machine only; give 0.0.0.0 to share it on your network on purpose."""
    port: int = 8080
    out: Path = Path("out/view")
    """Folder for exported frames and rendered videos."""
    render: Literal["browser", "server"] = "browser"
    """browser: splats drawn by the browser (smooth orbiting); server: rasterized here with full SH colour."""
    size: int = 256
    """Image height for server rendering and rendered videos."""
    compile: bool = False
    """torch.compile the deformation field (faster per frame after a one-off compile of tens of seconds)."""
    precision: Precision = "float32"
    """The deformation field's precision: half (float16 on a GPU, bfloat16 on a CPU) is faster and
    changes a fraction of a percent of the 8-bit pixel values (docs/benchmarks.md)."""
    device: Device = "auto"


def resolve_device(device: Device):
    import torch

    from gstalk.errors import InputError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but no CUDA GPU is available (use --device cpu)")
    return torch.device(device)


def cpu_threads(requested: int | None = None) -> int:
    """The CPU threads gstalk computes with: ``requested`` (``gstalk --threads N``), else
    $GSTALK_THREADS, else $OMP_NUM_THREADS, else this process's share of the cores it may run
    on: all of them, divided among the gstalk processes running (on Linux). Two processes
    that both take every core spin-wait on each other's threads: two trackings at once took
    6.6 times as long as one alone on a 2-core CPU, with a core each 1.5 times
    (docs/benchmarks.md)."""
    import os

    from gstalk.errors import InputError, check_value

    if requested is None:
        for var in ("GSTALK_THREADS", "OMP_NUM_THREADS"):
            raw = os.environ.get(var, "").strip()
            if raw:
                try:
                    requested = int(raw)
                except ValueError:
                    raise InputError(f"${var} must be a whole number of threads, got {raw!r}") from None
                break
    if requested is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        return max(1, cores // (1 + _other_gstalk_processes()))
    return int(check_value(requested, (lambda v: v == int(v) and 1 <= v <= 1024, "a whole number from 1 to 1024"),
                           "--threads"))


def apply_threads(n: int) -> None:
    """Use ``n`` CPU threads in torch (intra- and inter-op) and OpenCV (each left as it is
    where it already uses ``n``)."""
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if torch.get_num_interop_threads() != n:
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # parallel work has started: intra-op is what counts
            pass
    try:
        import cv2

        if cv2.getNumThreads() != n:
            cv2.setNumThreads(n)
    except ImportError:
        pass


def is_gstalk_command(argv: list[bytes]) -> bool:
    """Whether a process's command line (``/proc/PID/cmdline`` split at NUL) is a Python
    interpreter running gstalk: ``python .../gstalk VERB`` (what the ``gstalk`` script's
    shebang runs) or ``python -m gstalk[.cli]``. A wrapper that only names gstalk among its
    arguments (``time -v gstalk ...``, ``nohup gstalk ...``, a shell) is not one: it runs no
    torch threads of its own."""
    if not argv or not Path(argv[0].decode(errors="replace")).name.startswith("python"):
        return False
    args = [a for a in argv[1:4] if a]
    if args[:1] and (args[0].endswith(b"/gstalk") or args[0] == b"gstalk"):
        return True
    return args[:2] in ([b"-m", b"gstalk"], [b"-m", b"gstalk.cli"])


def _other_gstalk_processes(proc: Path = Path("/proc")) -> int:
    """How many other processes are running the gstalk command (Linux's /proc; 0 elsewhere)."""
    import os

    me, n = os.getpid(), 0
    try:
        procs = list(proc.iterdir())
    except OSError:
        return 0
    for p in procs:
        if not p.name.isdigit() or int(p.name) == me:
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if is_gstalk_command(argv):
            n += 1
    return n
