#!/usr/bin/env bash
# The Python client's test suite, as ctest runs it (entry python_client_test, label fast):
# a venv under the build dir gets numpy/pytest/nanobind/scikit-build-core from PyPI (once),
# `pip install client/python` builds the extension (incremental build dir beside the venv),
# and pytest runs client/python/tests against BUILD_DIR/bin/kvmemd.
#   scripts/test-python.sh [BUILD_DIR]      (default: build)
# PYTHON picks the interpreter the venv is made from (default: python3).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BUILD_DIR=$(cd "${1:-$REPO/build}" && pwd)
VENV=$BUILD_DIR/pyenv
PY=${PYTHON:-python3}

if [[ ! -x $VENV/bin/python ]]; then
  "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
if ! "$VPY" -c 'import numpy, pytest, nanobind, scikit_build_core' 2>/dev/null; then
  "$VPY" -m pip install -q --disable-pip-version-check \
    "numpy>=1.22" "pytest>=7" "nanobind>=2,<3" "scikit-build-core>=0.8"
fi
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} "$VPY" -m pip install -q \
  --disable-pip-version-check --no-build-isolation --no-deps \
  -C build-dir="$BUILD_DIR/python-ext" "$REPO/client/python"

cd "$REPO/client/python/tests"
KVMEMD=${KVMEMD:-$BUILD_DIR/bin/kvmemd} exec "$VPY" -m pytest -q -p no:cacheprovider .
