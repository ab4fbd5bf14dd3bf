"""One CLI: `openllm-ds <stage>`. Each subcommand builds a config and calls one library function.

Flags are written ``--snake_case`` as in the user guide; ``--kebab-case`` spellings work too.
Any config value can also be set as a trailing ``section.key=value`` override.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Callable

from openllm_ds.errors import UserError


class _Parser(argparse.ArgumentParser):
    """Accepts --kebab-case spellings of --snake_case flags."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        fixed = []
        for a in args:
            if a.startswith("--") and not a.startswith("--no-") and "-" in a[2:].split("=", 1)[0]:
                name, eq, val = a[2:].partition("=")
                a = "--" + name.replace("-", "_") + eq + val
            fixed.append(a)
        return super().parse_known_args(fixed, namespace)


def _int(text: str) -> int:
    """argparse type: an integer that torch and numpy can take (a 64-bit one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    from openllm_ds.config import INT64  # the bound every config value keeps (config._coerce)

    if not INT64[0] <= value <= INT64[1]:
        raise argparse.ArgumentTypeError(f"{text} is out of range (a 64-bit integer at most)")
    return value


def _workers(text: str) -> int | str:
    """argparse type: ``auto`` or a number of workers."""
    return "auto" if text.strip().lower() == "auto" else _int(text)


def _float(text: str) -> float:
    """argparse type: a finite number (NaN and inf are refused here, not deep inside a stage)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0-65535 (0: any free one), got {value}")
    return value


