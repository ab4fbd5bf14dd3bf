"""What the GPU paths read off the machine, tested with a fake nvidia-smi: GPUs matched by UUID (not nvidia-smi's
index), MIG slices, `[N/A]` fields; scripts/setup.sh's torch build for the driver and its CUDA check; the acceptance
report with non-finite losses; vLLM's dtype; the serving comparison's sides."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openllm_ds.serve.vllm import vllm_command, vllm_dtype

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

FAKE_SMI = """#!/bin/sh
# nvidia-smi as a machine with 4 GPUs, the last split into MIG slices; FAKE_MEM: memory.used per GPU
case "$*" in
  -L) cat <<EOF
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-11111111-1111-1111-1111-111111111111)
GPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-22222222-2222-2222-2222-222222222222)
GPU 3: NVIDIA H100 80GB HBM3 (UUID: GPU-33333333-3333-3333-3333-333333333333)
  MIG 1g.10gb     Device  0: (UUID: MIG-aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa)
EOF
  ;;
  *memory.used*) i=0; for m in ${FAKE_MEM:-100 200 300 [N/A]}; do echo "GPU-$i$i$i$i$i$i$i$i-$i$i$i$i-$i$i$i$i-$i$i$i$i-$i$i$i$i$i$i$i$i$i$i$i$i, $m"; i=$((i+1)); done ;;
  *driver_version,clocks*) for i in 0 1 2 3; do
      mig=Disabled; [ $i = 3 ] && mig=Enabled
      echo "GPU-$i$i$i$i$i$i$i$i-$i$i$i$i-$i$i$i$i-$i$i$i$i-$i$i$i$i$i$i$i$i$i$i$i$i, $i, ${FAKE_DRIVER:-580.159.04}, 1980, [N/A], $mig"
    done ;;
  *driver_version*) echo "${FAKE_DRIVER:-580.159.04}" ;;
  "") echo "| NVIDIA-SMI ${FAKE_DRIVER:-580.159.04}   Driver Version: ${FAKE_DRIVER:-580.159.04}   CUDA Version: ${FAKE_CUDA:-13.0} |" ;;
  *) exit 9 ;;
