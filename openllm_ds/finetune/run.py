"""``openllm-ds finetune``: the training loop (train/loop.py) in its fine-tuning mode.

``finetune_run_config`` turns the finetune section into the run config the loop trains with: the base model's shape
(its context replaced by ``finetune.max_seq_len``) and tokenizer, ``train.init_from`` = the base weights, the
finetune section's schedule and batch; the engine, checkpoints, resume, rollback, TensorBoard and launchers are the
train section's. A run config whose ``finetune.model_dir`` is set is a fine-tune: ``train()`` then reads
conversations (``load_sft``) instead of token shards (``sft_data``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from openllm_ds.config import RunConfig
from openllm_ds.errors import ConfigError, UserError
from openllm_ds.finetune.data import SftBatches, SftEvalBatches, SftExamples, load_examples
from openllm_ds.train.distributed import DistEnv

TRAIN_FILE, VALIDATION_FILE = "train.jsonl", "validation.jsonl"


def sft_files(data: str, eval_data: str | None) -> tuple[str, str | None]:
    """(training conversations, validation conversations): a folder means its train.jsonl; validation defaults to
    validation.jsonl beside the training file (None when there is none)."""
    p = Path(data)
    if p.is_dir() and (p / TRAIN_FILE).is_file():
        p = p / TRAIN_FILE
    if eval_data is None and p.is_file() and (p.parent / VALIDATION_FILE).is_file() and p.name != VALIDATION_FILE:
        eval_data = str(p.parent / VALIDATION_FILE)
    return str(p), eval_data


def finetune_run_config(cfg: RunConfig) -> RunConfig:
    """The run config of a fine-tune (idempotent: a resolved config resolves to itself)."""
    from openllm_ds.checkpoint import weights_source
    from openllm_ds.train.preflight import check_source_exists

    ft = cfg.finetune
    if not ft.model_dir:
        raise ConfigError("finetune needs the weights to start from: pass --model_dir (a training output, a "
                          "checkpoints/step_* dir, or a Hugging Face/PyTorch export)")
    try:
        src = weights_source(ft.model_dir)
    except UserError as e:
        raise ConfigError(f"finetune.model_dir (--model_dir): {e}") from None
    out = Path(cfg.train.output_dir or f"models/{cfg.name}-sft").expanduser()
    base = Path(ft.model_dir).expanduser().resolve()
    base_run = src.path.resolve().parent.parent if src.path.resolve().parent.name == "checkpoints" else base
    for b in {base, base_run}:
        if out.resolve() == b or b in out.resolve().parents or out.resolve() in b.parents:
            raise ConfigError(f"--output_dir {out} is (or holds, or lies in) the base model {b}: a fine-tune never "
                              "writes into the run it starts from; pass a new --output_dir, e.g. models/NAME-sft")
    for key, spec in (("finetune.data (--data)", ft.data), ("finetune.eval_data (--eval_data)", ft.eval_data)):
        if spec:  # before sft_files looks beside it for validation.jsonl
            check_source_exists(key, spec, "run `openllm-ds prepare-sft` first or pass an existing JSON Lines file, "
                                "a folder or a glob of them")
    data, eval_data = sft_files(ft.data, ft.eval_data)
    if eval_data is None:
        raise ConfigError(f"finetune.data {ft.data}: no validation conversations (validation.jsonl beside it); pass "
                          "--eval_data FILE.jsonl (openllm-ds prepare-sft writes both)")
    model = dataclasses.replace(src.model_config, max_seq_len=ft.max_seq_len or src.model_config.max_seq_len)
    min_lr = ft.min_lr if ft.min_lr is not None else ft.lr / 10
    train = dataclasses.replace(
        cfg.train, output_dir=str(out), init_from=str(ft.model_dir), tokenizer_dir=str(src.tokenizer_dir),
        learning_rate=ft.lr, min_lr_ratio=min_lr / ft.lr, warmup_steps=ft.warmup_steps,
        micro_batch_size=ft.batch_size, max_steps=ft.max_steps or cfg.train.max_steps, data_file=data, data_files=(),
        data_weights=(), eval_data=eval_data)
    return dataclasses.replace(cfg, model=model, train=train,
                               finetune=dataclasses.replace(ft, data=data, eval_data=eval_data))


@dataclass
class SftData:
    train: SftExamples
    val: SftExamples
    steps_per_epoch: int


def load_sft(cfg: RunConfig, env: DistEnv) -> tuple[RunConfig, SftData]:
    """The conversations tokenised with the base model's tokenizer and chat template (every rank alike), and the run
    config with ``train.max_steps`` = ``finetune.epochs`` x steps per epoch unless ``finetune.max_steps`` is set."""
    from openllm_ds.tokenizer import load_tokenizer
    from openllm_ds.tokenizer.chat import SpecialTokens

    cfg = finetune_run_config(cfg)
    ft, t = cfg.finetune, cfg.train
    tokenizer = load_tokenizer(t.tokenizer_dir)
    template, special = chat_template_of(t.tokenizer_dir, tokenizer), SpecialTokens(tokenizer)
    max_len = cfg.model.max_seq_len + 1
    train = load_examples(ft.data, template, special, max_len, ft.truncate)
    val = load_examples(ft.eval_data, template, special, max_len, ft.truncate, "finetune.eval_data (--eval_data)")
    global_batch = t.micro_batch_size * t.gradient_accumulation_steps * env.world_size
    steps = (len(train.ids) + round(ft.copy_drill * len(train.ids))) // global_batch
    if steps < 1:
        raise ConfigError(f"finetune.data {ft.data} holds {len(train.ids)} conversations, fewer than one global batch "
                          f"of {global_batch}; lower --batch_size or add conversations")
    if ft.max_steps is None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, max_steps=max(1, math.ceil(ft.epochs * steps))))
    return cfg, SftData(train, val, steps)


def chat_template_of(tokenizer_dir, tokenizer):
    from openllm_ds.tokenizer.chat import load_chat_template

    template = load_chat_template(tokenizer_dir, tokenizer)
    if template is None:
        raise ConfigError(f"the base model's tokenizer ({tokenizer_dir}) has no chat_template in tokenizer_config.json: "
                          "fine-tuning trains on the template the model will be served with; retrain the tokenizer "
                          "with `openllm-ds train-tokenizer`, or add one")
    return template


def sft_data(cfg: RunConfig, tokenizer, env: DistEnv, sft: SftData):
    """The loop's data for a fine-tune: (sources, batches, eval sets, data fingerprint, notes for the summary)."""
    import hashlib

    from openllm_ds.train.data import DataSource

    t, ft = cfg.train, cfg.finetune
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    batches = SftBatches(sft.train, t.micro_batch_size, t.gradient_accumulation_steps, env, t.seed, pad,
                         ft.copy_drill, tokenizer.prompt_prefix_id)
    evals = SftEvalBatches(sft.val, t.eval_batches * t.micro_batch_size, t.micro_batch_size, env, pad)
    source = DataSource("sft", ft.data, 1.0, sft.train, sft.val, ft.eval_data)
    fingerprint = hashlib.sha256(f"{sft.train.sha256} {ft.copy_drill}".encode()).hexdigest()
    notes = {"finetune": {
        "conversations": len(sft.train.ids), "validation_conversations": len(sft.val.ids),
        "steps_per_epoch": batches.steps_per_epoch, "copy_drill_examples_per_epoch": batches.num_drill,
        "padding_share": round(batches.padding_share(), 4), "context": cfg.model.max_seq_len,
        "truncated": sft.train.truncated + sft.val.truncated, "dropped_after_truncation": sft.train.dropped + sft.val.dropped,
        "base_model": ft.model_dir}}
    return [source], batches, [evals], fingerprint, notes
