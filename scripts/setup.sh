#!/usr/bin/env bash
# Create .venv (if needed) and install fc2conv with its test tools. Idempotent.
# torch is installed first, pinned to the CPU build: a bare "torch" requirement with no torch
# installed would pull a multi-GB CUDA build. Override with FC2CONV_TORCH_SPEC="torch==X".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c 'import torch, sys; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 4))' 2>/dev/null; then
  echo "setup: installing ${FC2CONV_TORCH_SPEC:-torch==2.13.0} (CPU build)"
  "$VPY" -m pip install --quiet --disable-pip-version-check "${FC2CONV_TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
  "$VPY" -c 'import torch' # fail here, loudly, if torch did not install
fi
echo "setup: installing fc2conv and its dependencies"
"$VPY" -m pip install --quiet --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
"$VPY" -c 'import fc2conv, onnx, onnxruntime, onnx_ir, hypothesis' # fail loudly if anything is missing
echo "setup: ready ($("$VPY" -c 'import torch, fc2conv; print(f"fc2conv {fc2conv.__version__}, torch {torch.__version__}")'))"
