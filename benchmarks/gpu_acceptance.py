"""GPU acceptance run: the paths a GPU user runs first, in one command, with one Markdown report.

    scripts/gpu_acceptance.sh [--with_vllm] [options]      # runs scripts/setup.sh first, then this
    .venv/bin/python benchmarks/gpu_acceptance.py [options]
    .venv/bin/python benchmarks/gpu_acceptance.py --dry_run [options]   # the CPU rehearsal CI runs

On a machine with one or more NVIDIA GPUs, in under 8 minutes, through the project's own commands
(`openllm-ds train` on one GPU, the deepspeed launcher on several; export, serve, generate):
  data     openllm-ds prepare --squad_dir (../shared/data/squad), train-tokenizer (the preset's vocabulary), tokenize
  fp16     the small preset, fp16 with dynamic loss scaling + activation checkpointing, ZeRO-2, --steps steps
  resume   the same twice with deterministic algorithms and a short loss-scale window (so that the scale
           moves): a run of --resume_steps steps and one resumed from its half-way checkpoint; losses, loss
           scales, gradient norms, learning rates and the final weights must be equal bit for bit
  bf16     the small preset in bf16 under ZeRO-3
  medium   the medium preset under ZeRO-3 + activation checkpointing: it fits, it runs, its MFU
  export   openllm-ds export --format huggingface of the fp16 run
  serve    greedy completions of the built-in server and of vLLM (when installed) against openllm-ds generate
MFU is model FLOPs (openllm_ds.train.metrics.flops_per_token; recomputation not counted) x tokens/s over the
GPU's dense fp16/bf16 peak (openllm_ds.train.metrics.peak_flops: datasheet table by name, else an estimate from
compute capability, SMs and clock); the median step after the first tenth. Writes WORK_DIR/report.md with
every figure, the GPU model, driver and library versions (gpu_acceptance_report.py), plus loss.png,
results.json and logs/.

--dry_run rehearses every stage on a CPU in about two minutes: the tiny preset, fp32 instead of fp16/bf16,
a few steps (the medium stage trains the tiny preset with ZeRO-3 + activation checkpointing), no vLLM unless
--vllm auto. Exit status: 0 every check passed (a stage may be skipped, with its reason), 1 a check failed,
2 bad input.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_acceptance_report import environment, fmt, loss_plot, nvidia_smi, write_report  # noqa: E402

from openllm_ds.errors import UserError  # noqa: E402

SHARED_SQUAD = Path(os.environ.get("OPENLLM_SHARED_DATA", ROOT.parent / "shared" / "data")) / "squad"
MARKER = ".gpu_acceptance"  # marks a work dir this script made: a rerun may replace what it wrote there
OWN_DIRS = ("data", "models", "exports", "logs")
PROMPTS = ("The Normans were", "Super Bowl 50 was", "The University of Chicago", "Oxygen is a chemical element")
MODEL_NAME = "acceptance"
DETERMINISTIC_FLAG = "--deterministic_train"


@dataclass
class Plan:
    """What the stages run: a GPU run or the CPU dry run."""

    dry_run: bool
    gpus: int
    steps: int
    resume_steps: int
    medium_steps: int
    new_tokens: int
    prompts: tuple[str, ...]
    vllm: str  # auto | off
    small: str = "small"
    medium: str = "medium"
    fp16: str = "fp16"
    bf16: str = "bf16"
    micro_batch: int | None = None  # None: the preset's own

    @classmethod
    def from_args(cls, a: argparse.Namespace, gpus: int) -> Plan:
        if a.dry_run:
            return cls(True, 1, a.steps or 4, a.resume_steps or 4, a.medium_steps or 2, a.new_tokens or 8,
                       PROMPTS[: a.prompts or 2], a.vllm or "off", small="tiny", medium="tiny", fp16="fp32",
                       bf16="fp32", micro_batch=4)
        return cls(False, gpus, a.steps or 300, a.resume_steps or 60, a.medium_steps or 40, a.new_tokens or 32,
                   PROMPTS[: a.prompts or 4], a.vllm or "auto")


@dataclass
class Ctx:
    plan: Plan
    work: Path
    clean: Path
    tokenizer: Path
    started: float = field(default_factory=time.perf_counter)
    commands: list[tuple[str, str]] = field(default_factory=list)  # (stage, command line)
    checks: list[dict] = field(default_factory=list)  # {check, result, ok (True/False/None = skipped)}

    def check(self, name: str, ok: bool | None, result: str) -> bool | None:
        self.checks.append({"check": name, "ok": ok, "result": result})
        print(f"[{'ok' if ok else 'skipped' if ok is None else 'FAILED'}] {name}: {result}", flush=True)
        return ok


# ---- commands --------------------------------------------------------------------------------------------

def venv_tool(name: str) -> str:
    tool = Path(sys.executable).parent / name
    return str(tool) if tool.is_file() else name


def openllm_ds(*args: str) -> list[str]:
    tool = Path(sys.executable).parent / "openllm-ds"
    return [str(tool), *args] if tool.is_file() else [sys.executable, "-m", "openllm_ds.cli", *args]


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float


def run(ctx: Ctx, stage: str, cmd: list[str], timeout: float, env: dict | None = None) -> Done:
    """Run one command from the repo root in its own process group (a timeout stops the launcher's ranks too);
    its stdout and stderr go to logs/<stage>.out and .err."""
    ctx.commands.append((stage, shlex.join(cmd)))
    print(f"[{stage}] {shlex.join(cmd)}", flush=True)
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
    (ctx.work / "logs" / f"{stage}.out").write_text(done.stdout)
    (ctx.work / "logs" / f"{stage}.err").write_text(done.stderr)
    return done


def last_json(stdout: str):
    """The JSON document a command printed last (its summary: the last line that opens a top-level object)."""
    i = stdout.rfind("\n{")
    return json.loads(stdout[i + 1:] if i >= 0 else stdout)


def error_tail(p: Done, lines: int = 6) -> str:
    err = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    mine = [ln for ln in err if ln.startswith("error:")]
    return (mine[-1] if mine else " | ".join(err[-lines:]))[-1500:] or f"exit code {p.returncode}"


# ---- machine and peaks ---------------------------------------------------------------------------------

def peaks(plan: Plan) -> dict:
    """Per precision: the peak MFU is taken against, and a timed torch.mm for comparison."""
    import torch

    from openllm_ds.train.metrics import measure_matmul_peak, peak_flops

    device = torch.device("cuda", 0) if not plan.dry_run else torch.device("cpu")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    out = {}
    for name in sorted({plan.fp16, plan.bf16}):
        dt = dtypes[name]
        if device.type == "cuda" and dt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            continue
        peak = peak_flops(device, dt)
        measured = peak.flops if peak.source.startswith("measured") else measure_matmul_peak(device, dt)
        out[name] = {"flops": peak.flops, "source": peak.source, "measured_mm_flops": measured}
    return out


class GpuMemory:
    """The most memory the GPUs held at once during a command, over what they held before it (this process's
    own CUDA context among it): nvidia-smi's memory.used, every 0.5 s."""

    def __init__(self, gpus: int):
        self.gpus, self.peak_mib, self._stop = gpus, 0.0, threading.Event()

    def used(self) -> float:
        rows = nvidia_smi("gpu=index,memory.used")
        return sum(float(r[1]) for r in rows if len(r) > 1 and r[0].isdigit() and int(r[0]) < self.gpus)

    def __enter__(self):
        if self.gpus:
            self.before = self.used()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.5):
            self.peak_mib = max(self.peak_mib, self.used() - self.before)

    def __exit__(self, *exc):
        self._stop.set()
        if self.gpus:
            self._thread.join(timeout=5)


