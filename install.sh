#!/usr/bin/env bash
# Install mlxgate into .venv next to this script and make it a service that starts at
# login (systemd user unit on Linux, LaunchAgent on macOS). Running it again updates in
# place; the flags given are what the service starts with.
#
# Usage: ./install.sh [flags]
#   --port N --https-port N --max-tokens N --default-model M --autocomplete-model M
#   --enable-https --ssl-domain DOMAIN --stand-in-any-key --use-sudo
#                          the service's `mlxgate start` flags (see the README)
#   --enable-port-forward  forward 443 on loopback to the HTTPS port (pf / nftables)
#   --forward-http         with --enable-port-forward: also 80 to the HTTP port
#   --trust-ca             add the local certificate authority to the system trust store
#   --enable-linger        Linux: run the service without a login (loginctl enable-linger)
#   --download-model M     download M first (progress bar); the default model unless named
#   --install-dependencies install the system packages the flags need (apt-get on Linux)
#   --no-service           everything but the boot service (CI, trying it out)
#   --vision               also the vision extra (mlx-vlm, ~680 MB): images, vision models
#                          (or MLXGATE_VISION=1 in the environment)
#   --quiet                less output from pip
#   --uninstall            remove the service, hosts line, forwarding, trust entry and
#                          runtime folder (keeps this folder: delete it to finish)
#   -h, --help             this text
# Steps that need root say what they will do and ask for sudo once; a failed step undoes
# what it changed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
service=1
quiet=""
vision="${MLXGATE_VISION:-0}"
uninstall=0
dependencies=0
download=""
forward=0
pass=()      # flags for `mlxgate service install`
while [ $# -gt 0 ]; do
  case "$1" in
    --no-service) service=0 ;;
    --quiet) quiet="-q" ;;
    --vision) vision=1 ;;
    --uninstall) uninstall=1 ;;
    --install-dependencies) dependencies=1 ;;
    --download-model) [ $# -ge 2 ] || { echo "install.sh: $1 needs a value" >&2; exit 2; }
                      download="$2"; shift ;;
    --enable-port-forward) forward=1; pass+=("$1") ;;
    --enable-https|--stand-in-any-key|--use-sudo|--forward-http|--trust-ca|--enable-linger) pass+=("$1") ;;
    --port|--https-port|--max-tokens|--default-model|--autocomplete-model|--ssl-domain)
      [ $# -ge 2 ] || { echo "install.sh: $1 needs a value" >&2; exit 2; }
      pass+=("$1" "$2"); shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

step() { printf '==> %s\n' "$*"; }
fail() { printf 'install.sh: step "%s" failed: %s\n' "$current" "$*" >&2; exit 1; }
current=""
trap 'rc=$?; [ $rc -ne 0 ] && [ -n "$current" ] && echo "install.sh: step \"$current\" failed (exit $rc); see the output above." >&2' EXIT

if [ "$uninstall" = 1 ]; then
  current="uninstall"
  [ -x .venv/bin/mlxgate ] || fail "no .venv/bin/mlxgate here: nothing of this checkout is installed"
  .venv/bin/mlxgate service uninstall
  current=""
  echo "mlxgate is uninstalled. This folder ($here: .venv, config/gateway.yaml, ssl/) is left; delete it to finish."
  exit 0
fi

if [ "$dependencies" = 1 ]; then
  current="install system packages"
  if command -v apt-get >/dev/null 2>&1; then
    packages="python3-venv ca-certificates"
    [ "$forward" = 1 ] && packages="$packages nftables"
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    step "installing $packages with apt-get (root: ${sudo:-already})"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq $packages >/dev/null
  elif [ "$(uname)" = Darwin ]; then
    step "macOS: pf, launchd and the keychain are part of the system; nothing to install"
  else
    fail "no apt-get here: install Python 3.11+ (with venv) and, for --enable-port-forward, nftables yourself"
  fi
fi

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
stamp=.venv/.installed-pyproject  # the pyproject.toml (and extras) the dependencies were installed from
extras="test"; [ "$vision" = 1 ] && extras="test,vision"
wanted="$(.venv/bin/python -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())') $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  step "dependencies are current (pyproject.toml unchanged since they were installed)"
else
  step "installing mlxgate and its dependencies into .venv (first run: a few minutes)"
  .venv/bin/python -m pip install $quiet --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install $quiet --disable-pip-version-check -e ".[$extras]"
  echo "$wanted" > "$stamp"
fi

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
from mlxgate.runtime_files import ensure_api_key
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

if [ -n "$download" ]; then
  current="download $download"
  .venv/bin/mlxgate download "$download"
  case " ${pass[*]:-} " in *" --default-model "*) ;; *) pass+=(--default-model "$download") ;; esac
fi

if [ "$service" = 1 ] || [ ${#pass[@]} -gt 0 ]; then
  current="set up the service and what it needs"
  noservice=(); [ "$service" = 1 ] || noservice=(--no-service)
  .venv/bin/mlxgate service install ${noservice[@]+"${noservice[@]}"} ${pass[@]+"${pass[@]}"}
fi

current=""
cat <<'NEXT'

mlxgate is installed. Next:
  .venv/bin/mlxgate status                          # the gateway and the boot service
  .venv/bin/mlxgate doctor                          # what is wrong, with the fix
  .venv/bin/mlxgate demo-model ~/models/tiny        # a tiny offline model to try the stack
  eval "$(.venv/bin/mlxgate env)"                   # point Anthropic/OpenAI clients at it
Tests: .venv/bin/python -m pytest
NEXT
