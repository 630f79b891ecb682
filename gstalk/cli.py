"""The ``gstalk`` command. Thin: options come from the config dataclasses, every verb calls
a library function, and a :class:`GstalkError` is printed without a traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import typing
from typing import Sequence

import tyro

os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # OpenCV's own warnings print around gstalk's messages
from typing_extensions import Annotated

from gstalk.config import (DemoConfig, EvalConfig, ExportConfig, FitBatchConfig, FitConfig, ImportConfig,
                           PrepareConfig, RenderConfig, TrackConfig, TrainConfig, ViewConfig)
from gstalk.errors import GstalkError

VERBS = {
    "demo": DemoConfig, "prepare": PrepareConfig, "import-dataset": ImportConfig, "track": TrackConfig,
    "train": TrainConfig, "fit": FitConfig, "fit-batch": FitBatchConfig, "render": RenderConfig, "eval": EvalConfig,
    "export": ExportConfig, "view": ViewConfig,
}


def _subcommands():
    verbs = {name: Annotated[cls, tyro.conf.subcommand(name, description=cls.__doc__)] for name, cls in VERBS.items()}
    return verbs


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


class StageProgress:
    """A rich progress bar per stage, with the latest numbers (loss, PSNR, Gaussians, ETA)."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console)
        self._tasks: dict[str, int] = {}

    def __enter__(self):
        self._p.__enter__()
        return self

    def __exit__(self, *exc):
        return self._p.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int, info: dict | None = None) -> None:
        if stage not in self._tasks:
            self._tasks[stage] = self._p.add_task(stage, total=total, info="")
        text = ""
        if info:
            parts = []
            if "loss" in info:
                parts.append(f"loss {info['loss']:.4f}")
            if "psnr" in info:
                parts.append(f"PSNR {info['psnr']:.2f}")
            if "gaussians" in info:
                parts.append(f"{info['gaussians']} Gaussians")
            if "eta" in info:
                parts.append(f"all stages ~{info['eta'] / 60:.1f} min left")
            text = "  ".join(parts)
        self._p.update(self._tasks[stage], completed=done, total=max(total, done), info=text)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that every temporary is removed and every
    half-written output left as it was, as on Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def terminate_like_interrupt():
    """SIGTERM raises :class:`Terminated` inside the block (the main thread only; elsewhere
    signals cannot be handled, and nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: Sequence[str] | None = None) -> int:
    with terminate_like_interrupt():
        return _main(argv)


def _main(argv: Sequence[str] | None = None) -> int:
    import warnings

    from gstalk.errors import GstalkWarning

    with warnings.catch_warnings():
        # gstalk's own warnings are one line each; libraries' (torch's, OpenCV's hints) are not
        # the user's business around gstalk's messages
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", GstalkWarning)
        console = _console()

        def show(message, category, *rest, **kw):  # only gstalk's own get past the filters
            console.print(f"[yellow]warning:[/] {message}")

        warnings.showwarning = show
        return _run(argv, console)


def _run(argv: Sequence[str] | None, console) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--version", "-V"):
        from gstalk import __version__

        print(f"gstalk {__version__}")
        return 0
    try:
        threads = None
        if argv and (argv[0] == "--threads" or argv[0].startswith("--threads=")):
            # gstalk --threads N VERB ...: how many CPU threads every verb computes with
            flag = argv.pop(0)
            value = flag.split("=", 1)[1] if "=" in flag else (argv.pop(0) if argv else "")
            try:
                threads = int(value)
            except ValueError:
                raise GstalkError(f"--threads must be a whole number of threads, got {value!r}") from None
        from gstalk.config import apply_threads, cpu_threads

        apply_threads(cpu_threads(threads))
        union = typing.Union[tuple(_subcommands().values())]  # type: ignore[misc]
        cfg = tyro.cli(union, args=argv, prog="gstalk",
                       description="Talking-head Gaussian avatars from a phone clip. Before the verb, '--threads N' "
                       "sets the CPU threads (default $GSTALK_THREADS, $OMP_NUM_THREADS or every core; give each "
                       "of several gstalk processes on one machine its share).")
        handler = HANDLERS.get(type(cfg))
        if handler is None:
            raise GstalkError(f"no handler for {type(cfg).__name__}")
        return handler(cfg, console)
    except GstalkError as e:
        _remove_empty_outputs()
        console.print(f"[bold red]gstalk error:[/] {e}")
        return e.exit_code
    except Terminated:
        _remove_empty_outputs()
        console.print("terminated")
        return 143
    except KeyboardInterrupt:
        _remove_empty_outputs()
        console.print("interrupted")
        return 130


def _remove_empty_outputs() -> None:
    """A failed or stopped command leaves no empty output folder behind."""
    from gstalk.io.atomic import remove_empty_created

    remove_empty_created()


def _demo(cfg: DemoConfig, console) -> int:
    from gstalk.demo import run_demo

    with StageProgress(console) as prog:
        run_demo(cfg, progress=prog, log=console.print)
    return 0


def _prepare(cfg: PrepareConfig | ImportConfig, console) -> int:
    with StageProgress(console) as prog:
        if isinstance(cfg, PrepareConfig):
            from gstalk.prepare import prepare

            ds = prepare(cfg.clip, cfg.out, cfg.opts, progress=prog, log=console.print)
        else:
            from gstalk.prepare import import_nerf_dataset

            ds = import_nerf_dataset(cfg.src, cfg.out, cfg.opts, progress=prog, log=console.print)
    m = ds.manifest
    console.print(f"dataset: {ds.root}  ({m['num_frames']} frames at {m['fps']:g} fps, {m['resolution']} px, "
                  f"face in {100 * m['face_fraction']:.0f}% / landmarks in {100 * m['landmark_fraction']:.0f}% "
                  f"of frames, audio {'yes' if m['audio']['present'] else 'no'})")
    for w in m["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")
    return 0


def _track(cfg: TrackConfig, console) -> int:
    from gstalk.head.tracker import track_dataset

    with StageProgress(console) as prog:
        out = track_dataset(cfg.dataset, cfg.opts, progress=prog, log=console.print)
    console.print(f"track: {out}")
    return 0


def _train(cfg: TrainConfig, console) -> int:
    from gstalk.train.trainer import train

    with StageProgress(console) as prog:
        out = train(cfg.dataset, cfg.avatar, cfg.opts, progress=prog, log=console.print)
    console.print(f"avatar: {out}")
    return 0


def _fit(cfg: FitConfig, console) -> int:
    from gstalk.fit import default_dataset, fit

    ds_dir = cfg.dataset or default_dataset(cfg.avatar)
    with StageProgress(console) as prog:
        out = fit(cfg.clip, cfg.avatar, ds_dir, cfg.prepare, cfg.track, cfg.train, progress=prog, log=console.print)
    console.print(f"dataset: {ds_dir}\navatar: {out}")
    return 0


def _fit_batch(cfg: FitBatchConfig, console) -> int:
    from rich.table import Table

    from gstalk.batch import SUMMARY, fit_batch

    jobs = fit_batch(cfg, console=console, log=console.print)
    table = Table(title=f"gstalk fit-batch: {len(jobs)} clips")
    for c in ("clip", "state", "time", "held-out PSNR", "attempts", "message"):
        table.add_column(c, justify="right" if c in ("time", "held-out PSNR", "attempts") else "left")
    for j in jobs:
        table.add_row(j.name, j.state, f"{j.seconds / 60:.1f} min" if j.seconds is not None else "-",
                      f"{j.psnr:.2f} dB" if j.psnr is not None else "-", str(j.attempts or "-"), j.error or "")
    console.print(table)
    console.print(f"summary: {cfg.out / SUMMARY}; each fit's log: {cfg.out}/NAME.log")
    return 1 if any(j.state == "failed" for j in jobs) else 0


#: Options of 'gstalk render' that only a .ply turntable uses, and that only an avatar uses.
PLY_ONLY = ("frames", "radius", "axes")
AVATAR_ONLY = ("audio", "expressions", "camera", "head", "deform", "lips", "compile", "precision")


def _render(cfg: RenderConfig, console) -> int:
    from gstalk.errors import InputError
    from gstalk.io.media import check_video_path

    default = RenderConfig(target=cfg.target)
    ply = cfg.target.suffix.lower() == ".ply"
    unused = [k for k in (AVATAR_ONLY if ply else PLY_ONLY) if getattr(cfg, k) != getattr(default, k)]
    if unused:  # set, but the target takes no notice of them
        flags = ", ".join("--" + k for k in unused)
        raise InputError(f"{flags} {'is' if len(unused) == 1 else 'are'} for "
                         f"{'an avatar folder' if ply else 'a .ply turntable'}; {cfg.target} is "
                         f"{'a .ply file' if ply else 'an avatar'}")
    if ply:
        from gstalk.demo import render_ply_turntable

        r = render_ply_turntable(cfg.target, cfg.out, size=cfg.size or 256, frames=cfg.frames, fps=cfg.fps or 24.0,
                                 radius=cfg.radius, axes=cfg.axes, device=cfg.device)
        console.print(f"  image     : {r.image}\n  turntable : {r.video}\n  render    : {r.ms_per_frame:.1f} ms/frame "
                      f"(median) at {r.size}x{r.size}, backend {r.backend} on {r.device}")
        return 0
    from gstalk.drive.render import drive

    check_video_path(cfg.out, "--out")  # before the avatar is loaded
    with StageProgress(console) as prog:
        r = drive(cfg.target, cfg.out, cfg.audio, cfg.expressions, cfg.camera, cfg.head, cfg.size, cfg.fps,
                  cfg.device, cfg.deform, progress=prog, compile_field=cfg.compile,
                  lips=None if cfg.lips == "auto" else cfg.lips, precision=cfg.precision,
                  log=lambda m: console.print(f"[yellow]warning:[/] {m}"))
    console.print(f"video: {r.video} ({r.frames} frames, {r.seconds:.2f} s at {r.fps:g} fps; rendered at "
                  f"{r.render_fps:.1f} frames/s)")
    return 0


def _eval(cfg: EvalConfig, console) -> int:
    from rich.table import Table

    from gstalk.eval.evaluate import CORR_LEVEL, corr_text, evaluate

    with StageProgress(console) as prog:
        res = evaluate(cfg.avatar, cfg.dataset, list(cfg.audio), cfg.size, cfg.out, cfg.device, progress=prog)
    cols = {"deformation": "with deformation", "no_deformation": "switched off", "other_audio": "other frames' audio",
            "audio_driven": f"audio alone ({res['lip_model']} lips)",
            **{f"audio_driven_{m}": f"audio alone ({m} lips)" for m in ("visemes", "learned")},
            "mean_mouth": "mean mouth (control)"}
    cols = {k: v for k, v in cols.items() if k in res}
    table = Table(title=f"held-out frames ({res['frames']}) at {res['size']} px")
    table.add_column("metric")
    for c in cols.values():
        table.add_column(c, justify="right")
    for k, v in res["deformation"].items():
        if not isinstance(v, (int, float)):  # an interval: shown with its value in the lips' table
            continue
        table.add_row(k, *(f"{res[c][k]:.4g}" if k in res[c] else "-" for c in cols))
    console.print(table)
    for key, label in (("gain_over_no_deformation", "deformation minus switched off"),
                       ("gain_over_other_audio", "deformation minus other frames' audio")):
        if key in res:
            g = res[key]
            console.print(f"{label} (mean +- standard error over frames): "
                          + ", ".join(f"{k} {g[k]['mean']:+.3g} +- {g[k]['sem']:.2g}" for k in g))
    if "lip_yardstick" in res:
        y = res["lip_yardstick"]
        lt = Table(title="lips from the clip's own held-out audio alone, against a still (mean) mouth")
        for c in ("lips", "LMD px", "minus mean mouth", "mouth PSNR", "minus mean mouth",
                  f"opening corr. [{100 * CORR_LEVEL:.0f} %]", "motion"):
            lt.add_column(c, justify="right" if c != "lips" else "left")
        for row, r in y["rows"].items():
            d = r.get("minus_mean_mouth", {})
            pair = [f"{d[k]['mean']:+.2f} +- {d[k]['sem']:.2f}" if k in d else "-" for k in ("lmd_px512", "mouth_psnr")]
            name = {"tracked": "tracked motion", "mean_mouth": "mean mouth"}.get(row, row)
            lt.add_row(name + (" (default)" if row == y["default"] else ""), f"{r['lmd_px512']:.2f}", pair[0],
                       f"{r['mouth_psnr']:.2f}", pair[1],
                       corr_text(r["mouth_opening_corr"], r["mouth_opening_corr_ci"]),
                       f"{r['mouth_motion_ratio']:.2f}")
        console.print(lt)
        console.print(f"the default lips ({y['default']}) "
                      + ("beat" if y["default_beats_mean_mouth"] else "do not beat")
                      + " the still mouth by more than a standard error")
    for note in res.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")
    if res["lip_model"] == "none":
        console.print("this avatar was fitted without audio: no audio-driven rows")
    else:
        console.print(f"sync of the real person's mouth with their own clip's audio (for reference): "
                      f"{res['sync_ground_truth']:.3g}")
    console.print(f"written: {res['files']['json']}, {res['files']['video']}")
    return 0


def _export(cfg: ExportConfig, console) -> int:
    from gstalk.export.exporter import export

    with StageProgress(console) as prog:
        r = export(cfg.avatar, cfg.out, tuple(cfg.format), cfg.audio, cfg.expressions, cfg.frame, cfg.max_frames,
                   cfg.fps, cfg.head, cfg.axes, cfg.deform, cfg.device, progress=prog, origin=cfg.origin)
    sizes = r.sizes()
    console.print(f"exported {r.gaussians} Gaussians" + (f", {r.frames} frames at {r.fps:g} fps" if r.frames else "")
                  + f" to {r.out} in {r.seconds:.1f} s; "
                  + ("the head's centre at the origin" if r.origin == "head" else "in the tracked camera's space"))
    for fmt, files in r.files.items():
        shown = str(files[0]) if len(files) == 1 else f"{files[0].parent}/ ({len(files)} files)"
        console.print(f"  {fmt:<15} {shown}  {sizes[fmt] / 1e6:.2f} MB")
    for note in r.notes:
        console.print(f"  {note}")
    return 0


def _view(cfg: ViewConfig, console) -> int:
    from gstalk.viewer.app import AvatarViewer

    v = AvatarViewer(cfg.avatar, cfg.host, cfg.port, cfg.audio, cfg.device, cfg.out, cfg.render, cfg.size,
                     compile_field=cfg.compile, precision=cfg.precision)
    console.print(f"gstalk viewer: {v.url}  ({v.num_frames} frames, {v.av.num_gaussians} Gaussians, "
                  f"{cfg.render} rendering on {v.dev.type}; Ctrl-C to stop)")
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] listening on {cfg.host}: anyone on that network can see this face")
    v.serve_forever()
    return 0


HANDLERS = {DemoConfig: _demo, PrepareConfig: _prepare, ImportConfig: _prepare, TrackConfig: _track,
            TrainConfig: _train, FitConfig: _fit, FitBatchConfig: _fit_batch, RenderConfig: _render, EvalConfig: _eval,
            ExportConfig: _export, ViewConfig: _view}


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
