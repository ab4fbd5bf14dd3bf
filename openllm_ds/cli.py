"""One CLI: `openllm-ds <stage>`. Each subcommand builds a config and calls one library function.

Flags are written ``--snake_case`` as in the user guide; ``--kebab-case`` spellings work too.
Any config value can also be set as a trailing ``section.key=value`` override.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

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


def add_stage_flags(p: argparse.ArgumentParser, stage: str) -> list[tuple[str, str]]:
    """The flags of ``stage``, generated from its config types (``openllm_ds.config.STAGES``); a run-config stage
    also takes trailing ``section.key=value`` overrides. Returns the run config's (``section.key``, flag) pairs."""
    from openllm_ds.config import RUN_CONFIG_STAGES, STAGES, add_flags

    section_flags = []
    for cls, section, owner in STAGES[stage]:
        added = add_flags(p, cls, stage, section, owner)
        if section:
            section_flags += added
    if stage in RUN_CONFIG_STAGES:
        p.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="any config value, e.g. train.warmup_steps=10")
    p.set_defaults(section_flags=section_flags)
    return section_flags


def run_config_from_args(args: argparse.Namespace):
    """defaults < --config YAML < --model_config JSON < flags < section.key=value."""
    from openllm_ds.config import load_run_config, parse_overrides

    overrides = {}
    for key, _ in getattr(args, "section_flags", ()):
        val = getattr(args, key, None)
        if val is not None:
            overrides[key] = val
    overrides.update(parse_overrides(getattr(args, "overrides", []) or []))
    return load_run_config(getattr(args, "config", None), overrides, getattr(args, "model_config", None))


def build_train_parser(prog: str = "openllm-ds train") -> argparse.ArgumentParser:
    """The train flags; shared by `openllm-ds train` and ray_jobs/train.py."""
    p = _Parser(prog=prog, description="Train the model with DeepSpeed (one process, the deepspeed launcher, or Ray Train).")
    add_stage_flags(p, "train")
    return p


class _ContextLengthAlias(argparse.Action):
    """serve's --max_length: the context length (prompt + completion), the old name of --context_length."""

    def __call__(self, parser, namespace, values, option_string=None):
        print("note: serve's --max_length is the context length served; its name is --context_length", file=sys.stderr)
        setattr(namespace, self.dest, values)


# ---- subcommands -----------------------------------------------------------------------------

def cmd_prepare(args):
    from openllm_ds.data import prepare

    cfg = run_config_from_args(args)
    return prepare(cfg.data)


def cmd_train_tokenizer(args):
    from pathlib import Path

    from openllm_ds.tokenizer import train_tokenizer

    from openllm_ds.paths import check_path

    cfg = run_config_from_args(args)
    if args.validation_file:  # named: it must be a file; by default, validation_data.txt beside --input when there
        check_path(args.validation_file, "--validation_file", "file", "pass a text file, one document a line")
    val = args.validation_file or str(Path(cfg.tokenizer.input).with_name("validation_data.txt"))
    return train_tokenizer(cfg.tokenizer, validation_file=val if Path(val).is_file() else None)


def cmd_tokenize(args):
    import contextlib

    from openllm_ds.config import TokenizeConfig, stage_config
    from openllm_ds.output_lock import OutputLock
    from openllm_ds.paths import normal_path
    from openllm_ds.tokenizer import load_tokenizer, tokenize_corpus, tokenize_each
    from openllm_ds.tokenizer.corpus import check_inputs, derived_shards_dirs, summary

    cfg, tok = stage_config(TokenizeConfig, args), run_config_from_args(args).tokenizer
    options = tok.read_options()
    load_tokenizer(cfg.tokenizer_dir)
    one_corpus = bool(cfg.output_dir) or len(cfg.input) == 1
    outputs = [cfg.output_dir] if cfg.output_dir else derived_shards_dirs(cfg.input)
    check_inputs(cfg.input, options, exclude=outputs)  # every input found and not empty before anything is encoded
    kwargs = dict(options=options, dedup=tok.dedup, holdout=cfg.holdout, num_workers=tok.num_workers,
                  unit_bytes=tok.unit_bytes)
    with contextlib.ExitStack() as held:  # every output dir's lock, before any of them is written
        for out in dict.fromkeys(map(normal_path, outputs)):
            held.enter_context(OutputLock(out, "tokenize"))
        if one_corpus:
            return summary(tokenize_corpus(list(cfg.input), cfg.tokenizer_dir, cfg.output_dir, **kwargs))
        return [summary(m) for m in tokenize_each(list(cfg.input), cfg.tokenizer_dir, **kwargs)]


def cmd_train(args):
    cfg = run_config_from_args(args)
    if args.dry_run:  # the resolved config, then every check the run makes before its work
        import yaml

        from openllm_ds.train.preflight import dry_run

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), flush=True)
        return dry_run(cfg)
    from openllm_ds.train import launch

    return launch(cfg)


def cmd_prepare_sft(args):
    from openllm_ds.config import PrepareSftConfig, stage_config
    from openllm_ds.finetune.prepare import prepare_sft

    return prepare_sft(stage_config(PrepareSftConfig, args))


def cmd_finetune(args):
    from openllm_ds.finetune.run import finetune_run_config
    from openllm_ds.train import launch

    return launch(finetune_run_config(run_config_from_args(args)))


def cmd_evaluate(args):
    from openllm_ds.config import EvaluateConfig, stage_config
    from openllm_ds.evaluation import evaluate

    return evaluate(**vars(stage_config(EvaluateConfig, args)))


