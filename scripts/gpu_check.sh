#!/usr/bin/env bash
# Run on a lent GPU machine, from the checkout's root, after scripts/gpu_kit.sh here (it gathers
# the wheels that machine lacks; nothing can be downloaded there). Steps, in the order given:
#
#   scripts/gpu_check.sh tests bench       carry .whl: the CUDA parity tests (with the CPU tests
#                                          of the same files) and scripts/bench.py --compile
#   scripts/gpu_check.sh fit               carry .whl-fit and .gpu: gstalk train on .gpu/ds at
#                                          512 px (timed; stopped with a checkpoint after
#                                          FIT_SECONDS, 540 s by default, and a re-run resumes),
#                                          then the avatar's render speed and half precision
#                                          (scripts/bench_precision.py) and gstalk render with
#                                          new audio
#
# The wheels are installed into /tmp/gstalk-site, which stays while the machine is warm, so a
# 'fit' call right after a 'tests bench' call finds the base kit there. What each step prints
# is also written to $OUT (the device tool's result folder; out/gpu without one).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
SITE=/tmp/gstalk-site
for kit in .whl .whl-fit; do
  if [ -d "$kit" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$kit"/*.whl \
      || { echo "gpu_check: installing $kit failed" >&2; exit 2; }
  fi
done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import tyro, gsplat, plyfile, av, kornia, librosa" 2>/dev/null; then
  echo "gpu_check: the base kit is missing: run scripts/gpu_kit.sh where pip can download and carry .whl" >&2
  exit 2
fi
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"; } 2>&1 | tee "$OUT/device.txt"
rc=0
for step in "$@"; do
  echo "== $step ($(date -u +%H:%M:%S))"
  case "$step" in
    tests)
      python3 -m pytest -q -rs -p no:cacheprovider tests/test_posing.py tests/test_deform.py tests/test_render.py \
        2>&1 | tee "$OUT/tests.txt"
      rc=$((rc | ${PIPESTATUS[0]})) ;;
    bench)
      python3 scripts/bench.py --compile --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench.txt"
      rc=$((rc | ${PIPESTATUS[0]})) ;;
    fit)
      [ -f .gpu/ds/track.npz ] || { echo "gpu_check: no .gpu/ds: run scripts/gpu_kit.sh DATASET and carry .gpu" >&2; exit 2; }
      python3 -c "import pocketsphinx" 2>/dev/null || { echo "gpu_check: carry .whl-fit (pocketsphinx)" >&2; exit 2; }
      av=out/gpu_fit/avatar
      t0=$(date +%s.%N)
      # Ctrl-C (SIGINT) makes the trainer save a checkpoint: sent before the device's 10-minute limit
      timeout -s INT "${FIT_SECONDS:-540}" python3 -m gstalk train .gpu/ds "$av" --device "${FIT_DEVICE:-cuda}" 2>&1 | tee -a "$OUT/fit.txt"
      st=${PIPESTATUS[0]}
      echo "train: exit $st after $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s (this call)" | tee -a "$OUT/fit.txt"
      if [ "$st" -ne 0 ]; then
        echo "gpu_check: training did not finish in this call; run 'fit' again to resume from its checkpoint" \
          | tee -a "$OUT/fit.txt"
        rc=1
        continue
      fi
      python3 scripts/bench_precision.py "$av" --frames 200 2>&1 | tee "$OUT/precision.txt"
      python3 -m gstalk render "$av" --audio .gpu/speech_radio_8s.wav --out "$OUT/render.mp4" 2>&1 | tee "$OUT/render.txt"
      python3 -m gstalk render "$av" --audio .gpu/speech_radio_8s.wav --out "$OUT/render_half.mp4" --precision half \
        --compile 2>&1 | tee -a "$OUT/render.txt" ;;
    *)
      echo "gpu_check: unknown step '$step' (tests, bench, fit)" >&2
      exit 2 ;;
  esac
done
exit $rc
