"""`openllm-ds evaluate`: perplexity of a text file, or harness tasks over checkpoints."""

from __future__ import annotations

import dataclasses

import time
from pathlib import Path

from openllm_ds.checkpoint import load_model
from openllm_ds.config import validation_source
from openllm_ds.errors import DataError, UserError
from openllm_ds.utils import select_device
from openllm_ds.evaluation.harness import run_harness
from openllm_ds.evaluation.sliding_window import check_metrics, evaluate_text, read_documents
from openllm_ds.evaluation.tasks import TaskSpec
from openllm_ds.utils import atomic_write_json, check_output_file


def evaluate(model_dir, eval_data=None, metrics=("perplexity", "loss"), stride=None, batch_size=8, checkpoint=None,
             tasks=(), checkpoints=None, num_workers=2, output=None, limit=None) -> dict:
    """Without ``tasks``: the requested perplexity metrics of ``eval_data`` (default: the run's
    validation file) under the checkpoint at step ``checkpoint`` (default latest) or an export.

    With ``tasks`` (names in eval/ or YAML paths): every task on every checkpoint in
    ``checkpoints`` ("all" | "latest" | "10,20"; default: ``checkpoint`` or latest), across
    ``num_workers`` Ray workers (0: in this process); ``eval_data`` then adds a perplexity task
    on that file; ``limit`` replaces each task's number of examples. Returns the report; ``output`` also receives
    it as JSON.
    """
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    if stride is not None and stride < 1:
        raise UserError(f"--stride must be >= 1, got {stride}")
    if output:
        check_output_file(output, "--output")  # before the evaluation, not after it
    tasks = tuple(tasks or ())
    if limit is not None:
        if limit < 1 or not tasks:
            raise UserError(f"--limit sets the examples of each --tasks task: pass it with --tasks, >= 1 (got {limit})")
        from openllm_ds.evaluation.tasks import load_task

        tasks = tuple(dataclasses.replace(load_task(t), limit=limit) for t in tasks)
    if tasks:
        if checkpoints is None and checkpoint is not None:
            checkpoints = str(checkpoint)
        extra = []
        if eval_data:
            _read_eval_data(eval_data, limit=1)  # missing or empty file: fail now
            extra.append(TaskSpec(name=f"{Path(eval_data).stem}_ppl", kind="perplexity", data=str(Path(eval_data).resolve()),
                                  stride=stride, batch_size=batch_size, source="--eval_data"))
        return run_harness(model_dir, tasks, checkpoints, num_workers, output, extra_specs=extra)
    if checkpoints is not None:
        raise UserError("--checkpoints selects checkpoints for --tasks; for one perplexity evaluation use --checkpoint STEP")

    metrics = check_metrics(metrics)
    docs = _read_eval_data(eval_data) if eval_data else None
    loaded = load_model(model_dir, step=checkpoint, device=select_device())
    if docs is None:
        eval_data, docs = run_validation_documents(loaded.run_config)

    tokenizer = loaded.tokenizer
    start = time.perf_counter()
    result = evaluate_text(loaded.model, tokenizer, docs, stride=stride, batch_size=batch_size)
    seconds = time.perf_counter() - start
    report = {
        "model_dir": str(model_dir),
        "checkpoint": str(loaded.path),
        "step": loaded.step,
        "eval_data": str(eval_data),
        **{m: result[m] for m in metrics},
        **{k: result[k] for k in ("num_tokens", "num_words", "num_bytes", "num_documents", "stride", "max_seq_len")},
        "seconds": round(seconds, 3),
        "tokens_per_second": round(result["num_tokens"] / seconds, 1) if seconds > 0 else None,
    }
    if output:
        atomic_write_json(output, report)
    return report


def run_validation_documents(run_config) -> tuple[str, list[str]]:
    """What a training run validated on: its validation source's documents, or its held-out documents (decoded
    from the held-out token shards of each training source)."""
    if run_config is None:
        raise UserError("pass --eval_data (any source: a text file, one document a line, JSONL, ...); an export "
                        "does not know its run's validation data")
    if run_config.eval_data:
        if not Path(run_config.eval_data).exists():
            raise UserError(f"pass --eval_data; the run's validation file {run_config.eval_data} is not there")
        return run_config.eval_data, read_documents(run_config.eval_data)
    from openllm_ds.tokenizer import TokenShards, load_tokenizer
    from openllm_ds.tokenizer.corpus import built_shards_dir

    names, docs = [], []
    for spec, _ in run_config.train.sources:
        if run_config.train.data_files and (val := validation_source(spec)):
            names.append(val)
            docs += read_documents(val)
            continue
        try:
            shards_dir = built_shards_dir(spec, run_config.tokenizer.shards_root)
            shards = TokenShards(shards_dir, "heldout")
        except UserError as e:
            raise UserError(f"pass --eval_data: the run validated on the held-out documents of {spec}, but {e}") from None
        names.append(f"held-out documents of {spec} ({shards_dir})")
        docs += shards.documents(load_tokenizer(run_config.train.tokenizer_dir))
    return "; ".join(names), docs


def _read_eval_data(path, limit=None) -> list[str]:
    try:
        return read_documents(path, limit=limit)
    except DataError as e:
        raise DataError(f"--eval_data: {e}") from None
