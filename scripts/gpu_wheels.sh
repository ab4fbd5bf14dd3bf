#!/usr/bin/env bash
# The offline bundle of the GPU acceptance run (scripts/gpu_acceptance.sh --offline DIR), built where there is network.
#
#   scripts/gpu_wheels.sh [--dest .whl] [--python_version 3.12] [--data small|tiny|none] [--squad_dir DIR] [--force]
#
# Wheels: what the stages import and the GPU machine's python3 lacks (scripts/device_packages.txt lists what it has),
# for CPython --python_version (default 3.12, the lent machines'; the CPU rehearsal takes this machine's) on
# manylinux x86_64, pinned to the versions this project is tested with: DeepSpeed, built here as a pure-Python wheel
# (its ops compile on first use, where needed; the trainer uses PyTorch's fused AdamW on GPUs), hjson, pydantic
# and pydantic-core, annotated-types, typing-inspection, typing-extensions (pydantic wants a newer one than some
# images have), zstandard, fastapi, starlette, uvicorn and opentelemetry-api (fastapi requires it).
# Data (--data PRESET, default small): `openllm-ds prepare` of --squad_dir (default $OPENLLM_SHARED_DATA/squad, else
# ../shared/data/squad) into DEST/data/clean and a tokenizer of the preset's vocabulary into DEST/data/tokenizer:
# `prepare` runs on Ray, which the GPU machine does not have; and the SQuAD v1.1 files the finetune stage reads
# (train*-v1.1*.json for `prepare-sft`, dev-v1.1.json for `squad_v1_chat`) into DEST/data/squad. --data none: wheels
# only.
# DEST (default .whl) is git-ignored; the script prints its size (a device call carries at most 64 MiB). A DEST
# whose MANIFEST says the same pins, Python and data is left as it is (--force rebuilds it).
set -euo pipefail
cd "$(dirname "$0")/.."

dest=.whl pyver=3.12 data=small force=0
squad_dir=${OPENLLM_SHARED_DATA:-../shared/data}/squad
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dest) dest=${2:?}; shift ;;
        --python_version) pyver=${2:?}; shift ;;
        --data) data=${2:?}; shift ;;
        --squad_dir) squad_dir=${2:?}; shift ;;
        --force) force=1 ;;
        -h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
        *) echo "scripts/gpu_wheels.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ $pyver =~ ^3\.[0-9]+$ ]] || { echo "scripts/gpu_wheels.sh: --python_version takes 3.N, got $pyver" >&2; exit 2; }
[[ $data == none || -f configs/$data.yaml ]] || {
    echo "scripts/gpu_wheels.sh: --data $data: no configs/$data.yaml (small, tiny, ... or none)" >&2; exit 2; }
[[ $data == none || -d $squad_dir ]] || {
    echo "scripts/gpu_wheels.sh: --squad_dir $squad_dir does not exist; pass a dir of SQuAD JSON files" >&2; exit 2; }
squad_files=()
if [[ $data != none ]]; then  # the finetune stage's SQuAD v1.1 files
    shopt -s nullglob
    squad_files=("$squad_dir"/train*v1.1*.json)
    shopt -u nullglob
    [[ ${#squad_files[@]} -ge 1 && -f $squad_dir/dev-v1.1.json ]] || {
        echo "scripts/gpu_wheels.sh: --squad_dir $squad_dir lacks train*v1.1*.json or dev-v1.1.json (the finetune" \
             "stage's data)" >&2; exit 2; }
    squad_files+=("$squad_dir/dev-v1.1.json")
fi

DEEPSPEED=deepspeed==0.19.8
BINARY=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 zstandard==0.25.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0
        opentelemetry-api==1.45.2)
PY=${PYTHON:-.venv/bin/python}
command -v "$PY" >/dev/null || PY=python3

manifest="python $pyver; $DEEPSPEED ${BINARY[*]}; data $data"
[[ $data == none ]] || manifest+=" with data/squad"
[[ $data == none ]] || manifest+=" from $(cd "$squad_dir" && pwd) ($(ls "$squad_dir" | tr '\n' ' '))"
if [[ $force == 0 && -f $dest/MANIFEST && "$(cat "$dest/MANIFEST")" == "$manifest" ]]; then
    echo "$dest is up to date ($manifest)"
else
    t0=$SECONDS
    rm -rf "$dest"/*.whl "$dest/data" "$dest/MANIFEST"
    mkdir -p "$dest"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${BINARY[@]}"
    # PyPI has DeepSpeed as source only: a wheel with no op built (DS_BUILD_OPS=0) holds only Python
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$dest" "$DEEPSPEED"
    ls "$dest"/deepspeed-*-py3-none-any.whl >/dev/null || {
        echo "scripts/gpu_wheels.sh: DeepSpeed's wheel is not pure Python: $(ls "$dest"/deepspeed-*)" >&2; exit 1; }
    echo "wheels in $((SECONDS - t0)) s"
    if [[ $data != none ]]; then
        t0=$SECONDS
        vocab=$("$PY" -c "import yaml, sys; print(yaml.safe_load(open(sys.argv[1]))['model']['vocab_size'])" \
            "configs/$data.yaml")
        log=$(mktemp)
        { "$PY" -m openllm_ds prepare --squad_dir "$squad_dir" --output_dir "$dest/data/clean" &&
          "$PY" -m openllm_ds train-tokenizer --input "$dest/data/clean/training_data.txt" --vocab_size "$vocab" \
              --output_dir "$dest/data/tokenizer"; } >"$log" 2>&1 || {
            tail -20 "$log" >&2; echo "scripts/gpu_wheels.sh: the data step failed (log above)" >&2; exit 1; }
        rm -f "$log"
        mkdir -p "$dest/data/squad"
        cp "${squad_files[@]}" "$dest/data/squad/"
        echo "data ($data preset: vocabulary $vocab) in $((SECONDS - t0)) s"
    fi
    echo "$manifest" >"$dest/MANIFEST"
fi
ls -1 "$dest"/*.whl | sed 's|.*/|  |'
bytes=$(du -sb "$dest" | cut -f1)
echo "$dest: $(ls "$dest"/*.whl | wc -l) wheels$([[ -d $dest/data ]] && echo " and data/"), $((bytes / 1048576)).$(((bytes % 1048576) * 10 / 1048576)) MiB in all (a device call carries at most 64 MiB)"
