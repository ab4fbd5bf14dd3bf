"""The run config: typed sections, one per concern, composed into one RunConfig (``load_run_config``).

Precedence: dataclass defaults < YAML preset (``--config``) < model JSON (``--model_config``)
< CLI flags and ``section.key=value`` overrides. Unknown keys and wrong types are errors that
name the key and the file before any work starts. Configs are never mutated at run time:
runtime state lives in the trainer's state object.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from openllm_ds.config.fields import INT64, parse_workers, setting
from openllm_ds.errors import ConfigError
from openllm_ds.export.formats import FORMATS, GGUF_TYPES, format_choices, pipeline_formats
from openllm_ds.text import text_problem
from openllm_ds.utils import read_json as read_json_file, read_yaml as read_yaml_file

DOC_SEPARATORS = ("newline", "blank_line")
TRAIN_AND_FINETUNE = ("train", "finetune")  # the train section's flags that finetune takes too
ON_BAD_RECORD = ("error", "skip")
# settings that name paths (or sources, which may be paths): `~` expanded once, where they are read
PATH_KEYS = {"data.squad_dir", "data.output_dir", "data.cache_dir", "tokenizer.input", "tokenizer.output_dir",
             "tokenizer.shards_root", "train.output_dir", "train.data_file", "train.data_files", "train.eval_data",
             "train.tokenizer_dir", "train.ds_config", "train.resume", "train.init_from", "train.eval_tasks",
             "export.model_dir", "export.output_dir", "finetune.model_dir", "finetune.data", "finetune.eval_data"}


@dataclass(frozen=True)
class ReadOptions:
    """How documents are read from a source: the field holding the text, the separator of text files, and what a
    bad record does (the tokenizer section's settings, for the readers in data/)."""

    text_field: str = "text"
    doc_separator: str = "newline"  # newline | blank_line (text files)
    on_bad_record: str = "error"  # error | skip

    def __post_init__(self):
        if self.doc_separator not in DOC_SEPARATORS:
            raise ConfigError(f"--doc_separator must be newline or blank_line, got {self.doc_separator!r}")
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ConfigError(f"--on_bad_record must be error or skip, got {self.on_bad_record!r}")
        if not self.text_field:
            raise ConfigError("--text_field must name a field, e.g. --text_field text")


@dataclass(frozen=True)
class DataConfig:
    source: str = setting("download", "download (official URLs, sha256-checked) | dir (--squad_dir) | hub (Hugging "
                          "Face datasets)")
    squad_dir: str | None = setting(None, "directory of SQuAD JSON files to use instead of downloading (files named "
                                    "*dev* are validation)")
    output_dir: str = setting("data/clean", "where training_data.txt, validation_data.txt and stats.json go "
                              "(default data/clean)")
    cache_dir: str = setting("~/.cache/openllm-ds/squad", "download cache (default ~/.cache/openllm-ds/squad)")
    min_words: int = setting(10, "drop passages with fewer words (default 10)")
    num_workers: int = setting(2, "Ray workers that share the stage (default 2): cleaning")

    def __post_init__(self):
        if self.source not in ("download", "dir", "hub"):
            raise ConfigError(f"data.source must be download, dir or hub, got {self.source!r}")
        if self.min_words < 0:
            raise ConfigError(f"data.min_words must be >= 0, got {self.min_words}")
        if self.num_workers < 1:
            raise ConfigError(f"data.num_workers must be >= 1, got {self.num_workers}")


@dataclass(frozen=True)
class TokenizerConfig:
    input: str = setting("data/clean/training_data.txt", "training text: any source `tokenize` reads (default "
                         "data/clean/training_data.txt)")
    output_dir: str = setting("data/tokenizer", "where the tokenizer files go (default data/tokenizer)")
    vocab_size: int = setting(32000, "vocabulary size, exact (default 32000)")
    model_type: str = setting("bpe", "bpe (default) or unigram")
    character_coverage: float = setting(0.9995, "SentencePiece character coverage (default 0.9995)")
    max_sentence_length: int = setting(4192, "longest input line in bytes (default 4192)")
    # lines SentencePiece trains on, sampled evenly; 0 = all (a large corpus: 10M)
    input_sentence_size: int = setting(0, "lines to train on, sampled; 0 = all (default)")
    # corpus -> token shards (tokenize, and train on its data), see data/documents.py and tokenizer/corpus.py
    num_workers: int | str = setting("auto", "Ray workers that share the stage: N, 0 (this process) or auto (default: "
                                     "this process for less than 32 MB of input, else one per CPU)",
                                     stages=("tokenize",), parse=parse_workers)
    text_field: str = setting("text", "JSON/Parquet/Arrow field holding the text (default text)",
                              stages=("train-tokenizer", "tokenize", "train"))
    doc_separator: str = setting("newline", "text files: newline (a document a line, default) | blank_line "
                                 "(documents separated by an empty line)", stages=("train-tokenizer", "tokenize", "train"))
    on_bad_record: str = setting("error", "a record that is not JSON or lacks the text: error (default) | skip "
                                 "(counted)", stages=("tokenize", "train"))
    # drop exact duplicate documents across all sources (the first copy is kept)
    dedup: bool = setting(True, "keep exact duplicate documents (default: removed)", flag="--no_dedup",
                          stages=("tokenize", "train"))
    unit_bytes: int = setting(16 * 2**20, "input bytes per unit of work (and per shard file)", stages=("tokenize",),
                              hidden=True)
    shards_root: str = "data/tokens"  # where the shards of globs, hf: datasets and mixtures of sources go

    def __post_init__(self):
        if self.model_type not in ("bpe", "unigram"):
            raise ConfigError(f"tokenizer.model_type must be bpe or unigram, got {self.model_type!r}")
        if self.vocab_size < 260:
            # 256 byte-fallback pieces + <unk> <s> </s> <pad>
            raise ConfigError(f"tokenizer.vocab_size must be >= 260 (byte fallback needs 256 + 4 specials), got {self.vocab_size}")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ConfigError(f"tokenizer.character_coverage must be in (0, 1], got {self.character_coverage}")
        if not 10 <= self.max_sentence_length <= 2**30:  # SentencePiece's own bounds
            raise ConfigError(f"tokenizer.max_sentence_length must be in [10, 2^30] bytes, got {self.max_sentence_length}")
        if self.num_workers != "auto" and (not isinstance(self.num_workers, int) or self.num_workers < 0):
            raise ConfigError(f"tokenizer.num_workers must be auto or >= 0 (0: in this process), got {self.num_workers!r}")
        if self.doc_separator not in DOC_SEPARATORS:
            raise ConfigError(f"tokenizer.doc_separator must be newline or blank_line, got {self.doc_separator!r}")
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ConfigError(f"tokenizer.on_bad_record must be error or skip, got {self.on_bad_record!r}")
        if not self.text_field:
            raise ConfigError("tokenizer.text_field must name a field, e.g. text")
        if self.unit_bytes < 1 or self.input_sentence_size < 0:
            raise ConfigError(f"tokenizer.unit_bytes must be >= 1 and tokenizer.input_sentence_size >= 0, got "
                              f"{self.unit_bytes} and {self.input_sentence_size}")

    def read_options(self) -> ReadOptions:
        return ReadOptions(self.text_field, self.doc_separator, self.on_bad_record)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    d_ff: int = 3072  # SwiGLU hidden size
    max_seq_len: int = 1024
    dropout: float = 0.1
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        for k in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, k) < 1:
                raise ConfigError(f"model.{k} must be >= 1, got {getattr(self, k)}")
        if self.n_kv_heads is not None and self.n_kv_heads < 1:
            raise ConfigError(f"model.n_kv_heads must be >= 1 (or null for n_heads), got {self.n_kv_heads}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.n_heads ({self.n_heads}) must divide model.d_model ({self.d_model})")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"model.d_model / model.n_heads = {self.d_model // self.n_heads} must be even for RoPE")
        if self.n_heads % self.num_kv_heads:
            raise ConfigError(f"model.n_kv_heads ({self.n_kv_heads}) must divide model.n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str | None = setting(None, "run directory (default models/NAME; finetune: models/NAME-sft)",
                                      stages=TRAIN_AND_FINETUNE)
    # training data: any source (a text/JSONL/JSON/Parquet file, a folder, a glob, a saved or hf: dataset, a
    # token shards dir); or a mixture: data_files sampled by data_weights (default: equal)
    data_file: str = setting("data/clean/training_data.txt", "training data: a file (text, JSONL/JSON, .gz/.zst, "
                             "Parquet), folder, glob, saved HF dataset, hf:NAME or shards dir; tokenized when needed")
    data_files: tuple[str, ...] = setting((), "a mixture of sources (with --data_weights)")
    data_weights: tuple[float, ...] = setting((), "sampling weight of each --data_files source (default: equal)")
    # validation: eval_data when given (one training source only); else validation_data.txt beside a file named
    # training_data.txt (`prepare`'s layout); else a held-out share of each source, chosen by document hash
    eval_data: str | None = setting(None, "validation data (default: validation_data.txt beside a training_data.txt, "
                                    "else a held-out share of the training data)")
    holdout_fraction: float = setting(0.01, "share of each source's documents held out for validation when no "
                                      "validation data is given (default 0.01)")
    allow_data_change: bool = False  # resume a checkpoint on other data (from the start of the new data's order)
    tokenizer_dir: str = setting("data/tokenizer", "tokenizer directory (default data/tokenizer)")
    ds_config: str = setting("ds_configs/zero2.json", "DeepSpeed JSON (ds_configs/zero0..3, *_offload); 'auto' values "
                             "come from the run config", stages=TRAIN_AND_FINETUNE)
    micro_batch_size: int = setting(8, "sequences per forward pass, on each rank (the micro batch)", flag="--batch_size")
    gradient_accumulation_steps: int = setting(1, "micro batches per optimizer step")
    learning_rate: float = setting(3e-4, "peak learning rate (warmup then cosine)")
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 100
    max_steps: int = setting(1000, "optimizer steps")
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = setting("auto", "auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16")
    gradient_checkpointing: bool = False
    # torch.compile the model through DeepSpeed's engine.compile(): faster steps after a one-off compile
    # (about a minute on a CPU, once per process); evaluation and generation stay eager
    compile: bool = False
    seed: int = setting(42, "random seed", stages=TRAIN_AND_FINETUNE)
    eval_every: int = setting(100, "validate every N steps", stages=TRAIN_AND_FINETUNE)
    eval_batches: int = 20
    save_every: int = setting(500, "checkpoint every N steps", stages=TRAIN_AND_FINETUNE)
    keep_last: int = 3
    log_every: int = 10
    resume: str = setting("auto", "auto (latest checkpoint in --output_dir) | none | a checkpoint dir", stages=TRAIN_AND_FINETUNE)
    # a new run starts from these weights (step 0, its own optimizer and schedule): a training output, one of its
    # checkpoints/step_* dirs, or a Hugging Face Llama dir (an export of ours or a compatible checkpoint)
    init_from: str | None = setting(None, "start a new run from these weights: a training output, a "
                                    "checkpoints/step_* dir or a Hugging Face Llama dir")
    num_workers: int = setting(0, "Ray workers that share the stage (0: this process, or the deepspeed launcher's): "
                               "N DeepSpeed ranks under Ray Train", stages=TRAIN_AND_FINETUNE)
    max_failures: int = 3  # Ray Train: worker-group restarts (resuming from latest) after a failure; -1 = no limit
    # loss spikes: spike_steps consecutive steps whose loss is non-finite or above spike_factor x its
    # running average (and 3 running standard deviations above it: train/spikes.py) roll the run back to
    # the last good checkpoint and skip the batches since it;
    # after max_rollbacks rollbacks the run stops instead. spike_factor 0 watches non-finite losses only.
    spike_factor: float = 2.0
    spike_steps: int = 3
    max_rollbacks: int = 3
    eval_tasks: tuple[str, ...] = ()  # harness task YAMLs run at each evaluation

    def __post_init__(self):
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ConfigError(f"train.precision must be auto, fp32, fp16 or bf16, got {self.precision!r}")
        for k in ("micro_batch_size", "gradient_accumulation_steps", "max_steps", "eval_every", "save_every", "log_every", "keep_last"):
            if getattr(self, k) < 1:
                raise ConfigError(f"train.{k} must be >= 1, got {getattr(self, k)}")
        if self.spike_steps < 1:
            raise ConfigError(f"train.spike_steps must be >= 1, got {self.spike_steps}")
        if self.max_rollbacks < 0 or not (self.spike_factor == 0 or self.spike_factor > 1):
            raise ConfigError(f"train.max_rollbacks must be >= 0 and train.spike_factor 0 (off) or > 1, got "
                              f"{self.max_rollbacks} and {self.spike_factor}")
        if self.warmup_steps < 0 or self.num_workers < 0:
            raise ConfigError("train.warmup_steps and train.num_workers must be >= 0")
        if self.max_failures < -1:
            raise ConfigError(f"train.max_failures must be >= 0, or -1 for no limit, got {self.max_failures}")
        if not 0 <= self.seed < 2**31:  # numpy's global seed (seed + rank) must stay below 2^32
            raise ConfigError(f"train.seed must be in [0, 2^31), got {self.seed}")
        if not self.learning_rate > 0:  # NaN too
            raise ConfigError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 < self.holdout_fraction < 0.5:  # NaN too
            raise ConfigError(f"train.holdout_fraction must be in (0, 0.5), got {self.holdout_fraction}")
        if self.data_weights:
            if not self.data_files:
                raise ConfigError("train.data_weights needs train.data_files (one weight per file)")
            if len(self.data_weights) != len(self.data_files):
                raise ConfigError(f"train.data_weights has {len(self.data_weights)} weights for {len(self.data_files)} "
                                  "train.data_files; give one weight per file")
            if not all(w >= 0 and w < float("inf") for w in self.data_weights) or not sum(self.data_weights) > 0:
                raise ConfigError(f"train.data_weights must be >= 0, finite, and not all 0, got "
                                  f"{list(self.data_weights)}")
        if self.data_files and self.eval_data:
            raise ConfigError("train.eval_data is for one train.data_file; with train.data_files each source "
                              "validates on its own held-out share (train.holdout_fraction) or validation_data.txt")

    @property
    def sources(self) -> list[tuple[str, float]]:
        """(source, sampling weight) of every training source, the weights summing to 1."""
        files = self.data_files or (self.data_file,)
        weights = self.data_weights or (1.0,) * len(files)
        total = sum(weights)
        return [(f, w / total) for f, w in zip(files, weights)]


