"""The per-frame path, stage by stage, and training iterations per second.

    python scripts/bench.py                          # GPU: 50k/100k/200k Gaussians at 512 px
    python scripts/bench.py --counts 5000 --size 128 --json out.json

Per frame (batch 1, what a live driver does): audio features and code (computed for a 4 s
clip, per frame), head-model skinning and triangle frames, the deformation field (in the
reference form, in the factored form inference uses, and factored in half precision, with what
half precision changes in the 8-bit frame), the posing
step (triangle binding + deformation outputs, per Gaussian) with the PyTorch reference and,
on CUDA, the fused kernel, rasterisation (on a CPU also with the PyTorch compositor that the
compiled one replaced), and copy-out (the image to host memory as uint8);
then "posed + rasterised frame": audio code, posing and rasterisation with each posing
backend, end to end, copied out as uint8, and as offline rendering does it (batches of 8
frames posed together and rasterized in one call; per frame); and the whole frame as ``gstalk
render`` runs it once the motion is known: those batches composited over a background (with
the other-view rule), converted to uint8 on the device and copied out once per batch, and
H.264-encoded in the writer's worker thread (per frame, encoding included); with
``--compile`` also the
deformation field compiled by ``torch.compile`` (with CUDA graphs on a GPU) and the posed +
rasterised frame with it. Training: iterations per
second of one synthetic training step (pose + deform + rasterize + L1 + backward + Adam; on a
CPU also with the PyTorch compositor).

The avatar is built in memory on the stand-in head (Gaussians spread over its triangles, a
randomised deformation field), so the numbers do not depend on a fit. On a CPU it runs at
a small size and says so. Prints a table naming the device; ``--json`` writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gstalk.avatar.model import Avatar, Frame  # noqa: E402
from gstalk.avatar.posing import cuda_kernel_available, pose_gaussians  # noqa: E402
from gstalk.avatar.synthetic import standin_avatar  # noqa: E402
from gstalk.eval.bench import device_name, time_it  # noqa: E402
from gstalk.head.lbs import FlameParams  # noqa: E402
from gstalk.render import Cameras, rasterize, rasterize_frames, select_backend  # noqa: E402

OFFLINE_BATCH = 8  # frames per call in offline rendering (gstalk.avatar.conditions.frames_iter's default)


def bench_avatar(n: int, size: int, device: torch.device, sh_degree: int = 3) -> Avatar:
    return standin_avatar(n_gaussians=n, resolution=size, sh_degree=sh_degree).to(device)


def frame_params(av: Avatar, device, t: float = 0.3) -> FlameParams:
    z = lambda k: torch.zeros(1, k, device=device)  # noqa: E731
    return FlameParams(expr=torch.full((1, av.head_model.n_expr), 0.2, device=device),
                       jaw=torch.tensor([[0.1 + 0.05 * np.sin(t), 0, 0]], device=device, dtype=torch.float32),
                       global_rot=torch.tensor([[0.0, 0.2, 0.0]], device=device), neck=z(3), eyes=z(6),
                       translation=torch.tensor([[0.0, 0.0, -0.6]], device=device))


def run(n: int, size: int, device: torch.device, budget: float, compile_field: bool = False) -> dict:
    from gstalk.audio.features import compute_features
    from gstalk.demo import synth_speech

    av = bench_avatar(n, size, device)
    cam = Cameras(av.viewmat[None], av.K[None], size, size).to(device)
    render_backend = select_backend("auto", device)
    p = frame_params(av, device)
    audio, _ = synth_speech(4.0, seed=3)
    n_frames = 100
    rows: dict[str, float] = {}
    with torch.no_grad():
        feats = compute_features(audio, n_frames, 25.0, "mel", 16).windows
        win = torch.from_numpy(feats).to(device)
        rows["audio features (per frame)"] = time_it(lambda: compute_features(audio, n_frames, 25.0, "mel", 16),
                                                     device, budget_s=budget) / n_frames
        rows["audio code"] = time_it(lambda: av.audio(win[:1]), device, budget_s=budget)
        code = av.audio(win[:1])
        frame = Frame(p, audio=code, blink=torch.zeros(1, device=device))
        rows["skinning + triangle frames"] = time_it(lambda: av.skin(p), device, budget_s=budget)
        # the field as inference ran it before the factored form: the whole module on every point,
        # with the spatial features and the neutral output computed once
        x, prior = av.canonical_positions(), av.prior_gates()
        hs = av.field.spatial(x)
        neutral = av.field.neutral_raw(hs, av.region, prior)
        expr = p.expr[:, :av.cfg.expr_cond]
        rows["deformation field [reference]"] = time_it(
            lambda: av.field(x, torch.tanh(code), blink=frame.blink, expr=expr, neck=p.neck, region=av.region,
                             prior_gates=prior, relative=av.cfg.field_relative, h=hs, neutral=neutral),
            device, budget_s=budget)
        av.frozen_field()
        rows["deformation field"] = time_it(lambda: av.deformation(frame), device, budget_s=budget)
        o, r, s = av.skin(p)
        d = av.deformation(frame)
        r0 = av.rest_frames()[1][0]
        args = (o, r, s, r0, av.means, av.quats, av.log_scales, av.binding, d.d_means, d.d_quats, d.d_log_scales)
        backends = ["torch"] + (["cuda"] if device.type == "cuda" and cuda_kernel_available() else [])
        for b in backends:
            rows[f"posing step [{b}]"] = time_it(lambda: pose_gaussians(*args, backend=b), device, budget_s=budget)
        g = av.posed(frame)[0][0]
        rows["rasterisation"] = time_it(lambda: rasterize(g, cam, sh_degree=av.cfg.sh_degree), device,
                                        budget_s=budget)
        if render_backend == "cpu":  # the PyTorch compositor the compiled one replaced
            rows["rasterisation [torch reference]"] = time_it(
                lambda: rasterize(g, cam, sh_degree=av.cfg.sh_degree, backend="torch"), device, budget_s=budget)
        img = rasterize(g, cam, sh_degree=av.cfg.sh_degree).colors[0]
        rows["copy-out (uint8 to host)"] = time_it(lambda: (img.clamp(0, 1) * 255).to(torch.uint8).cpu(), device,
                                                   budget_s=budget)

        def whole(b):
            c = av.audio(win[:1])
            gs, _ = av.posed(Frame(p, audio=c, blink=torch.zeros(1, device=device)), backend=b)
            out = rasterize(gs[0], cam, sh_degree=av.cfg.sh_degree).colors[0]
            return (out.clamp(0, 1) * 255).to(torch.uint8).cpu()

        for b in backends:
            rows[f"posed + rasterised frame [{b}]"] = time_it(lambda: whole(b), device, budget_s=budget)

        # offline rendering (gstalk render): OFFLINE_BATCH frames posed and rasterized per call
        pb = FlameParams(**{k: None if v is None else v.expand(OFFLINE_BATCH, *v.shape[1:]).contiguous()
                            for k, v in p.__dict__.items()})
        cams_b = Cameras(cam.viewmats.expand(OFFLINE_BATCH, -1, -1), cam.Ks.expand(OFFLINE_BATCH, -1, -1), size, size)

        def offline(b):
            c = av.audio(win[:OFFLINE_BATCH])
            g, _ = av.posed_batch(Frame(pb, audio=c, blink=torch.zeros(OFFLINE_BATCH, device=device)), backend=b)
            out = rasterize_frames(g, cams_b, sh_degree=av.cfg.sh_degree).colors
            return (out.clamp(0, 1) * 255).to(torch.uint8).cpu()

        b = backends[-1]
        rows[f"posed + rasterised frame, batches of {OFFLINE_BATCH} [{b}]"] = time_it(lambda: offline(b), device,
                                                                           budget_s=budget) / OFFLINE_BATCH
        rows[f"whole frame as gstalk render runs it, encoded [{b}]"] = render_path(
            av, pb, win, cams_b, device, budget, b)
        # the field in half precision (float16 on a GPU, bfloat16 on a CPU), and what it changes in the image
        full = whole(b).float()
        av.set_precision("half")
        rows["deformation field [half]"] = time_it(lambda: av.deformation(frame), device, budget_s=budget)
        rows[f"posed + rasterised frame [{b}, half field]"] = time_it(lambda: whole(b), device, budget_s=budget)
        diff = whole(b).float() - full
        mse = float(diff.square().mean()) / 255 ** 2
        half_image = {"dtype": str(av.frozen_field().dtype).removeprefix("torch."),
                      "psnr_db": float("inf") if mse == 0 else -10 * float(np.log10(mse)),
                      "max_abs_255": float(diff.abs().max()), "changed_values": float((diff != 0).float().mean())}
        av.set_precision("float32")
        if compile_field:  # torch.compile of the deformation field (CUDA graphs too on a GPU)
            av.compile_field(mode="reduce-overhead" if device.type == "cuda" else None)
            t0 = time.perf_counter()
            av.deformation(frame)
            rows["(one-off field compile)"] = 1000 * (time.perf_counter() - t0)
            rows["deformation field [compiled]"] = time_it(lambda: av.deformation(frame), device, budget_s=budget)
            b = backends[-1]
            rows[f"posed + rasterised frame [{b}, compiled field]"] = time_it(lambda: whole(b), device, budget_s=budget)
            av.compile_field(enable=False)  # training below uses the eager field

    # training: one synthetic step
    target = torch.rand(size, size, 3, device=device)
    params = [av.means, av.quats, av.log_scales, av.opacity_logits, av.sh, *av.field.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)

    def step(backend="auto"):
        gs, _ = av.posed(Frame(p, audio=code.detach(), blink=torch.zeros(1, device=device)), backend="torch")
        out = rasterize(gs[0], cam, sh_degree=av.cfg.sh_degree, backend=backend).colors[0]
        loss = (out - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        av.invalidate()

    rows["training iteration"] = time_it(step, device, budget_s=budget)
    if render_backend == "cpu":
        rows["training iteration [torch reference rasteriser]"] = time_it(lambda: step("torch"), device,
                                                                          budget_s=budget)
    return {"gaussians": av.num_gaussians, "size": size, "ms": rows, "half_field_image": half_image,
            "render_backend": render_backend}


def render_path(av: Avatar, pb: FlameParams, win: torch.Tensor, cams_b: Cameras, device, budget: float,
                backend: str) -> float:
    """ms per frame of what ``gstalk render`` does after the motion is known: batches of
    :data:`OFFLINE_BATCH` frames posed and rasterized, composited over a background (with the
    other-view rule), converted to uint8 on the device and copied out once per batch
    (:class:`HostFrames`), and H.264-encoded in the writer's worker thread (:func:`write_video`)
    to a scratch file; at least 4 batches, as many as fit in ``budget`` seconds."""
    import tempfile

    from gstalk.avatar.render import HostFrames, render_frames
    from gstalk.avatar.views import at_training_centre
    from gstalk.io.media import write_video

    size = cams_b.width
    bg = torch.full((size, size, 3), 0.5, device=device)
    at_train = at_training_centre(av, cams_b)

    def frames(n_batches):
        host = HostFrames()
        for _ in range(n_batches):
            c = av.audio(win[:OFFLINE_BATCH])
            g, _ = av.posed_batch(Frame(pb, audio=c, blink=torch.zeros(OFFLINE_BATCH, device=device)),
                                  backend=backend)
            yield from host(render_frames(av, g, cams_b, bg, at_train))

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.mp4"
        write_video(out, frames(1), 25.0)  # warm up (encoder, kernels)
        t0 = time.perf_counter()
        write_video(out, frames(4), 25.0)
        per_batch = (time.perf_counter() - t0) / 4
        n = max(4, int(budget / max(per_batch, 1e-6)))
        t0 = time.perf_counter()
        write_video(out, frames(n), 25.0)
        return 1000 * (time.perf_counter() - t0) / (n * OFFLINE_BATCH)


def backends_of(r: dict) -> str:
    """The fastest posing backend a result was timed with."""
    return "cuda" if "posing step [cuda]" in r["ms"] else "torch"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="*", default=None)
    ap.add_argument("--size", type=int, default=0, help="image size (0: 512 on a GPU, 128 on a CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of repeats per measurement")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd deformation field")
    a = ap.parse_args()
    dev = torch.device(a.device)
    gpu = dev.type == "cuda"
    counts = a.counts or ([50_000, 100_000, 200_000] if gpu else [5_000, 20_000])
    size = a.size or (512 if gpu else 128)
    name = device_name(dev)
    print(f"device: {name}  (torch {torch.__version__})")
    if not gpu:
        print("no CUDA GPU: running at a small size; the targets are GPU numbers")
    results = []
    for n in counts:
        t0 = time.perf_counter()
        r = run(n, size, dev, a.budget, a.compile)
        results.append(r)
        print(f"\n{r['gaussians']} Gaussians at {size}x{size}, rasterised by the {r['render_backend']} backend "
              f"({time.perf_counter() - t0:.0f} s)")
        for k, ms in r["ms"].items():
            rate = f"{1000 / ms:9.1f} /s" if k.startswith(("posed + rasterised", "whole frame", "training")) else ""
            print(f"  {k:<38} {ms:10.3f} ms {rate}")
        if "posing step [cuda]" in r["ms"]:
            ratio = r["ms"]["posing step [torch]"] / r["ms"]["posing step [cuda]"]
            whole = r["ms"]["posed + rasterised frame [torch]"] / r["ms"]["posed + rasterised frame [cuda]"]
            print(f"  fused posing kernel: {ratio:.1f}x the reference step, {whole:.2f}x the posed + rasterised frame")
        single, batched = r["ms"][f"posed + rasterised frame [{backends_of(r)}]"], r["ms"][
            f"posed + rasterised frame, batches of {OFFLINE_BATCH} [{backends_of(r)}]"]
        print(f"  offline batches of {OFFLINE_BATCH}: {single / batched:.2f}x the single-frame rate")
        ms = r["ms"]
        print(f"  factored field: {ms['deformation field [reference]'] / ms['deformation field']:.1f}x the reference "
              f"field; in half precision {ms['deformation field [reference]'] / ms['deformation field [half]']:.1f}x")
        hi = r["half_field_image"]
        print(f"  half-precision field ({hi['dtype']}) vs float32, posed + rasterised frame as uint8: "
              f"PSNR {hi['psnr_db']:.1f} dB, "
              f"max difference {hi['max_abs_255']:.0f}/255, {100 * hi['changed_values']:.2f} % of values changed")
        if "rasterisation [torch reference]" in ms:
            train_ratio = ms["training iteration [torch reference rasteriser]"] / ms["training iteration"]
            print(f"  compiled CPU compositor: {ms['rasterisation [torch reference]'] / ms['rasterisation']:.1f}x the "
                  f"PyTorch rasterisation, {train_ratio:.1f}x the training iteration")
        if "deformation field [compiled]" in r["ms"]:
            print(f"  compiled field: {r['ms']['deformation field'] / r['ms']['deformation field [compiled]']:.1f}x "
                  "the eager field")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "size": size,
                                      "results": results}, indent=2))
        print(f"\nwritten: {a.json}")


if __name__ == "__main__":
    main()
