#!/usr/bin/env bash
# GPU acceptance run: scripts/setup.sh (CUDA torch; vLLM's CUDA build with --with_vllm), then
# benchmarks/gpu_acceptance.py with the other arguments; report in runs/gpu_acceptance/report.md.
#
#   scripts/gpu_acceptance.sh [--with_vllm] [--skip_setup] [benchmarks/gpu_acceptance.py options]
#   scripts/gpu_acceptance.sh --skip_setup --dry_run      # the CPU rehearsal (CI runs it)
#
# Exit status: the Python script's (0 every check passed, 1 a check failed, 2 bad input).
set -euo pipefail
cd "$(dirname "$0")/.."

setup=1
setup_args=()
args=()
for arg in "$@"; do
    case "$arg" in
        --with_vllm) setup_args+=(--vllm) ;;
        --skip_setup) setup=0 ;;
        -h | --help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exec .venv/bin/python benchmarks/gpu_acceptance.py --help ;;
        *) args+=("$arg") ;;
    esac
done

if [[ $setup == 1 ]]; then
    scripts/setup.sh "${setup_args[@]}"
fi
exec .venv/bin/python benchmarks/gpu_acceptance.py "${args[@]}"
