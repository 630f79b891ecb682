"""Prepare each real clip in ../shared/data (or the clips given) and report speed and face coverage.

    python scripts/bench_prepare.py                     # every *.mp4 in ../shared/data
    python scripts/bench_prepare.py clip1.mp4 --resolution 512 --out /tmp/bench_prepare

Prints, per clip: frames, seconds of preparation, frames per second of preparation (whole
pipeline, preview included), fraction of frames with a face / with landmarks, peak memory
(max RSS of this process), and the machine.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gstalk.config import PrepareOptions  # noqa: E402
from gstalk.eval.bench import cpu_name  # noqa: E402
from gstalk.prepare import prepare  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clips", nargs="*", type=Path)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gstalk_bench_prepare"))
    ap.add_argument("--keep", action="store_true", help="keep the dataset folders")
    args = ap.parse_args()
    clips = args.clips or sorted((Path(__file__).resolve().parents[2] / "shared" / "data").glob("*.mp4"))
    if not clips:
        sys.exit("no clips given and ../shared/data has none")
    import os

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; resolution {args.resolution}")
    print("| clip | frames | seconds | prep fps | face | landmarks | warnings |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for clip in clips:
        out = args.out / clip.stem
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        try:
            ds = prepare(clip, out, PrepareOptions(resolution=args.resolution), log=lambda m: None)
        except Exception as e:  # report and go on with the next clip
            print(f"| {clip.name} | - | - | - | - | - | failed: {e} |")
            continue
        dt = time.perf_counter() - t0
        m = ds.manifest
        print(f"| {clip.name} | {m['num_frames']} | {dt:.1f} | {m['num_frames'] / dt:.1f} | "
              f"{100 * m['face_fraction']:.0f}% | {100 * m['landmark_fraction']:.0f}% | "
              f"{'; '.join(m['warnings']) or '-'} |", flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
