#!/usr/bin/env bash
# Install vllm-mlx 0.6.0 in a venv of its own, idempotently, and print the path of its
# `vllm-mlx` executable as the last line of stdout (everything else goes to stderr).
#
#   bash setup.sh [VENV_DIR]            # default: ~/.cache/mlxgate-bench/vllm-mlx
#   PYTHON=/path/to/python bash setup.sh  # interpreter to make the venv from
#                                         # (default: the checkout's .venv/bin/python, else python3)
#   VLLM_MLX_SETUP_LOCK=0 bash setup.sh   # resolve afresh instead of the pinned lock file
#
# A venv that already imports vllm_mlx 0.6.0 with a working mlx is left as it is (a second
# run takes about 2 s). Otherwise, in this order:
#   1. torch==2.13.0 first: on this kind of machine pip takes the CPU build from the local
#      wheel folder; any other torch request (vllm-mlx needs torchvision, which needs torch)
#      would fetch a CUDA build of several GB;
#   2. vllm-mlx and its dependencies, pinned by requirements-vllm.lock.txt (a `pip freeze`
#      of a venv that served the tiny model), constrained to torch 2.13.0 / torchvision
#      0.28.0 so nothing upgrades torch; vllm-mlx pins mlx-lm <0.32 (0.31.3);
#   3. mlx[cpu] on Linux: the plain `mlx` wheel vllm-mlx pulls has no CPU backend on Linux
#      (import fails: libmlx.so not found). On macOS plain mlx is the Metal build.
# Measured here (2 cores, shared): ~135 s (torch 37 s, vllm-mlx 95 s, mlx[cpu] 3 s), 2.1 GB.
# Known: `import torchvision` fails beside the CPU torch ("operator torchvision::nms does
# not exist"); vllm-mlx's text path (serve --continuous-batching) does not import it, its
# vision (MLLM) path would.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/mlxgate-bench/vllm-mlx}"
VERSION="0.6.0"
LOCK="$HERE/requirements-vllm.lock.txt"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$HERE/../../.venv/bin/python" ]]; then PYTHON="$HERE/../../.venv/bin/python"; else PYTHON=python3; fi
fi

log() { echo "setup.sh: $*" >&2; }

ready() {
  [[ -x "$VENV/bin/vllm-mlx" ]] || return 1
  "$VENV/bin/python" - "$VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
assert version("vllm-mlx") == sys.argv[1], version("vllm-mlx")
assert version("torch").startswith("2.13.0"), version("torch")
import mlx.core as mx
mx.eval(mx.ones(2) + 1)
import vllm_mlx  # noqa: F401
EOF
}

if ready; then
  log "vllm-mlx $VERSION already installed in $VENV"
  echo "$VENV/bin/vllm-mlx"
  exit 0
fi

started=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV from $PYTHON"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT

if [[ "$(uname -s)" == "Linux" ]]; then
  log "1/3 torch==2.13.0 (CPU build from the local wheels)"
  "${PIP[@]}" -q "torch==2.13.0" >&2
  printf 'torch==2.13.0\ntorchvision==0.28.0\n' >"$CONSTRAINTS"
else
  : >"$CONSTRAINTS"
fi

if [[ "${VLLM_MLX_SETUP_LOCK:-1}" != "0" && -f "$LOCK" && "$(uname -s)" == "Linux" ]]; then
  log "2/3 vllm-mlx==$VERSION from $(basename "$LOCK")"
  # torch in the lock carries the local version (+cpu): leave it to step 1
  grep -v -E '^(torch|mlx-cpu)==' "$LOCK" | "${PIP[@]}" -q -c "$CONSTRAINTS" -r /dev/stdin >&2 || {
    log "the lock did not install; resolving vllm-mlx==$VERSION afresh"
    "${PIP[@]}" -q -c "$CONSTRAINTS" "vllm-mlx==$VERSION" >&2
  }
else
  log "2/3 vllm-mlx==$VERSION"
  "${PIP[@]}" -q -c "$CONSTRAINTS" "vllm-mlx==$VERSION" >&2
fi

if [[ "$(uname -s)" == "Linux" ]]; then
  MLX_VERSION="$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("mlx"))')"
  log "3/3 mlx[cpu]==$MLX_VERSION (the CPU backend for Linux)"
  "${PIP[@]}" -q -c "$CONSTRAINTS" "mlx[cpu]==$MLX_VERSION" >&2
fi

if ! ready; then
  log "installed, but vllm-mlx does not import or mlx does not run in $VENV"
  exit 1
fi
log "done in $(( $(date +%s) - started )) s; $(du -sh "$VENV" | cut -f1) in $VENV"
echo "$VENV/bin/vllm-mlx"
