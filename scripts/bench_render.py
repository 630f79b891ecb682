"""Rasterizer speed: ms per frame, forward and forward+backward, for each backend here.

    python scripts/bench_render.py                    # 1k/10k/100k Gaussians at 128/256/512 px
    python scripts/bench_render.py --counts 1000 10000 --sizes 128 --json out.json

Backends: 'gsplat' (CUDA only), 'cpu' (the compiled CPU compositor, csrc/raster_cpu.cpp)
and 'torch' (the PyTorch reference; on the GPU when one is present). The scene is N
random Gaussians filling a sphere in front of the camera, sized so that coverage per pixel
stays similar as N grows. Prints a table with
the device name; numbers are medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gstalk.gaussians import GaussianSet  # noqa: E402
from gstalk.eval.bench import device_name, time_it  # noqa: E402
from gstalk.errors import InputError  # noqa: E402
from gstalk.render import orbit_cameras, rasterize, select_backend  # noqa: E402


def scene(n: int, device: torch.device) -> GaussianSet:
    g = torch.Generator().manual_seed(0)
    d = torch.randn(n, 3, generator=g)
    r = torch.rand(n, 1, generator=g) ** (1 / 3)
    means = d / d.norm(dim=-1, keepdim=True) * r * 0.5
    s = 0.5 * 1.6 / n ** (1 / 3)  # about the spacing between neighbours
    gs = GaussianSet(
        means=means,
        quats=torch.randn(n, 4, generator=g),
        log_scales=torch.log(torch.rand(n, 3, generator=g) * s + 0.2 * s),
        opacity_logits=torch.randn(n, generator=g),
        sh=torch.randn(n, 16, 3, generator=g) * 0.3,
    )
    return gs.to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--backends", nargs="+", default=None, help="default: every backend present")
    ap.add_argument("--sh-degree", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="minimum repeats per cell")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per cell beyond the minimum repeats")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    from gstalk.render import cpu_ext

    backends = args.backends or (["gsplat"] if cuda else []) + (["cpu"] if cpu_ext.available() else []) + ["torch"]
    rows = []
    for backend in backends:
        device = torch.device("cuda" if backend == "gsplat" or (cuda and backend == "torch") else "cpu")
        try:
            select_backend(backend, device)
        except InputError as e:
            sys.exit(f"bench_render: {e}")
        name = device_name(device)
        for n in args.counts:
            g = scene(n, device)
            for size in args.sizes:
                cams = orbit_cameras(1, 2.2, size, size, fov_y_deg=35.0).to(device)

                def fwd():
                    with torch.no_grad():
                        rasterize(g, cams, sh_degree=args.sh_degree, backend=backend, background=1.0)

                params = g.detach().to(device)
                params.optimizable()

                def fwd_bwd():
                    out = rasterize(params, cams, sh_degree=args.sh_degree, backend=backend, background=1.0)
                    out.colors.sum().backward()

                row = {"backend": backend, "device": name, "gaussians": n, "size": size,
                       "forward_ms": time_it(fwd, device, args.reps, args.budget),
                       "fwd_bwd_ms": time_it(fwd_bwd, device, args.reps, args.budget)}
                rows.append(row)
                print(f"{backend:7s} {n:>7d} {size:>4d}px  fwd {row['forward_ms']:9.1f} ms  "
                      f"fwd+bwd {row['fwd_bwd_ms']:9.1f} ms   [{name}]", flush=True)

    print()
    print(f"torch {torch.__version__}, SH degree {args.sh_degree}")
    print("| backend | device | Gaussians | size | forward ms | fwd+bwd ms | forward fps |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backend']} | {r['device']} | {r['gaussians']} | {r['size']} | {r['forward_ms']:.1f} | "
              f"{r['fwd_bwd_ms']:.1f} | {1000 / r['forward_ms']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
