"""`openllm-ds pipeline`: every stage in order, skipping the ones whose outputs are complete.

prepare -> train-tokenizer -> tokenize -> train -> evaluate -> export (huggingface, onnx) -> report.

A stage is skipped when its completion marker exists and its fingerprint (the config it ran
with and the hashes of its inputs) is unchanged; fingerprints live in ``runs/NAME/state.json``.
An interrupted pipeline rerun picks up where it stopped: training resumes from its latest
checkpoint (``train.resume=auto``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from openllm_ds.config import RunConfig
from openllm_ds.utils import atomic_write_json, atomic_write_text, sha256_file


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
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def run(self, name: str, fingerprint: str, complete: Callable[[], bool], fn: Callable[[], Any], force: bool):
        entry = self.data.get(name, {})
        if not force and entry.get("fingerprint") == fingerprint and complete():
            print(f"[pipeline] {name}: outputs complete and inputs unchanged, skipped")
            return entry.get("result")
        print(f"[pipeline] {name}: running")
        t0 = time.perf_counter()
        result = fn()
        self.data[name] = {"fingerprint": fingerprint, "seconds": round(time.perf_counter() - t0, 1), "result": result}
        atomic_write_json(self.path, self.data)
        return result


def run_pipeline(cfg: RunConfig, squad_dir: str | None = None, force: bool = False) -> dict:
    from openllm_ds.data import prepare
    from openllm_ds.evaluation import evaluate, generate_text
    from openllm_ds.export import export
    from openllm_ds.tokenizer import shards_dir_for, tokenize_file, train_tokenizer
    from openllm_ds.train import launch

    if squad_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, squad_dir=squad_dir, source="dir"))
    run_dir = Path("runs") / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    state = _State(run_dir / "state.json")
    clean = Path(cfg.data.output_dir)
    train_txt, val_txt = Path(cfg.train.data_file), Path(cfg.eval_data)
    tok_dir = Path(cfg.train.tokenizer_dir)
    out_dir = Path(cfg.output_dir)
    exports = Path("exports")

    data_inputs = sorted(Path(cfg.data.squad_dir).glob("*.json")) if cfg.data.squad_dir else []
    stats = state.run(
        "prepare", _fingerprint(dataclasses.asdict(cfg.data), *data_inputs),
        lambda: (clean / "stats.json").is_file(), lambda: prepare(cfg.data), force,
    )
    tok_cfg = dataclasses.replace(cfg.tokenizer, input=str(train_txt), output_dir=str(tok_dir))
    tok_report = state.run(
        "train-tokenizer", _fingerprint(dataclasses.asdict(tok_cfg), train_txt),
        lambda: (tok_dir / "tokenizer.json").is_file(),
        lambda: train_tokenizer(tok_cfg, validation_file=str(val_txt)), force,
    )
    state.run(
        "tokenize", _fingerprint(train_txt, val_txt, tok_dir / "tokenizer.model"),
        lambda: all((shards_dir_for(f) / "meta.json").is_file() for f in (train_txt, val_txt)),
        lambda: [tokenize_file(f, tok_dir, num_workers=cfg.tokenizer.num_workers)["num_tokens"] for f in (train_txt, val_txt)],
        force,
    )
    train_summary = state.run(
        "train", _fingerprint(dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.train), tok_dir / "tokenizer.model", train_txt),
        lambda: (out_dir / "checkpoints" / "latest").is_file() and "train" in state.data,
        lambda: launch(cfg), force,
    )
    latest = out_dir / "checkpoints" / "latest"
    ckpt_fp = _fingerprint(latest.read_text() if latest.is_file() else None)
    evaluation = state.run(
        "evaluate", _fingerprint(ckpt_fp, val_txt),
        lambda: True,
        lambda: evaluate(model_dir=str(out_dir), eval_data=str(val_txt), metrics=("perplexity", "loss", "bits_per_byte", "word_perplexity")),
        force,
    )
    exported = {}
    for fmt in ("huggingface", "onnx"):
        exported[fmt] = state.run(
            f"export-{fmt}", _fingerprint(ckpt_fp, fmt),
            lambda fmt=fmt: any((exports / fmt).glob("*")),
            lambda fmt=fmt: export(dataclasses.replace(cfg.export, model_dir=str(out_dir), format=fmt,
                                                       output_dir=str(exports / fmt), overwrite=True)),
            force,
        )
    baseline = unigram_perplexity(shards_dir_for(train_txt), shards_dir_for(val_txt))
    evaluation = {**evaluation, "unigram_baseline_perplexity": baseline}
    samples = [
        generate_text(str(out_dir), p, max_length=40, temperature=0.0, stream=False)[0]
        for p in ("The university", "In 1905, the")
    ]
    report = _write_report(run_dir, cfg, state.data, stats, tok_report, train_summary, evaluation, samples, out_dir)
    return {"report": str(report), "evaluation": evaluation, "exports": {k: str(exports / k) for k in exported}}


def unigram_perplexity(train_shards: Path, val_shards: Path) -> float:
    """Perplexity on the validation tokens of a unigram model fit on the training tokens (add-one)."""
    import numpy as np

    from openllm_ds.tokenizer import TokenShards

    train, val = TokenShards(train_shards), TokenShards(val_shards)
    counts = np.bincount(train[0 : len(train)], minlength=train.vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[val[0 : len(val)]].mean()))


def _write_report(run_dir, cfg, stages, stats, tok_report, train_summary, evaluation, samples, out_dir) -> Path:
    import yaml

    lines = [f"# Run report: {cfg.name}", "", "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v.get('seconds', '-')} |" for k, v in stages.items()]
    lines += ["", "## Data", "", "```json", json.dumps(stats.get("totals", stats) if isinstance(stats, dict) else stats, indent=2), "```"]
    lines += ["", "## Tokenizer", "", "```json", json.dumps(tok_report, indent=2, default=str), "```"]
    lines += ["", "## Training", "", "```json", json.dumps(train_summary, indent=2, default=str), "```"]
    lines += ["", "## Validation", "", "```json", json.dumps(evaluation, indent=2, default=str), "```"]
    lines += ["", "## Sample generations (greedy)", ""] + [f"- {s!r}" for s in samples]
    plot = _plot_losses(out_dir / "tensorboard", run_dir / "loss.png")
    if plot:
        lines += ["", "## Loss curves", "", f"![loss curves]({plot.name})"]
    lines += ["", "## Resolved config", "", "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False), "```"]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _plot_losses(tb_dir: Path, png: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    series = {}
    for ev_dir in {p.parent for p in tb_dir.rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(ev_dir))
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.endswith("loss"):
                series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for tag, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=tag)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
