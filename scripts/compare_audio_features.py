"""Which audio features make lips follow *another* speaker's voice? mel vs phoneme vs both.

    python scripts/compare_audio_features.py DATASET [DATASET ...] [--steps 400]

For each prepared dataset with audio (``gstalk prepare``), and each feature kind, an audio
model (gstalk's encoder + smoother + a linear head) learns the dataset's measured mouth
opening from its training frames. It is then scored on
- the held-out tail: correlation of predicted with measured mouth opening;
- other speakers' audio (../shared/data speech files and the other datasets' audio): the
  mouth-opening vs speech-energy sync score (gstalk.eval.sync), and on its own held-out
  audio for reference.
Prints a table with the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gstalk.audio.encoder import AudioModel  # noqa: E402
from gstalk.audio.features import compute_features  # noqa: E402
from gstalk.eval.sync import sync_score  # noqa: E402
from gstalk.io.dataset import Dataset  # noqa: E402
from gstalk.io.video import load_audio  # noqa: E402
from gstalk.eval.bench import cpu_name  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def train(ds: Dataset, kind: str, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    audio = ds.audio()
    feats = torch.from_numpy(compute_features(audio, ds.num_frames, ds.fps, kind).windows)
    mouth = ds.signals()["mouth_open"].astype(np.float32)
    ok = np.isfinite(mouth)
    mu, sd = np.nanmean(mouth), np.nanstd(mouth) + 1e-6
    target = torch.from_numpy(np.nan_to_num((mouth - mu) / sd))
    tr = ds.train_indices
    model = AudioModel(feats.shape[-1], feats.shape[1], code_dim=16)
    model.set_normalisation(feats[tr])
    head = torch.nn.Linear(16, 1)
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=2e-3, weight_decay=1e-4)
    m_tr = torch.from_numpy(ok[tr])
    for _ in range(steps):
        pred = head(model(feats[tr]))[:, 0]
        loss = ((pred - target[tr]) ** 2)[m_tr].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def predict(a: np.ndarray, n: int) -> np.ndarray:
        with torch.no_grad():
            w = torch.from_numpy(compute_features(a, n, ds.fps, kind).windows)
            return head(model(w))[:, 0].numpy()

    te = ds.test_indices
    held = predict(audio, ds.num_frames)[te]
    r_held = float(np.corrcoef(held[ok[te]], mouth[te][ok[te]])[0, 1])
    own_tail = audio[int(te[0] / ds.fps * 16000):]
    return predict, r_held, sync_score(held, own_tail, ds.fps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="+", type=Path)
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    sets = [Dataset(d) for d in args.datasets if (d / "manifest.json").is_file()]
    sets = [d for d in sets if d.has_audio and not d.manifest["audio"].get("silent")]
    drivers = {p.stem: load_audio(p) for p in sorted(SHARED.glob("speech_*.wav"))}
    for d in sets:
        drivers[d.root.name] = d.audio()
    print(f"machine: {cpu_name()}")
    print("| trained on | features | held-out mouth corr | own held-out sync | other speakers' sync (mean) | per driver |")
    print("|---|---|---:|---:|---:|---|")
    for ds in sets:
        for kind in ("mel", "phoneme", "mel+phoneme"):
            predict, r_held, s_own = train(ds, kind, args.steps)
            per = {}
            for name, a in drivers.items():
                if name == ds.root.name:
                    continue
                n = int(len(a) / 16000 * ds.fps)
                per[name] = sync_score(predict(a, n), a, ds.fps)
            mean = float(np.mean(list(per.values())))
            detail = ", ".join(f"{k} {v:.2f}" for k, v in per.items())
            print(f"| {ds.root.name} | {kind} | {r_held:.2f} | {s_own:.2f} | {mean:.2f} | {detail} |", flush=True)


if __name__ == "__main__":
    main()