@dataclass(frozen=True)
class FinetuneConfig:
    """``openllm-ds finetune``: supervised fine-tuning on conversations, a mode of the training loop (the train
    section's engine, checkpoints and launchers); these settings replace the train section's data, schedule and
    batch (openllm_ds/finetune/run.py)."""

    model_dir: str | None = setting(None, "the weights to start from: a training output, a checkpoints/step_* dir, "
                                    "a Hugging Face or PyTorch export, a Hugging Face Llama dir (its tokenizer too)")
    data: str = setting("data/sft", "conversations: a JSON Lines file ({\"messages\": [...]} or {\"prompt\", "
                        "\"completion\"}; .gz/.zst), a glob, or a folder holding train.jsonl (default data/sft)",
                        aliases=("--data_file",))
    eval_data: str | None = setting(None, "validation conversations (default: validation.jsonl beside train.jsonl)")
    lr: float = setting(1e-4, "peak learning rate (default 1e-4, below pretraining's), warmup then cosine",
                        aliases=("--learning_rate",))
    min_lr: float | None = setting(None, "the cosine's floor (default lr / 10)")
    epochs: float = setting(2.0, "passes over the conversations (default 2; --max_steps instead)")
    max_steps: int | None = setting(None, "optimizer steps (default: epochs x steps per epoch)")
    warmup_steps: int = setting(50, "linear warmup steps (default 50)")
    batch_size: int = setting(16, "conversations per micro batch on each rank (default 16), batched by length")
    max_seq_len: int | None = setting(None, "context in tokens (default the base model's; RoPE lets it be longer: "
                                      "the fine-tuned model and its exports carry it)")
    truncate: bool = setting(False, "keep the head of a conversation longer than the context (default: refused)")
    copy_drill: float = setting(0.0, "share of extra copy-drill sequences per epoch: a run of 20-60 tokens of a "
                                "training conversation, then the same run again, loss on the second copy only; it "
                                "teaches a small model to copy from its context (default 0; tiny preset 1)")
    # the pipeline's SFT stage (pipeline/sft_stage.py): on in the tiny preset; squad_v1_chat questions asked before/after
    in_pipeline: bool = False
    pipeline_questions: int = 200

    def __post_init__(self):
        if not self.lr > 0 or (self.min_lr is not None and not 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"finetune.lr must be > 0 and finetune.min_lr in [0, lr], got {self.lr} and {self.min_lr}")
        if not self.epochs > 0 or (self.max_steps is not None and self.max_steps < 1):
            raise ConfigError(f"finetune.epochs must be > 0 and finetune.max_steps >= 1, got {self.epochs} and "
                              f"{self.max_steps}")
        if self.warmup_steps < 0 or self.batch_size < 1 or (self.max_seq_len is not None and self.max_seq_len < 2):
            raise ConfigError(f"finetune.warmup_steps must be >= 0, finetune.batch_size >= 1 and finetune.max_seq_len "
                              f">= 2, got {self.warmup_steps}, {self.batch_size} and {self.max_seq_len}")
        if not 0.0 <= self.copy_drill <= 10.0:
            raise ConfigError(f"finetune.copy_drill must be in [0, 10] (a share of the epoch), got {self.copy_drill}")