def _integer(text: str) -> int:
    """argparse type: any integer; its range is checked where the value is used (a seed: openllm_ds.sampling)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


# Flags shared by the stages that build a RunConfig: (flag, config key, type, help)
CONFIG_FLAGS: dict[str, list[tuple[str, str, Any, str]]] = {
    "prepare": [
        ("--squad_dir", "data.squad_dir", str, "directory of SQuAD JSON files to use instead of downloading (files named *dev* are validation)"),
        ("--source", "data.source", str, "download (official URLs, sha256-checked) | dir (--squad_dir) | hub (Hugging Face datasets)"),
        ("--output_dir", "data.output_dir", str, "where training_data.txt, validation_data.txt and stats.json go (default data/clean)"),
        ("--min_words", "data.min_words", int, "drop passages with fewer words (default 10)"),
        ("--num_workers", "data.num_workers", int, "Ray workers that share the stage (default 2): cleaning"),
        ("--cache_dir", "data.cache_dir", str, "download cache (default ~/.cache/openllm-ds/squad)"),
    ],
    "train-tokenizer": [
        ("--input", "tokenizer.input", str, "training text: any source `tokenize` reads (default data/clean/training_data.txt)"),
        ("--vocab_size", "tokenizer.vocab_size", int, "vocabulary size, exact (default 32000)"),
        ("--model_type", "tokenizer.model_type", str, "bpe (default) or unigram"),
        ("--output_dir", "tokenizer.output_dir", str, "where the tokenizer files go (default data/tokenizer)"),
        ("--character_coverage", "tokenizer.character_coverage", float, "SentencePiece character coverage (default 0.9995)"),
        ("--max_sentence_length", "tokenizer.max_sentence_length", int, "longest input line in bytes (default 4192)"),
        ("--input_sentence_size", "tokenizer.input_sentence_size", int, "lines to train on, sampled; 0 = all (default)"),
        ("--text_field", "tokenizer.text_field", str, "JSON/Parquet/Arrow field holding the text (default text)"),
        ("--doc_separator", "tokenizer.doc_separator", str, "text files: newline (default) | blank_line"),
    ],
    "train": [
        ("--ds_config", "train.ds_config", str, "DeepSpeed JSON (ds_configs/zero0..3, *_offload); 'auto' values come from the run config"),
        ("--tokenizer_dir", "train.tokenizer_dir", str, "tokenizer directory (default data/tokenizer)"),
        ("--data_file", "train.data_file", str, "training data: a file (text, JSONL/JSON, .gz/.zst, Parquet), folder, "
         "glob, saved HF dataset, hf:NAME or shards dir; tokenized when needed"),
        ("--data_files", "train.data_files", list, "a mixture of sources (with --data_weights)"),
        ("--data_weights", "train.data_weights", list, "sampling weight of each --data_files source (default: equal)"),
        ("--eval_data", "train.eval_data", str, "validation data (default: validation_data.txt beside a training_data.txt, "
         "else a held-out share of the training data)"),
        ("--holdout_fraction", "train.holdout_fraction", float, "share of each source's documents held out for "
         "validation when no validation data is given (default 0.01)"),
        ("--text_field", "tokenizer.text_field", str, "JSON/Parquet/Arrow field holding the text (default text)"),
        ("--doc_separator", "tokenizer.doc_separator", str, "text files: newline (default) | blank_line"),
        ("--on_bad_record", "tokenizer.on_bad_record", str, "error (default) | skip"),
        ("--no_dedup", "tokenizer.dedup", False, "keep exact duplicate documents (default: removed)"),
        ("--output_dir", "train.output_dir", str, "run directory (default models/NAME)"),
        ("--batch_size", "train.micro_batch_size", int, "sequences per forward pass, on each rank (the micro batch)"),
        ("--gradient_accumulation_steps", "train.gradient_accumulation_steps", int, "micro batches per optimizer step"),
        ("--learning_rate", "train.learning_rate", float, "peak learning rate (warmup then cosine)"),
        ("--max_steps", "train.max_steps", int, "optimizer steps"),
        ("--save_every", "train.save_every", int, "checkpoint every N steps"),
        ("--eval_every", "train.eval_every", int, "validate every N steps"),
        ("--precision", "train.precision", str, "auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16"),
        ("--resume", "train.resume", str, "auto (latest checkpoint in --output_dir) | none | a checkpoint dir"),
        ("--init_from", "train.init_from", str, "start a new run from these weights: a training output, a "
         "checkpoints/step_* dir or a Hugging Face Llama dir"),
        ("--num_workers", "train.num_workers", int, "Ray workers that share the stage (0: this process, or the deepspeed launcher's): N DeepSpeed ranks under Ray Train"),
        ("--seed", "train.seed", int, "random seed"),
    ],
}


def _add_config_flags(p: argparse.ArgumentParser, stage: str, with_config: bool = True) -> None:
    if with_config:
        p.add_argument("--config", help="run preset YAML (configs/tiny.yaml, small.yaml, ...)")
    for flag, key, typ, help_ in CONFIG_FLAGS.get(stage, []):
        if typ is False:  # a switch that sets the key to false
            p.add_argument(flag, dest=key, action="store_const", const=False, default=None, help=f"{help_} [{key}]")
            continue
        many = {"nargs": "+", "type": str} if typ is list else {"type": {int: _int, float: _float}.get(typ, typ)}
        p.add_argument(flag, dest=key, default=None, metavar=flag[2:].upper(), help=f"{help_} [{key}]", **many)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="any config value, e.g. train.warmup_steps=10")


def run_config_from_args(args: argparse.Namespace, stage: str):
    """defaults < --config YAML < --model_config JSON < flags < section.key=value."""
    from openllm_ds.config import load_run_config, parse_overrides

    overrides = {}
    for _, key, _, _ in CONFIG_FLAGS.get(stage, []):
        val = getattr(args, key, None)
        if val is not None:
            overrides[key] = val
    overrides.update(parse_overrides(getattr(args, "overrides", []) or []))
    return load_run_config(getattr(args, "config", None), overrides, getattr(args, "model_config", None))


def build_train_parser(prog: str = "openllm-ds train") -> argparse.ArgumentParser:
    """The train flags; shared by `openllm-ds train`, `python -m openllm_ds.train` and ray_jobs/train.py."""
    p = _Parser(prog=prog, description="Train the model with DeepSpeed (one process, the deepspeed launcher, or Ray Train).")
    _add_config_flags(p, "train")
    p.add_argument("--model_config", help="model JSON (configs/medium_model.json): vocab_size, d_model, n_layers, n_heads, d_ff, max_seq_len, dropout")
    p.add_argument("--local_rank", type=_int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("--dry_run", action="store_true", help="print the resolved config and make every check the run makes "
                   "before its work (tokenizer, data, checkpoint, output dir and its lock), writing nothing; exit 2 "
                   "at the first failure, as the run would")
    return p


# ---- subcommands -----------------------------------------------------------------------------

def cmd_prepare(args):
    from openllm_ds.data import prepare

    cfg = run_config_from_args(args, "prepare")
    return prepare(cfg.data)


def cmd_train_tokenizer(args):
    from pathlib import Path

    from openllm_ds.tokenizer import train_tokenizer

    from openllm_ds.paths import check_path

    cfg = run_config_from_args(args, "train-tokenizer")
    if args.validation_file:  # named: it must be a file; by default, validation_data.txt beside --input when there
        check_path(args.validation_file, "--validation_file", "file", "pass a text file, one document a line")
    val = args.validation_file or str(Path(cfg.tokenizer.input).with_name("validation_data.txt"))
    return train_tokenizer(cfg.tokenizer, validation_file=val if Path(val).is_file() else None)


def cmd_tokenize(args):
    import contextlib

    from openllm_ds.data.units import ReadOptions
    from openllm_ds.output_lock import OutputLock
    from openllm_ds.paths import normal_path
    from openllm_ds.tokenizer import load_tokenizer, tokenize_corpus, tokenize_each
    from openllm_ds.tokenizer.corpus import check_inputs, derived_shards_dirs, summary

    options = ReadOptions(args.text_field, args.doc_separator, args.on_bad_record)
    load_tokenizer(args.tokenizer_dir)
    one_corpus = bool(args.output_dir) or len(args.input) == 1
    outputs = [args.output_dir] if args.output_dir else derived_shards_dirs(args.input)
    check_inputs(args.input, options, exclude=outputs)  # every input found and not empty before anything is encoded
    kwargs = dict(options=options, dedup=not args.no_dedup, holdout=args.holdout, num_workers=args.num_workers,
                  unit_bytes=args.unit_bytes)
    with contextlib.ExitStack() as held:  # every output dir's lock, before any of them is written
        for out in dict.fromkeys(map(normal_path, outputs)):
            held.enter_context(OutputLock(out, "tokenize"))
        if one_corpus:
            return summary(tokenize_corpus(args.input, args.tokenizer_dir, args.output_dir, **kwargs))
        return [summary(m) for m in tokenize_each(args.input, args.tokenizer_dir, **kwargs)]


def cmd_train(args):
    cfg = run_config_from_args(args, "train")
    if args.dry_run:  # the resolved config, then every check the run makes before its work
        import yaml

        from openllm_ds.train.preflight import dry_run

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), flush=True)
        return dry_run(cfg)
    from openllm_ds.train import launch

    return launch(cfg)


def cmd_evaluate(args):
    from openllm_ds.evaluation import evaluate

    return evaluate(
        model_dir=args.model_dir, eval_data=args.eval_data, metrics=_csv(args.metrics), stride=args.stride,
        batch_size=args.batch_size, checkpoint=args.checkpoint, tasks=_csv(args.tasks), checkpoints=args.checkpoints,
        num_workers=args.num_workers, output=args.output,
    )


def cmd_generate(args):
    from openllm_ds.evaluation import generate_text

    generate_text(
        model_dir=args.model_dir, prompt=args.prompt, max_length=args.max_length, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        num_samples=args.num_samples, checkpoint=args.checkpoint, stream=True,
    )
    return None


def cmd_score_squad(args):
    from openllm_ds.evaluation import score_squad

    return score_squad(args.dataset, args.predictions, na_prob_file=args.na_prob_file)


def cmd_export(args):
    from openllm_ds.config import ExportConfig
    from openllm_ds.export import export

    cfg = ExportConfig(
        model_dir=args.model_dir, format=args.format, output_dir=args.output_dir, dtype=args.dtype,
        verify=args.verify, optimize_for_inference=args.optimize_for_inference, quantize_int8=args.quantize_int8,
        overwrite=args.overwrite,
    )
    return export(cfg, checkpoint=args.checkpoint)


def cmd_serve(args):
    from openllm_ds.serve import serve

    from openllm_ds.settings import api_key_setting

    api_key = api_key_setting(args.api_key)  # --api_key, else OPENLLM_API_KEY, normalised once
    serve(model_path=args.model_path, host=args.host, port=args.port, max_length=args.max_length,
          engine=args.engine, backend=args.backend, api_key=api_key, model_name=args.model_name,
          max_concurrency=args.max_concurrency, max_body_bytes=args.max_body_bytes, num_threads=args.num_threads,
          replicas=args.replicas, address=args.address, vllm_args=tuple(args.vllm_arg))
    return None


def cmd_pipeline(args):
    from openllm_ds.pipeline import run_pipeline

    cfg = run_config_from_args(args, "pipeline")
    return run_pipeline(cfg, squad_dir=args.squad_dir, force=args.force, work_dir=args.work_dir)


def _csv(v):
    if v is None:
        return ()
    return tuple(x.strip() for x in v.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="openllm-ds", description=__doc__.splitlines()[0])
    p.add_argument("--local_rank", type=_int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's, first
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, fn: Callable, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=fn)
        return sp

    sp = add("prepare", cmd_prepare, "Stage 1: SQuAD -> cleaned, deduplicated passages (training/validation split), on Ray Data.")
    _add_config_flags(sp, "prepare")

    sp = add("train-tokenizer", cmd_train_tokenizer, "Stage 2: train a SentencePiece BPE tokenizer and write Hugging Face tokenizer files.")
    _add_config_flags(sp, "train-tokenizer")
    sp.add_argument("--validation_file", help="text for the tokens-per-word report (default: validation_data.txt beside --input)")

    sp = add("tokenize", cmd_tokenize, "Encode a corpus into binary token shards (EOS after each document), across Ray workers.")
    sp.add_argument("--input", nargs="+", required=True,
                    help="sources: text (a document a line), JSON Lines / JSON arrays (.gz, .zst), Parquet, folders "
                         "and globs of these, a saved Hugging Face dataset, hf:NAME[/CONFIG][:SPLIT]")
    sp.add_argument("--tokenizer_dir", default="data/tokenizer", help="tokenizer directory (default data/tokenizer)")
    sp.add_argument("--output_dir", help="shard directory for all inputs as one corpus (default: each input to "
                    "NAME.tokens/ beside it; a glob or hf: input to data/tokens/)")
    sp.add_argument("--text_field", default="text", help="JSON/Parquet/Arrow field holding the text (default text)")
    sp.add_argument("--doc_separator", default="newline", help="text files: newline (a document a line, default) | "
                    "blank_line (documents separated by an empty line)")
    sp.add_argument("--on_bad_record", default="error", help="a record that is not JSON or lacks the text: error "
                    "(default) | skip (counted)")
    sp.add_argument("--no_dedup", "--no-dedup", action="store_true", help="keep exact duplicate documents (default: removed)")
    sp.add_argument("--holdout", type=_float, default=0.0, help="share of documents (by hash) written as a held-out "
                    "split for validation (default 0)")
    sp.add_argument("--num_workers", type=_workers, default="auto", help="Ray workers that share the stage: N, 0 (this "
                    "process) or auto (default: this process for less than 32 MB of input, else one per CPU)")
    sp.add_argument("--unit_bytes", type=_int, default=16 * 2**20, help=argparse.SUPPRESS)

    sp = add("train", cmd_train, "Stages 3-4: train the transformer with DeepSpeed ZeRO (locally, or Ray Train with --num_workers).")
    for action in build_train_parser()._actions:
        if action.dest != "help":
            sp._add_action(action)

    sp = add("evaluate", cmd_evaluate, "Stage 5: perplexity/loss/bits-per-byte on a text file, or harness tasks over checkpoints.")
    sp.add_argument("--model_dir", required=True, help="training output (models/NAME) or Hugging Face export dir")
    sp.add_argument("--eval_data", help="text file, one document a line (e.g. data/clean/validation_data.txt)")
    sp.add_argument("--metrics", default="perplexity,loss", help="comma list: perplexity, loss, bits_per_byte, word_perplexity")
    sp.add_argument("--stride", type=_int, default=None, help="sliding-window stride in tokens (default: half the context)")
    sp.add_argument("--batch_size", type=_int, default=8, help="sequences (evaluation windows) per forward pass")
    sp.add_argument("--checkpoint", type=_int, default=None, help="training step to evaluate (default: latest)")
    sp.add_argument("--tasks", default=None, help="comma list of harness task YAMLs (eval/*.yaml) or task names")
    sp.add_argument("--checkpoints", default=None, help="'all', 'latest' or a comma list of steps (with --tasks)")
    sp.add_argument("--num_workers", type=_int, default=2, help="Ray workers that share the stage (default 2; 0: this process): tasks x checkpoints")
    sp.add_argument("--output", default=None, help="JSON report path (also printed to stdout)")

    sp = add("generate", cmd_generate, "Stage 5: generate text from a prompt (streams to the terminal).")
    sp.add_argument("--model_dir", required=True, help="training output or Hugging Face export dir")
    sp.add_argument("--prompt", required=True, help="text to continue")
    sp.add_argument("--max_length", type=_int, default=256, help="new tokens at most (fewer where the context ends)")
    sp.add_argument("--temperature", type=_float, default=0.7, help="0-2; 0 = greedy (default 0.7)")
    sp.add_argument("--top_k", type=_int, default=None, help="sample from the k likeliest tokens (0 or unset: all)")
    sp.add_argument("--top_p", type=_float, default=None, help="nucleus sampling, (0, 1] (unset: 1, all)")
    sp.add_argument("--repetition_penalty", type=_float, default=1.0, help="> 0; 1 = none (default)")
    sp.add_argument("--seed", type=_integer, default=None, help="makes sampling reproducible (-2^63 to 2^64-1)")
    sp.add_argument("--num_samples", type=_int, default=1, help="continuations, 1-16 (default 1)")
    sp.add_argument("--checkpoint", type=_int, default=None, help="training step (default: latest)")

    sp = add("score-squad", cmd_score_squad, "Stage 5: official SQuAD v1.1/v2.0 exact match and F1 of a predictions file.")
    sp.add_argument("--dataset", required=True, help="SQuAD JSON (dev-v1.1.json, dev-v2.0.json)")
    sp.add_argument("--predictions", required=True, help="JSON object {question_id: answer text}")
    sp.add_argument("--na_prob_file", default=None, help="v2.0: JSON {question_id: no-answer probability}")

    sp = add("export", cmd_export, "Stage 6: export to Hugging Face (transformers/vLLM), PyTorch or ONNX.")
    sp.add_argument("--model_dir", required=True, help="training output (latest checkpoint) or export dir")
    sp.add_argument("--format", required=True, help="huggingface | pytorch | onnx")
    sp.add_argument("--output_dir", default=None, help="default exports/FORMAT")
    sp.add_argument("--checkpoint", type=_int, default=None, help="training step (default: latest)")
    sp.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16 (huggingface, pytorch)")
    sp.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True, help="load the export back and compare logits (default on)")
    sp.add_argument("--optimize_for_inference", action="store_true", help="onnx: apply onnxruntime graph optimisations")
    sp.add_argument("--quantize_int8", action="store_true", help="onnx: int8 dynamic quantisation")
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")

    sp = add("serve", cmd_serve, "Serve an export with an OpenAI-compatible API (vLLM where installed, else the built-in "
             "server; --replicas N: N of them on Ray Serve).")
    sp.add_argument("--model_path", default="exports/huggingface", help="Hugging Face export dir")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=_port, default=8000, help="TCP port (0: any free one)")
    sp.add_argument("--max_length", type=_int, default=512, help="context length served (prompt + completion)")
    sp.add_argument("--engine", default="auto", help="auto | vllm | builtin")
    sp.add_argument("--backend", default="torch", help="builtin engine backend: torch | onnx")
    sp.add_argument("--api_key", default=None, help="require 'Authorization: Bearer KEY' (or set OPENLLM_API_KEY)")
    sp.add_argument("--model_name", default=None, help="model id reported by /v1/models (default: the export dir name)")
    sp.add_argument("--max_concurrency", type=_int, default=4,
                    help="built-in server: generations run at once; further requests wait their turn (default 4)")
    sp.add_argument("--max_body_bytes", type=_int, default=None,
                    help="built-in server: largest request body accepted, else 413 (default 1048576)")
    sp.add_argument("--num_threads", type=_int, default=None,
                    help="built-in server: intra-op threads per generation (default: cores / --max_concurrency, at least 1)")
    sp.add_argument("--replicas", type=_int, default=None,
                    help="run N replicas (built-in or vLLM) behind one endpoint on Ray Serve")
    sp.add_argument("--address", default=None,
                    help="with --replicas: the Ray cluster to deploy on (default: $RAY_ADDRESS, else a local Ray instance)")
    sp.add_argument("--vllm_arg", action="append", default=[], metavar="ARG",
                    help="extra argument for vLLM's server, repeatable (e.g. --vllm_arg=--enforce-eager)")

    sp = add("pipeline", cmd_pipeline, "All stages: prepare, tokenizer, tokenize, train, evaluate, export; skips completed stages.")
    sp.add_argument("--config", default="configs/tiny.yaml", help="run preset YAML")
    sp.add_argument("--squad_dir", default=None, help="SQuAD JSON directory instead of downloading")
    sp.add_argument("--force", action="store_true", help="rerun every stage (training from step 0: the run it "
                    "trained in train.output_dir is replaced)")
    sp.add_argument("--work_dir", default=None, help="where data/, models/, exports/ and runs/ go (default: the current "
                    "directory; under `ray job submit`, a path every node sees)")
    sp.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def check_argv(argv: list[str]) -> None:
    """Every command-line argument is text (``check_text``): bytes that are not UTF-8 reach Python as lone
    surrogates (surrogateescape) and would fail deep inside a stage, or be written into a config or a report."""
    from openllm_ds.text import check_text

    flag = None
    for a in argv:
        if "=" in a:  # --flag=value, section.key=value
            name, _, value = a.partition("=")
            check_text(name, "an argument")
            check_text(value, name)
        else:
            check_text(a, a if a.startswith("-") else flag or "an argument")
            flag = a if a.startswith("--") else flag


# flags outside the run config that name paths: `~` expanded once, as the run config's paths are (config.PATH_KEYS)
PATH_FLAGS = ("input", "tokenizer_dir", "output_dir", "model_config", "model_dir", "eval_data", "output",
              "dataset", "predictions", "na_prob_file", "model_path", "squad_dir", "work_dir", "validation_file",
              "config")


def expand_path_flags(args: argparse.Namespace) -> None:
    from openllm_ds.paths import expand_path

    for name in PATH_FLAGS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, str(expand_path(value)))
        elif isinstance(value, list):
            setattr(args, name, [str(expand_path(v)) for v in value])


def main(argv: list[str] | None = None) -> int:
    """`openllm-ds`, `python -m openllm_ds` and `deepspeed --module openllm_ds train` (every rank runs this; only
    rank 0 prints the result and errors)."""
    from openllm_ds.settings import env_setting

    argv = sys.argv[1:] if argv is None else list(argv)
    rank_zero = env_setting("RANK") in (None, "0")
    try:
        check_argv(argv)
        args = build_parser().parse_args(argv)
        expand_path_flags(args)
        result = args.func(args)
    except UserError as e:
        if rank_zero:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if rank_zero:
            print("interrupted", file=sys.stderr)
        return 130
    if isinstance(result, (dict, list)) and rank_zero:
        print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
