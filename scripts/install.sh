#!/usr/bin/env bash
# Installs fedmq from this repository's own files.
#
#   bash scripts/install.sh          what the demo needs, nothing more: a virtualenv in .venv with
#                                    fedmq and its training and plot extras (torch 2.13 CPU, Flower,
#                                    scikit-learn, matplotlib). The demo runs on the embedded broker.
#   bash scripts/install.sh --test   all that, plus what the test suite needs: the test extras,
#                                    Mosquitto and its clients, Chromium and Node.js (Debian
#                                    packages) and Node-RED with the dashboard nodes (npm ci).
#
# System packages are installed with apt-get as root, or through sudo where it exists. Where they
# cannot be installed, it says so and goes on with what works: the tests that need a missing
# program are skipped and say why.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=demo
case "${1:-}" in
  "") ;;
  --test) profile=test ;;
  *) echo "usage: bash scripts/install.sh [--test]" >&2; exit 2 ;;
esac

say() { echo "== $*" >&2; }

# --- Python and the virtualenv --------------------------------------------------------------
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY="$candidate"; break
    fi
  done
fi
[ -n "$PY" ] || { echo "fedmq needs Python >= 3.11" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv

extras="train,plot"
[ "$profile" = test ] && extras="train,plot,test"
say "installing fedmq[$extras] into .venv"
pip_install() {
  if ! .venv/bin/python -m pip install --disable-pip-version-check "$@" >> .venv/pip.log 2>&1; then
    grep -v -E "^WARNING: Location .* is ignored" .venv/pip.log | tail -40 >&2
    echo "fedmq install failed (full log: .venv/pip.log)" >&2
    exit 1
  fi
}
: > .venv/pip.log
pip_install -e ".[$extras]"
# amqtt 0.11 pins typer==0.15.4 for its own command-line tools, which fedmq never runs; Flower's
# CLI (`flwr`) needs typer's Literal support (>= 0.17) and < 0.21. fedmq's own CLI works with both.
pip_install "typer==0.20.1"
.venv/bin/python -c "import broker, amqtt.broker, paho.mqtt, msgpack, peewee, flwr, torch, sklearn, matplotlib" \
  || { echo "fedmq install failed: a required package does not import" >&2; exit 1; }
.venv/bin/flwr --help >/dev/null || { echo "the Flower CLI does not run (flwr --help)" >&2; exit 1; }
[ "$profile" = demo ] && exit 0

# --- system packages for the tests -----------------------------------------------------------
if [ "$(id -u)" = 0 ]; then as_root() { "$@"; }
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then as_root() { sudo "$@"; }
else as_root() { return 1; }
fi

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} (Debian packages)"
  if ! { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -qq "${missing[@]}" >/dev/null; }; then
    echo "!! could not install ${missing[*]} (needs root or sudo). Going on: tests on Mosquitto," >&2
    echo "!! the dashboards' browser test and Node-RED are skipped where their program is missing." >&2
  fi
  # Debian's mosquitto package starts a system broker on 1883; fedmq never uses it.
fi

if command -v npm >/dev/null 2>&1 && [ ! -f dashboards/node_modules/node-red/red.js ]; then
  say "installing Node-RED and the dashboard nodes (npm ci in dashboards/)"
  (cd dashboards && npm ci --no-audit --no-fund --loglevel=error >/dev/null) \
    || { echo "npm could not install Node-RED in dashboards/" >&2; exit 1; }
fi
