"""``gstalk fit-batch``: one avatar per clip for many clips, each fit a Ray task.

gstalk schedules nothing itself: Ray does (``pip install gstalk[batch]``). Without an address
a local Ray is started, sized to this machine's cores and GPUs, and stopped at the end; with
``--address auto`` or ``ray://HOST:PORT`` the fits go to an existing cluster, whose workers
need gstalk installed and the output folder on storage they share with this machine.

- Each task runs :func:`gstalk.fit.fit` for one clip into ``OUT/NAME/`` (the folder ``gstalk
  fit`` writes), its dataset ``OUT/NAME.dataset/`` and its log ``OUT/NAME.log``. It asks for
  one GPU where the cluster has GPUs, for CPUs otherwise, and computes with as many threads
  as it was given CPUs.
- A clip that fails fails its own task with its GstalkError message; the others go on.
- A worker that dies (killed, out of memory, its machine lost) is retried by Ray up to
  ``--retries`` times; every stage of a fit resumes from what the dead one left (the
  dataset's finished stages, the track, the trainer's checkpoint). A GstalkError is not
  retried: it would fail again.
- Re-running the command skips finished avatars and resumes unfinished ones.
- The end is a table (clip, state, time, held-out PSNR with ``--eval``, attempts) and the
  same as JSON in ``OUT/batch.json``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from gstalk.errors import AT_LEAST_0, GstalkError, InputError, check_value

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")
LIST_SUFFIXES = (".txt", ".list", ".lst")
SUMMARY = "batch.json"


def collect_clips(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Clips from paths that are clips, folders of clips (their video files, not recursing)
    or list files (one clip per line, relative to the list's folder; '#' starts a comment).
    The same clip given twice is fitted once; two clips with one file name are refused (they
    would share an avatar folder)."""
    clips: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in VIDEO_SUFFIXES)
            if not found:
                raise InputError(f"{p}: a folder without clips (files ending {', '.join(VIDEO_SUFFIXES)})")
            clips += found
        elif p.suffix.lower() in LIST_SUFFIXES:
            try:
                text = p.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(f"{p}: cannot read this list of clips ({getattr(e, 'strerror', None) or e})") from None
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    q = Path(line).expanduser()
                    clips.append(q if q.is_absolute() else p.parent / q)  # a missing one fails its own task
        elif p.exists():
            clips.append(p)
        else:
            raise InputError(f"{p}: no such clip, folder of clips or list of clips")
    out, seen, names = [], set(), {}
    for c in clips:
        key = os.path.abspath(c)
        if key in seen:
            continue
        seen.add(key)
        if c.stem in names:
            raise InputError(f"{names[c.stem]} and {c} would both be fitted into the avatar folder {c.stem}/; "
                             "rename one")
        names[c.stem] = c
        out.append(c)
    if not out:
        raise InputError("no clips to fit: give clips, folders of clips or lists of clips" +
                         (" (the lists given are empty)" if inputs else ""))
    return out


@dataclass
class Job:
    """One clip's row: where it goes and how it went."""

    name: str
    clip: str
    avatar: str
    dataset: str
    log: str
    state: str = "pending"  # pending, done (fitted now), skipped (finished before), failed
    seconds: float | None = None
    psnr: float | None = None
    attempts: int = 0
    error: str = ""


def plan(clips: Sequence[Path], out: Path, overwrite: bool) -> list[Job]:
    """A job per clip; those whose avatar is finished are 'skipped' (unless ``overwrite``),
    with the held-out PSNR of an earlier evaluation where there is one."""
    from gstalk.avatar.io import is_finished_avatar
    from gstalk.fit import default_dataset

    jobs = []
    for c in clips:
        av = out / c.stem
        # absolute: the workers may start elsewhere (on a cluster, the same shared storage)
        j = Job(c.stem, os.path.abspath(c), os.path.abspath(av), os.path.abspath(default_dataset(av)),
                os.path.abspath(out / f"{c.stem}.log"))
        if not overwrite and is_finished_avatar(av) and not (av / "checkpoint.pt").is_file():
            j.state, j.psnr = "skipped", _eval_psnr(av)
        jobs.append(j)
    return jobs


