"""The GPU acceptance run's CPU rehearsal of its offline path (so that it cannot rot: the wheels of
scripts/gpu_wheels.sh in a clean --target dir, a Python that sees only the GPU machine's packages), the stages'
imports without Ray and `datasets`, and the CPU-testable logic of the CUDA paths it checks: the launcher's summary and
devices, the peak-FLOP table, the DeepSpeed config for GPUs, object collectives that outlast the process group's
timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import free_port
from openllm_ds.errors import ConfigError, UserError
from openllm_ds.train import build_ds_config
from openllm_ds.train.launch import printed_summary
from openllm_ds.train.metrics import peak_flops, spec_peak_flops
from helpers import run_cfg

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def rehearsal_wheels() -> Path:
    """The wheels .ci/run builds with scripts/gpu_wheels.sh for this Python ($OPENLLM_REHEARSAL_WHEELS)."""
    where = os.environ.get("OPENLLM_REHEARSAL_WHEELS")
    if where and any(Path(where).glob("deepspeed-*.whl")):
        return Path(where)
    why = ("no rehearsal wheels: run scripts/gpu_wheels.sh --python_version %d.%d --data none --dest DIR and set "
           "OPENLLM_REHEARSAL_WHEELS=DIR (.ci/run does)" % sys.version_info[:2])
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


@pytest.mark.slow
def test_offline_rehearsal_runs_every_stage_on_the_gpu_machines_packages(prepared_data, tokenizer_dir, token_shards,
                                                                           squad_dir, tmp_path):
    wheels = rehearsal_wheels()
    site, work, out = tmp_path / "site", tmp_path / "acceptance", tmp_path / "out"
    cmd = ["bash", str(ROOT / "scripts/gpu_acceptance.sh"), "--offline", str(wheels), "--rehearse", "--site", str(site),
           "--work_dir", str(work), "--out", str(out), "--clean_dir", str(prepared_data), "--tokenizer_dir",
           str(tokenizer_dir), "--squad_dir", str(squad_dir)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    # the wheels went into the clean --target dir, and the stages' Python had neither Ray nor datasets
    assert (site / "deepspeed").is_dir() and (site / "fastapi").is_dir() and (site / "pydantic_core").is_dir()
    python = site.parent / "site.device-view" / "venv" / "bin" / "python"
    path = {"PYTHONPATH": f"{site}:{ROOT}:{site.parent / 'site.device-view' / 'lib'}"}
    probe = "import importlib.util as u, deepspeed; print(u.find_spec('ray'), u.find_spec('datasets'), deepspeed.__file__)"
    seen = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env={**env, **path}, timeout=120)
    last = seen.stdout.strip().splitlines()[-1].split()  # DeepSpeed's accelerator warning comes first
    assert last[:2] == ["None", "None"] and last[2].startswith(str(site)), seen

    res = json.loads((work / "results.json").read_text())
    stages = res["stages"]
    assert list(stages) == ["data", "small", "resume", "medium", "serve", "finetune", "medium_ckpt"]
    assert all(s["ok"] for s in stages.values()), json.dumps({k: s["checks"] for k, s in stages.items()})[:3000]
    assert all(s["wall_s"] > 0 for s in stages.values())
    assert res["environment"]["ray"] == "not installed" and res["environment"]["deepspeed"] == "0.19.8"
    runs = {r["name"]: r for s in stages.values() for r in s["runs"]}
    assert list(runs) == ["small-fp32-zero2-ckpt", "resume-a", "resume-b", "medium-fp32-zero2",
                          "small-fp32-zero2-sft", "medium-fp32-zero2-ckpt"]
    assert stages["medium_ckpt"]["runs"][0]["checkpointing"] and not stages["medium"]["runs"][0]["checkpointing"]
    for r in runs.values():
        assert r["ok"] and r["params"] == 1_877_120 and r["precision"] == "fp32" and r["mfu"] > 0
    small = runs["small-fp32-zero2-ckpt"]
    assert small["loss_last"] < small["loss_first"] < 9.2  # ln(8000) = 8.99 at the start
    assert small["steps"] == 4 and small["tokens_per_step"] == 4 * 256 and small["loss_scales"] == []  # train/loss_scale: fp16 runs only
    resume = stages["resume"]
    assert resume["compared"] == 7 and resume["differ"] == [] and resume["weights"] == "equal"
    assert resume["b_resumed_from"] == 2 and runs["resume-b"]["summary"]["final_step"] == 4

    serve = stages["serve"]
    assert serve["export"]["model"].endswith("small-fp32-zero2-ckpt")  # the small stage's model, not one of its own
    generated, served = serve["generate"]["texts"], serve["builtin"]["texts"]
    assert list(served) == ["The Normans were", "Super Bowl 50 was"]
    assert all(generated[p] and served[p] == generated[p] for p in served), (generated, served)
    assert serve["builtin_vs_generate"] == {"identical": 2, "of": 2, "first_divergence": None,
                                            "sides": ["cpu, float32", "cpu, float32"]}
    # the small run fine-tuned for 4 steps (validated after each), and scored before and after on 4 questions
    finetune = stages["finetune"]
    sft = runs["small-fp32-zero2-sft"]
    assert finetune["steps"] == 4 and sft["summary"]["final_step"] == 4 and sft["nonfinite_losses"] == 0
    assert sft["summary"]["finetune"]["conversations"] > 1000 and sft["tokens_per_sec"] > 0
    assert [s for s, _ in sft["val_losses"]] == [1, 2, 3, 4] and sft["val_losses"][-1][1] < sft["val_losses"][0][1]
    assert sft["val_losses"][-1][1] == pytest.approx(sft["summary"]["val_loss"])
    for when in ("before", "after"):
        score = finetune["scores"][when]
        assert score["questions"] == 4 and 0 <= score["exact_match"] <= score["f1"] <= 100, score
        assert len(score["examples"]) == 3 and all(e["gold"] for e in score["examples"])
    assert finetune["scores"]["before"]["step"] == 4 and finetune["scores"]["after"]["step"] == 4

    commands = "\n".join(c for s in stages.values() for c in s["commands"])
    assert commands.count("--num_workers 0") == 3  # tokenize and both evaluations in this process: no Ray
    for part in ("-m deepspeed.launcher.runner --master_port", "--log_level=warning --num_gpus 1 --module openllm_ds "
                 "train", "gpu_acceptance_train.py --deterministic_train", "-m openllm_ds export",
                 "-m openllm_ds generate", "-m openllm_ds serve", "-m openllm_ds prepare-sft",
                 "--module openllm_ds finetune", "--tasks " + str(work / "data" / "squad_v1_chat.yaml") + " --limit 4"):
        assert part in commands, part
    assert all(c.startswith(f"{python} ") for c in commands.splitlines()), commands[:500]

    report = (out / "report.md").read_text()
    assert "# GPU acceptance run (CPU dry run)" in report and "![train loss](loss.png)" in report
    assert f"| {small['tokens_per_sec']:,.0f} | {small['mfu']:.1%} |" in report
    before, after = finetune["scores"]["before"], finetune["scores"]["after"]
    assert "## Fine-tune (squad_v1_chat)" in report
    assert f"- fine-tune: 4 steps, {sft['tokens_per_sec']:,.0f} tokens/s" in report
    assert f"| before | {before['f1']:.2f} | {before['exact_match']:.2f} |" in report
    assert f"| after | {after['f1']:.2f} | {after['exact_match']:.2f} |" in report
    assert (out / "loss.png").stat().st_size > 10_000 and json.loads((out / "results.json").read_text()) == res
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "logs/train-resume-b.out" in tar.getnames()

    # a rerun of some stages keeps the others' results, and the report says where they come from
    p = subprocess.run(cmd + ["--stages", "medium"], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    again = json.loads((work / "results.json").read_text())["stages"]
    assert again["small"]["runs"][0]["tokens_per_sec"] == small["tokens_per_sec"]
    assert again["small"]["note"].startswith("from the earlier run of ") and "note" not in again["medium"]
    assert again["medium"]["started"] != stages["medium"]["started"]
    assert "| small | pass |" in (out / "report.md").read_text()


STAGES_WITHOUT_RAY = textwrap.dedent("""
    import http.client, json, sys
    from openllm_ds.cli import main
    from openllm_ds.serve import start_server
    out, data, tok = sys.argv[1:4]
    model = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=32"]
    assert main(["train", "--config", "tiny", "--data_file", data + "/training_data.txt", "--tokenizer_dir", tok,
                 "--output_dir", out + "/model", "--max_steps", "2", "--batch_size", "2", "--save_every", "2",
                 "--eval_every", "2", "train.eval_batches=1", "tokenizer.num_workers=0", *model]) == 0
    assert main(["export", "--model_dir", out + "/model", "--format", "huggingface", "--output_dir", out + "/hf"]) == 0
    assert main(["generate", "--model_dir", out + "/hf", "--prompt", "The Normans", "--max_new_tokens", "4",
                 "--temperature", "0"]) == 0
    server = start_server(out + "/hf", context_length=32, model_name="m")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"model": "m", "prompt": "The", "max_tokens": 3,
                                                            "temperature": 0}), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        print("status", reply.status, json.loads(reply.read())["usage"]["completion_tokens"])
    finally:
        server.stop()
    print("loaded", sorted({m.split(".")[0] for m in sys.modules} & {"ray", "datasets", "deepspeed", "fastapi"}))