# ---- data ------------------------------------------------------------------------------------------------

def preset(name: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text(encoding="utf-8"))


def stage_data(ctx: Ctx, args: argparse.Namespace) -> None:
    vocab = preset(ctx.plan.small)["model"]["vocab_size"]
    if not args.clean_dir:
        squad = Path(args.squad_dir)
        p = run(ctx, "prepare", openllm_ds("prepare", "--squad_dir", str(squad), "--output_dir", str(ctx.clean)), 900)
        if p.returncode:
            raise UserError(f"openllm-ds prepare --squad_dir {squad} failed: {error_tail(p)}")
    if not args.tokenizer_dir:
        p = run(ctx, "train-tokenizer", openllm_ds("train-tokenizer", "--input", str(ctx.clean / "training_data.txt"),
                                                   "--vocab_size", str(vocab), "--output_dir", str(ctx.tokenizer)), 900)
        if p.returncode:
            raise UserError(f"openllm-ds train-tokenizer failed: {error_tail(p)}")
    if not args.clean_dir:  # token shards now, not inside the first training run (rank 0 alone, the others waiting)
        texts = [str(ctx.clean / "training_data.txt"), str(ctx.clean / "validation_data.txt")]
        p = run(ctx, "tokenize", openllm_ds("tokenize", "--input", *texts, "--tokenizer_dir", str(ctx.tokenizer)), 900)
        if p.returncode:
            raise UserError(f"openllm-ds tokenize failed: {error_tail(p)}")
    check_tokenizer(ctx.tokenizer, ctx.plan)