def cmd_generate(args):
    from openllm_ds.config import GenerateConfig, stage_config
    from openllm_ds.evaluation import generate_text

    generate_text(**vars(stage_config(GenerateConfig, args)), stream=True)
    return None


def cmd_score_squad(args):
    from openllm_ds.config import ScoreSquadConfig, stage_config
    from openllm_ds.evaluation import score_squad

    return score_squad(**vars(stage_config(ScoreSquadConfig, args)))


def cmd_export(args):
    from openllm_ds.config import ExportConfig, stage_config
    from openllm_ds.export import export

    return export(stage_config(ExportConfig, args))


def cmd_serve(args):
    from openllm_ds.config import ServeConfig, stage_config
    from openllm_ds.serve import serve
    from openllm_ds.settings import api_key_setting

    cfg = stage_config(ServeConfig, args)
    # --api_key, else OPENLLM_API_KEY, normalised once
    serve(**{**vars(cfg), "api_key": api_key_setting(cfg.api_key), "vllm_args": tuple(cfg.vllm_args)})
    return None


def cmd_pipeline(args):
    from openllm_ds.config import PipelineConfig, stage_config
    from openllm_ds.pipeline import run_pipeline

    opts = stage_config(PipelineConfig, args)
    cfg = run_config_from_args(args)
    return run_pipeline(cfg, squad_dir=opts.squad_dir, force=opts.force, work_dir=opts.work_dir)


STAGE_HELP = {
    "prepare": "Stage 1: SQuAD -> cleaned, deduplicated passages (training/validation split), on Ray Data.",
    "train-tokenizer": "Stage 2: train a SentencePiece BPE tokenizer and write Hugging Face tokenizer files.",
    "tokenize": "Encode a corpus into binary token shards (EOS after each document), across Ray workers.",
    "train": "Stages 3-4: train the transformer with DeepSpeed ZeRO (locally, or Ray Train with --num_workers).",
    "prepare-sft": "Stage 7: SQuAD's training questions as conversations (train.jsonl, validation.jsonl) for finetune.",
    "finetune": "Stage 7: supervised fine-tuning on conversations (loss on the answers), on train's DeepSpeed loop.",
    "evaluate": "Stage 5: perplexity/loss/bits-per-byte on a text file, or harness tasks over checkpoints.",
    "generate": "Stage 5: generate text from a prompt (streams to the terminal).",
    "score-squad": "Stage 5: official SQuAD v1.1/v2.0 exact match and F1 of a predictions file.",
    "export": "Stage 6: export to another format: {formats}.",
    "serve": "Serve an export with an OpenAI-compatible API (vLLM where installed, else the built-in server; "
             "--replicas N: N of them on Ray Serve).",
    "pipeline": "All stages: prepare, tokenizer, tokenize, train, evaluate, export; skips completed stages.",
    "lm-eval": "EleutherAI's lm-evaluation-harness (its own flags) with the shipped openllm_* tasks found by name.",
}
COMMANDS: dict[str, Callable] = {
    "prepare": cmd_prepare, "train-tokenizer": cmd_train_tokenizer, "tokenize": cmd_tokenize, "train": cmd_train,
    "prepare-sft": cmd_prepare_sft, "finetune": cmd_finetune, "evaluate": cmd_evaluate, "generate": cmd_generate, "score-squad": cmd_score_squad, "export": cmd_export,
    "serve": cmd_serve, "pipeline": cmd_pipeline,
}


def build_parser() -> argparse.ArgumentParser:
    from openllm_ds.config.fields import parse_int
    from openllm_ds.export.formats import FORMATS

    p = _Parser(prog="openllm-ds", description=__doc__.splitlines()[0])
    p.add_argument("--local_rank", type=parse_int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's, first
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, fn in COMMANDS.items():
        help_ = STAGE_HELP[name].format(formats=", ".join(f"{f.name} ({f.reads})" for f in FORMATS.values()))
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=fn)
        add_stage_flags(sp, name)
        if name == "serve":
            sp.add_argument("--max_length", type=parse_int, dest="context_length", action=_ContextLengthAlias,
                            help=argparse.SUPPRESS)
    # lm-eval's own flags pass through untouched (main hands them over before parsing); listed here for --help
    sub.add_parser("lm-eval", help=STAGE_HELP["lm-eval"], description=STAGE_HELP["lm-eval"]).add_argument(
        "lm_eval_args", nargs=argparse.REMAINDER, help="e.g. --model hf --model_args pretrained=exports/huggingface "
                                                       "--tasks openllm_squad_v1 --limit 200")
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
              "dataset", "predictions", "na_prob_file", "squad_dir", "work_dir", "validation_file", "config")


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
        if argv[:1] == ["lm-eval"] and not {"-h", "--help"} & set(argv[1:2]):
            from openllm_ds.evaluation.lm_eval_tasks import run_lm_eval

            return run_lm_eval(argv[1:])
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


def job_main(stage: str, argv: list[str], outputs: Callable[[argparse.Namespace], dict]) -> int:
    """A ``ray_jobs/*.py`` script: parse ``stage``'s flags, check that the outputs ``outputs(args)`` names (flag ->
    path) are absolute where the job runs in Ray's temporary copy of --working-dir (``utils.check_job_outputs``),
    then run the stage as ``openllm-ds STAGE`` does. Exit 2 with one line on a bad flag or output."""
    from openllm_ds.utils import check_job_outputs

    try:
        check_argv(argv)
        args = build_parser().parse_args([stage, *argv])
        expand_path_flags(args)
        check_job_outputs(outputs(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return main([stage, *argv])


if __name__ == "__main__":
    sys.exit(main())