""")


@pytest.mark.slow
def test_train_export_generate_and_serve_need_neither_ray_nor_datasets(prepared_data, tokenizer_dir, token_shards,
                                                                        tmp_path):
    view = tmp_path / "view"
    subprocess.run([sys.executable, str(ROOT / "scripts/device_view.py"), "--out", str(view), "--without",
                    "ray,datasets"], check=True, capture_output=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{view / 'lib'}"}
    python = str(view / "venv" / "bin" / "python")
    gone = subprocess.run([python, "-c", "import ray"], capture_output=True, text=True, env=env, timeout=60)
    assert gone.returncode == 1 and "No module named 'ray'" in gone.stderr
    p = subprocess.run([python, "-c", STAGES_WITHOUT_RAY, str(tmp_path), str(prepared_data), str(tokenizer_dir)],
                       capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "status 200 3" in p.stdout and "loaded ['deepspeed', 'fastapi']" in p.stdout, p.stdout[-2000:]
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_printed_summary_skips_the_launchers_lines():
    summary = {"final_step": 4, "train_loss": float("nan"), "sources": [{"name": "a"}], "val_loss": None}
    stdout = ("[2026-12-01 10:00:00,000] [INFO] [launch.py:256:main] process 7 spawned\nstep 4/4  loss nan\n"
              + json.dumps(summary, indent=2) + "\n[2026-12-01 10:00:09,000] [INFO] [launch.py:367:main] Process 7 exits "
              "successfully.\nProcess 8 exits successfully.\n")
    got = printed_summary(stdout)
    assert got["final_step"] == 4 and got["sources"] == [{"name": "a"}] and got["train_loss"] != got["train_loss"]
    two = json.dumps({"first": 1}, indent=2) + "\n" + json.dumps({"second": 2}, indent=2) + "\n{ not json\n"
    assert printed_summary(two) == {"second": 2}  # the last complete object
    assert printed_summary('{"one": "line"}\n') == {"one": "line"}
    with pytest.raises(ValueError, match="no JSON object"):
        printed_summary("Process 7 exits successfully.\n")


def test_the_launcher_keeps_the_gpus_this_process_may_use(monkeypatch):
    from gpu_acceptance_train import Plan, launcher

    plan = Plan(False, 2, 1, 4, 1, 1, ("a",), "off", 60)
    head = launcher(plan, {})
    assert head[1:3] == ["-m", "deepspeed.launcher.runner"] and head[-2:] == ["--num_gpus", "2"]
    assert "--log_level=warning" in head and 1024 < int(head[head.index("--master_port") + 1]) < 65536
    # the launcher drops CUDA_VISIBLE_DEVICES when given --num_gpus: a subset goes by --include
    assert launcher(plan, {"CUDA_VISIBLE_DEVICES": "2, 3,5"})[-2:] == ["--include", "localhost:2,3"]
    one = Plan(False, 1, 1, 4, 1, 1, ("a",), "off", 60)
    assert launcher(one, {"CUDA_VISIBLE_DEVICES": "MIG-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77"}) is None  # no launcher
    with pytest.raises(UserError, match="names devices by UUID"):
        launcher(plan, {"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"})
    monkeypatch.setattr("gpu_acceptance_train.deepspeed_version", lambda: (0, 17))  # no --log_level before 0.18
    assert not any(a.startswith("--log_level") for a in launcher(plan, {}))


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
    # a MIG slice: its share of the whole GPU's SMs
    mig = spec_peak_flops("NVIDIA H100 80GB HBM3 MIG 1g.10gb", (9, 0), 16, None, bf16)
    assert mig.flops == pytest.approx(989.4e12 * 16 / 132) and "16/132 SMs" in mig.source
    assert spec_peak_flops("NVIDIA A100-SXM4-40GB MIG 3g.20gb", (8, 0), 42, None, fp16).flops == pytest.approx(
        312e12 * 42 / 108)
    assert spec_peak_flops("NVIDIA L4 MIG 1g", (8, 9), 10, None, fp16) is None  # its whole SMs unknown: measured
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


def test_finetune_stage_is_skipped_with_its_reason_without_the_small_run(squad_dir, tmp_path):
    from gpu_acceptance_finetune import stage_finetune
    from gpu_acceptance_report import finetune_rows
    from gpu_acceptance_train import Ctx, Plan

    plan = Plan(True, 1, 4, 4, 2, 8, ("a",), "off", 600, small="tiny", medium="tiny", fp16="fp32", bf16="fp32")
    ctx = Ctx(plan, tmp_path, tmp_path / "clean", tmp_path / "tok", [], {}, squad=squad_dir)
    for small in ({"ok": False, "runs": [{"ok": False}]}, {"ok": True, "runs": [{"ok": True}]}, None):
        ctx.stages = {"small": small} if small else {}
        ctx.stage, ctx.stages["finetune"] = "finetune", {"checks": [], "runs": [], "commands": []}
        stage_finetune(ctx)  # a failed small run, a passed one whose run dir is gone, none at all
        [check] = ctx.stages["finetune"]["checks"]
        assert check["ok"] is None and "small stage's run" in check["result"] and "--stages small,finetune" in \
            check["result"], check
        assert ctx.stages["finetune"]["commands"] == [] and finetune_rows(ctx.stages["finetune"]) == []
    (tmp_path / "models" / "small-fp32-zero2-ckpt" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "small-fp32-zero2-ckpt" / "checkpoints" / "latest").write_text("step_4")
    ctx.squad = tmp_path / "no-squad"
    ctx.stages = {"small": {"ok": True, "runs": [{"ok": True}]}, "finetune": {"checks": [], "runs": [],
                                                                             "commands": []}}
    stage_finetune(ctx)
    [check] = ctx.stages["finetune"]["checks"]
    assert check["ok"] is None and f"--squad_dir {tmp_path / 'no-squad'}" in check["result"]


def test_report_shows_the_finetune_stage_and_a_failed_evaluation():
    from gpu_acceptance_report import finetune_f1, finetune_rows

    run = {"ok": True, "precision": "fp16", "steps": 300, "tokens_per_sec": 123456.7, "tokens_per_step": 32768,
           "wall_s": 61.5, "val_losses": [[30, 3.25], [60, 2.5], [300, 1.875]]}
    res = {"steps": 300, "questions": 200, "runs": [run], "scores": {
        "before": {"f1": 0.5, "exact_match": 0.0, "baseline_f1": 3.99, "questions": 200, "truncated_prompts": 0,
                   "wall_s": 20.1, "examples": []},
        "after": {"error": "error: out of memory", "wall_s": 3.0}}}
    text = "\n".join(finetune_rows(res))
    assert "- fine-tune: 300 steps, 123,457 tokens/s, 32,768 tokens/step, 61.5 s; validation answer loss 3.250 " \
           "(step 30) -> 1.875 (step 300)" in text
    assert "| before | 0.50 | 0.00 | 3.99 | 200 (0) | 20.1 |" in text
    assert "| after | **failed**: error: out of memory | | | | 3.0 |" in text
    assert finetune_f1(res) == "0.50 -> - (200 questions)" and finetune_f1({}) is None
