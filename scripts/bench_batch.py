"""Wall time of fitting several clips as one ``gstalk fit-batch`` (a local Ray) against
``gstalk fit`` run on them one after another, each way from nothing (no dataset, no track).

    python scripts/bench_batch.py CLIP CLIP CLIP --work DIR [-- FIT FLAGS...]

Flags after ``--`` go to both ways alike (e.g. fewer training iterations to keep the benchmark
short). Prints one line per clip and per way, and the two totals. The machine must be otherwise
idle: both ways use all its cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(cmd: list[str], log: Path) -> float:
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc:
        sys.exit(f"{' '.join(cmd)} failed ({rc}); see {log}")
    return time.perf_counter() - t


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("clips", nargs="+", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--ways", nargs="+", choices=["batch", "sequential"], default=["batch", "sequential"])
    a = ap.parse_args(argv)
    gstalk = [sys.executable, "-m", "gstalk"]
    a.work.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs; fit flags: {' '.join(extra) or '(defaults)'}", flush=True)
    totals = {}
    for way in a.ways:
        out = a.work / way
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if way == "batch":
            totals[way] = run(gstalk + ["fit-batch", *map(str, a.clips), "--out", str(out), *extra],
                              a.work / "batch.log")
            for row in json.loads((out / "batch.json").read_text())["jobs"]:
                print(f"batch       {row['name']:<24} {row['state']:<8} {row['seconds'] or 0:7.1f} s", flush=True)
        else:
            total = 0.0
            for clip in a.clips:
                s = run(gstalk + ["fit", str(clip), str(out / clip.stem), *extra], a.work / f"seq_{clip.stem}.log")
                total += s
                print(f"sequential  {clip.stem:<24} done     {s:7.1f} s", flush=True)
            totals[way] = total
        print(f"{way:<11} {len(a.clips)} clips in {totals[way]:.1f} s wall", flush=True)
    if len(totals) == 2:
        print(f"batch / sequential: {totals['batch'] / totals['sequential']:.2f}")


if __name__ == "__main__":
    main()
