"""The training stages of the GPU acceptance run (benchmarks/gpu_acceptance.py), and what they share with its other
stages: the plan, the run context, running one command.

Training goes through the deepspeed launcher (``python -m deepspeed.launcher.runner``, the ``deepspeed`` script's
module, which works where that script is not on PATH: a ``pip install --target`` dir) on a free ``--master_port``
with ``--log_level=warning`` (DeepSpeed 0.18 and later); its summary is read with ``printed_summary``, which skips
the launcher's own lines.
``CUDA_VISIBLE_DEVICES`` is kept: the launcher drops it when given ``--num_gpus``, so a subset of GPUs by index goes
to ``--include localhost:I,J``, and one device named by UUID (a MIG slice) trains without the launcher.

``python gpu_acceptance_train.py --deterministic_train ARGS`` is ``openllm-ds train ARGS`` with deterministic
algorithms on: the resume check's entry point.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gpu_acceptance_machine import GpuMemory  # noqa: E402
from gpu_acceptance_report import fmt  # noqa: E402

from openllm_ds.errors import UserError  # noqa: E402
from openllm_ds.train.launch import printed_summary  # noqa: E402

DETERMINISTIC_FLAG = "--deterministic_train"


@dataclass
class Plan:
    """What the stages run: a GPU run, or the CPU dry run (tiny preset, fp32, a few steps)."""

    dry_run: bool
    gpus: int
    steps: int
    resume_steps: int
    medium_steps: int
    new_tokens: int
    prompts: tuple[str, ...]
    vllm: str  # auto | off
    budget_s: float
    small: str = "small"
    medium: str = "medium"
    fp16: str = "fp16"
    bf16: str = "bf16"
    micro_batch: int | None = None  # None: the preset's own
    compile: bool = True  # torch.compile the medium runs (train.compile: DeepSpeed's engine.compile())
    finetune_steps: int = 300  # the fine-tune of the small run
    questions: int = 200  # squad_v1_chat questions before and after it


@dataclass
class Ctx:
    plan: Plan
    work: Path
    clean: Path
    tokenizer: Path
    gpus: list[dict]  # the probe's GPUs (cuda_index, uuid, name, ...), nvidia-smi's fields added
    peaks: dict
    started: float = field(default_factory=time.perf_counter)
    stage: str = ""
    stages: dict = field(default_factory=dict)  # {stage: {ok, wall_s, checks, runs, commands, ...}}
    squad: Path | None = None  # SQuAD JSON files (train*.json, dev-v1.1.json) for the fine-tune stage

    def check(self, name: str, ok: bool | None, result: str) -> bool | None:
        """A verdict of the current stage: True passed, False failed, None skipped or only reported."""
        self.stages[self.stage]["checks"].append({"check": name, "ok": ok, "result": result})
        print(f"[{'ok' if ok else 'skipped' if ok is None else 'FAILED'}] {name}: {result}", flush=True)
        return ok

    def command(self, name: str, cmd: list[str]) -> None:
        self.stages[self.stage]["commands"].append(shlex.join(cmd))
        print(f"[{name}] {shlex.join(cmd)}", flush=True)

    def remaining(self) -> float:
        return self.plan.budget_s - (time.perf_counter() - self.started)

    def timeout(self, cap: float) -> float:
        """A command's time limit: ``cap``, or what is left of the run's budget (at least 10 s)."""
        return max(10.0, min(cap, self.remaining()))


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float


def run(ctx: Ctx, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> Done:
    """Run one command from the repo root in its own process group (a timeout stops the launcher's ranks too);
    its stdout and stderr go to logs/NAME.out and .err."""
    ctx.command(name, cmd)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code, err = 124, err + f"\nerror: timed out after {timeout:.0f} s"
    done = Done(code, out, err, time.perf_counter() - t0)
    (ctx.work / "logs" / f"{name}.out").write_text(done.stdout)
    (ctx.work / "logs" / f"{name}.err").write_text(done.stderr)
    return done


def error_tail(p: Done, lines: int = 6) -> str:
    err = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    mine = [ln for ln in err if ln.startswith("error:")]
    return (mine[-1] if mine else " | ".join(err[-lines:]))[-1500:] or f"exit code {p.returncode}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preset(name: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text(encoding="utf-8"))


# ---- one training run ------------------------------------------------------------------------------------

@dataclass
class TrainRun:
    name: str
    preset: str
    ds_config: str
    precision: str
    checkpointing: bool
    steps: int
    save_every: int | None = None
    resume: Path | None = None
    deterministic: bool = False
    compile: bool = False


def launcher(plan: Plan, env: dict | os._Environ = os.environ) -> list[str] | None:
    """The deepspeed launcher for ``plan.gpus`` ranks on the GPUs this process may use; None where one device is
    named by UUID in CUDA_VISIBLE_DEVICES (a MIG slice), which the launcher cannot pass on."""
    head = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port())]
    if deepspeed_version() >= (0, 18):  # the launcher's --log_level came with DeepSpeed 0.18
        head.append("--log_level=warning")
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if plan.dry_run or visible is None:
        return head + ["--num_gpus", str(plan.gpus)]
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if ids and all(v.isdigit() for v in ids):
        return head + ["--include", f"localhost:{','.join(ids[:plan.gpus])}"]
    if plan.gpus == 1:
        return None
    raise UserError(f"CUDA_VISIBLE_DEVICES={visible} names devices by UUID and the deepspeed launcher takes indices; "
                    "give indices (CUDA_VISIBLE_DEVICES=0,1) or --num_gpus 1")


def deepspeed_version() -> tuple[int, ...]:
    import importlib.metadata as md
    import re

    try:
        return tuple(int(x) for x in re.findall(r"\d+", md.version("deepspeed"))[:2])
    except md.PackageNotFoundError:
        return (0,)


def grad_accum(plan: Plan, preset_name: str) -> int:
    """The preset's accumulation over the GPUs, so that the global batch stays near the preset's."""
    return max(1, int(preset(preset_name)["train"].get("gradient_accumulation_steps", 1)) // plan.gpus)


def train_command(ctx: Ctx, r: TrainRun) -> list[str]:
    plan = ctx.plan
    args = ["--config", str(ROOT / "configs" / f"{r.preset}.yaml"),
            "--data_file", str(ctx.clean / "training_data.txt"), "--tokenizer_dir", str(ctx.tokenizer),
            "--output_dir", str(ctx.work / "models" / r.name), "--ds_config", r.ds_config,
            "--precision", r.precision, "--max_steps", str(r.steps), "--save_every", str(r.save_every or r.steps),
            "--eval_every", str(r.steps), "--gradient_accumulation_steps", str(grad_accum(plan, r.preset)),
            "--resume", str(r.resume) if r.resume else "none"]
    if plan.micro_batch:
        args += ["--batch_size", str(plan.micro_batch)]
    args += ["train.log_every=1", f"train.gradient_checkpointing={str(r.checkpointing).lower()}",
             f"train.warmup_steps={max(1, r.steps // 10)}", "train.keep_last=2", f"train.compile={str(r.compile).lower()}",
             "tokenizer.num_workers=0"]  # token shards, if missing, in this process: no Ray on this path
    if plan.dry_run:
        args += ["train.eval_batches=1"]
    if r.deterministic:
        script = [str(Path(__file__).resolve()), DETERMINISTIC_FLAG]
        head = launcher(plan)
        return [*(head or [sys.executable]), *script, *args]
    return launched(plan, "train", args)


def launched(plan: Plan, subcommand: str, args: list[str]) -> list[str]:
    """``openllm-ds SUBCOMMAND ARGS`` through the deepspeed launcher (``--module openllm_ds``), or in one process
    where the launcher cannot pass the device on (``launcher`` gives None)."""
    head = launcher(plan)
    if head is None:
        return [sys.executable, "-m", "openllm_ds", subcommand, *args]
    return [*head, "--module", "openllm_ds", subcommand, *args]


def train(ctx: Ctx, r: TrainRun, cmd: list[str] | None = None, timeout: float | None = None) -> dict:
    """Run one training job (``train_command``'s, or ``cmd`` writing into models/NAME, e.g. a fine-tune); its
    summary, log rows and derived figures (or its error)."""
    import shutil

    out = ctx.work / "models" / r.name
    shutil.rmtree(out, ignore_errors=True)  # this run's own output from an earlier try
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if r.deterministic else {}
    if r.deterministic and ctx.plan.dry_run:  # on the CPU: MKL's results otherwise depend on the buffers'
        env.update(MKL_CBWR="AUTO,STRICT", OMP_NUM_THREADS="1")  # alignment and on how threads split a reduction
    with GpuMemory([g["uuid"] for g in ctx.gpus[:ctx.plan.gpus]]) as mem:
        p = run(ctx, f"train-{r.name}", cmd or train_command(ctx, r),
                ctx.timeout(timeout or (420 if not ctx.plan.dry_run else 300)), env)
    res = {"name": r.name, "preset": r.preset, "precision": r.precision, "ds_config": Path(r.ds_config).name,
           "checkpointing": r.checkpointing, "compile": r.compile, "steps": r.steps, "gpus": ctx.plan.gpus,
           "wall_s": round(p.wall_s, 1), "deterministic": r.deterministic, "ok": p.returncode == 0,
           "nvidia_smi_peak_mib": mem.peak_mib, "nvidia_smi_note": mem.why}
    if p.returncode:
        res["error"] = error_tail(p)
        return res
    try:
        summary = printed_summary(p.stdout)
        rows = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines() if ln.strip()]
        res.update(summary=summary, rows=rows, **throughput(ctx, r, summary, rows, out))
    except (ValueError, OSError, KeyError) as e:
        res.update(ok=False, error=f"exit code 0 but its output cannot be read: {type(e).__name__}: {e}")
    return res


def throughput(ctx: Ctx, r: TrainRun, summary: dict, rows: list[dict], out: Path) -> dict:
    import yaml

    from openllm_ds.config import ModelConfig
    from openllm_ds.train.metrics import flops_per_token

    model = ModelConfig(**yaml.safe_load((out / "run_config.yaml").read_text())["model"])
    params = count_params(model)  # the summary's count is 0 under ZeRO-3 (partitioned parameters)
    steps = [x for x in rows if "perf/tokens_per_s" in x]
    timed = steps[max(1, len(steps) // 10):] or steps  # the first steps allocate, compile and warm up
    tps = statistics.median(x["perf/tokens_per_s"] for x in timed)
    flops_tok = flops_per_token(model, params)
    peak = ctx.peaks.get(summary["precision"], {})
    world = summary["world_size"]
    mfu = flops_tok * tps / (peak["flops"] * world) if peak else None
    losses = [x["train/loss"] for x in steps if is_finite(x.get("train/loss"))]  # "nan"/"inf": strings in JSON
    k = max(1, min(10, len(losses) // 4))
    scales = [x["train/loss_scale"] for x in steps if is_finite(x.get("train/loss_scale"))]
    return {
        "params": params, "summary_params": summary["num_params"], "precision": summary["precision"],
        "tokens_per_step": int(summary["tokens_seen"] / max(1, summary["final_step"])),
        "tokens_per_sec": tps, "flops_per_token": flops_tok, "mfu": mfu,
        "mfu_measured_mm": flops_tok * tps / (peak["measured_mm_flops"] * world) if peak else None,
        # activation checkpointing runs each block's forward again: ~8N instead of 6N FLOPs per token
        "hfu": mfu * 4 / 3 if mfu is not None and r.checkpointing else mfu,
        "torch_peak_mib": max((x["perf/memory_gb"] * 1024 for x in steps if is_finite(x.get("perf/memory_gb"))),
                              default=None),
        "nonfinite_losses": sum(1 for x in steps if not is_finite(x.get("train/loss"))),
        "loss_first": statistics.fmean(losses[:k]) if losses else None,
        "loss_last": statistics.fmean(losses[-k:]) if losses else None,
        "val_loss": summary.get("val_loss"), "skipped_steps": summary.get("nonfinite_skipped"),
        "loss_scales": sorted(set(scales)), "final_loss_scale": scales[-1] if scales else None,
    }


def is_finite(v) -> bool:
    """A real, finite number (the training log writes NaN and infinities as strings)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def count_params(model) -> int:
    """Parameters of the model (a tied embedding once), built on the meta device: no memory, no init cost."""
    import torch

    from openllm_ds.model import Transformer

    with torch.device("meta"):
        return Transformer(model).num_params()


def check_learning(ctx: Ctx, res: dict, what: str) -> None:
    if not res["ok"]:
        ctx.check(what, False, res["error"])
        return
    ok = res["nonfinite_losses"] == 0 and res["loss_last"] is not None and res["loss_last"] < res["loss_first"]
    mfu = f", MFU {fmt(res['mfu'], '.1%')}" if res["mfu"] is not None else ""
    bad = f", {res['nonfinite_losses']} non-finite loss(es)" if res["nonfinite_losses"] else ""
    ctx.check(what, ok, f"{res['steps']} steps, loss {fmt(res['loss_first'], '.3f')} -> {fmt(res['loss_last'], '.3f')}"
                        f"{bad}, {res['tokens_per_sec']:,.0f} tokens/s{mfu}, {res['skipped_steps']} skipped step(s)")


# ---- the stages ------------------------------------------------------------------------------------------

def zero(n: int) -> str:
    return str(ROOT / "ds_configs" / f"zero{n}.json")


def small_run_name(plan: Plan) -> str:
    return f"small-{plan.fp16}-zero2-ckpt"


def stage_small(ctx: Ctx) -> None:
    """The small preset in fp16 (dynamic loss scaling) with activation checkpointing, ZeRO-2."""
    plan = ctx.plan
    res = train(ctx, TrainRun(small_run_name(plan), plan.small, zero(2), plan.fp16, True, plan.steps))
    ctx.stages[ctx.stage]["runs"].append(res)
    check_learning(ctx, res, f"{plan.small} {plan.fp16}, ZeRO-2, activation checkpointing: trains")


def stage_medium(ctx: Ctx, checkpointing: bool) -> None:
    """The medium preset in bf16 under ZeRO-2, torch.compile'd, with or without activation checkpointing."""
    plan = ctx.plan
    name = f"medium-{plan.bf16}-zero2{'-ckpt' if checkpointing else ''}"
    if plan.bf16 not in ctx.peaks and not plan.dry_run:
        ctx.check(f"{name}: runs", None, "this GPU has no bf16")
        return
    res = train(ctx, TrainRun(name, plan.medium, zero(2), plan.bf16, checkpointing, plan.medium_steps,
                              compile=plan.compile))
    ctx.stages[ctx.stage]["runs"].append(res)
    what = f"{plan.medium} {plan.bf16}, {'with' if checkpointing else 'no'} activation checkpointing" + \
           (", torch.compile" if plan.compile else "") + ": runs"
    if not res["ok"]:
        ctx.check(what, False, res["error"])
        return
    bad = f", {res['nonfinite_losses']} non-finite loss(es)" if res["nonfinite_losses"] else ""
    ctx.check(what, not bad, f"{res['steps']} steps, {res['tokens_per_sec']:,.0f} tokens/s, MFU {fmt(res['mfu'], '.1%')}, "
                             f"peak {fmt(res['torch_peak_mib'], ',.0f')} MiB (torch), loss {fmt(res['loss_first'], '.3f')}"
                             f" -> {fmt(res['loss_last'], '.3f')}{bad}")


def resume_ds_config(ctx: Ctx, steps: int) -> Path:
    """zero2.json with a short loss-scale window: the dynamic scale rises (and overflows) within the run."""
    base = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    base["fp16"]["loss_scale_window"] = max(5, steps // 6)
    path = ctx.work / "models" / "zero2_short_scale_window.json"
    path.write_text(json.dumps(base, indent=2))
    return path


def stage_resume(ctx: Ctx) -> None:
    """Run A to R steps (checkpoint at R/2); run B resumed from A's R/2 checkpoint; compare steps R/2+1..R."""
    from openllm_ds.checkpoint import CHECKPOINTS, WEIGHTS, step_tag

    plan, what = ctx.plan, "resume: losses and loss scale continue bit-exactly"
    R = plan.resume_steps - plan.resume_steps % 2
    ds = str(resume_ds_config(ctx, R))
    res = ctx.stages[ctx.stage]
    res.update(steps=R, ds_config=Path(ds).name)
    a = train(ctx, TrainRun("resume-a", plan.small, ds, plan.fp16, True, R, save_every=R // 2, deterministic=True))
    res["runs"].append(a)
    if not a["ok"]:
        ctx.check(what, False, f"run A: {a['error']}")
        return
    half = ctx.work / "models" / "resume-a" / CHECKPOINTS / step_tag(R // 2)
    b = train(ctx, TrainRun("resume-b", plan.small, ds, plan.fp16, True, R, save_every=R // 2, resume=half,
                            deterministic=True))
    res["runs"].append(b)
    if not b["ok"]:
        ctx.check(what, False, f"run B: {b['error']}")
        return
    keys = ("train/loss", "train/loss_scale", "train/grad_norm", "train/lr", "eval/loss")
    rows_a = {(x["step"], k): x[k] for x in a["rows"] if x["step"] > R // 2 for k in keys if k in x}
    rows_b = {(x["step"], k): x[k] for x in b["rows"] for k in keys if k in x}
    differ = sorted(k for k in rows_a.keys() | rows_b.keys() if rows_a.get(k) != rows_b.get(k))
    weights = compare_weights(ctx.work / "models" / "resume-a" / CHECKPOINTS / step_tag(R) / WEIGHTS,
                              ctx.work / "models" / "resume-b" / CHECKPOINTS / step_tag(R) / WEIGHTS)
    scales = [x["train/loss_scale"] for x in a["rows"] if "train/loss_scale" in x]
    shown = [f"step {s} {k}: {rows_a.get((s, k))!r} vs {rows_b.get((s, k))!r}" for s, k in differ[:10]]
    res.update(compared=len(rows_a), differ=shown, weights=weights,
               loss_scale_changes=sum(1 for x, y in zip(scales, scales[1:]) if x != y),
               skipped_a=a["skipped_steps"], b_resumed_from=b["summary"].get("resumed_from_step"))
    ok = not differ and weights == "equal" and res["b_resumed_from"] == R // 2 and len(rows_a) >= 2 * (R // 2)
    verdict = "all equal" if not differ else f"{len(differ)} differ, first: {shown[0]}"
    ctx.check(what, ok, f"steps {R // 2 + 1}-{R}: {len(rows_a)} values (loss, loss scale, grad norm, lr, eval loss) "
                        f"{verdict}; final weights {weights}; loss scale changed {res['loss_scale_changes']} time(s), "
                        f"{res['skipped_a']} overflow step(s) skipped in run A")


def compare_weights(a: Path, b: Path) -> str:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    if wa.keys() != wb.keys():
        return f"differ in names ({sorted(wa.keys() ^ wb.keys())[:3]})"
    bad = [k for k in wa if not (wa[k].dtype == wb[k].dtype and wa[k].shape == wb[k].shape
                                 and bool((wa[k] == wb[k]).all()))]
    return "equal" if not bad else f"differ in {len(bad)} tensor(s), e.g. {bad[0]}"


def deterministic_train(argv: list[str]) -> int:
    """``openllm-ds train`` with deterministic algorithms on, for the resume check."""
    import torch

    torch.use_deterministic_algorithms(True)
    # deterministic mode also fills every new tensor with NaN, a debugging aid that costs time and is not needed
    torch.utils.deterministic.fill_uninitialized_memory = False
    from openllm_ds.cli import main as cli_main

    return cli_main(["train", *argv])


def stage_error(ctx: Ctx, e: BaseException) -> None:
    """A stage that raised: its traceback in logs/, one failed check, and the other stages go on."""
    (ctx.work / "logs" / f"stage-{ctx.stage}.traceback").write_text(traceback.format_exc())
    ctx.check(f"{ctx.stage}: stage ran", False, f"{type(e).__name__}: {e}"[:1500])


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher's, first
    if args[:1] != [DETERMINISTIC_FLAG]:
        sys.exit(f"usage: {sys.argv[0]} {DETERMINISTIC_FLAG} TRAIN_ARGS  (the resume check's training entry point)")
    sys.exit(deterministic_train(args[1:]))
