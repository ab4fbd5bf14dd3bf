"""The pipeline's report: ``runs/NAME/report.md`` (the data, the tokenizer, training, evaluation against a unigram
baseline, the harness tasks, samples) and its loss plot."""

from __future__ import annotations

from pathlib import Path

from openllm_ds.utils import atomic_write_text


def harness_results(report: dict) -> list[dict]:
    keep = ("task", "step", "metric", "value", "baseline", "baseline_kind", "num_examples", "higher_is_better")
    return [{k: r.get(k) for k in keep} for r in report["results"]]


def unigram_perplexity(train, val) -> float:
    """Perplexity on the validation tokens of a unigram model fit on the training tokens (add-one)."""
    import numpy as np

    counts = np.bincount(train[0 : len(train)], minlength=train.vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[val[0 : len(val)]].mean()))


def write_report(run_dir, cfg, state, stats, tok_report, train_summary, evaluation, harness, samples,
                  out_dir, sources, exported: dict | None = None, sft: dict | None = None) -> Path:
    import yaml

    ev, tr = evaluation, train_summary
    lines = [f"# Run report: {cfg.name}", "", "| | |", "|---|---|",
             f"| parameters | {tr['num_params']:,} |",
             f"| training | {tr['final_step']} steps, {tr['tokens_seen']:,} tokens, {tr['world_size']} rank(s), "
             f"{tr['precision']}, ZeRO-{tr['zero_stage']} |",
             f"| final train loss | {_fmt(tr.get('train_loss'), '.4f')} |",
             f"| validation perplexity (per token) | {ev['perplexity']:.2f} |",
             f"| validation bits per byte | {ev['bits_per_byte']:.4f} |",
             f"| validation word perplexity | {ev['word_perplexity']:.1f} |",
             f"| unigram baseline perplexity (same tokenizer) | {ev['unigram_baseline_perplexity']:.2f} |",
             f"| uniform baseline perplexity (vocabulary) | {cfg.model.vocab_size:,} |",
             "", f"Validation: `{ev['eval_data']}`, {ev['num_tokens']:,} tokens, {ev['num_words']:,} words, "
             f"{ev['num_bytes']:,} bytes, sliding window of {ev['max_seq_len']} with stride {ev['stride']}; "
             f"checkpoint `{ev['checkpoint']}`.", ""]

    lines += ["## Stages", "", "| stage | seconds | this invocation |", "|---|---:|---|"]
    lines += [f"| {k} | {v.get('seconds', '-')} | {'skipped (complete, inputs unchanged)' if k in state.skipped else 'ran'} |"
              for k, v in state.data.items()]

    lines += ["", "## Data", ""]
    if stats is not None:
        lines += _squad_data_lines(stats)
    lines += _source_lines(sources, tr)

    ex = tok_report.get("examples", {})
    lines += ["", "## Tokenizer", "", f"SentencePiece {tok_report['model_type']}, vocabulary {tok_report['vocab_size']:,}, "
              f"{tok_report['tokens_per_word']} tokens per word on `{tok_report['tokens_per_word_file']}`."]
    for kind, e in ex.items():
        lines.append(f"- {kind} word `{e['word']}` ({e['count']}x): {' '.join(e['pieces'])}")

    lines += ["", "## Harness", "", "| task | step | metric | value | baseline | examples |", "|---|---:|---|---:|---:|---:|"]
    lines += [f"| {r['task']} | {r['step']} | {r['metric']} | {r['value']:.4g} | {r['baseline']:.4g} | {r['num_examples']} |"
              for r in harness]
    baselines = sorted({f"{r['task']}: {r['baseline_kind']}" for r in harness})
    if baselines:
        lines += ["", "Baselines: " + "; ".join(baselines) + "."]
    lines += ["", "## Exports", "", "| format | directory | files | size |", "|---|---|---:|---:|"]
    lines += [f"| {fmt} | `{r['output_dir']}` | {len(r['files'])} | {r['bytes'] / 2**20:.1f} MiB |"
              for fmt, r in (exported or {}).items() if r]
    lines += ["", "## Sample generations (greedy)", ""] + [f"- {s!r}" for s in samples]
    from openllm_ds.pipeline.sft_stage import sft_report_lines

    lines += sft_report_lines(sft)
    plot = _plot_losses(out_dir / "tensorboard", run_dir / "loss.png")
    if plot:
        lines += ["", "## Loss curves", "", f"![loss curves]({plot.name})"]
    lines += ["", "## Resolved config", "", "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False), "```"]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _fmt(value, spec: str) -> str:
    """A figure for the report, or "-" when the run did not produce it (e.g. no step trained this time)."""
    return "-" if value is None else format(value, spec)


def _squad_data_lines(stats: dict) -> list[str]:
    lines = [f"Source: {stats['source']} ({stats['location']}), min_words {stats['min_words']}.", "",
              "| file | split | paragraphs | kept | too short | duplicates | words |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, f in sorted(stats["files"].items()):
        lines.append(f"| {name} | {f['split']} | {f['paragraphs']:,} | {f['kept']:,} | {f['too_short']:,} | "
                     f"{f['duplicates']:,} | {f['words']:,} |")
    for split, f in stats["splits"].items():
        lines.append(f"| **{f['output']}** | {split} | {f['paragraphs']:,} | {f['kept']:,} | {f['too_short']:,} | "
                     f"{f['duplicates']:,} | {f['words']:,} |")
    return lines + [""]


def _source_lines(sources, train_summary: dict) -> list[str]:
    """Per training source: its shards, what tokenization dropped, its validation, its realised token share."""
    lines = ["| training source | weight | token share trained | documents | duplicates removed | empty / bad skipped "
             "| tokens | validation | val loss |", "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    trained = {s["name"]: s for s in train_summary.get("sources") or []}
    for s in sources:
        c, t = s.train.meta["counts"], trained.get(s.name, {})
        share = f"{t['token_share']:.1%}" if t.get("token_share") is not None else "-"
        val_loss = f"{t['val_loss']:.4f}" if t.get("val_loss") is not None else "-"
        lines.append(f"| `{s.source}` | {s.weight:.1%} | {share} | {s.train.num_documents:,} | {c['duplicates']:,} | "
                     f"{c['empty']:,} / {c['bad_records']:,} | {len(s.train):,} | {s.val_name} "
                     f"({len(s.val):,} tokens) | {val_loss} |")
    return lines


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
