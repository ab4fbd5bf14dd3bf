"""The configs of the stages that are not sections of the run config, one per concern, and ``STAGES``: which config
types each subcommand's flags come from (``fields.add_flags``).

A run-config stage (prepare, train-tokenizer, train, pipeline) reads its flags into ``section.key`` overrides, so the
precedence stays defaults < --config YAML < --model_config JSON < flags < section.key=value; the others build their
own config from their flags and pass it to their library function.
"""

from __future__ import annotations

from dataclasses import dataclass

from openllm_ds.errors import ConfigError
from openllm_ds.config.fields import parse_any_int, parse_csv, parse_float, parse_port, setting
from openllm_ds.config.run import DataConfig, ExportConfig, FinetuneConfig, TokenizerConfig, TrainConfig


@dataclass(frozen=True)
class RunOptions:
    """What a run-config stage reads besides the sections' flags."""

    config: str | None = setting(None, "run preset YAML (configs/tiny.yaml, small.yaml, ...)",
                                 stages=("prepare", "train-tokenizer", "train", "finetune"))
    model_config: str | None = setting(None, "model JSON (configs/medium_model.json): vocab_size, d_model, n_layers, "
                                       "n_heads, d_ff, max_seq_len, dropout", stages=("train",))
    local_rank: int | None = setting(None, "set by the deepspeed launcher", stages=("train", "finetune"), hidden=True)
    dry_run: bool = setting(False, "print the resolved config and make every check the run makes before its work "
                            "(tokenizer, data, checkpoint, output dir and its lock), writing nothing; exit 2 at the "
                            "first failure, as the run would", stages=("train",))
    validation_file: str | None = setting(None, "text for the tokens-per-word report (default: validation_data.txt "
                                          "beside --input)", stages=("train-tokenizer",))


@dataclass(frozen=True)
class TokenizeConfig:
    """``openllm-ds tokenize``: the sources and where their shards go; how they are read and split is the tokenizer
    section's (text_field, doc_separator, on_bad_record, dedup, num_workers, unit_bytes)."""

    input: tuple[str, ...] = setting((), "sources: text (a document a line), JSON Lines / JSON arrays (.gz, .zst), "
                                     "Parquet, folders and globs of these, a saved Hugging Face dataset, "
                                     "hf:NAME[/CONFIG][:SPLIT]", required=True)
    tokenizer_dir: str = setting("data/tokenizer", "tokenizer directory (default data/tokenizer)")
    output_dir: str | None = setting(None, "shard directory for all inputs as one corpus (default: each input to "
                                     "NAME.tokens/ beside it; a glob or hf: input to data/tokens/)")
    holdout: float = setting(0.0, "share of documents (by hash) written as a held-out split for validation "
                             "(default 0)", parse=parse_float)


@dataclass(frozen=True)
class PrepareSftConfig:
    """``openllm-ds prepare-sft``: SQuAD's training questions as conversations (openllm_ds/finetune/prepare.py)."""

    squad_dir: str | None = setting(None, "directory of SQuAD JSON files (train-v1.1.json; train-v2.0.json's "
                                    "unanswerable questions get a fixed no-answer reply); files named *dev* are left "
                                    "for scoring", required=True)
    output_dir: str = setting("data/sft", "where train.jsonl and validation.jsonl go (default data/sft)")
    layout: str = setting("passage_question", "the user turn: passage_question (the passage, a blank line, the "
                          "question; default) | question_passage")
    validation_share: float = setting(0.02, "share of the passages whose questions go to validation.jsonl "
                                      "(default 0.02)", parse=parse_float)
    seed: int = setting(0, "which passages are drawn for validation (default 0)")

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ConfigError(f"--layout must be {' or '.join(LAYOUTS)}, got {self.layout!r}")
        if not 0.0 < self.validation_share < 0.5:
            raise ConfigError(f"--validation_share must be in (0, 0.5), got {self.validation_share}")


LAYOUTS = ("passage_question", "question_passage")


@dataclass(frozen=True)
class EvaluateConfig:
    """``openllm-ds evaluate``."""

    model_dir: str | None = setting(None, "training output (models/NAME) or Hugging Face export dir", required=True)
    eval_data: str | None = setting(None, "text file, one document a line (e.g. data/clean/validation_data.txt)")
    metrics: tuple[str, ...] = setting(("perplexity", "loss"), "comma list: perplexity, loss, bits_per_byte, "
                                       "word_perplexity", parse=parse_csv, metavar="METRICS")
    stride: int | None = setting(None, "sliding-window stride in tokens (default: half the context)")
    batch_size: int = setting(8, "sequences (evaluation windows) per forward pass")
    checkpoint: int | None = setting(None, "training step to evaluate (default: latest)")
    tasks: tuple[str, ...] = setting((), "comma list of harness task YAMLs (eval/*.yaml) or task names",
                                     parse=parse_csv, metavar="TASKS")
    checkpoints: str | None = setting(None, "'all', 'latest' or a comma list of steps (with --tasks)")
    limit: int | None = setting(None, "with --tasks: examples per task (questions, passages; default: each task's "
                                "limit:)")
    num_workers: int = setting(2, "Ray workers that share the stage (default 2; 0: this process): tasks x checkpoints")
    output: str | None = setting(None, "JSON report path (also printed to stdout)")


