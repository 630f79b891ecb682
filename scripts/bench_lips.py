"""Do the lips from audio beat a still mouth? The yardstick over every real speech clip.

    python scripts/bench_lips.py eval [CLIP ...] --work DIR [--size 256] [--recalibrate]
    python scripts/bench_lips.py proxy DATASET [DATASET ...] [--phones vad|energy|free] [--folds 8]
    python scripts/bench_lips.py pauses

``eval``: for each clip (default: every clip with speech in ../shared/data), ``gstalk fit``
into ``DIR/<clip>/`` (dataset and avatar; resumed, skipped when done), then ``gstalk eval``
on its held-out tail, and one table: for the default lip model, the learned network, the
tracked motion and the mean mouth, the held-out LMD driven by the clip's own held-out audio
alone, the paired difference from the mean mouth with its standard error, the opening's
correlation with the ground truth and how far the lips move. ``--recalibrate`` first
re-calibrates an existing avatar's viseme lip model on its dataset (lips only, no re-fit:
for trying a lip model on fitted avatars).

``proxy``: seconds per clip and no fitting, for developing a lip model. The head model's lip
landmarks, posed with the track and projected with its camera, stand in for the render's (the
tracked motion puts them 1.5-2.5 px from the detector's); blocked cross-validation over the
whole clip (each of ``--folds`` blocks predicted by a model calibrated on the rest, minus
0.4 s either side) and the real held-out tail; LMD against the detector's lips, the paired
difference from the mean mouth, and the correlation of the mouth's opening within blocks and
over the whole clip's cross-validated predictions (with its interval: hundreds of frames
know it far better than the held-out tail does).
``--phones`` chooses the phone timings: as the fit chooses them (choose, the default: the
recognised words, or free phone decoding where it predicts the training frames' lips better),
recognised words force-aligned within pauses found by the voice-activity detector (vad) or by
loudness (energy), or free phone decoding (free).

``pauses``: where are the pauses? Sentences spoken by espeak-ng (which says where its pauses
are) with pauses between them, in quiet and with noise at 20 and 10 dB SNR, plus music and
noise alone: the share of 10 ms frames the voice-activity detector and the loudness rule
classify right, for speech and for pauses.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gstalk.audio.phones import phone_timeline  # noqa: E402
from gstalk.audio.visemes import VisemeMotion, lip_measures  # noqa: E402
from gstalk.avatar.io import head_for  # noqa: E402
from gstalk.eval.bench import device_name  # noqa: E402
from gstalk.eval.evaluate import CORR_LEVEL, corr_interval, corr_text  # noqa: E402
from gstalk.face.regions import LIPS, mouth_opening  # noqa: E402
from gstalk.head.embedding import load_embedding  # noqa: E402
from gstalk.head.lbs import flame_forward  # noqa: E402
from gstalk.head.tracker import load_track  # noqa: E402
from gstalk.io.dataset import Dataset  # noqa: E402
from gstalk.train.motion import choose_phones, lip_inputs  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def speech_clips() -> list[Path]:
    from gstalk.io.video import load_audio

    out = []
    for p in sorted(DATA.glob("*.mp4")):
        try:
            a = load_audio(p)
        except Exception:  # noqa: BLE001 - a clip without an audio track
            continue
        if len(a) and float(np.sqrt(np.mean(a.astype(np.float64) ** 2))) > 1e-3:
            out.append(p)
    return out


# ------------------------------------------------------------------ eval over fitted avatars
def gstalk(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "gstalk.cli", *args], check=True)


def recalibrate(ds_dir: Path, av_dir: Path) -> None:
    """The avatar's viseme lip model calibrated again on its dataset (what the trainer does)."""
    from safetensors.torch import load_file, save_file

    from gstalk.avatar.io import load_avatar
    from gstalk.avatar.model import AVATAR_VERSION
    from gstalk.io.atomic import atomic_path, write_json
    from gstalk.train.motion import fit_visemes

    ds = Dataset(ds_dir)
    nets = av_dir / "networks.safetensors"
    tensors = {k: v for k, v in load_file(str(nets)).items() if not k.startswith("visemes.")}
    cfg = json.loads((av_dir / "config.json").read_text())
    if cfg["version"] >= 7:  # load it without its lip model, which may be another version's
        cfg.update(version=6, lip_motion="learned")
        write_json(av_dir / "config.json", cfg)
        with atomic_path(nets) as tmp:
            save_file(tensors, str(tmp))
    av, _ = load_avatar(av_dir)
    track = load_track(ds.root / "track.npz")
    tl = phone_timeline(ds.audio(), source=av.cfg.phones)
    av.visemes = VisemeMotion(av.cfg.n_expr)
    driven, lip_map = lip_inputs(av.head_model, av.shape, track.jaw, track.expr, ds.train_indices, av.cfg.n_expr)
    lips = fit_visemes(av.visemes, ds, tl, track.jaw, track.expr, ds.train_indices, driven, print, lip_map=lip_map)
    tensors.update({f"visemes.{k}": v.contiguous() for k, v in av.visemes.state_dict().items()})
    with atomic_path(nets) as tmp:
        save_file(tensors, str(tmp))
    cfg.update(version=AVATAR_VERSION, lip_motion=lips)
    write_json(av_dir / "config.json", cfg)


