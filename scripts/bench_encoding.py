"""Hash-encoding speed: million encodings per second (forward, and forward+backward) for 100k
points, for each backend present (torch always; cpu = the compiled CPU kernel where it builds;
cuda = gstalk's kernels when a GPU is there). Prints the device
name.

    python scripts/bench_encoding.py [--points 100000] [--levels 16] [--log2-table 19]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gstalk.deform.hashgrid import HashGrid, TriPlane  # noqa: E402
from gstalk.eval.bench import device_name, time_it  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--levels", type=int, default=16)
    ap.add_argument("--log2-table", type=int, default=19)
    args = ap.parse_args()
    from gstalk.render import cpu_ext

    runs = [("torch", torch.device("cpu"))] + ([("cpu", torch.device("cpu"))] if cpu_ext.available() else [])
    if torch.cuda.is_available():
        runs += [("torch", torch.device("cuda")), ("cuda", torch.device("cuda"))]
    print("| encoding | backend | device | points | fwd M/s | fwd+bwd M/s |")
    print("|---|---|---|---:|---:|---:|")
    for kind in ("hash3d", "triplane"):
        for backend, dev in runs:
            if kind == "hash3d":
                enc = HashGrid(3, args.levels, 2, args.log2_table, 16, 2048, backend=backend).to(dev)
            else:
                enc = TriPlane(args.levels, 2, args.log2_table - 2, 16, 1024, backend=backend).to(dev)
            x = torch.rand(args.points, 3, device=dev)

            def fwd():
                with torch.no_grad():
                    enc(x)

            def fwd_bwd():
                enc(x).sum().backward()

            tf, tb = time_it(fwd, dev, 3, 1.0) / 1000, time_it(fwd_bwd, dev, 3, 1.0) / 1000
            print(f"| {kind} | {backend} | {device_name(dev)} | {args.points} | {args.points / tf / 1e6:.2f} | "
                  f"{args.points / tb / 1e6:.2f} |", flush=True)


if __name__ == "__main__":
    main()
