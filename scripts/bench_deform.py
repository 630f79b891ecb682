"""Does the audio deformation help on frames it was not trained on? (the built-in synthetic clip)

    python scripts/bench_deform.py                          # 4 s clip, 64 px, the e2e test's schedule
    python scripts/bench_deform.py --seconds 8 --clip-size 128 --resolution 128 --scale 0.5 \\
        --iters 300 300 150 --seeds 0 1 2                  # the docs' 128 px table

Builds the demo's talking clip (skimage's face photo on the stand-in head, lips that round
and spread with synthesized vowels), prepares it and tracks it with only two expression
directions (mouth open, lip press), so the rounding and spreading are left to the
audio-driven deformation. Then, per seed, trains an avatar and evaluates the held-out tail
with the deformation on, off, and driven by random training frames' audio (the control).
Prints a Markdown table (PSNR over the frame and in the mouth box, LMD) with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gstalk.config import PrepareOptions, TrackOptions, TrainOptions  # noqa: E402
from gstalk.eval.bench import cpu_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--clip-size", type=int, default=128, help="pixels of the synthetic clip")
    ap.add_argument("--resolution", type=int, default=64, help="dataset resolution (prepare)")
    ap.add_argument("--scale", type=float, default=1.0, help="train at this fraction of the resolution")
    ap.add_argument("--iters", type=int, nargs=3, default=(120, 120, 60), metavar=("STATIC", "AUDIO", "JOINT"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--features", default="mel", help="audio features (mel, phoneme, mel+phoneme)")
    ap.add_argument("--set", default="{}", help="other TrainOptions as JSON, e.g. '{\"field_expr\": 0}'")
    ap.add_argument("--work", type=Path, default=None, help="keep the clip, dataset and avatars here")
    args = ap.parse_args()
    import torch

    from gstalk.demo import make_talking_clip
    from gstalk.eval.evaluate import evaluate
    from gstalk.head.tracker import track_dataset
    from gstalk.prepare import prepare
    from gstalk.train.trainer import train

    work = args.work or Path(tempfile.mkdtemp(prefix="gstalk_bench_deform_"))
    work.mkdir(parents=True, exist_ok=True)
    quiet = lambda m: None  # noqa: E731
    ds = work / "ds"
    if not (ds / "track.npz").is_file():
        clip = make_talking_clip(work / "clip.mp4", seconds=args.seconds, size=args.clip_size)
        prepare(clip, ds, PrepareOptions(resolution=args.resolution, preview=False), log=quiet)
        track_dataset(ds, TrackOptions(iters_rigid=100, iters_shape=100, iters_all=150, focal_search=False,
                                       preview=False, device="cpu", n_expr=2), log=quiet)
    st, au, jo = args.iters
    base = TrainOptions(iters_static=st, iters_audio=au, iters_joint=jo, iters_a2m=60, scale=args.scale,
                        per_triangle=1, torso_points=200, densify_every=60, checkpoint_every=0, device="cpu",
                        feature_kind=args.features)
    opts = replace(base, **json.loads(args.set))
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"clip {args.seconds:g} s at {args.clip_size} px, dataset {args.resolution} px, training scale "
          f"{args.scale:g}, iterations {st}+{au}+{jo}, features {args.features}, options {args.set}")
    print("| seed | train s | PSNR on / off / other audio | gain | mouth PSNR on / off / other audio | mouth gain "
          "| LMD on / off |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for seed in args.seeds:
        av_dir = work / f"avatar_{seed}"
        shutil.rmtree(av_dir, ignore_errors=True)
        t0 = time.perf_counter()
        train(ds, av_dir, replace(opts, seed=seed), log=quiet)
        dt = time.perf_counter() - t0
        r = evaluate(av_dir, ds, size=args.resolution, device="cpu")
        d, b, o = r["deformation"], r["no_deformation"], r["other_audio"]
        print(f"| {seed} | {dt:.0f} | {d['psnr']:.2f} / {b['psnr']:.2f} / {o['psnr']:.2f} | "
              f"{d['psnr'] - b['psnr']:+.2f} | {d['mouth_psnr']:.2f} / {b['mouth_psnr']:.2f} / "
              f"{o['mouth_psnr']:.2f} | {d['mouth_psnr'] - b['mouth_psnr']:+.2f} | "
              f"{d['lmd_px512']:.2f} / {b['lmd_px512']:.2f} |", flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
