"""Track prepared datasets and report accuracy, jitter and speed.

    python scripts/bench_track.py /tmp/gstalk_bench_prepare/*     # dataset folders (from bench_prepare --keep)

Per dataset: frames, seconds, tracking frames per second (whole fit incl. focal search,
without the preview video), median landmark reprojection error in pixels (at the dataset's
resolution), jitter (mean |second difference| of the head translation, mm per frame^2),
and the focal length found. Prints the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gstalk.config import TrackOptions  # noqa: E402
from gstalk.head.tracker import load_track, track_dataset  # noqa: E402
from gstalk.eval.bench import cpu_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="+", type=Path)
    ap.add_argument("--preview", action="store_true", help="also write track_preview.mp4")
    args = ap.parse_args()
    import torch

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print("| dataset | frames | res | seconds | track fps | median err px | jitter mm/f^2 | focal px |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for d in args.datasets:
        if not (d / "manifest.json").is_file():
            continue
        t0 = time.perf_counter()
        track_dataset(d, replace(TrackOptions(), preview=args.preview), log=lambda m: None)
        dt = time.perf_counter() - t0
        tr = load_track(d / "track.npz")
        acc = np.abs(np.diff(tr.translation, 2, axis=0)).sum(-1).mean() * 1000
        print(f"| {d.name} | {tr.num_frames} | {tr.width} | {dt:.1f} | {tr.num_frames / dt:.1f} | "
              f"{np.nanmedian(tr.residual_px):.2f} | {acc:.3f} | {tr.K[0, 0]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