def run_eval(args) -> None:
    clips = [Path(c) for c in args.clips] or speech_clips()
    rows = []
    for clip in clips:
        work = Path(args.work) / clip.stem
        ds, av = work / "ds", work / "avatar"
        t0 = time.perf_counter()
        if not (av / "config.json").is_file():
            gstalk("fit", str(clip), str(av), "--dataset", str(ds))
        elif args.recalibrate:
            recalibrate(ds, av)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        gstalk("eval", str(av), str(ds), "--size", str(args.size))
        res = json.loads((av / "eval" / "eval.json").read_text())
        rows.append((clip.stem, res, fit_s, time.perf_counter() - t0))
    print(f"\nmachine: {device_name()}\n")
    print(f"| clip | held-out frames | lips | LMD px | minus mean mouth | opening corr. [{100 * CORR_LEVEL:.0f} %] "
          "| motion | beats the still mouth |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for name, res, _, _ in rows:
        y = res["lip_yardstick"]
        for row, r in y["rows"].items():
            d = r.get("minus_mean_mouth", {}).get("lmd_px512")
            pair = f"{d['mean']:+.2f} +- {d['sem']:.2f}" if d else "-"
            beats = ("yes" if y["default_beats_mean_mouth"] else "no") if row == y["default"] else ""
            label = row + (" (default)" if row == y["default"] else "")
            print(f"| {name} | {res['frames']} | {label} | {r['lmd_px512']:.2f} | {pair} | "
                  f"{corr_text(r['mouth_opening_corr'], r.get('mouth_opening_corr_ci'))} | "
                  f"{_fmt(r['mouth_motion_ratio'], '.2f')} | {beats} |")
    print("\n" + "; ".join(f"{n}: fit {f / 60:.1f} min, eval {e:.0f} s" for n, _, f, e in rows))


def _fmt(x, spec: str = "+.2f") -> str:
    return "-" if x is None or not np.isfinite(x) else format(x, spec)


# ------------------------------------------------------------------ the proxy
class Proxy:
    """A tracked dataset's lips: the detector's, and the head model's for any jaw and
    expression (the track's pose and camera)."""

    def __init__(self, ds_dir: Path, phones: str):
        self.ds = Dataset(ds_dir)
        self.track = load_track(self.ds.root / "track.npz")
        self.head = head_for(self.track.model)
        self.emb = load_embedding(self.head)
        ids = self.emb.landmark_indices.tolist()
        if not set(LIPS) | {33, 263} <= set(ids):
            raise SystemExit(f"{ds_dir}: the head model's landmark embedding lacks the lips or the eye corners")
        self.order = [ids.index(i) for i in range(478) if i in ids]  # face-mesh order
        lm = self.ds.landmarks()
        self.valid = np.asarray(lm["valid"], bool)
        lmk = np.asarray(lm["lmk"], np.float64)
        self.gt = lmk[:, LIPS, :2] * (512 / self.ds.resolution)
        self.gt_open = mouth_opening(np.nan_to_num(lmk))
        self.lips = lip_measures(np.nan_to_num(lmk))
        self.T, self.fps = self.track.num_frames, self.ds.fps
        self.Y = np.concatenate([self.track.jaw, self.track.expr], 1).astype(np.float64)
        audio = self.ds.audio()
        self.choice = ""
        if phones == "free":
            self.timeline = phone_timeline(audio, source="phones")
        elif phones == "choose":  # as the fit chooses (--train.phones choose)
            words, free = phone_timeline(audio), phone_timeline(audio, source="phones")
            tr = self.ds.train_indices
            driven, lip_map = lip_inputs(self.head, torch.as_tensor(self.track.shape), self.Y[:, :3], self.Y[:, 3:],
                                         tr, self.head.n_expr)
            pick, self.choice = choose_phones(self.ds, words, free, self.Y[:, :3], self.Y[:, 3:], tr, self.head.n_expr,
                                              driven, lip_map)
            self.timeline = free if pick == "phones" else words
        else:
            self.timeline = phone_timeline(audio, phones)

    def mesh_px(self, y: np.ndarray) -> np.ndarray:
        """[T, 478, 2] the head model's face-mesh landmarks (px at 512) for jaw+expression rows y."""
        p = self.track.params()
        p.jaw = torch.as_tensor(y[:, :3], dtype=torch.float32)
        p.expr = torch.as_tensor(y[:, 3:], dtype=torch.float32)
        K = torch.as_tensor(self.track.K, dtype=torch.float32)
        V = torch.as_tensor(self.track.viewmat, dtype=torch.float32)
        with torch.no_grad():
            pts = self.emb.points(flame_forward(self.head, p).vertices, self.head.faces)[:, self.order]
            uv = (pts @ V[:3, :3].T + V[:3, 3]) @ K.T
        return (uv[..., :2] / uv[..., 2:3]).numpy() * (512 / self.ds.resolution)

    def lmd(self, y: np.ndarray) -> np.ndarray:
        d = np.linalg.norm(self.mesh_px(y)[:, LIPS] - self.gt, axis=-1).mean(-1)
        d[~self.valid] = np.nan
        return d

    def opening(self, y: np.ndarray) -> np.ndarray:
        """The mouth's opening as eval measures it (over the eye-corner distance)."""
        return mouth_opening(self.mesh_px(y))

    def visemes(self, frames: np.ndarray) -> np.ndarray:
        vm = VisemeMotion(self.head.n_expr)
        driven, lip_map = lip_inputs(self.head, torch.as_tensor(self.track.shape), self.Y[:, :3], self.Y[:, 3:],
                                     frames, self.head.n_expr)
        vm.fit(self.timeline, self.fps, self.Y, self.lips, frames, driven=driven, lip_map=lip_map)
        jaw, expr = vm(self.timeline, self.T, self.fps)
        return torch.cat([jaw, expr], 1).double().numpy()


def run_proxy(args) -> None:
    print(f"machine: {device_name()}; phones: {args.phones}\n")
    print("| clip | lips | CV LMD px | minus mean mouth | opening corr. in blocks "
          f"| whole clip [{100 * CORR_LEVEL:.0f} %] | held-out LMD | minus mean mouth | held-out opening corr. |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for d in args.datasets:
        t0 = time.perf_counter()
        c = Proxy(Path(d), args.phones)
        gap = int(round(0.4 * c.fps))
        blocks = np.array_split(np.arange(c.T), args.folds)
        cv = {"visemes": np.zeros_like(c.Y), "mean mouth": np.zeros_like(c.Y)}
        for b in blocks:
            tr = np.setdiff1d(np.arange(c.T), np.arange(b[0] - gap, b[-1] + gap + 1))
            tr = tr[c.valid[tr]]
            cv["visemes"][b] = c.visemes(tr)[b]
            cv["mean mouth"][b] = c.Y[tr].mean(0)
        tr = np.asarray(c.ds.train_indices)
        tr = tr[c.valid[tr]]
        te = np.asarray(c.ds.test_indices)
        te = te[c.valid[te]]
        ho = {"visemes": c.visemes(tr), "mean mouth": np.repeat(c.Y[tr].mean(0, keepdims=True), c.T, 0)}
        cv["tracked"] = ho["tracked"] = c.Y
        base_cv, base_ho = c.lmd(cv["mean mouth"]), c.lmd(ho["mean mouth"])[te]
        for name in ("visemes", "tracked", "mean mouth"):
            l_cv, l_ho = c.lmd(cv[name]), c.lmd(ho[name])[te]
            ok = np.isfinite(l_cv)
            d_cv, d_ho = (l_cv - base_cv)[ok], l_ho - base_ho
            o = c.opening(cv[name])
            corr = [np.corrcoef(o[b[c.valid[b]]], c.gt_open[b[c.valid[b]]])[0, 1] for b in blocks
                    if c.valid[b].sum() > 3 and o[b[c.valid[b]]].std() > 1e-9]
            ok_o = c.valid & np.isfinite(o)
            whole = (corr_text(np.corrcoef(o[ok_o], c.gt_open[ok_o])[0, 1], corr_interval(o[ok_o], c.gt_open[ok_o]))
                     if o[ok_o].std() > 1e-9 else "-")
            oh = c.opening(ho[name])[te]
            pair = (lambda x: f"{x.mean():+.2f} +- {x.std(ddof=1) / np.sqrt(len(x)):.2f}") if name != "mean mouth" \
                else (lambda x: "-")
            print(f"| {c.ds.root.parent.name}/{c.ds.root.name} | {name} | {np.nanmean(l_cv):.2f} | {pair(d_cv)} | "
                  f"{_fmt(np.mean(corr) if corr else np.nan)} | {whole} | {l_ho.mean():.2f} | {pair(d_ho)} | "
                  f"{_fmt(np.corrcoef(oh, c.gt_open[te])[0, 1] if oh.std() > 1e-9 else np.nan)} |")
        print(f"{d}: {time.perf_counter() - t0:.0f} s ({c.timeline.source}) {c.choice}", file=sys.stderr)


def run_pauses(args) -> None:
    import librosa

    sys.path.insert(0, str(ROOT / "tests"))
    import espeak

    from gstalk.audio.phones import SPEECH_DETECTORS

    if not espeak.available():
        raise SystemExit("needs espeak-ng (Debian package espeak-ng)")
    sentences = ["My mother bought a big blue bag from the market.", "Then we walked home along the river.",
                 "It was late, and the shops were closing.", "Nobody knew what would happen next."]
    rng = np.random.default_rng(0)
    parts, truth = [], []
    for k, text in enumerate(sentences * 2):
        a, sr, ev = espeak.speak(text, "en-us+f2" if k % 2 else "en-us")
        a = librosa.resample(a, orig_sr=sr, target_sr=16000)
        on = np.zeros(int(np.ceil(len(a) / 160)), bool)
        for _, s0, e0 in espeak.phones(ev, len(a) / 16000):
            on[int(s0 * 100):int(np.ceil(e0 * 100))] = True
        gap = int(rng.uniform(0.4, 1.2) * 16000)
        parts += [a, np.zeros(gap, np.float32)]
        truth += [on, np.zeros(gap // 160, bool)]
    clean, truth = np.concatenate(parts), np.concatenate(truth)
    t = np.arange(6 * 16000) / 16000
    f0 = np.array([440.0, 523.3, 659.3, 587.3])[(t * 2).astype(int) % 4]
    music = (sum(0.2 * np.sin(h * 2 * np.pi * np.cumsum(f0) / 16000) / h for h in (1, 2, 3))
             * np.exp(-(t % 0.5) * 4)).astype(np.float32)
    print(f"machine: {device_name()}\n")
    print("| audio | detector | speech frames found | pause frames found |")
    print("|---|---|---:|---:|")
    mask = np.zeros(len(clean), bool)
    mask[:160 * len(truth)] = np.repeat(truth, 160)[:len(clean)]
    p_speech = float(np.mean(clean[mask] ** 2))
    for name, snr in (("speech, quiet", None), ("speech, noise 20 dB", 20), ("speech, noise 10 dB", 10)):
        a = clean if snr is None else clean + rng.normal(0, np.sqrt(p_speech / 10 ** (snr / 10)), len(clean))
        a = a.astype(np.float32)
        for det, fn in SPEECH_DETECTORS.items():
            on = fn(a)
            m = min(len(on), len(truth))
            print(f"| {name} | {det} | {on[:m][truth[:m]].mean():.1%} | {(~on[:m][~truth[:m]]).mean():.1%} |")
    for name, a in (("music alone", music), ("noise alone", rng.normal(0, 0.1, 5 * 16000).astype(np.float32))):
        for det, fn in SPEECH_DETECTORS.items():
            print(f"| {name} | {det} | - | {(~fn(a)).mean():.1%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    e.add_argument("clips", nargs="*")
    e.add_argument("--work", required=True)
    e.add_argument("--size", type=int, default=256)
    e.add_argument("--recalibrate", action="store_true")
    p = sub.add_parser("proxy")
    p.add_argument("datasets", nargs="+")
    p.add_argument("--phones", choices=("choose", "vad", "energy", "free"), default="choose")
    p.add_argument("--folds", type=int, default=8)
    sub.add_parser("pauses")
    args = ap.parse_args()
    {"eval": run_eval, "proxy": run_proxy, "pauses": run_pauses}[args.cmd](args)


if __name__ == "__main__":
    main()
