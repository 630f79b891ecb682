#!/usr/bin/env bash
# Check, on a machine without a GPU, that gstalk's CUDA code compiles, before device time is
# spent on it:
#
#   scripts/build_cuda.sh            gstalk's CUDA extensions (hash grid, posing)
#   scripts/build_cuda.sh --gsplat   and gsplat 1.5.3's CUDA code too (11 min for arch 9.0 on 2 cores)
#
# It builds against a CUDA torch in its own venv (CUDA_VENV, default .venv-cuda; CUDA_TORCH,
# default torch==2.14.1, which this project's CPU machine has on local disk), with the CUDA
# toolkit that nvcc belongs to (CUDA_HOME, found from nvcc's real location when unset, as
# gstalk itself does) for TORCH_CUDA_ARCH_LIST (default 9.0, the H200). The objects are a
# compile check only: the GPU machine runs another torch (2.11), whose ABI they do not match,
# so it builds them again there (gstalk does, on first use). Prints what built and how long.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CUDA_VENV:-.venv-cuda}
TORCH=${CUDA_TORCH:-torch==2.14.1}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
command -v nvcc >/dev/null || { echo "build_cuda: no nvcc on PATH (install the CUDA toolkit)" >&2; exit 2; }
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -c "import torch, ninja" 2>/dev/null || "$VENV/bin/pip" install -q "$TORCH" ninja numpy
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=$(PYTHONPATH=. "$VENV/bin/python" -c "from gstalk.kernels.cuda import cuda_home; print(cuda_home() or '')")
  [ -n "$CUDA_HOME" ] || { echo "build_cuda: cannot find the CUDA toolkit of $(command -v nvcc); set CUDA_HOME" >&2; exit 2; }
  export CUDA_HOME
fi
"$VENV/bin/python" -c "import torch; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME $CUDA_HOME,', \
  f'arch $TORCH_CUDA_ARCH_LIST, {$MAX_JOBS} jobs')"
PYTHONPATH=. "$VENV/bin/python" - <<'EOF'
import shutil
import time
from pathlib import Path

from torch.utils.cpp_extension import load

from gstalk.kernels import CSRC
from gstalk.kernels.cuda import MODULES

failed = []
for name, sources in MODULES.items():
    build = Path(".cuda-build") / name
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        load(name=f"gstalk_{name}", sources=[str(CSRC / s) for s in sources], build_directory=str(build),
             extra_cuda_cflags=["-O3", "--use_fast_math"], verbose=False)
        print(f"{name}: built and loaded in {time.perf_counter() - t0:.0f} s ({build})")
    except Exception as e:
        failed.append(name)
        print(f"{name}: FAILED after {time.perf_counter() - t0:.0f} s: {str(e).strip()[-1500:]}")
raise SystemExit(1 if failed else 0)
EOF
if [ "${1:-}" = "--gsplat" ]; then
  # gsplat 1.5.3 ships its CUDA sources and compiles them on first import of its backend (its
  # wheel is pure Python): install it here and trigger that compile
  start=$(date +%s)
  "$VENV/bin/python" -c "import gsplat, packaging, jaxtyping" 2>/dev/null || "$VENV/bin/pip" install -q --no-deps gsplat==1.5.3 jaxtyping rich packaging
  export TORCH_EXTENSIONS_DIR=$PWD/.cuda-build/torch_extensions
  "$VENV/bin/python" -c "from gsplat.cuda._backend import _C; assert _C is not None, 'gsplat did not compile'"
  echo "gsplat: CUDA code built and loaded in $(( $(date +%s) - start )) s ($TORCH_EXTENSIONS_DIR)"
fi
