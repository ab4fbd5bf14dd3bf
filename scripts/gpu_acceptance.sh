#!/usr/bin/env bash
# GPU acceptance run (benchmarks/gpu_acceptance.py: stages, report.md, results.json).
#
#   scripts/gpu_acceptance.sh --offline .whl [--out DIR] [options]   # a GPU machine without network
#   scripts/gpu_acceptance.sh [--with_vllm] [--skip_setup] [options] # a GPU machine with network
#   scripts/gpu_acceptance.sh --offline DIR --rehearse [options]     # the CPU rehearsal of the offline run
#
# --offline DIR: DIR is what scripts/gpu_wheels.sh built (run it where there is network): the wheels the machine's
#   python3 lacks, installed with `pip install --no-index --target /tmp/site` (--site elsewhere), and the data
#   (DIR/data). The checkout goes on PYTHONPATH and the machine's own python3 ($PYTHON) and torch run every stage:
#   no network, no Ray, no vLLM, no venv.
# --rehearse: on a CPU, with this checkout's .venv: its Python sees only the packages of the GPU machine
#   (scripts/device_packages.txt, via scripts/device_view.py) and the wheels; the stages run with --dry_run.
# Without --offline: scripts/setup.sh first (CUDA torch; vLLM's CUDA build with --with_vllm), then .venv/bin/python.
#
# On a lent GPU machine (the `device` tool: 15 minutes of device time in all, 10 per command; ignored paths travel
# only when named in carry, 64 MiB at most), after scripts/gpu_wheels.sh here, one call:
#   run(command="scripts/gpu_acceptance.sh --offline .whl --out $OUT", carry=[".whl"], timeout_s=540)
# It ends within 8 minutes (--budget_s 450 for the stages, ~15 s to install the wheels); report.md, results.json,
# loss.png and logs.tar.gz come back from $OUT. A second try runs only what failed: add --stages NAME,...
#
# Exit status: the Python script's (0 every check passed, 1 a check failed, 2 bad input).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

setup=1 offline="" site=/tmp/site rehearse=0
setup_args=() args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --with_vllm) setup_args+=(--vllm) ;;
        --skip_setup) setup=0 ;;
        --offline) offline=${2:?--offline needs the dir scripts/gpu_wheels.sh built}; shift; args+=(--offline "$offline") ;;
        --site) site=${2:?--site needs a dir}; shift ;;
        --rehearse) rehearse=1; args+=(--dry_run) ;;
        -h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; echo
                     [[ -x .venv/bin/python ]] && help_python=.venv/bin/python || help_python=python3
                     exec "${PYTHON:-$help_python}" benchmarks/gpu_acceptance.py --help ;;
        *) args+=("$1") ;;
    esac
    shift
done

if [[ -z $offline ]]; then
    [[ $rehearse == 1 ]] && { echo "scripts/gpu_acceptance.sh: --rehearse needs --offline DIR" >&2; exit 2; }
    [[ $setup == 1 ]] && scripts/setup.sh "${setup_args[@]}"
    exec .venv/bin/python benchmarks/gpu_acceptance.py "${args[@]}"
fi

ls "$offline"/*.whl >/dev/null 2>&1 || {
    echo "scripts/gpu_acceptance.sh: no wheels in --offline $offline; build them with scripts/gpu_wheels.sh" >&2; exit 2; }
if [[ $rehearse == 1 ]]; then
    [[ -x .venv/bin/python ]] || { echo "scripts/gpu_acceptance.sh: --rehearse needs .venv (scripts/setup.sh)" >&2; exit 2; }
    installer=.venv/bin/python
else
    installer=${PYTHON:-python3}
fi

# the wheels, once per set: a rerun on the same machine finds them installed
t0=$SECONDS
stamp=$site/.openllm-ds-wheels
wanted=$(cd "$offline" && ls -1 *.whl | sort)
if [[ ! -f $stamp || "$(cat "$stamp")" != "$wanted" ]]; then
    "$installer" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$offline"/*.whl
    echo "$wanted" >"$stamp"
fi
echo "[offline] $(echo "$wanted" | wc -l) wheels from $offline in $site ($((SECONDS - t0)) s)"

python=${PYTHON:-python3}
path_extra=""
if [[ $rehearse == 1 ]]; then  # a Python that sees only the GPU machine's packages
    view=$site.device-view
    .venv/bin/python scripts/device_view.py --out "$view" --only scripts/device_packages.txt --wheels "$offline"
    python=$view/venv/bin/python path_extra=":$view/lib"
fi
export PYTHONPATH="$site:$root$path_extra${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
exec "$python" benchmarks/gpu_acceptance.py "${args[@]}"
