#!/usr/bin/env bash
# gstalk's one entry point for a fresh checkout. It creates .venv/ in the checkout,
# installs gstalk and what it needs (once; again only when pyproject.toml changes),
# then runs:
#   ./run.sh demo [options]    the built-in demo (gstalk demo --help for options)
#   ./run.sh test [pytest args] the test suite
#   ./run.sh gstalk VERB ...    any gstalk command
# On a machine without an NVIDIA GPU it installs the CPU build of torch 2.13.0 and never
# CUDA wheels. With a GPU, install a CUDA build of torch 2.13.0 into .venv first (README).
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY=${PYTHON:-python3}
stamp() { cat pyproject.toml run.sh viewer/package-lock.json | sha256sum | cut -d' ' -f1; }

install() {
  # A full disk makes pip stop half-way with "[Errno 28] No space left on device"; say so
  # first. The CPU install takes about 3 GB (torch, mediapipe with jaxlib, OpenCV, ffmpeg).
  # (An update of an existing .venv needs far less.)
  local free_mb need_mb=3500
  [ -x "$VENV/bin/python" ] && need_mb=1000
  free_mb=$(df -Pm . | awk 'NR == 2 {print $4}')
  if [ -n "$free_mb" ] && [ "$free_mb" -lt "$need_mb" ]; then
    echo "run.sh: only ${free_mb} MB free on the disk holding $(pwd); installing gstalk into $VENV needs about ${need_mb} MB. Free some space and run it again." >&2
    exit 1
  fi
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  local pip=("$VENV/bin/python" -m pip)
  "${pip[@]}" install -q --upgrade pip >/dev/null
  if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "run.sh: NVIDIA GPU found: installing torch 2.13.0 (CUDA build from the default index)" >&2
      "${pip[@]}" install -q torch==2.13.0
    else
      echo "run.sh: no GPU: installing the CPU build of torch 2.13.0" >&2
      local cpu_index=https://download.pytorch.org/whl/cpu extra=()
      # Use PyTorch's CPU-only index where it is reachable; where it is not (a mirror or
      # a local wheel provides torch), the +cpu local wheel is picked all the same.
      if command -v curl >/dev/null 2>&1 && curl -sfI -m 5 "$cpu_index/torch/" >/dev/null 2>&1; then
        extra=(--extra-index-url "$cpu_index")
      fi
      "${pip[@]}" install -q "${extra[@]}" torch==2.13.0
      if "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then
        echo "run.sh: warning: the torch installed is a CUDA build on a machine without a GPU" >&2
      fi
    fi
  fi
  "${pip[@]}" install -q -e ".[test,reference,batch]"
  # The web player's libraries (three.js, Spark) at the versions viewer/package-lock.json pins,
  # for `gstalk export --format web`; without npm that one format says how to get them.
  if command -v npm >/dev/null 2>&1; then
    npm ci --prefix viewer --no-audit --no-fund --silent || echo "run.sh: warning: npm ci in viewer/ failed; gstalk export --format web needs it" >&2
  else
    echo "run.sh: npm not found: gstalk export --format web needs 'npm ci' in viewer/ (everything else works)" >&2
  fi
  stamp > "$VENV/.gstalk-installed"
}

if [ ! -f "$VENV/.gstalk-installed" ] || [ "$(cat "$VENV/.gstalk-installed")" != "$(stamp)" ]; then
  echo "run.sh: installing gstalk into $VENV (first run or dependencies changed) ..." >&2
  install
fi

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo) exec "$VENV/bin/gstalk" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest -q "$@" ;;
  gstalk) exec "$VENV/bin/gstalk" "$@" ;;
  *) echo "usage: ./run.sh demo [options] | ./run.sh test [pytest args] | ./run.sh gstalk VERB ..." >&2; exit 2 ;;
esac