def check_tokenizer(path: Path, plan: Plan) -> None:
    from openllm_ds.tokenizer import load_tokenizer

    vocab = preset(plan.small)["model"]["vocab_size"]
    try:
        have = load_tokenizer(path).vocab_size
    except UserError as e:
        raise UserError(f"--tokenizer_dir: {e}") from None
    if have != vocab:
        raise UserError(f"--tokenizer_dir {path} has {have} tokens and configs/{plan.small}.yaml wants "
                        f"{vocab}; pass a tokenizer of that size or leave --tokenizer_dir out")


# ---- training --------------------------------------------------------------------------------------------

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
             f"train.warmup_steps={max(1, r.steps // 10)}", "train.keep_last=2"]
    if plan.dry_run:
        args += ["train.eval_batches=1"]
    if r.deterministic:  # this file, as a thin launcher that turns deterministic algorithms on first
        entry = [str(Path(__file__).resolve()), DETERMINISTIC_FLAG]
        launcher = [venv_tool("deepspeed"), "--num_gpus", str(plan.gpus)] if plan.gpus > 1 else [sys.executable]
        return [*launcher, *entry, *args]
    if plan.gpus > 1:
        return [venv_tool("deepspeed"), "--num_gpus", str(plan.gpus), "--module", "openllm_ds.train", *args]
    return openllm_ds("train", *args)


def train(ctx: Ctx, r: TrainRun, peaks_: dict) -> dict:
    """Run one training job; its summary, log rows and derived figures (or its error)."""
    out = ctx.work / "models" / r.name
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if r.deterministic else {}
    if r.deterministic and ctx.plan.dry_run:  # on the CPU: MKL's results otherwise depend on the buffers'
        env.update(MKL_CBWR="AUTO,STRICT", OMP_NUM_THREADS="1")  # alignment and on how threads split a reduction
    with GpuMemory(0 if ctx.plan.dry_run else ctx.plan.gpus) as mem:
        p = run(ctx, f"train-{r.name}", train_command(ctx, r), 600 if not ctx.plan.dry_run else 300, env)
    res = {"name": r.name, "preset": r.preset, "precision": r.precision, "ds_config": Path(r.ds_config).name,
           "checkpointing": r.checkpointing, "steps": r.steps, "gpus": ctx.plan.gpus, "wall_s": round(p.wall_s, 1),
           "deterministic": r.deterministic, "ok": p.returncode == 0, "nvidia_smi_peak_mib": mem.peak_mib or None}
    if p.returncode:
        res["error"] = error_tail(p)
        return res
    summary = last_json(p.stdout)
    rows = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines() if ln.strip()]
    res.update(summary=summary, rows=rows, **throughput(r, summary, rows, out, peaks_))
    return res


