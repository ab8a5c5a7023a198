#!/usr/bin/env bash
# Install mlxgate into .venv next to this script. Safe to run again: each step only
# does what is missing. Usage: ./install.sh [--no-service] [--quiet]
#   --no-service  do everything except registering the boot service
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
service=1
quiet=""
for arg in "$@"; do
  case "$arg" in
    --no-service) service=0 ;;
    --quiet) quiet="-q" ;;
    -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done

step() { printf '==> %s\n' "$*"; }
fail() { printf 'install.sh: step "%s" failed: %s\n' "$current" "$*" >&2; exit 1; }
current=""
trap 'rc=$?; [ $rc -ne 0 ] && [ -n "$current" ] && echo "install.sh: step \"$current\" failed (exit $rc); see the output above." >&2' EXIT

current="find Python 3.11+"
python=""
for candidate in python3.13 python3.12 python3.11 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    python="$(command -v "$candidate")"; break
  fi
done
[ -n "$python" ] || fail "no Python 3.11 or newer on PATH; install one (e.g. 'brew install python@3.12' or 'apt-get install python3.11') and run ./install.sh again"
step "using $python ($("$python" --version 2>&1))"

current="create .venv"
if [ ! -x .venv/bin/python ]; then
  step "creating .venv"
  "$python" -m venv .venv || fail "python -m venv failed; on Debian/Ubuntu install python3-venv"
else
  step ".venv exists"
fi

current="install mlxgate and its dependencies"
step "installing mlxgate and its dependencies into .venv (first run: a few minutes)"
.venv/bin/python -m pip install $quiet --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install $quiet --disable-pip-version-check -e ".[test]"

current="write config/gateway.yaml"
if [ ! -f config/gateway.yaml ]; then
  cp config/gateway.example.yaml config/gateway.yaml
  step "wrote config/gateway.yaml from config/gateway.example.yaml"
else
  step "config/gateway.yaml exists; left as it is"
fi

current="make the API key"
.venv/bin/python - <<'PY' || fail "could not write the API key file"
from mlxgate.config import runtime_home
from mlxgate.supervision.control import ensure_api_key
import os
home = runtime_home()
if os.environ.get("MLXGATE_API_KEY"):
    print("==> API key: MLXGATE_API_KEY is set; using it")
else:
    existed = (home / "api_key").is_file()
    ensure_api_key(home)
    print(f"==> API key: {home / 'api_key'} ({'kept' if existed else 'made'}, mode 600)")
PY

current="check the install"
.venv/bin/mlxgate --version >/dev/null || fail "the mlxgate command does not run"
LITELLM_LOCAL_MODEL_COST_MAP=True .venv/bin/python -c 'import mlx.core, mlx_lm, litellm' || fail "a dependency does not import"

current=""
if [ "$service" = 1 ]; then
  echo "note: registering the boot service is not available yet; mlxgate runs in the foreground."
fi
cat <<'NEXT'

mlxgate is installed. Next:
  .venv/bin/mlxgate demo-model ~/models/tiny        # a tiny offline model to try the stack
  .venv/bin/mlxgate start --default-model tiny      # run the gateway (or a model of yours)
  eval "$(.venv/bin/mlxgate env)"                   # point Anthropic/OpenAI clients at it
Tests: .venv/bin/python -m pytest
NEXT
