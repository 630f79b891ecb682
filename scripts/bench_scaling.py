"""Time and memory of prepare, track and train against the clip's length.

    python scripts/bench_scaling.py --work DIR [--clip ../shared/data/portrait_youth_20s.mp4]
                                    [--seconds 8 20 60 300] [--stages prepare track train]

Long clips are the real clip repeated end to end (its packets copied, not re-encoded: the
same person, the same phone video, a cut every repeat), cut to ``--seconds``. Each stage runs
as its own ``gstalk`` process under GNU time (default options; resumed work is not redone, so
delete DIR to measure again); the table gives its wall time, the time per second of clip and
the process's peak memory (max RSS), with the machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gstalk.eval.bench import device_name  # noqa: E402


def repeat_clip(src: Path, out: Path, seconds: float) -> Path:
    """``src`` played again and again to ``seconds`` (stream copy: no re-encoding)."""
    import av

    if out.is_file():
        return out
    tmp = out.with_suffix(".tmp.mp4")
    with av.open(str(src)) as inp:
        with av.open(str(tmp), "w") as o:
            streams = {s.index: o.add_stream_from_template(s) for s in inp.streams if s.type in ("video", "audio")}
            start = 0.0  # where this repeat begins, s: after the end of every stream's last packet
            while start < seconds:
                inp.seek(0)
                end = start
                for pkt in inp.demux(*[inp.streams[i] for i in streams]):
                    if pkt.dts is None:
                        continue
                    tb = pkt.time_base
                    off = int(round(start / tb))
                    if float((pkt.pts + off) * tb) >= seconds:
                        continue
                    end = max(end, float((pkt.pts + off + (pkt.duration or 0)) * tb))
                    pkt.pts, pkt.dts = pkt.pts + off, pkt.dts + off
                    pkt.stream = streams[pkt.stream.index]
                    o.mux(pkt)
                start = end + 0.05
    tmp.rename(out)
    return out


def run(args: list[str], work: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of one gstalk process (GNU time's maximum resident set)."""
    report = work / "time.txt"
    t0 = time.perf_counter()
    subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), sys.executable, "-m", "gstalk.cli", *args],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0, int(report.read_text().split()[-1]) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--clip", type=Path, default=ROOT.parent / "shared" / "data" / "portrait_youth_20s.mp4")
    ap.add_argument("--seconds", type=float, nargs="+", default=[8, 20, 60, 300])
    ap.add_argument("--stages", nargs="+", default=["prepare", "track", "train"],
                    choices=["prepare", "track", "train"])
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for sec in sorted(args.seconds):
        clip = repeat_clip(args.clip, args.work / f"clip_{sec:g}s.mp4", sec)
        ds, av = args.work / f"ds_{sec:g}s", args.work / f"avatar_{sec:g}s"
        cmds = {"prepare": ["prepare", str(clip), str(ds)], "track": ["track", str(ds), "--no-preview"],
                "train": ["train", str(ds), str(av)]}
        for stage in args.stages:
            wall, rss = run(cmds[stage], args.work)
            rows.append((sec, stage, wall, rss))
            print(f"{sec:g} s {stage}: {wall:.0f} s, {rss:.2f} GiB", file=sys.stderr, flush=True)
    print(f"machine: {device_name()}\n")
    print("| clip | stage | wall | per second of clip | peak RSS |")
    print("|---:|---|---:|---:|---:|")
    for sec, stage, wall, rss in rows:
        print(f"| {sec:g} s | {stage} | {wall / 60:.1f} min | {wall / sec:.1f} s | {rss:.2f} GiB |")


if __name__ == "__main__":
    main()
