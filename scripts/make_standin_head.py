"""Generate gstalk's open stand-in head model into assets/flame/standin_head.npz.

    python scripts/make_standin_head.py [--out assets/flame/standin_head.npz]

Deterministic: the same installed mediapipe and scikit-image give the same file. The model
is gstalk's own (see gstalk/head/standin.py for how it is built); it is not FLAME.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from standin_builder import build_standin  # noqa: E402
from gstalk.io.atomic import write_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets/flame/standin_head.npz")
    args = ap.parse_args()
    d = build_standin()
    arrays = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float64 else v)
              for k, v in d.items()}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes(args.out, buf.getvalue())
    print(f"wrote {args.out}: {len(d['v_template'])} vertices, {len(d['f'])} triangles, "
          f"{int(d['n_shape'])} identity + {d['shapedirs'].shape[2] - int(d['n_shape'])} expression directions")


if __name__ == "__main__":
    main()