@dataclass(frozen=True)
class GenerateConfig:
    """``openllm-ds generate``: the sampling parameters' ranges are ``openllm_ds.inference.sampling``'s."""

    model_dir: str | None = setting(None, "training output or Hugging Face export dir", required=True)
    prompt: str | None = setting(None, "text to continue", required=True)
    max_new_tokens: int = setting(256, "new tokens at most, fewer where the context ends (--max_length, the user "
                                  "guide's name, is this too: new tokens, not the context)", aliases=("--max_length",))
    temperature: float = setting(0.7, "0-2; 0 = greedy (default 0.7)")
    top_k: int | None = setting(None, "sample from the k likeliest tokens (0 or unset: all)")
    top_p: float | None = setting(None, "nucleus sampling, (0, 1] (unset: 1, all)")
    repetition_penalty: float = setting(1.0, "> 0; 1 = none (default)")
    seed: int | None = setting(None, "makes sampling reproducible (-2^63 to 2^64-1)", parse=parse_any_int)
    num_samples: int = setting(1, "continuations, 1-16 (default 1)")
    checkpoint: int | None = setting(None, "training step (default: latest)")


@dataclass(frozen=True)
class ScoreSquadConfig:
    """``openllm-ds score-squad``."""

    dataset: str | None = setting(None, "SQuAD JSON (dev-v1.1.json, dev-v2.0.json)", required=True)
    predictions: str | None = setting(None, "JSON object {question_id: answer text}", required=True)
    na_prob_file: str | None = setting(None, "v2.0: JSON {question_id: no-answer probability}")


@dataclass(frozen=True)
class ServeConfig:
    """``openllm-ds serve``."""

    model_dir: str = setting("exports/huggingface", "the export (or training output) to serve (--model_path: the "
                             "same)", aliases=("--model_path",))
    host: str = setting("127.0.0.1", "address to listen on (default 127.0.0.1: this machine only)")
    port: int = setting(8000, "TCP port (0: any free one)", parse=parse_port)
    context_length: int = setting(512, "context length served: prompt + completion (default 512; the model's own "
                                  "when that is shorter)")
    engine: str = setting("auto", "auto | vllm | builtin")
    backend: str = setting("torch", "builtin engine backend: torch | onnx")
    api_key: str | None = setting(None, "require 'Authorization: Bearer KEY' (or set OPENLLM_API_KEY)")
    model_name: str | None = setting(None, "model id reported by /v1/models (default: the export dir name)")
    max_concurrency: int = setting(4, "built-in server: generations run at once; further requests wait their turn "
                                   "(default 4)")
    max_body_bytes: int | None = setting(None, "built-in server: largest request body accepted, else 413 (default "
                                         "1048576)")
    num_threads: int | None = setting(None, "built-in server: intra-op threads per generation (default: cores / "
                                      "--max_concurrency, at least 1)")
    replicas: int | None = setting(None, "run N replicas (built-in or vLLM) behind one endpoint on Ray Serve")
    address: str | None = setting(None, "with --replicas: the Ray cluster to deploy on (default: $RAY_ADDRESS, else "
                                  "a local Ray instance)")
    vllm_args: tuple[str, ...] = setting((), "extra argument for vLLM's server, repeatable (e.g. "
                                         "--vllm_arg=--enforce-eager)", flag="--vllm_arg", nargs="append",
                                         metavar="ARG")


@dataclass(frozen=True)
class PipelineConfig:
    """``openllm-ds pipeline``: the run config's sections come from --config and section.key=value."""

    config: str = setting("configs/tiny.yaml", "run preset YAML")
    squad_dir: str | None = setting(None, "SQuAD JSON directory instead of downloading")
    force: bool = setting(False, "rerun every stage (training from step 0: the run it trained in train.output_dir is "
                          "replaced)")
    work_dir: str | None = setting(None, "where data/, models/, exports/ and runs/ go (default: the current "
                                   "directory; under `ray job submit`, a path every node sees)")


# stage -> [(config type, run-config section or None, the stage that owns the section's flags)]
STAGES: dict[str, list[tuple[type, str | None, str | None]]] = {
    "prepare": [(RunOptions, None, None), (DataConfig, "data", "prepare")],
    "train-tokenizer": [(RunOptions, None, None), (TokenizerConfig, "tokenizer", "train-tokenizer")],
    "tokenize": [(TokenizeConfig, None, None), (TokenizerConfig, "tokenizer", "train-tokenizer")],
    "train": [(RunOptions, None, None), (TrainConfig, "train", "train"), (TokenizerConfig, "tokenizer", "train-tokenizer")],
    "finetune": [(RunOptions, None, None), (FinetuneConfig, "finetune", "finetune"), (TrainConfig, "train", "train")],
    "prepare-sft": [(PrepareSftConfig, None, None)],
    "evaluate": [(EvaluateConfig, None, None)],
    "generate": [(GenerateConfig, None, None)],
    "score-squad": [(ScoreSquadConfig, None, None)],
    "export": [(ExportConfig, None, None)],
    "serve": [(ServeConfig, None, None)],
    "pipeline": [(PipelineConfig, None, None)],
}
RUN_CONFIG_STAGES = ("prepare", "train-tokenizer", "train", "finetune", "pipeline")  # they take section.key=value overrides

