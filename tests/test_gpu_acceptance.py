"""The GPU acceptance script's CPU dry run (so that it cannot rot), and the CPU-testable logic of the CUDA paths
it checks: the peak-FLOP table, the DeepSpeed config for GPUs, object collectives that outlast the process
group's timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import free_port
from openllm_ds.errors import ConfigError
from openllm_ds.train import build_ds_config
from openllm_ds.train.metrics import peak_flops, spec_peak_flops
from test_train_config import run_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_exercises_every_stage(prepared_data, tokenizer_dir, token_shards, tmp_path):
    work = tmp_path / "acceptance"
    p = subprocess.run(["bash", str(ROOT / "scripts/gpu_acceptance.sh"), "--skip_setup", "--dry_run", "--work_dir",
                        str(work), "--clean_dir", str(prepared_data), "--tokenizer_dir", str(tokenizer_dir)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((work / "results.json").read_text())
    checks = {c["check"]: c["ok"] for c in res["checks"]}
    assert checks.pop("vLLM == openllm-ds generate (greedy)") is None  # not tried in the dry run
    assert len(checks) == 6 and all(checks.values()), res["checks"]

    runs = {r["name"]: r for r in res["runs"]}
    assert list(runs) == ["tiny-fp32-zero2-ckpt", "resume-a", "resume-b", "tiny-fp32-zero3", "tiny-zero3-ckpt"]
    for r in runs.values():
        assert r["ok"] and r["params"] == 1_877_120 and r["precision"] == "fp32" and r["mfu"] > 0
    fp16, zero3 = runs["tiny-fp32-zero2-ckpt"], runs["tiny-fp32-zero3"]
    assert fp16["loss_last"] < fp16["loss_first"] < 9.2  # ln(8000) = 8.99 at the start
    assert fp16["steps"] == 4 and fp16["tokens_per_step"] == 4 * 256 and fp16["loss_scales"] == [1.0]
    assert abs(zero3["loss_last"] - fp16["loss_last"]) < 1e-3  # same data and init, ZeRO-3 instead of ZeRO-2
    resume = res["resume"]
    assert resume["compared"] == 9 and resume["differ"] == [] and resume["weights"] == "equal"
    assert resume["b_resumed_from"] == 2 and runs["resume-b"]["summary"]["final_step"] == 4

    generated = res["serve"]["generate"]
    served = res["serve"]["builtin"]["texts"]
    assert list(served) == ["The Normans were", "Super Bowl 50 was"]
    assert all(generated[p] and served[p] == generated[p] for p in served), (generated, served)
    export = Path(res["export"]["dir"])
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    commands = "\n".join(cmd for _, cmd in res["commands"])
    for part in ("openllm-ds train", "gpu_acceptance.py --deterministic_train", "openllm-ds export",
                 "openllm-ds generate", "openllm-ds serve"):
        assert part in commands

    report = (work / "report.md").read_text()
    assert "# GPU acceptance run (CPU dry run)" in report and "![train loss](loss.png)" in report
    assert f"| {fp16['tokens_per_sec']:,.0f} | {fp16['mfu']:.1%} |" in report
    assert (work / "loss.png").stat().st_size > 10_000


def test_peak_flops_from_the_name_else_the_architecture():
    fp16, bf16 = torch.float16, torch.bfloat16
    table = [("NVIDIA H100 80GB HBM3", (9, 0), fp16, 989.4), ("NVIDIA H100 PCIe", (9, 0), bf16, 756.0),
             ("NVIDIA H100 NVL", (9, 0), fp16, 835.5), ("NVIDIA H200", (9, 0), bf16, 989.4),
             ("NVIDIA GH200 480GB", (9, 0), fp16, 989.4), ("NVIDIA H20", (9, 0), fp16, 148.0),
             ("NVIDIA A100-SXM4-80GB", (8, 0), bf16, 312.0), ("NVIDIA A100 80GB PCIe", (8, 0), fp16, 312.0),
             ("NVIDIA A10", (8, 6), fp16, 125.0), ("NVIDIA L40S", (8, 9), bf16, 362.05),
             ("NVIDIA L4", (8, 9), fp16, 121.0),
             ("Tesla V100-PCIE-32GB", (7, 0), fp16, 112.0), ("Tesla T4", (7, 5), fp16, 65.0)]
    for name, cc, dtype, tflops in table:
        peak = spec_peak_flops(name, cc, 100, None, dtype)
        assert peak.flops == pytest.approx(tflops * 1e12) and peak.source.startswith("datasheet"), name
    assert spec_peak_flops("Tesla V100-SXM2-16GB", (7, 0), 80, 1530, bf16) is None  # no bf16 tensor cores
    assert spec_peak_flops("NVIDIA H100 80GB HBM3", (9, 0), 132, 1980, torch.float32) is None
    # not in the table: SMs x max clock x the architecture's FLOPs per clock
    a10g = spec_peak_flops("NVIDIA A10G", (8, 6), 80, 1710, fp16)
    assert a10g.flops == pytest.approx(80 * 1710e6 * 1024) and a10g.source.startswith("estimate")
    assert spec_peak_flops("NVIDIA Hopper X", (9, 0), 132, 1830, bf16).flops == pytest.approx(989.5e12, rel=1e-3)
    assert spec_peak_flops("NVIDIA A10G", (8, 6), 80, None, fp16) is None  # clock unknown
    assert spec_peak_flops("Some Future GPU", (12, 1), 100, 2000, fp16) is None
    cpu = peak_flops(torch.device("cpu"), torch.float32)
    assert cpu.flops > 1e9 and cpu.source.startswith("measured")


def test_gpu_ds_config_uses_torch_fused_adamw_and_checks_bf16(tmp_path, monkeypatch):
    z2 = ROOT / "ds_configs/zero2.json"
    params = build_ds_config(run_cfg(z2), 1, "cuda")["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True  # no FusedAdam build (nvcc) on a GPU
    assert "fused" not in build_ds_config(run_cfg(z2), 1, "cpu")["optimizer"]["params"]
    for offload in ("zero2_offload.json", "zero3_offload.json"):  # DeepSpeedCPUAdam on pinned host memory
        ds = build_ds_config(run_cfg(ROOT / "ds_configs" / offload), 1, "cuda")
        assert "torch_adam" not in ds["optimizer"]["params"]
        assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    base = json.loads(z2.read_text())
    base["optimizer"]["params"]["torch_adam"] = False
    (tmp_path / "ds.json").write_text(json.dumps(base))
    params = build_ds_config(run_cfg(tmp_path / "ds.json"), 1, "cuda")["optimizer"]["params"]
    assert params["torch_adam"] is False and "fused" not in params  # the base JSON asks for FusedAdam
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(ConfigError, match=r"precision=bf16 needs a GPU with bf16 .*Tesla T4.*train.precision=fp16"):
        build_ds_config(run_cfg(z2, train__precision="bf16"), 1, "cuda")


OBJECT_COLLECTIVES = textwrap.dedent("""
    import sys, time
    from datetime import timedelta
    import torch.distributed as dist
    from openllm_ds.train.distributed import DistEnv, all_gather_object, broadcast_object, object_group
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=2))
    env = DistEnv(rank, rank, 2, "cpu", object_group=object_group(timedelta(seconds=60)))
    if rank == 0:
        time.sleep(4)  # rank 0 alone at work (token shards, a checkpoint) for longer than the group's timeout
    got = broadcast_object({"shards": "ok"} if rank == 0 else None, env)
    print("broadcast", got["shards"], "gathered", all_gather_object(rank * 10, env), flush=True)
    if rank == 0:
        time.sleep(4)
    try:  # the same wait on the default group times out
        dist.broadcast_object_list([1], src=0)
        print("default group: no timeout", flush=True)
    except RuntimeError:
        print("default group: timed out", flush=True)
""")


@pytest.mark.slow
def test_object_collectives_wait_longer_than_the_process_group_timeout():
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", OBJECT_COLLECTIVES, str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert "broadcast ok gathered [0, 10]" in outs[1][0], outs[1]
    assert "broadcast ok gathered [0, 10]" in outs[0][0], outs[0]
    assert "default group: timed out" in outs[1][0], outs[1]
