#!/usr/bin/env bash
# Create .venv and install openllm-ds with its test extras.
#
# PyTorch is installed first, so that pip keeps that build for everything else:
#   - default: torch==2.13.0 from your pip configuration (PyPI gives the CUDA build on Linux;
#     a machine with a local CPU wheel in pip's find-links gets that one);
#   - CPU-only machine with internet: OPENLLM_TORCH_INDEX=https://download.pytorch.org/whl/cpu
#   - an existing torch in the venv is kept.
# Extra pip arguments for the package (e.g. ".[test,vllm]") go in OPENLLM_EXTRAS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    if [ -n "${OPENLLM_TORCH_INDEX:-}" ]; then
        python -m pip install -q "torch==${OPENLLM_TORCH_VERSION:-2.13.0}" --index-url "$OPENLLM_TORCH_INDEX"
    else
        python -m pip install -q "torch==${OPENLLM_TORCH_VERSION:-2.13.0}"
    fi
fi
python -m pip install -q -e "${OPENLLM_EXTRAS:-.[test]}"
python -c "import torch, deepspeed, ray; print(f'torch {torch.__version__} (cuda: {torch.cuda.is_available()}), deepspeed {deepspeed.__version__}, ray {ray.__version__}')"
