#!/usr/bin/env bash
# Builds fedmq's wheel, installs it into a fresh virtualenv and runs it from an empty folder, as a
# user who never saw this repository would: fedmq --version, fedmq demo, fedmq dashboards --help.
# Proves the package carries what it needs at run time (examples, dashboards, mosquitto.conf).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$(mktemp -d "${TMPDIR:-/tmp}/fedmq-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
PY="${PYTHON:-python3}"
echo "== building the wheel" >&2
"$PY" -m pip wheel --disable-pip-version-check --no-deps -q . -w "$work/dist" 2>&1 | grep -v "^WARNING: Location" >&2 || true
wheel=$(ls "$work"/dist/fedmq-*.whl)
echo "== installing $(basename "$wheel")[train,plot] into a fresh virtualenv" >&2
"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --disable-pip-version-check -q "$wheel[train,plot]" > "$work/pip.log" 2>&1 \
  || { tail -30 "$work/pip.log" >&2; exit 1; }
mkdir "$work/empty" && cd "$work/empty"
"$work/venv/bin/python" -c "import sys, fedmq.cloud; assert 'broker' not in sys.modules" \
  || { echo "the wheel installed more than the fedmq namespace" >&2; exit 1; }
for top in broker cloud edge ftdl; do
  if "$work/venv/bin/python" -c "import $top" 2>/dev/null; then
    echo "the wheel installed a top-level package '$top'" >&2; exit 1
  fi
done
"$work/venv/bin/fedmq" --version
"$work/venv/bin/fedmq" dashboards --help > /dev/null
"$work/venv/bin/fedmq" demo --rounds 2
[ -f fedmq-demo/result.json ] || { echo "the demo wrote no result.json" >&2; exit 1; }
echo "== the wheel works from an empty folder ($repo)" >&2
