#!/usr/bin/env bash
# mypy over the fedmq namespace as it is installed (fedmq.broker is broker/, ...): mypy cannot
# follow setuptools' package-dir mapping, so it checks a tree of links laid out like the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=.mypy-tree
rm -rf "$tree" && mkdir -p "$tree/fedmq"
for entry in fedmq/*; do ln -s "$PWD/$entry" "$tree/fedmq/"; done
for folder in broker cloud edge ftdl; do ln -s "$PWD/$folder" "$tree/fedmq/$folder"; done
cd "$tree" && ../.venv/bin/python -m mypy --config-file ../pyproject.toml "$@" fedmq
