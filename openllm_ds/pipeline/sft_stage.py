"""The pipeline's SFT stage (``finetune.in_pipeline``): prepare-sft -> finetune -> squad_v1_chat before (the base
model) and after (the fine-tuned one) -> the fine-tuned model's Hugging Face export, which is what to serve. Each
step is skipped, as every pipeline stage is, when its outputs are complete and its inputs unchanged."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from openllm_ds.config import PrepareSftConfig, RunConfig

SFT_DATA_DIR = "data/sft"
CHAT_TASK = "squad_v1_chat"


def sft_paths(cfg: RunConfig) -> tuple[Path, Path, Path]:
    """(conversations dir, fine-tuned run dir, its Hugging Face export dir)."""
    return Path(SFT_DATA_DIR), Path(f"models/{cfg.name}-sft"), Path("exports/huggingface-sft")


def run_sft_stage(cfg: RunConfig, state, stats: dict | None, base_dir: Path, ckpt_fp: str, fingerprint, force: bool):
    """The stage's results for the report; None when it is off or the run has no SQuAD files to draw from."""
    from openllm_ds.evaluation.tasks import load_task, run_task
    from openllm_ds.export import export
    from openllm_ds.finetune.prepare import prepare_sft
    from openllm_ds.finetune.run import finetune_run_config
    from openllm_ds.train import launch

    squad = Path((stats or {}).get("location", ""))
    dev = squad / "dev-v1.1.json"
    if not cfg.finetune.in_pipeline or not stats or not dev.is_file():
        return None
    data_dir, out, export_dir = sft_paths(cfg)
    prep_cfg = PrepareSftConfig(squad_dir=str(squad), output_dir=str(data_dir))
    prepared = state.run("prepare-sft", fingerprint(dataclasses.asdict(prep_cfg), *sorted(squad.glob("train*.json"))),
                         lambda: (data_dir / "stats.json").is_file(), lambda: prepare_sft(prep_cfg), force)
    sft_cfg = dataclasses.replace(
        cfg, finetune=dataclasses.replace(cfg.finetune, model_dir=str(base_dir), data=str(data_dir)),
        train=dataclasses.replace(cfg.train, output_dir=str(out), eval_tasks=(), resume="auto"))
    summary = state.run("finetune", fingerprint(ckpt_fp, dataclasses.asdict(cfg.finetune), prepared),
                        lambda: (out / "checkpoints" / "latest").is_file() and "finetune" in state.data,
                        lambda: launch(finetune_run_config(sft_cfg)), force)
    task = dataclasses.replace(load_task(CHAT_TASK, check_data=False), data=str(dev),
                               limit=cfg.finetune.pipeline_questions)
    scores = {}
    for when, model_dir, fp in (("before", base_dir, ckpt_fp), ("after", out, summary)):
        scores[when] = state.run(f"{CHAT_TASK}-{when}", fingerprint(fp, task.to_dict()), lambda: True,
                                 lambda model_dir=model_dir: _chat_scores(run_task(task, str(model_dir))), force)
    state.run("export-huggingface-sft", fingerprint(summary), lambda: (export_dir / "config.json").is_file(),
              lambda: export(dataclasses.replace(cfg.export, model_dir=str(out), format="huggingface",
                                                 output_dir=str(export_dir), overwrite=True)), force)
    return {"prepared": prepared, "summary": summary, "scores": scores, "export": str(export_dir),
            "model_dir": str(out)}


def _chat_scores(result: dict) -> dict:
    m = result["metrics"]
    return {"exact_match": m["exact_match"], "f1": m["f1"], "baseline_f1": result["baseline"],
            "num_examples": result["num_examples"], "num_truncated_prompts": m["num_truncated_prompts"],
            "examples": m["examples"], "step": result.get("step")}


def sft_report_lines(sft: dict | None) -> list[str]:
    """The report's fine-tuning section."""
    if not sft:
        return []
    s, ft, before, after = sft["summary"], sft["summary"].get("finetune", {}), sft["scores"]["before"], sft["scores"]["after"]
    lines = ["", "## Fine-tuning (SFT)", "",
             f"`openllm-ds finetune` from the trained model on {ft.get('conversations', 0):,} SQuAD conversations "
             f"({sft['prepared']['validation']['conversations']:,} held out by passage), context {ft.get('context')}: "
             f"{s['final_step']} steps, {s['tokens_seen']:,} tokens, {s.get('elapsed_s', 0):.0f} s.", "",
             "| | before (base) | after (fine-tuned) |", "|---|---:|---:|",
             f"| {CHAT_TASK} exact match | {before['exact_match']:.2f} | {after['exact_match']:.2f} |",
             f"| {CHAT_TASK} F1 | {before['f1']:.2f} | {after['f1']:.2f} |",
             f"| random-span baseline F1 | {before['baseline_f1']:.2f} | {after['baseline_f1']:.2f} |",
             f"| questions (prompts truncated) | {before['num_examples']} ({before['num_truncated_prompts']}) | "
             f"{after['num_examples']} ({after['num_truncated_prompts']}) |", "",
             f"- validation answer loss (answer tokens only): {s['val_loss']:.4f}" if s.get("val_loss") is not None
             else "- validation answer loss: -",
             f"- padding share of the batches: {ft.get('padding_share', 0):.1%}",
             f"- conversations longer than the context: {ft.get('truncated', 0)} (truncated; "
             f"{ft.get('dropped_after_truncation', 0)} left out, their answer past the head)",
             f"- served: `openllm-ds serve --model_dir {sft['export']}` (the fine-tuned model's Hugging Face export)",
             "", "Sample conversations (greedy, after fine-tuning):", ""]
    for e in after["examples"][:3]:
        lines.append(f"- User: {e['question']!r} -> Assistant: {e['prediction']!r} (gold {e['gold'][:1]!r})")
    return lines