esac
"""


@pytest.fixture()
def fake_smi(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


def uuid(i: int) -> str:
    d = str(i)
    return f"GPU-{d * 8}-{d * 4}-{d * 4}-{d * 4}-{d * 12}"


def test_gpus_are_nvidia_smis_by_uuid_under_a_device_subset_and_mig(fake_smi):
    from gpu_acceptance_machine import describe_gpus

    # CUDA_VISIBLE_DEVICES=2,1 (the probe's view): CUDA's 0 is nvidia-smi's 2; the third is a MIG slice of GPU 3
    probed = [{"cuda_index": 0, "uuid": uuid(2), "name": "NVIDIA H100 80GB HBM3"},
              {"cuda_index": 1, "uuid": uuid(1), "name": "NVIDIA H100 80GB HBM3"},
              {"cuda_index": 2, "uuid": "MIG-aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa", "name": "H100 MIG 1g.10gb"}]
    gpus = describe_gpus(probed)
    assert [g["smi_index"] for g in gpus] == ["2", "1", "3"]
    assert gpus[0]["driver"] == "580.159.04" and gpus[0]["max_sm_clock_mhz"] == 1980.0
    assert gpus[0]["power_limit_w"] is None  # [N/A]
    assert gpus[2]["mig_parent"] == uuid(3) and "mig_parent" not in gpus[0]


def test_gpu_memory_reads_its_own_gpus_and_survives_na(fake_smi, monkeypatch):
    from gpu_acceptance_machine import GpuMemory, smi_number

    assert smi_number("[N/A]") is None and smi_number("[Not Supported]") is None and smi_number(" 12 ") == 12.0
    monkeypatch.setenv("FAKE_MEM", "100 200 300 400")
    with GpuMemory([uuid(2), uuid(1)]) as mem:
        assert mem.before == 500.0  # GPUs 2 and 1 by UUID, not the first two indices
        monkeypatch.setenv("FAKE_MEM", "100 1200 2300 400")
        time.sleep(1.3)
    assert mem.peak_mib == 3000.0 and mem.why is None
    monkeypatch.setenv("FAKE_MEM", "100 200 300 [N/A]")
    with GpuMemory([uuid(3)]) as na:
        pass
    assert na.peak_mib is None and "no memory.used" in na.why
    with GpuMemory(["MIG-aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa"]) as mig:
        pass
    assert mig.peak_mib is None and mig.why.startswith("MIG slice")


def setup_sh(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts/setup.sh"), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("cuda, index", [("13.0", None), ("12.9", "cu128"), ("12.8", "cu128"), ("12.4", "cu126"),
                                         ("12.0", "cu126")])
def test_setup_picks_the_torch_build_the_driver_runs(fake_smi, cuda, index):
    p = setup_sh("--print_torch", env={"FAKE_CUDA": cuda})
    assert p.returncode == 0, p.stderr
    want = "pip install torch==2.13.0" + (f" --index-url https://download.pytorch.org/whl/{index}" if index else "")
    assert p.stdout.strip() == want
    assert setup_sh("--print_torch", env={"FAKE_CUDA": cuda, "OPENLLM_TORCH_INDEX": "https://x/cpu"}).stdout.strip() \
        == "pip install torch==2.13.0 --index-url https://x/cpu"


def test_setup_refuses_a_driver_too_old_and_a_torch_that_cannot_see_the_gpu(fake_smi):
    old = setup_sh("--print_torch", env={"FAKE_CUDA": "11.8", "FAKE_DRIVER": "520.61.05"})
    assert old.returncode == 2 and old.stdout == ""
    assert "driver 520.61.05 supports CUDA 11.8" in old.stderr and "update the driver" in old.stderr
    # .venv's torch is the CPU build: on a machine with a GPU the check fails, naming both sides
    check = setup_sh("--check_cuda", env={"FAKE_CUDA": "12.2", "FAKE_DRIVER": "535.104.05"})
    assert check.returncode == 1
    assert "lists 4 GPU(s) (driver 535.104.05, CUDA 12.2)" in check.stderr
    assert "torch.version.cuda None) cannot use them" in check.stderr


def test_setup_without_a_gpu_takes_the_default_torch(tmp_path):
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}  # no nvidia-smi
    assert setup_sh("--print_torch", env=env).stdout.strip() == "pip install torch==2.13.0"
    check = setup_sh("--check_cuda", env=env)
    assert check.returncode == 0 and "no NVIDIA GPU" in check.stdout


def results_with_nan() -> dict:
    rows = [{"step": 1, "train/loss": 9.0, "train/loss_scale": 65536.0, "perf/tokens_per_s": 1000.0},
            {"step": 2, "train/loss": "nan", "train/loss_scale": 32768.0, "perf/tokens_per_s": 1100.0},
            {"step": 3, "train/loss": "inf", "train/loss_scale": 16384.0, "perf/tokens_per_s": 1200.0}]
    run = {"name": "small-fp16-zero2-ckpt", "preset": "small", "precision": "fp16", "checkpointing": True,
           "compile": False, "gpus": 1, "steps": 3, "ok": True, "deterministic": False, "wall_s": 9.0, "params": 10,
           "tokens_per_step": 100, "tokens_per_sec": 1100.0, "mfu": float("nan"), "hfu": float("nan"),
           "mfu_measured_mm": None, "torch_peak_mib": 10.0, "nvidia_smi_peak_mib": None,
           "nvidia_smi_note": "nvidia-smi gave no memory.used for these GPUs", "loss_first": 9.0,
           "loss_last": float("nan"), "val_loss": float("inf"), "skipped_steps": 2,
           "loss_scales": [16384.0, 32768.0, 65536.0], "rows": rows}
    return {"command": "benchmarks/gpu_acceptance.py", "wall_s": 100.0, "peaks": {}, "environment": {"torch": "2.11"},
            "plan": {"dry_run": False, "small": "small", "medium": "medium", "fp16": "fp16", "bf16": "bf16",
                     "new_tokens": 4, "prompts": ["a"]},
            "gpus": [{"cuda_index": 0, "uuid": uuid(0), "name": "NVIDIA H100 80GB HBM3", "capability": "9.0",
                      "memory_gib": 79.2, "sms": 132, "mig": False, "smi_index": "0", "driver": "580",
                      "max_sm_clock_mhz": 1980.0, "power_limit_w": None}],
            "stages": {"small": {"ok": False, "wall_s": 9.0, "runs": [run], "commands": ["x"],
                                 "checks": [{"check": "trains", "ok": False, "result": "2 non-finite"}]},
                       "medium": {"ok": None, "note": "not run: the budget of 450 s is spent", "checks": [],
                                  "runs": [], "commands": []}}}


def test_the_report_survives_non_finite_losses(tmp_path):
    from gpu_acceptance_report import fmt, loss_plot, write_report

    assert fmt(float("nan"), ".3f") == "nan" and fmt("inf", ".3f") == "inf" and fmt(None) == "-"
    assert fmt(1.23456, ".3f") == "1.235"
    results = results_with_nan()
    assert loss_plot(results["stages"]["small"]["runs"], tmp_path / "loss.png") is True  # the finite point
    report = write_report(results, tmp_path / "report.md").read_text()
    assert "| small-fp16-zero2-ckpt | small | 10 | fp16 |" in report
    assert "| 9.000 -> nan | inf | 2 | 16384, 32768, 65536 |" in report
    assert "step 2: nan" in report and "step 3: inf" in report
    assert "| medium | skipped | - s | not run: the budget of 450 s is spent |" in report
    assert "| medium bf16, no activation checkpointing, >= 35% MFU on one H100 | - | no figure |" in report
    assert "nvidia-smi gave no memory.used" in report and "power limit ? W" in report
    json.dumps(results)  # what finish() writes; NaN is allowed there


def test_vllm_gets_the_exports_dtype_or_the_users(tmp_path):
    cfg = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 128}
    for stored, want in (("float32", "float32"), ("bfloat16", "bfloat16"), ("float16", "float16")):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "torch_dtype": stored}))
        gpu = vllm_command(tmp_path, "127.0.0.1", 8000, 64, "m", python="/py", cpu=False)
        assert vllm_dtype(gpu) == want and gpu.count("--dtype") == 1
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))  # transformers 5's key
    assert vllm_dtype(vllm_command(tmp_path, "h", 1, 64, python="/py", cpu=False)) == "bfloat16"
    assert vllm_dtype(vllm_command(tmp_path, "h", 1, 64, python="/py", cpu=True)) == "float32"
    mine = vllm_command(tmp_path, "h", 1, 64, python="/py", cpu=False, extra_args=("--dtype=float16",))
    assert vllm_dtype(mine) == "float16" and not any(a == "--dtype" for a in mine)


def test_served_text_is_exact_on_equal_sides_and_reported_on_others(tokenizer_dir, tmp_path):
    from gpu_acceptance_serve import compare, divergence
    from gpu_acceptance_train import Ctx, Plan

    from openllm_ds.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    assert divergence(tok, "The Normans", " were a people", " were a people") is None
    assert divergence(tok, "The Normans", " were a people of", " were a nation of") == \
        len(tok.encode("The Normans were a")) - len(tok.encode("The Normans"))
    prompts = ("The Normans", "Oxygen is")
    ctx = Ctx(Plan(False, 1, 1, 4, 1, 8, prompts, "off", 60), tmp_path, tmp_path, tokenizer_dir, [], {})
    ctx.stage, ctx.stages["serve"] = "serve", {"checks": []}
    ref = {"ok": True, "texts": {"The Normans": " were a people", "Oxygen is": " a gas"}}
    differ = {"ok": True, "texts": {"The Normans": " were a nation", "Oxygen is": " a gas"}}
    same = compare(ctx, tokenizer_dir, "vLLM", ref, "cuda, float32", ref, "cuda, float32")
    assert same["identical"] == 2 and ctx.stages["serve"]["checks"][-1]["ok"] is True
    got = compare(ctx, tokenizer_dir, "vLLM", differ, "cuda, float32", ref, "cuda, float32")
    assert got["identical"] == 1 and got["first_divergence"] >= 2 and ctx.stages["serve"]["checks"][-1]["ok"] is False
    got = compare(ctx, tokenizer_dir, "vLLM", differ, "cuda, float16", ref, "cuda, float32")
    check = ctx.stages["serve"]["checks"][-1]
    assert check["ok"] is None and "1 of 2 identical" in check["result"] and "first divergence at token" in \
        check["result"] and "(cuda, float16) == openllm-ds generate (cuda, float32)" in check["check"]
    assert not math.isnan(got["first_divergence"])