@dataclass(frozen=True)
class EvalConfig:
    """The pipeline's evaluation stage (``openllm-ds evaluate`` takes flags)."""

    stride: int | None = None  # sliding-window stride; None = max_seq_len // 2
    batch_size: int = 8
    tasks: tuple[str, ...] = ()
    num_workers: int = 2


@dataclass(frozen=True)
class ExportConfig:
    """``openllm-ds export``'s flags, and the pipeline's export section (its formats: the export table's)."""

    model_dir: str | None = setting(None, "training output (latest checkpoint) or export dir", required=True)
    format: str = setting("huggingface", format_choices, required=True)  # the export table's, when --help is built
    output_dir: str | None = setting(None, "default exports/FORMAT")
    dtype: str = setting("fp32", "fp32 | fp16 | bf16 (huggingface, pytorch)")
    verify: bool = setting(True, "load the export back and compare logits (default on)")
    optimize_for_inference: bool = setting(False, "onnx: apply onnxruntime graph optimisations")
    quantize_int8: bool = setting(False, "onnx: int8 dynamic quantisation")
    gguf_type: str | None = setting(None, "gguf: f32 | f16 (default) | q8_0", metavar="TYPE")
    # the formats `openllm-ds pipeline` exports (a YAML list); `export` itself takes --format
    formats: tuple[str, ...] = pipeline_formats()
    overwrite: bool = setting(False, "replace a non-empty output dir")
    checkpoint: int | None = setting(None, "training step (default: latest)")

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"export.format must be {format_choices(' or ')} (--format), got {self.format!r}")
        if self.dtype not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"export.dtype must be fp32, fp16 or bf16 (--dtype), got {self.dtype!r}")
        if self.gguf_type is not None and self.gguf_type not in GGUF_TYPES:
            raise ConfigError(f"export.gguf_type must be {', '.join(GGUF_TYPES)} (--gguf_type), got {self.gguf_type!r}")
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ConfigError(f"export.formats must list formats of {format_choices(', ')}, got {list(self.formats)}")


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @property
    def output_dir(self) -> str:
        return self.train.output_dir or f"models/{self.name}"

    @property
    def eval_data(self) -> str | None:
        """The validation source of a one-source run: train.eval_data, or validation_data.txt beside a
        training_data.txt; None: a held-out share of the training data (``validation_source``)."""
        if self.train.eval_data:
            return self.train.eval_data
        return None if self.train.data_files else validation_source(self.train.data_file)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        from openllm_ds.utils import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def validation_source(data_file: str) -> str | None:
    """validation_data.txt beside a file named training_data.txt (what `prepare` writes), else None."""
    p = Path(data_file)
    return str(p.with_name("validation_data.txt")) if p.name == "training_data.txt" else None