def throughput(r: TrainRun, summary: dict, rows: list[dict], out: Path, peaks_: dict) -> dict:
    import yaml

    from openllm_ds.config import ModelConfig
    from openllm_ds.train.metrics import flops_per_token

    model = ModelConfig(**yaml.safe_load((out / "run_config.yaml").read_text())["model"])
    params = count_params(model)  # the summary's count is 0 under ZeRO-3 (partitioned parameters)
    steps = [x for x in rows if "train/tokens_per_sec" in x]
    timed = steps[max(1, len(steps) // 10):] or steps  # the first steps allocate, build and warm up
    tps = statistics.median(x["train/tokens_per_sec"] for x in timed)
    flops_tok = flops_per_token(model, params)
    peak = peaks_.get(summary["precision"], {})
    world = summary["world_size"]
    mfu = flops_tok * tps / (peak["flops"] * world) if peak else None
    losses = [x["train/loss"] for x in steps if isinstance(x["train/loss"], float)]  # "nan"/"inf": strings in JSON
    k = max(1, min(10, len(losses) // 4))
    return {
        "params": params, "summary_params": summary["num_params"], "precision": summary["precision"],
        "tokens_per_step": int(summary["tokens_seen"] / max(1, summary["final_step"])),
        "tokens_per_sec": tps, "flops_per_token": flops_tok, "mfu": mfu,
        "mfu_measured_mm": flops_tok * tps / (peak["measured_mm_flops"] * world) if peak else None,
        # activation checkpointing runs each block's forward again: ~8N instead of 6N FLOPs per token
        "hfu": mfu * 4 / 3 if mfu is not None and r.checkpointing else mfu,
        "torch_peak_mib": max((x.get("train/memory", 0) for x in steps), default=None),
        "loss_first": statistics.fmean(losses[:k]) if losses else None,
        "loss_last": statistics.fmean(losses[-k:]) if losses else None,
        "val_loss": summary.get("val_loss"), "skipped_steps": summary.get("nonfinite_skipped"),
        "loss_scales": sorted({x["train/loss_scale"] for x in steps}),
        "final_loss_scale": steps[-1]["train/loss_scale"] if steps else None,
    }


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
    finite = all(isinstance(x["train/loss"], float) for x in res["rows"] if "train/loss" in x)
    ok = finite and res["loss_last"] is not None and res["loss_last"] < res["loss_first"]
    mfu = f", MFU {res['mfu']:.1%}" if res["mfu"] is not None else ""
    ctx.check(what, ok, f"{res['steps']} steps, loss {fmt(res['loss_first'], '.3f')} -> "
                        f"{fmt(res['loss_last'], '.3f')}, "
                        f"{res['tokens_per_sec']:,.0f} tokens/s{mfu}, {res['skipped_steps']} skipped step(s)")


def resume_ds_config(ctx: Ctx, steps: int) -> Path:
    """zero2.json with a short loss-scale window: the dynamic scale rises (and overflows) within the run."""
    base = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    base["fp16"]["loss_scale_window"] = max(5, steps // 6)
    path = ctx.work / "models" / "zero2_short_scale_window.json"
    path.write_text(json.dumps(base, indent=2))
    return path


def stage_resume(ctx: Ctx, peaks_: dict) -> dict:
    """Run A to R steps (checkpoint at R/2); run B resumed from A's R/2 checkpoint; compare steps R/2+1..R."""
    from openllm_ds.checkpoint import CHECKPOINTS, WEIGHTS, step_tag

    plan = ctx.plan
    R = plan.resume_steps - plan.resume_steps % 2
    ds = str(resume_ds_config(ctx, R))
    a = train(ctx, TrainRun("resume-a", plan.small, ds, plan.fp16, True, R, save_every=R // 2, deterministic=True),
              peaks_)
    res = {"a": a, "steps": R, "ds_config": Path(ds).name}
    if not a["ok"]:
        ctx.check("resume: losses and loss scale continue bit-exactly", False, f"run A: {a['error']}")
        return res
    half = ctx.work / "models" / "resume-a" / CHECKPOINTS / step_tag(R // 2)
    b = train(ctx, TrainRun("resume-b", plan.small, ds, plan.fp16, True, R, save_every=R // 2, resume=half,
                            deterministic=True), peaks_)
    res["b"] = b
    if not b["ok"]:
        ctx.check("resume: losses and loss scale continue bit-exactly", False, f"run B: {b['error']}")
        return res
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
    ctx.check("resume: losses and loss scale continue bit-exactly", ok,
              f"steps {R // 2 + 1}-{R}: {len(rows_a)} values (loss, loss scale, grad norm, lr, eval loss) {verdict}; "
              f"final weights {weights}; loss scale changed {res['loss_scale_changes']} time(s), "
              f"{res['skipped_a']} overflow step(s) skipped in run A")
    return res


def compare_weights(a: Path, b: Path) -> str:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    if wa.keys() != wb.keys():
        return f"differ in names ({sorted(wa.keys() ^ wb.keys())[:3]})"
    bad = [k for k in wa if not (wa[k].dtype == wb[k].dtype and wa[k].shape == wb[k].shape
                                 and bool((wa[k] == wb[k]).all()))]
    return "equal" if not bad else f"differ in {len(bad)} tensor(s), e.g. {bad[0]}"


# ---- export and serving ----------------------------------------------------------------------------------

def stage_export(ctx: Ctx, model: Path) -> dict:
    out = ctx.work / "exports" / "huggingface"
    p = run(ctx, "export", openllm_ds("export", "--model_dir", str(model), "--format", "huggingface",
                                      "--output_dir", str(out)), 900)
    res = {"ok": p.returncode == 0, "dir": str(out), "wall_s": round(p.wall_s, 1)}
    if p.returncode:
        res["error"] = error_tail(p)
    else:
        res["report"] = last_json(p.stdout)
    ctx.check("export: Hugging Face files written and verified (logits against ours)", res["ok"],
              res.get("error") or f"{out} in {p.wall_s:.0f} s")
    return res


def generate(ctx: Ctx, export: Path, prompts, n: int) -> dict[str, str | None]:
    out = {}
    for i, prompt in enumerate(prompts):
        p = run(ctx, f"generate-{i}", openllm_ds("generate", "--model_dir", str(export), "--prompt", prompt,
                                                 "--max_length", str(n), "--temperature", "0"), 600)
        text = p.stdout
        out[prompt] = text[len(prompt):].removesuffix("\n") if p.returncode == 0 and text.startswith(prompt) else None
        if out[prompt] is None:
            out[f"error: {prompt}"] = (error_tail(p) if p.returncode
                                       else f"stdout does not start with the prompt: {text[:200]!r}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(port: int, method: str, path: str, body: dict | None = None, timeout: float = 300):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def serve_and_complete(ctx: Ctx, stage: str, engine: str, export: Path, prompts, n: int, max_length: int,
                       extra: tuple[str, ...] = (), ready_s: float = 300) -> dict:
    """`openllm-ds serve --engine ENGINE` on a free port; greedy completions of the prompts; then stopped."""
    port = free_port()
    cmd = openllm_ds("serve", "--model_path", str(export), "--engine", engine, "--port", str(port),
                     "--max_length", str(max_length), "--model_name", MODEL_NAME, *extra)
    ctx.commands.append((stage, shlex.join(cmd)))
    print(f"[{stage}] {shlex.join(cmd)}", flush=True)
    log = ctx.work / "logs" / f"{stage}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
                mine = [ln for ln in tail if ln.startswith("error:")]
                why = (mine or tail[-4:] or ["no output"])[-1][-1500:]
                return {"ok": False, "exit_code": proc.returncode, "error": why}
            try:
                if http_json(port, "GET", "/health", timeout=5)[0] == 200:
                    break
            except (OSError, ValueError):
                pass
            if time.perf_counter() - t0 > ready_s:
                return {"ok": False, "error": f"no answer on /health within {ready_s:.0f} s (log {log})"}
            time.sleep(0.5)
        ready = time.perf_counter() - t0
        texts = {}
        for prompt in prompts:
            try:
                status, body = http_json(port, "POST", "/v1/completions", {"model": MODEL_NAME, "prompt": prompt,
                                                                          "max_tokens": n, "temperature": 0})
                texts[prompt] = body["choices"][0]["text"]
            except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
                return {"ok": False, "error": f"/v1/completions: {type(e).__name__}: {e}"}
            if status != 200:
                return {"ok": False, "error": f"/v1/completions: HTTP {status}: {json.dumps(body)[:500]}"}
        return {"ok": True, "ready_s": round(ready, 1), "texts": texts}
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it stops its own children, vLLM included), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind in its group
    except (ProcessLookupError, PermissionError):
        pass


def stage_serve(ctx: Ctx, export: Path, max_length: int) -> dict:
    plan = ctx.plan
    ours = generate(ctx, export, plan.prompts, plan.new_tokens)
    res = {"generate": ours}
    missing = [p for p in plan.prompts if ours.get(p) is None]
    if missing:
        ctx.check("generate: greedy continuations", False, ours.get(f"error: {missing[0]}", "no output"))
        return res

    def compare(label: str, served: dict) -> None:
        if not served["ok"]:
            ctx.check(f"{label} == openllm-ds generate (greedy)", False, served["error"])
            return
        same = [p for p in plan.prompts if served["texts"][p] == ours[p]]
        ctx.check(f"{label} == openllm-ds generate (greedy)", len(same) == len(plan.prompts),
                  f"{len(same)}/{len(plan.prompts)} prompts identical, {plan.new_tokens} new tokens each "
                  f"(ready in {served['ready_s']} s)")

    res["builtin"] = serve_and_complete(ctx, "serve-builtin", "builtin", export, plan.prompts, plan.new_tokens,
                                        max_length, ready_s=180)
    compare("built-in server", res["builtin"])
    if plan.vllm == "off":
        ctx.check("vLLM == openllm-ds generate (greedy)", None, "not tried (--vllm off" +
                  (", the dry run's default)" if plan.dry_run else ")"))
        return res
    # fp32 as ours; vLLM's own default would be fp16 for an fp32 export. --enforce-eager: no graph capture
    # or compilation, a quicker start. fp16 is the fallback when its CUDA build cannot run fp32.
    for dtype in ("float32",) if plan.dry_run else ("float32", "float16"):
        served = serve_and_complete(ctx, f"serve-vllm-{dtype}", "vllm", export, plan.prompts, plan.new_tokens,
                                    max_length, (f"--vllm_arg=--dtype={dtype}", "--vllm_arg=--enforce-eager"), 420)
        served["dtype"] = dtype
        res.setdefault("vllm_tries", []).append(served)
        unavailable = "--engine vllm:" in served.get("error", "")  # the CLI's word: not installed, no GPU
        if served["ok"] or unavailable:
            break
    res["vllm"] = served
    if unavailable:
        ctx.check("vLLM == openllm-ds generate (greedy)", None, served["error"])
    else:
        compare(f"vLLM ({served['dtype']})", served)
    return res


# ---- main ------------------------------------------------------------------------------------------------

def prepare_work_dir(work: Path) -> None:
    """A fresh work dir, or one this script made before (its outputs there are replaced)."""
    if work.exists() and any(work.iterdir()) and not (work / MARKER).is_file():
        raise UserError(f"--work_dir {work} holds files this script did not write; pass an empty or new directory")
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("written by benchmarks/gpu_acceptance.py\n")
    for name in OWN_DIRS:
        if (work / name).is_dir():
            shutil.rmtree(work / name)
    for name in ("report.md", "results.json", "loss.png"):
        (work / name).unlink(missing_ok=True)
    (work / "logs").mkdir()
    (work / "models").mkdir()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry_run", action="store_true", help="CPU rehearsal: tiny preset, fp32, a few steps")
    p.add_argument("--work_dir", default=str(ROOT / "runs" / "gpu_acceptance"), help="outputs and report.md")
    p.add_argument("--squad_dir", default=str(SHARED_SQUAD),
                   help="SQuAD JSON files for `prepare` (default ../shared/data/squad)")
    p.add_argument("--clean_dir", help="reuse `prepare` output (training_data.txt, validation_data.txt) instead")
    p.add_argument("--tokenizer_dir", help="reuse a tokenizer of the preset's vocabulary instead of training one")
    p.add_argument("--num_gpus", type=int, help="GPUs to train on (default: all visible)")
    p.add_argument("--steps", type=int, help="steps of the fp16 and bf16 runs (default 300; dry run 4)")
    p.add_argument("--resume_steps", type=int, help="steps of each resume-check run (default 60; dry run 4)")
    p.add_argument("--medium_steps", type=int, help="steps of the medium run (default 40; dry run 2)")
    p.add_argument("--new_tokens", type=int, help="greedy tokens per prompt (default 32; dry run 8)")
    p.add_argument("--prompts", type=int, help=f"how many of the {len(PROMPTS)} prompts (default all; dry run 2)")
    p.add_argument("--vllm", choices=("auto", "off"),
                   help="serve with vLLM too when installed (default auto; dry run off)")
    a = p.parse_args(argv)
    for k in ("steps", "resume_steps", "medium_steps", "new_tokens", "prompts", "num_gpus"):
        v = getattr(a, k)
        if v is not None and v < (4 if k == "resume_steps" else 1):
            p.error(f"--{k} must be >= {4 if k == 'resume_steps' else 1}, got {v}")
    return a


def deterministic_train(argv: list[str]) -> int:
    """The training entry point (python -m openllm_ds.train) with deterministic algorithms on, for the resume check."""
    import torch

    torch.use_deterministic_algorithms(True)
    # deterministic mode also fills every new tensor with NaN, a debugging aid that costs time and is not needed
    torch.utils.deterministic.fill_uninitialized_memory = False
    from openllm_ds.train.__main__ import main as train_main

    return train_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if DETERMINISTIC_FLAG in argv:
        argv.remove(DETERMINISTIC_FLAG)
        return deterministic_train(argv)
    a = parse_args(argv)
    try:
        return acceptance(a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def acceptance(a: argparse.Namespace) -> int:
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not a.dry_run and visible == 0:
        raise UserError("no CUDA GPU is visible (torch.cuda.is_available() is False); run on a GPU machine after "
                        "scripts/setup.sh (CUDA torch), or pass --dry_run for the CPU rehearsal")
    if a.num_gpus and a.num_gpus > max(visible, 1):
        raise UserError(f"--num_gpus {a.num_gpus} but {visible} GPU(s) are visible; pass at most {visible}")
    plan = Plan.from_args(a, a.num_gpus or visible or 1)
    if not a.clean_dir and not Path(a.squad_dir).is_dir():
        raise UserError(f"--squad_dir {a.squad_dir} does not exist; pass a directory of SQuAD JSON files "
                        "(e.g. ../shared/data/squad) or --clean_dir with `openllm-ds prepare` output")
    if a.clean_dir and not (Path(a.clean_dir) / "training_data.txt").is_file():
        raise UserError(f"--clean_dir {a.clean_dir} has no training_data.txt; pass `openllm-ds prepare` output")
    if a.tokenizer_dir:
        check_tokenizer(Path(a.tokenizer_dir), plan)
    work = Path(a.work_dir).resolve()
    prepare_work_dir(work)
    ctx = Ctx(plan, work, Path(a.clean_dir).resolve() if a.clean_dir else work / "data" / "clean",
              Path(a.tokenizer_dir).resolve() if a.tokenizer_dir else work / "data" / "tokenizer")

    env = environment(plan.dry_run, plan.gpus)
    print(f"[env] {json.dumps({k: v for k, v in env.items() if k != 'gpus'})}", flush=True)
    peaks_ = peaks(plan)
    stage_data(ctx, a)

    zero2, zero3 = str(ROOT / "ds_configs" / "zero2.json"), str(ROOT / "ds_configs" / "zero3.json")
    runs = []
    fp16_name = f"{plan.small}-{plan.fp16}-zero2-ckpt"
    fp16 = train(ctx, TrainRun(fp16_name, plan.small, zero2, plan.fp16, True, plan.steps), peaks_)
    runs.append(fp16)
    check_learning(ctx, fp16, f"{plan.small} {plan.fp16}, ZeRO-2, activation checkpointing: trains")
    resume = stage_resume(ctx, peaks_)
    runs += [resume[k] for k in ("a", "b") if k in resume]
    bf16_ok = plan.dry_run or torch.cuda.is_bf16_supported()
    if bf16_ok:
        bf16 = train(ctx, TrainRun(f"{plan.small}-{plan.bf16}-zero3", plan.small, zero3, plan.bf16, False, plan.steps),
                     peaks_)
        runs.append(bf16)
        check_learning(ctx, bf16, f"{plan.small} {plan.bf16}, ZeRO-3: trains")
    else:
        ctx.check(f"{plan.small} bf16, ZeRO-3: trains", None, f"{torch.cuda.get_device_name()} has no bf16")
    medium = train(ctx, TrainRun(f"{plan.medium}-zero3-ckpt", plan.medium, zero3, "auto", True, plan.medium_steps),
                   peaks_)
    runs.append(medium)
    ctx.check(f"{plan.medium} fits and runs with ZeRO-3 + activation checkpointing", medium["ok"],
              medium.get("error") or f"{medium['steps']} steps, {medium['tokens_per_sec']:,.0f} tokens/s, MFU "
                                     f"{fmt(medium['mfu'], '.1%')}, peak {fmt(medium['torch_peak_mib'], ',.0f')} MiB")

    export = serve = None
    if fp16["ok"]:
        export = stage_export(ctx, work / "models" / fp16_name)
        if export["ok"]:
            context = preset(plan.small)["model"]["max_seq_len"]
            serve = stage_serve(ctx, Path(export["dir"]), context)
    else:
        ctx.check("export and serving", False, "not run: the fp16 training run failed")

    if loss_plot(runs, work / "loss.png") is False:
        (work / "loss.png").unlink(missing_ok=True)
    report = write_report(ctx, env, peaks_, runs, resume, export, serve)
    strip = lambda r: {k: v for k, v in r.items() if k != "rows"}  # noqa: E731
    (work / "results.json").write_text(json.dumps(
        {"plan": plan.__dict__, "environment": env, "peaks": peaks_, "checks": ctx.checks,
         "runs": [strip(r) for r in runs], "resume": {k: v for k, v in resume.items() if k not in ("a", "b")},
         "export": export, "serve": serve, "commands": ctx.commands,
         "wall_s": round(time.perf_counter() - ctx.started, 1)}, indent=2, default=str))
    failed = [c["check"] for c in ctx.checks if c["ok"] is False]
    print(f"report: {report}" + (f"; FAILED: {'; '.join(failed)}" if failed else "; every check passed"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
