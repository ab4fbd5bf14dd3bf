"""GPU acceptance run: the paths a GPU user runs first, in one command, with one Markdown report.

    scripts/gpu_acceptance.sh --offline .whl [options]    # a machine with no network: the wheels and data of
                                                          # scripts/gpu_wheels.sh, the machine's own python3 and torch
    scripts/gpu_acceptance.sh [--with_vllm] [options]     # a machine with network: scripts/setup.sh first
    .venv/bin/python benchmarks/gpu_acceptance.py --dry_run [options]   # the CPU rehearsal

On a machine with NVIDIA GPUs, in under 8 minutes, through the project's own commands (the deepspeed launcher,
`openllm-ds export`, `generate`, `serve`), stage by stage:
  data         `openllm-ds tokenize` in this process (and `prepare`, `train-tokenizer` when no data is given)
  small        the small preset, fp16 (dynamic loss scaling) + activation checkpointing, ZeRO-2, --steps steps
  resume       the same twice with deterministic algorithms and a short loss-scale window: a run of
               --resume_steps and one resumed from its half-way checkpoint; losses, loss scales, gradient norms,
               learning rates and final weights must be equal bit for bit
  medium       the medium preset (117M, seq 1024), bf16, no activation checkpointing, torch.compile: tokens/s and
               MFU (target: >= 35% on one H100)
  serve        `export --format huggingface` of the small model; greedy text of `generate`, the built-in server
               and vLLM (when installed), compared on equal devices and dtypes
  finetune     the small run fine-tuned (`prepare-sft` of the SQuAD dir, `finetune` through the launcher in the
               small run's precision, --finetune_steps steps), and `evaluate --tasks squad_v1_chat --limit
               --questions` on the base and the result: F1/EM before and after; skipped when the small run is
               missing or failed
  medium_ckpt  the medium run with activation checkpointing, for its cost
A stage that fails does not stop the others; each prints its time, and --stages / --skip run some of them again
(the results of the others are kept from the work dir's results.json). MFU is model FLOPs
(openllm_ds.train.metrics.flops_per_token) x tokens/s over the GPU's dense fp16/bf16 peak (datasheet by name, a MIG
slice's share of it by SMs, else SMs x clock), measured in a child process, like everything that touches CUDA: this
process holds no CUDA context. Writes WORK_DIR/report.md, results.json, loss.png and logs/ (and copies them to
--out). Exit status: 0 every check passed (a stage may be skipped, with its reason), 1 a check failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_acceptance_finetune import stage_finetune  # noqa: E402
from gpu_acceptance_machine import describe_gpus, probe  # noqa: E402
from gpu_acceptance_report import all_runs, loss_plot, versions, write_report  # noqa: E402
from gpu_acceptance_serve import stage_serve  # noqa: E402
from gpu_acceptance_train import (Ctx, Plan, error_tail, preset, run, stage_error, stage_medium,  # noqa: E402
                                  stage_resume, stage_small)

from openllm_ds.errors import UserError  # noqa: E402

SHARED_SQUAD = Path(os.environ.get("OPENLLM_SHARED_DATA", ROOT.parent / "shared" / "data")) / "squad"
MARKER = ".gpu_acceptance"  # marks a work dir this script made: a rerun may replace what it wrote there
PROMPTS = ("The Normans were", "Super Bowl 50 was", "The University of Chicago", "Oxygen is a chemical element")
# in the order they run: the one that matters least last, where a spent budget leaves it out
STAGES = {"small": stage_small, "resume": stage_resume, "medium": lambda ctx: stage_medium(ctx, False),
          "serve": stage_serve, "finetune": stage_finetune, "medium_ckpt": lambda ctx: stage_medium(ctx, True)}
BUNDLE_DATA = ("data/clean", "data/tokenizer")  # scripts/gpu_wheels.sh writes these beside the wheels
BUNDLE_SQUAD = "data/squad"  # and SQuAD v1.1's train and dev files, for the finetune stage
OUT_FILES = ("report.md", "results.json", "loss.png")


def plan_from(a: argparse.Namespace, gpus: int) -> Plan:
    if a.dry_run:
        return Plan(True, 1, a.steps or 4, a.resume_steps or 4, a.medium_steps or 2, a.new_tokens or 8,
                    PROMPTS[: a.prompts or 2], a.vllm or "off", a.budget_s or 1800, small="tiny", medium="tiny",
                    fp16="fp32", bf16="fp32", micro_batch=4, compile=False, finetune_steps=a.finetune_steps or 4,
                    questions=a.questions or 4)
    return Plan(False, gpus, a.steps or 200, a.resume_steps or 40, a.medium_steps or 30, a.new_tokens or 32,
                PROMPTS[: a.prompts or 3], a.vllm or ("off" if a.offline else "auto"), a.budget_s or 450,
                compile=not a.no_compile, finetune_steps=a.finetune_steps or 300, questions=a.questions or 200)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry_run", action="store_true", help="CPU rehearsal: tiny preset, fp32, a few steps")
    p.add_argument("--offline", metavar="DIR", help="the dir of scripts/gpu_wheels.sh: its data/clean and "
                   "data/tokenizer are the data (no prepare: it needs Ray), vLLM is off")
    p.add_argument("--work_dir", default=str(ROOT / "runs" / "gpu_acceptance"), help="outputs, report.md, logs/")
    p.add_argument("--out", help="also copy report.md, results.json, loss.png and logs.tar.gz here")
    p.add_argument("--squad_dir", help="SQuAD JSON files for `prepare` and the finetune stage (default: --offline "
                   "DIR's data/squad, else ../shared/data/squad)")
    p.add_argument("--clean_dir", help="reuse `prepare` output (training_data.txt, validation_data.txt) instead")
    p.add_argument("--tokenizer_dir", help="reuse a tokenizer of the preset's vocabulary instead of training one")
    p.add_argument("--num_gpus", type=int, help="GPUs to train on (default: all visible)")
    p.add_argument("--stages", help=f"comma-separated, of {','.join(STAGES)} (default all)")
    p.add_argument("--skip", help="comma-separated stages not to run (their earlier results are kept)")
    p.add_argument("--budget_s", type=float, help="seconds for the whole run; a stage that would start after them "
                   "is not run, and each command's limit is what is left (default 450; dry run 1800)")
    p.add_argument("--steps", type=int, help="steps of the small run (default 200; dry run 4)")
    p.add_argument("--resume_steps", type=int, help="steps of each resume-check run (default 40; dry run 4)")
    p.add_argument("--medium_steps", type=int, help="steps of each medium run (default 30; dry run 2)")
    p.add_argument("--no_compile", action="store_true", help="the medium runs without torch.compile")
    p.add_argument("--finetune_steps", type=int, help="steps of the fine-tune (default 300; dry run 4)")
    p.add_argument("--questions", type=int, help="squad_v1_chat questions before and after the fine-tune "
                   "(default 200; dry run 4)")
    p.add_argument("--new_tokens", type=int, help="greedy tokens per prompt (default 32; dry run 8)")
    p.add_argument("--prompts", type=int, help=f"how many of the {len(PROMPTS)} prompts (default 3; dry run 2)")
    p.add_argument("--vllm", choices=("auto", "off"),
                   help="serve with vLLM too when installed (default auto; dry run and --offline: off)")
    a = p.parse_args(argv)
    for k in ("steps", "resume_steps", "medium_steps", "finetune_steps", "questions", "new_tokens", "prompts",
              "num_gpus"):
        v = getattr(a, k)
        if v is not None and v < (4 if k == "resume_steps" else 1):
            p.error(f"--{k} must be >= {4 if k == 'resume_steps' else 1}, got {v}")
    for flag in ("stages", "skip"):
        bad = [s for s in (getattr(a, flag) or "").split(",") if s and s not in STAGES]
        if bad:
            p.error(f"--{flag}: no stage {', '.join(bad)}; the stages are {', '.join(STAGES)}")
    return a


def selected(a: argparse.Namespace) -> list[str]:
    wanted = [s for s in (a.stages or ",".join(STAGES)).split(",") if s]
    skip = set((a.skip or "").split(","))
    return [s for s in STAGES if s in wanted and s not in skip]


def prepare_work_dir(work: Path) -> dict:
    """A fresh work dir, or one this script made before; returns the earlier run's stages (results.json), whose
    outputs a rerun keeps for the stages it does not run."""
    if work.exists() and any(work.iterdir()) and not (work / MARKER).is_file():
        raise UserError(f"--work_dir {work} holds files this script did not write; pass an empty or new directory")
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("written by benchmarks/gpu_acceptance.py\n")
    earlier = {}
    if (work / "results.json").is_file():
        try:
            earlier = json.loads((work / "results.json").read_text())
        except ValueError:
            earlier = {}
    for name in ("logs", "models"):
        (work / name).mkdir(exist_ok=True)
    return earlier


# ---- data ------------------------------------------------------------------------------------------------

def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "openllm_ds", *args]


def stage_data(ctx: Ctx, a: argparse.Namespace) -> None:
    """`prepare` and `train-tokenizer` where no data is given; the token shards in this process (no Ray)."""
    plan = ctx.plan
    vocab = preset(plan.small)["model"]["vocab_size"]
    steps = []
    if not a.clean_dir:
        steps.append(("prepare", cli("prepare", "--squad_dir", a.squad_dir, "--output_dir", str(ctx.clean))))
    if not a.tokenizer_dir:
        steps.append(("train-tokenizer", cli("train-tokenizer", "--input", str(ctx.clean / "training_data.txt"),
                                             "--vocab_size", str(vocab), "--output_dir", str(ctx.tokenizer))))
    texts = [str(ctx.clean / "training_data.txt"), str(ctx.clean / "validation_data.txt")]
    # each into its default shards dir, where `openllm-ds train` reads it
    steps.append(("tokenize", cli("tokenize", "--input", *texts, "--tokenizer_dir", str(ctx.tokenizer),
                                  "--num_workers", "0")))
    for name, cmd in steps:
        p = run(ctx, name, cmd, ctx.timeout(600))
        ctx.check(f"data: openllm-ds {name}", p.returncode == 0,
                  error_tail(p) if p.returncode else f"{p.wall_s:.0f} s")
        if p.returncode:
            return
    check_tokenizer(ctx.tokenizer, plan)


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


def check_inputs(a: argparse.Namespace) -> None:
    if a.offline:
        bundle = Path(a.offline)
        missing = [d for d in BUNDLE_DATA if not (bundle / d).is_dir()]
        if missing and not (a.clean_dir and a.tokenizer_dir):
            raise UserError(f"--offline {bundle} has no {' or '.join(missing)}; build it with scripts/gpu_wheels.sh "
                            "(its data step), or pass --clean_dir and --tokenizer_dir")
        a.clean_dir = a.clean_dir or str(bundle / BUNDLE_DATA[0])
        a.tokenizer_dir = a.tokenizer_dir or str(bundle / BUNDLE_DATA[1])
        if not a.squad_dir and (bundle / BUNDLE_SQUAD).is_dir():
            a.squad_dir = str(bundle / BUNDLE_SQUAD)
    a.squad_dir = a.squad_dir or str(SHARED_SQUAD)
    if not a.clean_dir and not Path(a.squad_dir).is_dir():
        raise UserError(f"--squad_dir {a.squad_dir} does not exist; pass a directory of SQuAD JSON files "
                        "(e.g. ../shared/data/squad) or --clean_dir with `openllm-ds prepare` output")
    if a.clean_dir and not (Path(a.clean_dir) / "training_data.txt").is_file():
        raise UserError(f"--clean_dir {a.clean_dir} has no training_data.txt; pass `openllm-ds prepare` output")


# ---- main ------------------------------------------------------------------------------------------------

def run_stage(ctx: Ctx, name: str, fn) -> None:
    ctx.stage = name
    ctx.stages[name] = s = {"ok": None, "checks": [], "runs": [], "commands": [],
                            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    print(f"[stage {name}] started, {ctx.remaining():.0f} s of the budget left", flush=True)
    t0 = time.perf_counter()
    try:
        fn(ctx)
    except Exception as e:  # noqa: BLE001 - a broken stage is one failed check; the next stage still runs
        stage_error(ctx, e)
    s["wall_s"] = round(time.perf_counter() - t0, 1)
    oks = [c["ok"] for c in s["checks"]]
    s["ok"] = False if False in oks else True if True in oks else None
    print(f"[stage {name}] {'passed' if s['ok'] else 'skipped' if s['ok'] is None else 'FAILED'} "
          f"in {s['wall_s']:.0f} s", flush=True)


def finish(ctx: Ctx, env: dict, out: str | None) -> Path:
    """results.json, loss.png and report.md in the work dir (after every stage: a run cut short keeps them), and
    their copies with logs.tar.gz in ``out``."""
    work = ctx.work
    results = {"command": shlex.join(["benchmarks/gpu_acceptance.py", *sys.argv[1:]]), "plan": ctx.plan.__dict__,
               "environment": env, "gpus": ctx.gpus, "peaks": ctx.peaks, "stages": ctx.stages,
               "wall_s": round(time.perf_counter() - ctx.started, 1)}
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if loss_plot(all_runs(results), work / "loss.png") is False:
        (work / "loss.png").unlink(missing_ok=True)
    report = write_report(results, work / "report.md")
    if out:
        dest = Path(out)
        dest.mkdir(parents=True, exist_ok=True)
        for name in OUT_FILES:
            if (work / name).is_file():
                shutil.copyfile(work / name, dest / name)
        with tarfile.open(dest / "logs.tar.gz", "w:gz") as tar:
            tar.add(work / "logs", arcname="logs")
    return report


def main(argv: list[str] | None = None) -> int:
    a = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return acceptance(a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def acceptance(a: argparse.Namespace) -> int:
    check_inputs(a)
    t0 = time.perf_counter()
    machine = probe(["fp32"] if a.dry_run else ["fp16", "bf16"], cpu=a.dry_run)
    if machine.get("error"):
        raise UserError(machine["error"])
    visible = len(machine["gpus"])
    if a.num_gpus and a.num_gpus > max(visible, 1):
        raise UserError(f"--num_gpus {a.num_gpus} but {visible} GPU(s) are visible; pass at most {visible}")
    plan = plan_from(a, a.num_gpus or visible or 1)
    if a.tokenizer_dir:
        check_tokenizer(Path(a.tokenizer_dir), plan)
    work = Path(a.work_dir).resolve()
    earlier = prepare_work_dir(work)
    gpus = describe_gpus(machine["gpus"])
    ctx = Ctx(plan, work, Path(a.clean_dir).resolve() if a.clean_dir else work / "data" / "clean",
              Path(a.tokenizer_dir).resolve() if a.tokenizer_dir else work / "data" / "tokenizer", gpus,
              machine["peaks"], started=t0, squad=Path(a.squad_dir).resolve())
    env = {**versions(), **{k: machine.get(k) for k in ("torch", "cuda_runtime", "cudnn", "nccl")},
           "driver": gpus[0]["driver"] if gpus else None}
    print(f"[env] {json.dumps(env)}\n[gpus] {json.dumps(gpus)}", flush=True)

    run_stage(ctx, "data", lambda c: stage_data(c, a))
    finish(ctx, env, a.out)
    if not ctx.stages["data"]["ok"]:
        print("the other stages need the data: not run", file=sys.stderr)
        return 1
    chosen = selected(a)
    same_kind = earlier.get("plan", {}).get("dry_run") == plan.dry_run
    for name, fn in STAGES.items():
        if name not in chosen:
            kept = earlier.get("stages", {}).get(name) if same_kind else None
            ctx.stages[name] = {**kept, "note": f"from the earlier run of {kept.get('started', '?')}"} if kept else \
                {"ok": None, "checks": [], "runs": [], "commands": [], "note": "not selected (--stages/--skip)"}
        elif ctx.remaining() < 60:
            ctx.stages[name] = {"ok": None, "checks": [], "runs": [], "commands": [],
                                "note": f"not run: the budget of {plan.budget_s:.0f} s is spent; rerun with "
                                        f"--stages {name}"}
        else:
            run_stage(ctx, name, fn)
        finish(ctx, env, a.out)
    report = finish(ctx, env, a.out)
    failed = [f"{n}: {c['check']}" for n, s in ctx.stages.items() for c in s["checks"] if c["ok"] is False]
    timing = ", ".join(f"{n} {s['wall_s']:.0f} s" for n, s in ctx.stages.items() if s.get("wall_s") is not None)
    print(f"report: {report} ({timing}; total {time.perf_counter() - t0:.0f} s)" +
          (f"; FAILED: {'; '.join(failed)}" if failed else "; every check passed"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