_SECTION_CLASSES = {
    "data": DataConfig, "tokenizer": TokenizerConfig, "model": ModelConfig,
    "train": TrainConfig, "eval": EvalConfig, "export": ExportConfig, "finetune": FinetuneConfig,
}


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check/convert one value to the annotated type; strings from the CLI are parsed."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        for a in inner[:-1]:  # the first type that takes the value (int | str: 2 -> 2, "auto" -> "auto")
            try:
                return _coerce(value, a, key, source)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], key, source)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} in {source}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], key, source) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key} in {source}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} in {source}: expected an integer, got {value!r}")
        number = None
        if isinstance(value, int):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str):
            try:
                number = int(value)
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    number = int(f)
        if number is None:
            raise ConfigError(f"{key} in {source}: expected an integer, got {value!r}")
        if not INT64[0] <= number <= INT64[1]:
            raise ConfigError(f"{key} in {source}: {number} is out of range (a 64-bit integer at most)")
        return number
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key} in {source}: expected a number, got {value!r}")
        if not math.isfinite(number):  # NaN and inf never make a usable setting
            raise ConfigError(f"{key} in {source}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            problem = text_problem(str(value))
            if problem:
                raise ConfigError(f"{key} in {source} {problem}")
            return str(value)
        raise ConfigError(f"{key} in {source}: expected a string, got {value!r}")
    return value


def _expand(value):
    return os.path.expanduser(value) if isinstance(value, str) else value


def _section_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _merge_section(values: dict, origins: dict, section: str, updates: dict, source: str) -> None:
    """Typed ``updates`` into ``values[section]``; ``origins`` notes where each key was set."""
    cls = _SECTION_CLASSES[section]
    types_ = _section_types(cls)
    for k, v in updates.items():
        if k not in types_:
            raise ConfigError(
                f"unknown key '{section}.{k}' in {source}; valid keys of '{section}': {', '.join(sorted(types_))}"
            )
        value = _coerce(v, types_[k], f"'{section}.{k}'", source)
        if f"{section}.{k}" in PATH_KEYS:
            value = tuple(map(_expand, value)) if isinstance(value, tuple) else _expand(value)
        values[section][k] = value
        origins[f"{section}.{k}"] = source


def read_config_yaml(path: str | Path) -> dict:
    """A run config YAML (``--config``), by the one reader policy (``utils.read_yaml``): a mapping of sections."""
    raw = read_yaml_file(path, "write sections (data, tokenizer, model, train, eval, export) of key: value, or pass "
                         "another --config (see configs/)", "config file", (dict, type(None)), ConfigError)
    return raw or {}


def read_model_json(path: str | Path) -> dict:
    """A model JSON (``--model_config``), by the one reader policy (``utils.read_json``): an object of model fields."""
    return read_json_file(path, "pass a JSON object of model fields such as configs/medium_model.json",
                          "model config", dict, ConfigError)


def load_run_config(
    config_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    model_config_path: str | Path | None = None,
    base: dict | None = None,
) -> RunConfig:
    """Compose a RunConfig: defaults < ``base`` dict < YAML < model JSON < ``overrides``.

    ``overrides`` maps dotted keys (``train.max_steps``) to values; CLI strings are parsed by type.
    """
    values: dict[str, dict] = {s: {} for s in _SECTION_CLASSES}
    origins: dict[str, str] = {}  # "section.key" -> where its value came from, for error messages
    name = "run"

    def apply(raw: dict, source: str):
        nonlocal name
        for sec, sub in raw.items():
            if sec == "name":
                name = _coerce(sub, str, "'name'", source)
                continue
            if sec not in _SECTION_CLASSES:
                raise ConfigError(
                    f"unknown section '{sec}' in {source}; valid sections: name, {', '.join(_SECTION_CLASSES)}"
                )
            if not isinstance(sub, dict):
                raise ConfigError(f"section '{sec}' in {source} must be a mapping of keys")
            _merge_section(values, origins, sec, sub, source)

    if base:
        apply(base, "the built-in defaults")
    if config_path is not None:
        from openllm_ds.presets import config_file, resolve_beside

        config_path = config_file(config_path)
        raw = read_config_yaml(config_path)
        train = raw.get("train") if isinstance(raw, dict) else None
        if isinstance(train, dict) and isinstance(train.get("ds_config"), str):
            raw["train"] = {**train, "ds_config": resolve_beside(train["ds_config"], config_path)}
        apply(raw, str(config_path))
        if "name" not in raw:
            name = Path(config_path).stem
    if model_config_path is not None:
        _merge_section(values, origins, "model", read_model_json(model_config_path), str(model_config_path))
    for key, v in (overrides or {}).items():
        if key == "name":
            name = str(v)
            continue
        sec, _, k = key.partition(".")
        if not k:
            raise ConfigError(f"override '{key}' must look like section.key=value (e.g. train.max_steps=100)")
        if sec not in _SECTION_CLASSES:
            raise ConfigError(f"unknown section '{sec}' in command-line override '{key}'; valid: {', '.join(_SECTION_CLASSES)}")
        _merge_section(values, origins, sec, {k: v}, "the command line")

    if values["train"].get("data_files") and \
            origins.get("train.data_file") == origins.get("train.data_files") != "the built-in defaults":
        # data_files replaces a data_file set earlier (a preset's); both given in one place is a mistake
        raise ConfigError(f"train.data_file and train.data_files were both set in {origins['train.data_file']}; "
                          "pass one: --data_file for one source, --data_files for a mixture")
    sections = {}
    for sec, cls in _SECTION_CLASSES.items():
        try:
            sections[sec] = cls(**values[sec])
        except ConfigError as e:
            raise ConfigError(f"{e} ({_where_set(str(e), origins)})") from None
    return RunConfig(name=name, **sections)


def _where_set(message: str, origins: dict[str, str]) -> str:
    """Where the keys a validation message names were set: "from t.yaml", or one source per key."""
    keys = list(dict.fromkeys(re.findall(r"\b(?:" + "|".join(_SECTION_CLASSES) + r")\.\w+", message)))
    sources = {k: origins.get(k, "the defaults") for k in keys}
    if len(set(sources.values())) == 1:
        return f"from {next(iter(sources.values()))}"
    return ", ".join(f"{k} from {src}" for k, src in sources.items()) or "from the defaults"


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["train.max_steps=10", ...]`` -> ``{"train.max_steps": "10"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"cannot read override '{item}': write section.key=value, e.g. train.max_steps=100")
        out[key.strip()] = value.strip()
    return out


RETIRED_KEYS = {"eval": ("model_dir", "eval_data", "metrics")}  # in run configs saved before they were removed


def run_config_from_dict(raw: dict, source: str = "a saved run config") -> RunConfig:
    """Rebuild a RunConfig saved by ``RunConfig.save`` (checkpoints, exports)."""
    if not raw:
        return RunConfig()
    raw = {sec: ({k: v for k, v in sub.items() if k not in RETIRED_KEYS.get(sec, ())} if isinstance(sub, dict) else sub)
           for sec, sub in raw.items()}
    return load_run_config(base=raw)
