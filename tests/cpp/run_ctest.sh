#!/usr/bin/env bash
# Configure, build (-j2) and run the C++ tests of csrc/ with ctest, against the torch installed in
# the Python environment: $PYTHON if set, else $DIVEBATCH_VENV/bin/python (as ./run uses), else
# the checkout's .venv, else python3 on PATH.
# Build directory: $DIVEBATCH_CMAKE_BUILD_DIR (default build/cmake), reused between runs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  VENV="${DIVEBATCH_VENV:-$ROOT/.venv}"
  [[ "$VENV" = /* ]] || VENV="$ROOT/$VENV"
  if [[ -x "$VENV/bin/python" ]]; then PY="$VENV/bin/python"; else PY="python3"; fi
fi
TORCH_PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
BUILD="${DIVEBATCH_CMAKE_BUILD_DIR:-$ROOT/build/cmake}"

cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX"
cmake --build "$BUILD" -j2
cd "$BUILD"
ctest --output-on-failure
