"""`openllm-ds pipeline`: every stage in order, skipping the ones whose outputs are complete.

prepare -> train-tokenizer -> tokenize -> train -> evaluate -> export (the export table's pipeline formats:
huggingface, onnx) -> with ``finetune.in_pipeline``, the SFT stage (``sft_stage.py``: prepare-sft -> finetune ->
squad_v1_chat before and after -> its Hugging Face export) -> report (``report.py``).

A stage is skipped when its completion marker exists and its fingerprint (the config it ran
with and the hashes of its inputs) is unchanged; fingerprints live in ``runs/NAME/state.json``.
An interrupted pipeline rerun picks up where it stopped: training resumes from its latest
checkpoint (``train.resume=auto``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from openllm_ds.config import RunConfig
from openllm_ds.export.formats import FORMATS, config_for_format
from openllm_ds.pipeline.report import harness_results, unigram_perplexity, write_report
from openllm_ds.output_lock import OutputLock
from openllm_ds.paths import normal_path, same_path
from openllm_ds.utils import atomic_write_bytes, atomic_write_json, ensure_writable_dir, read_json, sha256_file


def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Path):
            p = sha256_file(p) if p.is_file() else f"missing:{p}"
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class _State:
    """Per-stage fingerprints and timings of one pipeline run dir."""

    def __init__(self, path: Path):
        self.path = path
        self.data = read_json(path, "delete it (or pass --force) and the pipeline checks every stage again",
                              expect=dict) if path.is_file() else {}
        self.skipped: set[str] = set()  # stages this invocation skipped

    def run(self, name: str, fingerprint: str, complete: Callable[[], bool], fn: Callable[[], Any], force: bool):
        entry = self.data.get(name, {})
        if not force and entry.get("fingerprint") == fingerprint and complete():
            print(f"[pipeline] {name}: outputs complete and inputs unchanged, skipped")
            self.skipped.add(name)
            return entry.get("result")
        print(f"[pipeline] {name}: running")
        t0 = time.perf_counter()
        result = fn()
        self.data[name] = {"fingerprint": fingerprint, "seconds": round(time.perf_counter() - t0, 1), "result": result}
        atomic_write_json(self.path, self.data)
        return result


def run_pipeline(cfg: RunConfig, squad_dir: str | None = None, force: bool = False, work_dir: str | None = None) -> dict:
    """Run the pipeline with its relative paths (data/, models/, exports/, runs/) under ``work_dir``
    (default: the current directory), one pipeline at a time there. Input paths given relative to the current
    directory (the DeepSpeed JSON, --squad_dir) are taken in their normal form (``paths.normal_path``) before
    moving there: the stages' fingerprints then compare what the paths name, however they were spelled."""
    from openllm_ds.train.ds_config import read_base_ds_config

    if squad_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, squad_dir=squad_dir, source="dir"))
    read_base_ds_config(cfg.train.ds_config)  # a missing or broken DeepSpeed JSON stops us now, not after data and tokenizer
    if cfg.data.squad_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, squad_dir=str(normal_path(cfg.data.squad_dir))))
    if Path(cfg.train.ds_config).is_file():
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ds_config=str(normal_path(cfg.train.ds_config))))
    work = work_dir or "."
    with OutputLock(work, "pipeline", "--work_dir"), contextlib.chdir(ensure_writable_dir(work, "--work_dir")):
        return _run_stages(cfg, force)


def uses_prepare(cfg: RunConfig) -> bool:
    """Does the run train on what `prepare` writes (SQuAD), rather than on the user's own corpus?"""
    return not cfg.train.data_files and same_path(cfg.train.data_file, Path(cfg.data.output_dir) / "training_data.txt")


# settings a finished run can change and still go on (more steps, other cadences, another launcher; another number
# of ranks, ZeRO stage or micro batch: the trainer keeps the checkpoint's global batch, or says which flag does)
CONTINUABLE = {"max_steps", "eval_every", "save_every", "log_every", "keep_last", "eval_batches", "resume",
               "num_workers", "max_failures", "eval_tasks", "allow_data_change", "output_dir", "ds_config",
               "micro_batch_size", "gradient_accumulation_steps"}  # not init_from: a run resumes only from the
# weights it started from (train/preflight.check_resumed_base)


