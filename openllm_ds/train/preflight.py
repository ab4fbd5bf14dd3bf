"""Checks that run before any compute: each failure is one line naming the key or file and the fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from openllm_ds.config import RunConfig
from openllm_ds.errors import ConfigError, DataError, UserError
from openllm_ds.train.checkpointing import check_fresh_output_dir, find_resume_checkpoint
from openllm_ds.train.data import num_windows
from openllm_ds.train.distributed import DistEnv
from openllm_ds.train.ds_config import build_ds_config, resolve_precision
from openllm_ds.utils import ensure_writable_dir


@dataclass(frozen=True)
class RunInputs:
    tokenizer: object  # openllm_ds.tokenizer.Tokenizer
    ds_config: dict
    precision: str  # fp32 | fp16 | bf16, resolved for the device
    resume_from: Path | None
    eval_tasks: tuple = ()  # openllm_ds.evaluation.tasks.TaskSpec, run at each evaluation


def check_run_inputs(cfg: RunConfig, env: DistEnv) -> RunInputs:
    from openllm_ds.tokenizer import load_tokenizer

    t = cfg.train
    ds_config = build_ds_config(cfg, env.world_size, env.device)
    if t.eval_batches < 1:
        raise ConfigError(f"train.eval_batches must be >= 1, got {t.eval_batches}")
    try:
        tokenizer = load_tokenizer(t.tokenizer_dir)
    except UserError as e:
        raise ConfigError(f"train.tokenizer_dir (--tokenizer_dir): {e}") from None
    if cfg.model.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer in {t.tokenizer_dir} has "
                          f"{tokenizer.vocab_size} tokens; set model.vocab_size={tokenizer.vocab_size} "
                          "(or train the tokenizer with that --vocab_size)")
    for key, path in (("train.data_file (--data_file)", t.data_file), ("train.eval_data (--eval_data)", cfg.eval_data)):
        if not Path(path).is_file():
            raise DataError(f"{key} {path} does not exist; run `openllm-ds prepare` first or pass an existing "
                            "text file (one document a line)")
    eval_tasks = load_eval_tasks(t.eval_tasks)
    check_output_dir(cfg, tokenizer.model_file)
    resume_from = find_resume_checkpoint(cfg)
    if resume_from is None:
        check_fresh_output_dir(cfg)
    return RunInputs(tokenizer, ds_config, resolve_precision(t.precision, env.device), resume_from, eval_tasks)


def load_eval_tasks(names) -> tuple:
    """train.eval_tasks: harness task YAMLs or names (eval/*.yaml), parsed and their data checked now."""
    if not names:
        return ()
    from openllm_ds.evaluation.tasks import load_task

    try:
        return tuple(load_task(n) for n in names)
    except UserError as e:
        raise ConfigError(f"train.eval_tasks: {e}") from None


def check_output_dir(cfg: RunConfig, tokenizer_model: Path) -> None:
    """Writable, and not a run trained with another tokenizer."""
    out = ensure_writable_dir(cfg.output_dir, "train.output_dir (--output_dir)")
    copied = out / "tokenizer" / tokenizer_model.name
    if copied.is_file() and copied.read_bytes() != tokenizer_model.read_bytes():
        raise ConfigError(f"output dir {out} holds a run trained with another tokenizer ({copied.parent}) than "
                          f"train.tokenizer_dir {cfg.train.tokenizer_dir}; choose another --output_dir")


def check_lengths(cfg: RunConfig, train_tokens: int, val_tokens: int, world_size: int) -> None:
    """Enough tokens for one global batch of training windows and one validation window per rank."""
    T = cfg.model.max_seq_len
    need = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world_size
    have = num_windows(train_tokens, T)
    if have < need:
        raise DataError(
            f"train.data_file {cfg.train.data_file} has {train_tokens:,} tokens = {have} windows of "
            f"model.max_seq_len+1 = {T + 1} tokens, fewer than one global batch of {need} windows (micro "
            f"{cfg.train.micro_batch_size} x grad_accum {cfg.train.gradient_accumulation_steps} x {world_size} "
            "rank(s)); lower --batch_size or model.max_seq_len, or train on more text")
    have = num_windows(val_tokens, T)
    if have < world_size:
        raise DataError(
            f"train.eval_data {cfg.eval_data} has {val_tokens:,} tokens = {have} windows of model.max_seq_len+1 = "
            f"{T + 1} tokens; validation needs at least {world_size}; use a longer file or a smaller model.max_seq_len")
