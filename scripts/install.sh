#!/usr/bin/env bash
# Installs fedmq and everything its demo and tests need, from this repository's own files:
# a virtualenv in .venv with the package (training and test extras), and Mosquitto if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ] \
   || ! command -v mosquitto_pub >/dev/null 2>&1; then
  echo "== installing mosquitto and mosquitto-clients (Debian packages)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
  # The package starts a system broker on 1883; fedmq never uses it (it starts its own on free ports).
fi

# The dashboards' test drives headless Chromium; the dashboards need Node.js and npm.
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium (Debian package, for the dashboards' browser test)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "== installing nodejs and npm (Debian packages, for Node-RED)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi

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
echo "== installing fedmq into .venv"
if ! .venv/bin/python -m pip install --disable-pip-version-check -e ".[train,test,postgres,plot]" > .venv/pip.log 2>&1; then
  grep -v -E "^WARNING: Location .* is ignored" .venv/pip.log | tail -40 >&2
  echo "fedmq install failed (full log: .venv/pip.log)" >&2
  exit 1
fi
.venv/bin/python -c "import broker, paho.mqtt, amqtt, msgpack, peewee, flwr, torch, sklearn" \
  || { echo "fedmq install failed" >&2; exit 1; }

if [ ! -f dashboards/node_modules/node-red/red.js ]; then
  echo "== installing Node-RED and the dashboard nodes (npm ci in dashboards/)"
  (cd dashboards && npm ci --no-audit --no-fund --loglevel=error >/dev/null) \
    || { echo "npm could not install Node-RED in dashboards/" >&2; exit 1; }
fi