def train_stage(cfg: RunConfig, previous: dict | None, tok_dir: Path, force: bool, launch: Callable) -> dict:
    """The pipeline's training: go on with the run in train.output_dir when only continuable settings changed
    (nothing to do when it is already at train.max_steps); otherwise say what differs. --force trains from
    step 0, replacing the outputs of a run this pipeline trained (and only those)."""
    from openllm_ds.checkpoint import RUN_OUTPUTS, list_checkpoints
    from openllm_ds.config import run_config_from_dict
    from openllm_ds.errors import UserError
    from openllm_ds.train.ray_launcher import absolute_paths
    from openllm_ds.utils import read_yaml

    out = Path(cfg.output_dir)
    found = list_checkpoints(out)
    saved = out / "run_config.yaml"
    if not found or not saved.is_file():
        return launch(cfg)
    if force:
        if previous is None:
            raise UserError(f"--force: {out} holds a run this pipeline did not train; set train.output_dir to a new "
                            "directory (nothing was deleted)")
        import shutil

        print(f"[pipeline] train: --force, replacing the run in {out} (step {found[-1][0]})")
        with OutputLock(out, "pipeline --force", "train.output_dir"):  # not while it trains
            for name in RUN_OUTPUTS:
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        return launch(cfg)
    old = run_config_from_dict(read_yaml(saved, "delete the run dir or pass --force", expect=dict), str(saved))
    diff = [f"model.{k}: {v} -> {getattr(cfg.model, k)}" for k, v in dataclasses.asdict(old.model).items()
            if v != getattr(cfg.model, k)]
    # compared as the run saw them: paths absolute (a Ray Train run saves them so)
    old_train, new_train = absolute_paths(old).train, absolute_paths(cfg).train
    diff += [f"train.{k}: {v} -> {getattr(new_train, k)}" for k, v in dataclasses.asdict(old_train).items()
             if k not in CONTINUABLE and v != getattr(new_train, k)]
    copied = out / "tokenizer" / "tokenizer.model"
    if copied.is_file() and (tok_dir / "tokenizer.model").is_file() and \
            sha256_file(copied) != sha256_file(tok_dir / "tokenizer.model"):
        diff.append(f"the tokenizer ({tok_dir} was trained again)")
    if diff:
        raise UserError(f"{out} holds a run (step {found[-1][0]}) trained with other settings ({'; '.join(diff[:4])}); "
                        "it cannot go on with these: pass --force to train it again from step 0, or set "
                        "train.output_dir to a new directory")
    if found[-1][0] >= cfg.train.max_steps and previous and previous.get("result"):
        print(f"[pipeline] train: {out} is complete at step {found[-1][0]} (train.max_steps), nothing to train")
        return previous["result"]
    return launch(cfg)


def _source_fingerprint(spec: str):
    """A local file's sha256; the files (paths, sizes, mtimes) of a folder or glob; an hf: dataset's name."""
    from openllm_ds.data.units import ReadOptions, is_hub_source, resolve_sources

    if is_hub_source(spec):
        return spec
    p = Path(spec)
    if p.is_file():
        return p
    try:
        return [f.fingerprint() for f in resolve_sources([spec], ReadOptions())]
    except Exception:  # noqa: BLE001 - a missing source: the stage that reads it says so
        return f"missing:{spec}"


