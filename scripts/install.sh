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
if ! .venv/bin/python -m pip install --disable-pip-version-check -e ".[train,test]" > .venv/pip.log 2>&1; then
  grep -v -E "^WARNING: Location .* is ignored" .venv/pip.log | tail -40 >&2
  echo "fedmq install failed (full log: .venv/pip.log)" >&2
  exit 1
fi
.venv/bin/python -c "import broker, paho.mqtt, amqtt, msgpack, peewee, flwr, torch, sklearn" \
  || { echo "fedmq install failed" >&2; exit 1; }