def _eval_psnr(avatar: Path) -> float | None:
    import json

    try:
        return float(json.loads((avatar / "eval" / "eval.json").read_text())["deformation"]["psnr"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------ inside a Ray worker
class Board:
    """A Ray actor the tasks report to: attempts, the worker's pid, stage and progress."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def start(self, name: str, pid: int, host: str) -> None:
        r = self.rows.setdefault(name, {"attempts": 0, "since": time.time()})
        r.update(attempts=r["attempts"] + 1, pid=pid, host=host, stage="starting", done=0, total=1)

    def progress(self, name: str, stage: str, done: int, total: int) -> None:
        self.rows.setdefault(name, {"attempts": 0, "since": time.time()}).update(stage=stage, done=done, total=total)

    def get(self) -> dict[str, dict]:
        return self.rows


class _Reporter:
    """A fit's progress callback that tells the board, at most twice a second per stage."""

    def __init__(self, board, name: str):
        self.board, self.name, self.stage, self.last = board, name, None, 0.0

    def __call__(self, stage: str, done: int, total: int, info: dict | None = None) -> None:
        now = time.monotonic()
        if stage != self.stage or done >= total or now - self.last > 0.5:
            self.board.progress.remote(self.name, stage, int(done), int(total))
            self.stage, self.last = stage, now


def _attempt(log: str, run: str) -> int:
    """This attempt's number in batch run ``run``: one more than the run's headers in the log."""
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            return 1 + sum(line.startswith("--- ") and f" batch {run} " in line for line in f)
    except FileNotFoundError:
        return 1


def fit_task(job: dict, options: tuple, evaluate: bool, threads: int, board, run: str = "") -> dict:
    """One clip's fit (a Ray task): the fit, its log in the job's log file, and the job's
    new state; a GstalkError is the clip's failure, returned, not raised (Ray would retry it)."""
    from gstalk.config import apply_threads
    from gstalk.fit import fit

    apply_threads(threads)
    attempt = _attempt(job["log"], run)
    # told, not asked: a task blocked in ray.get lends its CPUs to the next task (Ray's rule),
    # which ran three 1-CPU fits at once on 2 CPUs
    board.start.remote(job["name"], os.getpid(), socket.gethostname())
    with open(job["log"], "a", encoding="utf-8") as f:
        def log(msg) -> None:
            print(msg, file=f, flush=True)

        log(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} batch {run} attempt {attempt}: worker pid {os.getpid()} "
            f"on {socket.gethostname()}, {threads} threads")
        prog = _Reporter(board, job["name"])
        prepare, track, train = options
        with warnings.catch_warnings():
            from gstalk.errors import GstalkWarning

            warnings.simplefilter("ignore")
            warnings.simplefilter("always", GstalkWarning)
            warnings.showwarning = lambda message, *a, **k: log(f"warning: {message}")
            try:
                fit(job["clip"], job["avatar"], job["dataset"], prepare, track, train, progress=prog, log=log)
                psnr = None
                if evaluate:
                    from gstalk.eval.evaluate import evaluate as evaluate_avatar

                    res = evaluate_avatar(job["avatar"], job["dataset"], progress=prog)
                    psnr = float(res["deformation"]["psnr"])
                log("done")
                return {"state": "done", "psnr": psnr, "attempts": attempt, "finished": time.time()}
            except GstalkError as e:
                log(f"gstalk error: {e}")
                return {"state": "failed", "error": str(e), "attempts": attempt, "finished": time.time()}


# ------------------------------------------------------------------ the driver
def _ray():
    try:
        import ray
    except ImportError:
        raise GstalkError("gstalk fit-batch runs its fits on Ray, which is not installed: pip install "
                          "'gstalk[batch]' (or pip install ray)") from None
    return ray


def _connect(ray, address: str | None) -> bool:
    """Start a local Ray (True: stop it at the end) or join the cluster at ``address``."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
    kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        if address:
            ray.init(address=address, **kw)
            return False
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        ray.init(address="local", num_cpus=cores, num_gpus=torch.cuda.device_count() if torch.cuda.is_available()
                 else 0, **kw)
        return True
    except Exception as e:  # noqa: BLE001 - Ray's own errors (ConnectionError, RuntimeError, ...)
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise GstalkError(f"cannot start or reach {where}: {why}") from None


def _resources(ray, cpus_per_fit: int, n: int) -> tuple[dict, int]:
    """Each task's resources and CPU threads: one GPU (and its share of the CPUs) where the
    cluster has GPUs, else ``cpus_per_fit`` or the CPUs shared among ``n`` fits."""
    total = ray.cluster_resources()
    gpus, cpus = float(total.get("GPU", 0)), float(total.get("CPU", 1))
    biggest = max([float(nd["Resources"].get("CPU", 0)) for nd in ray.nodes() if nd.get("Alive")] or [cpus])
    if gpus >= 1:
        threads = cpus_per_fit or max(1, int(cpus // gpus))
        res = {"num_gpus": 1, "num_cpus": threads}
    else:
        threads = cpus_per_fit or max(1, int(cpus // max(1, min(n, cpus))))
        res = {"num_cpus": threads}
    if threads > biggest:
        raise InputError(f"--cpus-per-fit {threads} is more than any machine of the cluster has ({biggest:g} CPUs)")
    return res, threads


def fit_batch(cfg, console=None, log=print) -> list[Job]:
    """Run the batch ``cfg`` (:class:`gstalk.config.FitBatchConfig`); returns the jobs, also
    written to OUT/batch.json."""
    from gstalk.fit import check_fit_options
    from gstalk.io.atomic import ensure_dir

    check_value(cfg.cpus_per_fit, AT_LEAST_0, "--cpus-per-fit")
    check_value(cfg.retries, AT_LEAST_0, "--retries")
    check_fit_options(cfg.prepare, cfg.track, cfg.train)  # the flags of 'gstalk fit', before any task
    clips = collect_clips(cfg.clips)
    out = ensure_dir(cfg.out)
    jobs = plan(clips, out, cfg.train.overwrite)
    todo = [j for j in jobs if j.state == "pending"]
    log(f"{len(jobs)} clips: {len(jobs) - len(todo)} finished before, {len(todo)} to fit")
    try:
        if todo:
            _run(todo, cfg, console, log)
    finally:
        write_summary(out, jobs)
    return jobs


def _run(todo: list[Job], cfg, console, log) -> None:
    ray = _ray()
    local = _connect(ray, cfg.address)
    refs: dict = {}
    try:
        res, threads = _resources(ray, cfg.cpus_per_fit, len(todo))
        log(f"Ray: {'a local Ray' if local else cfg.address}, {ray.cluster_resources().get('CPU', 0):g} CPUs, "
            f"{ray.cluster_resources().get('GPU', 0):g} GPUs; each fit {res.get('num_gpus', 0)} GPU and "
            f"{threads} CPU threads; up to {cfg.retries} retries of a fit whose worker dies")
        board = ray.remote(num_cpus=0)(Board).remote()
        task = ray.remote(fit_task).options(**res, max_retries=cfg.retries, retry_exceptions=False,
                                            name="gstalk-fit")
        options = (cfg.prepare, cfg.track, cfg.train)
        run = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        refs = {task.remote(asdict(j), options, cfg.eval, threads, board, run): j for j in todo}
        _wait(ray, refs, board, console, log)
    except KeyboardInterrupt:
        for r in refs:
            ray.cancel(r, force=True)
        raise
    finally:
        if local:
            ray.shutdown()


def _wait(ray, refs: dict, board, console, log) -> None:
    """Collect the tasks' results as they end, showing each clip's stage and the count."""
    pending = list(refs)
    bars = _Bars(console, [j.name for j in refs.values()]) if console is not None else None
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            finished = {}
            for r in ready:
                job = refs[r]
                try:
                    out = ray.get(r)
                    finished[job.name] = out.pop("finished")
                    job.__dict__.update(out)
                except ray.exceptions.RayError as e:  # the worker died more often than retried, or a bug
                    job.state = "failed"
                    job.error = _ray_error(e)
                    finished[job.name] = time.time()
                log(f"{job.name}: {job.state}" + (f" ({job.error})" if job.error else ""))
            rows = ray.get(board.get.remote())
            for job in refs.values():
                row = rows.get(job.name, {})
                job.attempts = max(job.attempts, int(row.get("attempts", 0)))
                if job.name in finished and "since" in row:  # from its first attempt's start
                    job.seconds = finished[job.name] - row["since"]
                if bars:
                    bars.update(job, row, sum(j.state != "pending" for j in refs.values()))
    finally:
        if bars:
            bars.stop()


def _ray_error(e: Exception) -> str:
    name = type(e).__name__
    if "WorkerCrashed" in name or "NodeDied" in name or "ActorDied" in name or "OutOfMemory" in name:
        return "its worker died on every attempt (killed, out of memory or its machine lost); see its log"
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{name}: {lines[-1] if lines else ''}"


class _Bars:
    """rich progress: one line per clip (stage, percent) and the count of finished fits."""

    def __init__(self, console, names: list[str]):
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        self.p = Progress(TextColumn("{task.description:>20}"), TextColumn("{task.fields[stage]:<12}"), BarColumn(),
                          TaskProgressColumn(), console=console)
        self.p.start()
        self.all = self.p.add_task("fits", total=len(names), stage="")
        self.ids = {n: self.p.add_task(n[:20], total=1, stage="waiting") for n in names}

    def update(self, job: Job, row: dict, finished: int) -> None:
        stage = job.state if job.state != "pending" else row.get("stage", "waiting")
        if row.get("attempts", 0) > 1 and job.state == "pending":
            stage = f"{stage} (try {row['attempts']})"
        total = max(1, int(row.get("total", 1)))
        done = total if job.state != "pending" else min(int(row.get("done", 0)), total)
        self.p.update(self.ids[job.name], completed=done, total=total, stage=stage)
        self.p.update(self.all, completed=finished, stage=f"{finished} of {len(self.ids)}")

    def stop(self) -> None:
        self.p.stop()


def write_summary(out: Path, jobs: list[Job]) -> Path:
    from gstalk.io.atomic import write_json

    return write_json(out / SUMMARY, {"jobs": [asdict(j) for j in jobs],
                                      "counts": {s: sum(j.state == s for j in jobs)
                                                 for s in ("done", "skipped", "failed", "pending")}})