def _run_stages(cfg: RunConfig, force: bool) -> dict:
    from openllm_ds.checkpoint import read_latest
    from openllm_ds.data import prepare
    from openllm_ds.evaluation import evaluate, generate_text
    from openllm_ds.evaluation.harness import run_harness
    from openllm_ds.export import export
    from openllm_ds.tokenizer import load_tokenizer, train_tokenizer
    from openllm_ds.train import launch
    from openllm_ds.train.data import load_sources, shards_dirs
    from openllm_ds.train.distributed import DistEnv

    run_dir = Path("runs") / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    state = _State(run_dir / "state.json")
    clean = Path(cfg.data.output_dir)
    tok_dir = Path(cfg.train.tokenizer_dir)
    out_dir = Path(cfg.output_dir)
    exports = Path("exports")
    specs = [spec for spec, _ in cfg.train.sources]
    data_fp = [_source_fingerprint(s) for s in specs] + [_source_fingerprint(cfg.eval_data) if cfg.eval_data else None]

    if uses_prepare(cfg):
        data_inputs = sorted(Path(cfg.data.squad_dir).glob("*.json")) if cfg.data.squad_dir else []
        stats = state.run(
            "prepare", _fingerprint(dataclasses.asdict(cfg.data), *data_inputs),
            lambda: (clean / "stats.json").is_file(), lambda: prepare(cfg.data), force,
        )
        data_fp = [_source_fingerprint(s) for s in specs] + [_source_fingerprint(cfg.eval_data)]
    else:
        print("[pipeline] prepare: train.data_file is your own corpus, skipped")
        stats = None
    tok_cfg = dataclasses.replace(cfg.tokenizer, input=specs[0], output_dir=str(tok_dir))
    report_file = cfg.eval_data if cfg.eval_data and Path(cfg.eval_data).is_file() else None
    tok_report = state.run(
        "train-tokenizer", _fingerprint(dataclasses.asdict(tok_cfg), *data_fp),
        lambda: (tok_dir / "tokenizer.json").is_file(),
        lambda: train_tokenizer(tok_cfg, validation_file=report_file, sources=specs), force,
    )
    rank0 = DistEnv(rank=0, local_rank=0, world_size=1, device="cpu")
    state.run(
        "tokenize", _fingerprint(*data_fp, tok_dir / "tokenizer.model", dataclasses.asdict(cfg.tokenizer),
                                 cfg.train.holdout_fraction),
        lambda: all((d / "meta.json").is_file() for d in shards_dirs(cfg)),
        lambda: [{"source": s.source, "train_tokens": len(s.train), "validation_tokens": len(s.val)}
                 for s in load_sources(cfg, load_tokenizer(tok_dir).sha256, rank0)],
        force,
    )
    train_summary = state.run(
        "train", _fingerprint(dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.train), tok_dir / "tokenizer.model",
                              *data_fp),
        lambda: (out_dir / "checkpoints" / "latest").is_file() and "train" in state.data,
        lambda: train_stage(cfg, state.data.get("train"), tok_dir, force, launch), force,
    )
    sources = load_sources(cfg, load_tokenizer(tok_dir).sha256, rank0)  # up to date: reads meta.json only
    val_data = Path(cfg.eval_data) if cfg.eval_data else write_heldout_documents(cfg, run_dir / "validation.jsonl")
    ckpt_fp = _fingerprint(read_latest(out_dir / "checkpoints"))
    evaluation = state.run(
        "evaluate", _fingerprint(ckpt_fp, val_data, cfg.eval.stride),
        lambda: True,
        lambda: evaluate(model_dir=str(out_dir), eval_data=str(val_data), stride=cfg.eval.stride,
                         batch_size=cfg.eval.batch_size,
                         metrics=("perplexity", "loss", "bits_per_byte", "word_perplexity")),
        force,
    )
    harness_specs = pipeline_tasks(cfg, stats, val_data)
    harness = state.run(
        "harness", _fingerprint(ckpt_fp, [s.to_dict() for s in harness_specs]),
        lambda: (out_dir / "eval" / "report.json").is_file(),
        lambda: harness_results(run_harness(out_dir, (), checkpoints="all", num_workers=cfg.eval.num_workers,
                                             extra_specs=harness_specs)),
        force,
    )
    exported = {}
    for fmt in cfg.export.formats:  # export.formats (default: the export table's pipeline formats)
        fmt_cfg = config_for_format(cfg.export, fmt, model_dir=str(out_dir), output_dir=str(exports / fmt),
                                    overwrite=True)
        options = {field: getattr(fmt_cfg, field) for _, field in FORMATS[fmt].options}  # e.g. gguf_type
        exported[fmt] = state.run(
            f"export-{fmt}", _fingerprint(ckpt_fp, fmt, *([options] if options else [])),
            lambda fmt=fmt: any((exports / fmt).glob("*")),
            lambda fmt_cfg=fmt_cfg: export(fmt_cfg),
            force,
        )
    from openllm_ds.pipeline.sft_stage import run_sft_stage

    sft = run_sft_stage(cfg, state, stats, out_dir, ckpt_fp, _fingerprint, force)
    baseline = unigram_perplexity(sources[0].train, sources[0].val)
    evaluation = {**evaluation, "unigram_baseline_perplexity": baseline}
    samples = [
        generate_text(str(out_dir), p, max_new_tokens=40, temperature=0.0, stream=False)[0]
        for p in ("The university", "In 1905, the")
    ]
    report = write_report(run_dir, cfg, state, stats, tok_report, train_summary, evaluation, harness, samples,
                           out_dir, sources, exported=exported, sft=sft)
    return {"report": str(report.resolve()), "evaluation": evaluation, "harness": harness,
            "exports": {k: str((exports / k).resolve()) for k in exported},
            **({"finetune": {"scores": sft["scores"], "export": str(Path(sft["export"]).resolve())}} if sft else {})}


def write_heldout_documents(cfg: RunConfig, path: Path) -> Path:
    """The run's held-out validation documents as JSON Lines ({"text": ...}), for evaluation and the harness;
    rewritten only when they changed."""
    from openllm_ds.evaluation.run import run_validation_documents

    _, docs = run_validation_documents(cfg)
    data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    if not path.is_file() or path.read_bytes() != data:
        atomic_write_bytes(path, data)
    return path


def pipeline_tasks(cfg: RunConfig, stats: dict | None, val_txt: Path) -> list:
    """The harness tasks of the run: ``eval.tasks`` when set; else a cloze task on the validation
    passages, plus SQuAD QA and answer ranking on the dev-v1.1 file the data came from (if any)."""
    from openllm_ds.evaluation.tasks import TaskSpec, load_task

    if cfg.eval.tasks:
        return [load_task(t) for t in cfg.eval.tasks]
    specs = [TaskSpec(name="validation_cloze", kind="cloze", data=str(val_txt.resolve()), metric="accuracy", limit=100,
                      max_new_tokens=6, description="last word of held-out validation passages")]
    stats = stats or {}
    dev = Path(stats.get("location", "")) / "dev-v1.1.json"
    if dev.is_file() and "dev-v1.1.json" in stats.get("files", {}):
        for name in ("squad_v1_qa", "squad_answer_ranking"):
            specs.append(dataclasses.replace(load_task(name, check_data=False), data=str(dev)))
    return specs
