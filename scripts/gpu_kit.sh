#!/usr/bin/env bash
# Run here, where pip can download: gather what scripts/gpu_check.sh needs on a lent GPU machine,
# whose image has python3.12, a CUDA torch, numpy, scipy, scikit-learn, numba, opencv,
# scikit-image, rich, safetensors, jaxtyping, ninja and pytest, and which cannot download.
#
#   scripts/gpu_kit.sh [TRACKED_DATASET]
#
# .whl/      the wheels the image lacks for the tests and benchmarks (about 52 MB)
# .whl-fit/  pocketsphinx, for training with phone features there (about 29 MB)
# .gpu/      with a dataset given: a copy of it without its preview videos, and the shared
#            data's speech_radio_8s.wav to drive the avatar with
# All three are in .gitignore. The device tool carries at most 64 MiB a call, so the tests and
# benchmarks carry .whl, and the fit carries .whl-fit and .gpu (docs/benchmarks.md).
# Versions are the ones gstalk is tested with here. PY312 names a Python 3.12 to build
# pocketsphinx's wheel with (it is published as source for Python 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${PY312:-}" ]; then
  for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python; do
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY312=$c; break; fi
  done
fi
[ -n "${PY312:-}" ] || { echo "gpu_kit: no Python 3.12 found to build pocketsphinx's wheel: set PY312" >&2; exit 2; }
rm -rf .whl .whl-fit && mkdir -p .whl .whl-fit
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64)
"$PY" -m pip download -q --no-deps "${plat[@]}" -d .whl \
  tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.0 plyfile==1.1.5 \
  librosa==0.11.0 audioread==3.1.0 soxr==1.1.0 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 \
  pooch==1.9.0 platformdirs==4.14.5 decorator==5.3.1 av==18.1.0 kornia==0.9.0 kornia_rs==0.2.0
# gsplat is published as source only: its wheel is pure Python when built without CUDA (its
# CUDA code is compiled on first use on the GPU machine, with the nvcc and ninja there)
BUILD_NO_CUDA=1 "$PY" -m pip wheel -q --no-deps --no-build-isolation gsplat==1.5.3 -w .whl
"$PY312" -m pip wheel -q --no-deps pocketsphinx==5.1.1 sounddevice==0.5.6 -w .whl-fit
if [ $# -ge 1 ]; then
  rm -rf .gpu && mkdir -p .gpu
  [ -f "$1/track.npz" ] || { echo "gpu_kit: $1 is not a tracked dataset (no track.npz)" >&2; exit 2; }
  cp -r "$1" .gpu/ds && rm -f .gpu/ds/preview.mp4 .gpu/ds/track_preview.mp4
  [ -f ../shared/data/speech_radio_8s.wav ] && cp ../shared/data/speech_radio_8s.wav .gpu/
fi
du -sh .whl .whl-fit .gpu 2>/dev/null
