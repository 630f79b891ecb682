"""The ``gstalk`` command. Thin: options come from the config dataclasses, every verb calls
a library function, and a :class:`GstalkError` is printed without a traceback."""

from __future__ import annotations

import sys
from typing import Sequence

import tyro
from typing_extensions import Annotated

from gstalk.config import DemoConfig, ImportConfig, PendingConfig, PrepareConfig, RenderImageConfig, TrackConfig
from gstalk.errors import GstalkError, NotImplementedYet

# Verbs whose capability has not landed yet, and what will bring them.
PENDING = {
    "train": "fitting an avatar (issue 'End to end')",
    "fit": "prepare + track + train (issue 'End to end')",
    "view": "the browser viewer (issue 'Interactive viewer')",
    "export": "exporters (issue 'Export')",
    "eval": "evaluation (issue 'End to end')",
}


def _subcommands():
    verbs = {
        "demo": Annotated[DemoConfig, tyro.conf.subcommand("demo", description=DemoConfig.__doc__)],
        "render": Annotated[RenderImageConfig, tyro.conf.subcommand(
            "render", description="Render a Gaussian PLY as a turntable video and image "
            "(driving a fitted avatar with audio lands with issue 'End to end').")],
        "prepare": Annotated[PrepareConfig, tyro.conf.subcommand("prepare", description=PrepareConfig.__doc__)],
        "import-dataset": Annotated[ImportConfig, tyro.conf.subcommand("import-dataset",
                                                                       description=ImportConfig.__doc__)],
        "track": Annotated[TrackConfig, tyro.conf.subcommand("track", description=TrackConfig.__doc__)],
    }
    for verb, what in PENDING.items():
        verbs[verb] = Annotated[PendingConfig, tyro.conf.subcommand(verb, description=f"Not available yet: {what}.")]
    return verbs


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--version", "-V"):
        from gstalk import __version__

        print(f"gstalk {__version__}")
        return 0
    verb = next((a for a in argv if not a.startswith("-")), None)
    console = _console()
    try:
        if verb in PENDING:
            if any(a in ("-h", "--help") for a in argv):
                print(f"gstalk {verb}: not available yet ({PENDING[verb]}).")
                return 0
            raise NotImplementedYet(f"'gstalk {verb}' is not available yet: it arrives with {PENDING[verb]}.")
        verbs = _subcommands()
        import typing

        union = typing.Union[tuple(verbs.values())]  # type: ignore[misc]
        cfg = tyro.cli(union, args=argv, prog="gstalk", description="Talking-head Gaussian avatars from a phone clip.")
        if isinstance(cfg, DemoConfig):
            return _demo(cfg, console)
        if isinstance(cfg, RenderImageConfig):
            return _render(cfg, console)
        if isinstance(cfg, (PrepareConfig, ImportConfig)):
            return _prepare(cfg, console)
        if isinstance(cfg, TrackConfig):
            from gstalk.head.tracker import track_dataset

            with StageProgress(console) as prog:
                out = track_dataset(cfg.dataset, cfg.opts, progress=prog, log=console.print)
            console.print(f"track: {out}")
            return 0
        raise NotImplementedYet("this command is not available yet")
    except GstalkError as e:
        console.print(f"[bold red]gstalk error:[/] {e}")
        return e.exit_code
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


def _demo(cfg: DemoConfig, console) -> int:
    from gstalk.demo import run_demo

    console.print(f"gstalk demo: rendering the built-in Gaussian scene into {cfg.out}/ ...")
    r = run_demo(cfg)
    _report(r, console)
    return 0


def _render(cfg: RenderImageConfig, console) -> int:
    from gstalk.demo import render_ply_turntable

    r = render_ply_turntable(cfg)
    _report(r, console)
    return 0


class StageProgress:
    """A rich progress bar per pipeline stage (frames done, rate, time left)."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(),
                           console=console, transient=False)
        self._tasks: dict[str, int] = {}

    def __enter__(self):
        self._p.__enter__()
        return self

    def __exit__(self, *exc):
        return self._p.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self._tasks:
            self._tasks[stage] = self._p.add_task(stage, total=total)
        self._p.update(self._tasks[stage], completed=done, total=max(total, done))


def _prepare(cfg: PrepareConfig | ImportConfig, console) -> int:
    with StageProgress(console) as prog:
        if isinstance(cfg, PrepareConfig):
            from gstalk.prepare import prepare

            ds = prepare(cfg.clip, cfg.out, cfg.opts, progress=prog, log=console.print)
        else:
            from gstalk.importers import import_nerf_dataset

            ds = import_nerf_dataset(cfg.src, cfg.out, cfg.opts, progress=prog, log=console.print)
    m = ds.manifest
    console.print(f"dataset: {ds.root}  ({m['num_frames']} frames at {m['fps']:g} fps, {m['resolution']} px, "
                  f"face in {100 * m['face_fraction']:.0f}% / landmarks in {100 * m['landmark_fraction']:.0f}% "
                  f"of frames, audio {'yes' if m['audio']['present'] else 'no'})")
    for w in m["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")
    return 0


def _report(r, console) -> None:
    console.print(f"  gaussians : {r.gaussians}")
    console.print(f"  image     : {r.image}")
    console.print(f"  turntable : {r.video}")
    console.print(f"  ply       : {r.ply}")
    console.print(f"  render    : {r.ms_per_frame:.1f} ms/frame (median) at {r.size}x{r.size}, "
                  f"backend {r.backend} on {r.device}")


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
