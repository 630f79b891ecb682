"""How well do the lip models predict a clip's motion from its audio?

    python scripts/bench_a2m.py DATASET [DATASET ...] [--folds 5] [--iters 600]

For a prepared and tracked dataset (``gstalk prepare`` + ``gstalk track``), cross-validation
over the whole clip: each of ``--folds`` contiguous blocks is predicted by a model trained on
the rest (minus a gap of the audio window's reach either side): by the viseme lip model
(calibrated on the rest), and by the audio-to-motion network once validated (a block of the
training frames picks the iteration count) and once run for all ``--iters`` (the trainer's
rule). Prints, per output (jaw opening, first expression coefficients), the
correlation of the prediction with the track, its error over the track's variance (1 = no
better than the mean) and its spread over the track's (damped lips < 1), with the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gstalk.audio.features import compute_features  # noqa: E402
from gstalk.avatar.io import head_for  # noqa: E402
from gstalk.avatar.init import mouth_expressions  # noqa: E402
from gstalk.avatar.model import AudioToMotion  # noqa: E402
from gstalk.eval.bench import cpu_name  # noqa: E402
from gstalk.head.tracker import load_track  # noqa: E402
from gstalk.io.dataset import Dataset  # noqa: E402
from gstalk.audio.visemes import VisemeMotion  # noqa: E402
from gstalk.train.motion import fit_audio_to_motion, fit_visemes, motion_target  # noqa: E402

OUTPUTS = {"jaw open": 0, "expr 0": 3, "expr 1": 4, "expr 2": 5}


def cross_validate(ds: Dataset, folds: int, iters: int, mode: str, kind: str, n_expr: int = 8):
    """mode: 'visemes' (the viseme lip model, calibrated on the training blocks), 'validated'
    or 'all' (the learned network)."""
    track = load_track(ds.root / "track.npz")
    feats = compute_features(ds.audio(), ds.num_frames, ds.fps, kind)
    w = torch.from_numpy(feats.windows).float()
    blink = np.nan_to_num(ds.signals()["blink"])
    target = motion_target(track.jaw, track.expr, blink, n_expr)
    n = len(w)
    driven = mouth_expressions(head_for(track.model), torch.from_numpy(track.shape).float())
    pred = torch.zeros_like(target)
    gap = w.shape[1] // 2 + 4
    runs = []
    for block in np.array_split(np.arange(n), folds):
        train = np.array([i for i in range(n) if i < block[0] - gap or i > block[-1] + gap])
        if mode == "visemes":
            vm = VisemeMotion(kind, w.shape[2], w.shape[1], n_expr)
            if fit_visemes(vm, ds, w, track.jaw, track.expr, train, driven[:n_expr]) != "visemes":
                raise SystemExit(f"{ds.root}: the viseme lip model cannot be calibrated (features {kind})")
            runs.append(0)
            with torch.no_grad():
                jaw, expr = vm(w)
            pred[block, :3 + n_expr] = torch.cat([jaw, expr], 1)[block]
            continue
        torch.manual_seed(0)
        a2m = AudioToMotion(w.shape[2], w.shape[1], n_expr)
        runs.append(fit_audio_to_motion(a2m, w, target, train, iters, seed=1, validate=mode == "validated"))
        with torch.no_grad():
            jaw, expr, blink_p = a2m(w)
        pred[block] = torch.cat([jaw, expr, blink_p[:, None]], 1)[block]
    rows = {}
    for name, j in OUTPUTS.items():
        p, t = pred[:, j].numpy(), target[:, j].numpy()
        rows[name] = (float(np.corrcoef(p, t)[0, 1]), float(((p - t) ** 2).mean() / t.var()), float(p.std() / t.std()))
    return rows, runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--features", default="phoneme", choices=["phoneme", "mel", "mel+phoneme"])
    a = ap.parse_args()
    for d in a.datasets:
        if not (Path(d) / "track.npz").is_file():
            sys.exit(f"{d} is not a tracked dataset (run 'gstalk prepare' and 'gstalk track' first)")
    print(f"machine: {cpu_name()}, torch {torch.__version__}; {a.folds}-fold cross-validation, {a.features} features")
    print("| clip | training | output | correlation | error / variance | spread / track's | iterations |")
    print("|---|---|---|---|---|---|---|")
    for d in a.datasets:
        ds = Dataset(d)
        for mode in ("visemes", "validated", "all"):
            if mode == "visemes" and "phoneme" not in a.features:
                continue
            t = time.perf_counter()
            rows, runs = cross_validate(ds, a.folds, a.iters, mode, a.features)
            label = {"visemes": "viseme model", "validated": "network, validated"}.get(mode, f"network, all {a.iters}")
            for name, (c, e, s) in rows.items():
                print(f"| {Path(d).name if Path(d).name != 'ds' else Path(d).parent.name} | {label} | {name} | "
                      f"{c:+.2f} | {e:.2f} | {s:.2f} | {min(runs)}-{max(runs)} |", flush=True)
            print(f"<!-- {time.perf_counter() - t:.1f} s -->", flush=True)


if __name__ == "__main__":
    main()
