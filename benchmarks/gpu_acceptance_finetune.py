"""The fine-tune stage of the GPU acceptance run (benchmarks/gpu_acceptance.py): the small stage's trained run
fine-tuned on SQuAD's training questions, and its `squad_v1_chat` F1 before and after, through the project's own
commands: `openllm-ds prepare-sft` of the run's SQuAD dir into the work dir, `openllm-ds finetune` through the
deepspeed launcher (the small stage's precision and ZeRO-2 config), `openllm-ds evaluate --tasks squad_v1_chat
--limit N` on the base and on the result.

The fine-tune's recipe is the preset's `finetune:` section where it has one (tiny), else the preset's pretraining
peak learning rate and one copy drill per conversation (README, "Fine-tuning and chat"); its length is the plan's
(``Plan.finetune_steps``), validated on the held-out conversations every tenth of it: "it learned" is the validation
answer loss of its last evaluation below that of its first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gpu_acceptance_report import fmt
from gpu_acceptance_serve import cli
from gpu_acceptance_train import (ROOT, Ctx, TrainRun, error_tail, grad_accum, is_finite, launched, preset, run,
                                  small_run_name, train, zero)

CHAT_TASK = "squad_v1_chat"
DEV_FILE = "dev-v1.1.json"


def stage_finetune(ctx: Ctx) -> None:
    """prepare-sft -> finetune of the small run -> squad_v1_chat on the base and on the fine-tuned run."""
    plan = ctx.plan
    res = ctx.stages[ctx.stage]
    base = ctx.work / "models" / small_run_name(plan)
    why = missing_inputs(ctx, base)
    if why:
        ctx.check("finetune: runs", None, why)
        return
    data = ctx.work / "data" / "sft"
    shutil.rmtree(data, ignore_errors=True)  # this stage's own output from an earlier try
    p = run(ctx, "prepare-sft", cli("prepare-sft", "--squad_dir", str(ctx.squad), "--output_dir", str(data)),
            ctx.timeout(300))
    if not ctx.check("finetune: openllm-ds prepare-sft", p.returncode == 0,
                     error_tail(p) if p.returncode else f"{conversations(data)} conversations, {p.wall_s:.0f} s"):
        return
    r = TrainRun(f"small-{plan.fp16}-zero2-sft", plan.small, zero(2), plan.fp16, False, plan.finetune_steps)
    ft = train(ctx, r, finetune_command(ctx, r, base, data), timeout=360 if not plan.dry_run else 300)
    res["runs"].append(ft)
    learned(ctx, ft)
    task = task_file(ctx)
    res.update(steps=r.steps, questions=plan.questions, scores={})
    for when, model in (("before", base), ("after", ctx.work / "models" / r.name)):
        if when == "after" and not ft["ok"]:
            break
        res["scores"][when] = score = chat_score(ctx, when, model, task)
        ctx.check(f"finetune: {CHAT_TASK} {when} ({model.name})", "error" not in score,
                  score.get("error") or f"F1 {score['f1']:.2f}, EM {score['exact_match']:.2f} on "
                                        f"{score['questions']} questions, {score['wall_s']:.0f} s")


def missing_inputs(ctx: Ctx, base: Path) -> str | None:
    """Why the stage cannot run (the small run is missing or failed, no SQuAD files), else None."""
    small = ctx.stages.get("small", {})
    runs = small.get("runs") or [{}]
    if small.get("ok") is not True or not runs[0].get("ok") or not (base / "checkpoints" / "latest").is_file():
        return (f"it starts from the small stage's run ({base}), which is missing or failed; run the small stage "
                "first (--stages small,finetune)")
    squad = ctx.squad
    if squad is None or not squad.is_dir() or not any(squad.glob("train*.json")) or not (squad / DEV_FILE).is_file():
        return (f"no SQuAD dir with train*.json and {DEV_FILE} (--squad_dir {squad}); pass one, or rebuild the "
                "offline bundle with scripts/gpu_wheels.sh (its data/squad)")
    return None


def conversations(data: Path) -> str:
    try:
        stats = json.loads((data / "stats.json").read_text())
        return f"{stats['train']['conversations']:,} + {stats['validation']['conversations']:,}"
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def finetune_command(ctx: Ctx, r: TrainRun, base: Path, data: Path) -> list[str]:
    plan = ctx.plan
    cfg = preset(r.preset)
    recipe = cfg.get("finetune") or {}
    every = max(1, r.steps // 10)
    args = ["--config", str(ROOT / "configs" / f"{r.preset}.yaml"), "--model_dir", str(base), "--data", str(data),
            "--output_dir", str(ctx.work / "models" / r.name), "--ds_config", r.ds_config,
            "--max_steps", str(r.steps), "--warmup_steps", str(max(1, r.steps // 10)),
            "--lr", str(recipe.get("lr") or cfg["train"]["learning_rate"]),
            "--copy_drill", str(recipe.get("copy_drill", 1.0)), "--truncate", "--eval_every", str(every),
            "--save_every", str(r.steps), "--resume", "none"]
    if plan.micro_batch:
        args += ["--batch_size", str(plan.micro_batch)]
    # section.key=value last: argparse takes them as one positional list, after every flag
    args += [f"train.precision={r.precision}", f"train.gradient_accumulation_steps={grad_accum(plan, r.preset)}",
             "train.log_every=1", "train.keep_last=1", "train.gradient_checkpointing=false"]
    if plan.dry_run:
        args += ["train.eval_batches=1"]
    return launched(plan, "finetune", args)


def learned(ctx: Ctx, ft: dict) -> None:
    """The fine-tune exits 0, its losses are finite, its validation answer loss fell from its first evaluation."""
    what = f"{ctx.plan.small} fine-tune, {ft['precision']}, ZeRO-2: learns (validation answer loss falls)"
    if not ft["ok"]:
        ctx.check(what, False, ft["error"])
        return
    evals = [(x["step"], x["eval/loss"]) for x in ft["rows"] if "eval/loss" in x]
    finite = [v for _, v in evals if is_finite(v)]
    ft.update(val_losses=evals)
    ok = ft["nonfinite_losses"] == 0 and len(finite) == len(evals) >= 2 and finite[-1] < finite[0]
    bad = f", {ft['nonfinite_losses']} non-finite loss(es)" if ft["nonfinite_losses"] else ""
    curve = " -> ".join(f"{fmt(v, '.3f')} (step {s})" for s, v in (evals[:1] + evals[-1:]))
    ctx.check(what, ok, f"{ft['steps']} steps, validation answer loss {curve or '-'}{bad}, "
                        f"{ft['tokens_per_sec']:,.0f} tokens/s, {ft['wall_s']:.0f} s")


def task_file(ctx: Ctx) -> Path:
    """eval/squad_v1_chat.yaml with its data in the run's SQuAD dir (the task's own path is ../shared/data); the
    dry run's answers are --new_tokens long (a CPU decodes the tiny preset's 24 tokens in about a second)."""
    import yaml

    spec = yaml.safe_load((ROOT / "eval" / f"{CHAT_TASK}.yaml").read_text(encoding="utf-8"))
    spec.update(name=CHAT_TASK, data=str((ctx.squad / DEV_FILE).resolve()))
    if ctx.plan.dry_run:
        spec["max_new_tokens"] = ctx.plan.new_tokens
    ctx.stages[ctx.stage]["max_new_tokens"] = spec["max_new_tokens"]
    path = ctx.work / "data" / f"{CHAT_TASK}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def chat_score(ctx: Ctx, when: str, model: Path, task: Path) -> dict:
    """`openllm-ds evaluate --tasks squad_v1_chat --limit N` of one model: F1, EM, questions, seconds (or error)."""
    report = ctx.work / "logs" / f"{CHAT_TASK}-{when}.json"
    report.unlink(missing_ok=True)
    p = run(ctx, f"evaluate-{when}", cli("evaluate", "--model_dir", str(model), "--tasks", str(task), "--limit",
                                         str(ctx.plan.questions), "--num_workers", "0", "--output", str(report)),
            ctx.timeout(240))
    if p.returncode:
        return {"error": error_tail(p), "wall_s": round(p.wall_s, 1)}
    try:
        result = json.loads(report.read_text())["results"][0]
        m = result["metrics"]
        score = {"f1": m["f1"], "exact_match": m["exact_match"], "baseline_f1": result["baseline"],
                 "questions": result["num_examples"], "truncated_prompts": m.get("num_truncated_prompts"),
                 "step": result.get("step"), "wall_s": round(p.wall_s, 1),
                 "examples": [{k: e.get(k) for k in ("question", "prediction", "gold")} for e in m["examples"][:3]]}
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        return {"error": f"exit code 0 but {report} cannot be read: {type(e).__name__}: {e}", "wall_s": p.wall_s}
    if not is_finite(score["f1"]):
        return {"error": f"{report}: F1 is {score['f1']!r}", "wall_s": score["wall_s"]}
    return score
