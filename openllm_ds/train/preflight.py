"""Checks that run before any compute: each failure is one line naming the key or file and the fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from openllm_ds.config import RunConfig, validation_source
from openllm_ds.errors import ConfigError, DataError, UserError
from openllm_ds.train.checkpointing import check_fresh_output_dir, find_resume_checkpoint
from openllm_ds.train.data import num_windows, windows_needed
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
    for key, spec in data_keys(cfg):
        check_source_exists(key, spec)
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


def data_keys(cfg: RunConfig) -> list[tuple[str, str]]:
    """(config key, source) of every training and validation source the user named."""
    t = cfg.train
    key = "train.data_files (--data_files)" if t.data_files else "train.data_file (--data_file)"
    keys = [(key, spec) for spec, _ in t.sources]
    if cfg.eval_data:
        keys.append(("train.eval_data (--eval_data)", cfg.eval_data))
    elif t.data_files:
        keys += [("train.data_files: its validation", v) for spec, _ in t.sources if (v := validation_source(spec))]
    return keys


def check_source_exists(key: str, spec: str) -> None:
    import glob

    from openllm_ds.data.units import is_glob, is_hub_source

    if is_hub_source(spec) or Path(spec).exists() or is_glob(spec) and glob.glob(spec, recursive=True):
        return
    raise DataError(f"{key} {spec} does not exist; run `openllm-ds prepare` first or pass an existing file, folder, "
                    "glob pattern or hf:NAME")


def check_lengths(cfg: RunConfig, sources: list, world_size: int) -> None:
    """Every source has enough tokens for one global batch of training windows and one validation window per rank."""
    T = cfg.model.max_seq_len
    batch = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world_size
    key = "train.data_files" if cfg.train.data_files else "train.data_file"
    for s, need in zip(sources, windows_needed([s.weight for s in sources], batch)):
        tokens = len(s.train)
        have = num_windows(tokens, T)
        if have < need:
            what = (f"one global batch of {need} windows" if need == batch else
                    f"the {need} windows a step takes from it (weight {s.weight:.3g} of a global batch of {batch})")
            raise DataError(
                f"{key} {s.source} has {tokens:,} tokens = {have} windows of model.max_seq_len+1 = {T + 1} tokens, "
                f"fewer than {what} (micro {cfg.train.micro_batch_size} x grad_accum "
                f"{cfg.train.gradient_accumulation_steps} x {world_size} rank(s)); lower --batch_size or "
                "model.max_seq_len, or train on more text")
        tokens = len(s.val)
        have = num_windows(tokens, T)
        if have < world_size:
            fix = ("raise train.holdout_fraction or pass --eval_data" if s.val.split == "heldout"
                   else "use a longer file or a smaller model.max_seq_len")
            raise DataError(
                f"validation data ({s.val_name}) has {tokens:,} tokens = {have} windows of model.max_seq_len+1 = "
                f"{T + 1} tokens; validation needs at least {world_size}; {fix}")
