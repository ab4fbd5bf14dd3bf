"""Stage 1: SQuAD contexts -> cleaned, deduplicated passages, one a line, split train/validation.

``prepare(cfg)`` reads and validates every input (see ``sources``), cleans every paragraph's
context on Ray Data across ``cfg.num_workers`` workers (see ``clean``), then dedupes and splits on
the driver, and writes to ``cfg.output_dir``:

- ``training_data.txt`` and ``validation_data.txt``: one cleaned passage a line (UTF-8, "\\n" after
  every line), each passage once;
- ``stats.json``, written last: its presence means the other two are complete and belong to it.

Dedupe and split rule. Inputs are processed validation files first, then train files, each group in
name order, and paragraphs in file order. For each paragraph, in that order:

- ``too_short``: its cleaned text has fewer than ``min_words`` words (and never fewer than one, so
  no empty line is written); checked first.
- ``duplicates``: its cleaned text is exactly equal to a passage already kept from an earlier
  paragraph in that order: in the same file, in an earlier file of its split, or (for a train
  file) in any validation file. So a passage found in both dev and train files goes to validation
  only, and its train copy counts as a duplicate of that train file.
- ``kept``: otherwise; the passage is written to its split's file.

Per file, ``paragraphs = kept + too_short + duplicates``; ``characters`` (code points) and
``words`` (whitespace-separated tokens) are counted over kept passages. Each split's totals sum its
files. Output lines are in the processing order above (order of first appearance), so the output
depends only on the inputs and ``min_words``, never on ``num_workers`` or Ray's batch order.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from tqdm.auto import tqdm

from openllm_ds.config import DataConfig
from openllm_ds.data.clean import clean_batch, count_words
from openllm_ds.data.download import download_official
from openllm_ds.data.sources import HUB_DATASETS, SPLITS, SquadInput, list_squad_dir, load_hub, read_squad_files
from openllm_ds.errors import ConfigError, DataError
from openllm_ds.output_lock import OutputLock
from openllm_ds.paths import check_path
from openllm_ds.utils import (OutputKind, atomic_write_bytes, atomic_write_json, claim_output_dir, ensure_writable_dir,
                              init_ray, write_manifest)

OUTPUT_FILES = {"train": "training_data.txt", "validation": "validation_data.txt"}
STATS_FILE = "stats.json"
COUNTS = ("paragraphs", "kept", "too_short", "duplicates", "characters", "words")
CLEAN_DATA = OutputKind("cleaned data", "openllm-ds prepare", lambda name: name in (*OUTPUT_FILES.values(), STATS_FILE))


def prepare(cfg: DataConfig) -> dict:
    """Run stage 1 and return the stats it writes to ``<cfg.output_dir>/stats.json`` (one writer at a time there)."""
    source = resolve_source(cfg)
    with OutputLock(cfg.output_dir, "prepare"):
        claim_output_dir(Path(cfg.output_dir).expanduser(), CLEAN_DATA, "--output_dir")  # adds its files; others stay
        if source == "dir":
            check_path(cfg.squad_dir, "--squad_dir", "dir", "pass a folder holding SQuAD JSON files", DataError)
        return _prepare(cfg, source, ensure_writable_dir(Path(cfg.output_dir).expanduser(), "--output_dir"))


def _prepare(cfg: DataConfig, source: str, out_dir: Path) -> dict:
    if source == "dir":
        location = str(Path(cfg.squad_dir).expanduser().resolve())
        inputs = read_squad_files(list_squad_dir(cfg.squad_dir))
    elif source == "download":
        location = str(Path(cfg.cache_dir).expanduser().resolve())
        inputs = read_squad_files(download_official(cfg.cache_dir))
    else:
        location = "huggingface.co/datasets: " + ", ".join(HUB_DATASETS)
        inputs = load_hub(cfg.cache_dir)
    cleaned = clean_on_ray(inputs, cfg.num_workers)
    passages, file_stats = dedupe_and_split(inputs, cleaned, cfg.min_words)
    stats = {"source": source, "location": location, "min_words": cfg.min_words, "files": file_stats, "splits": {}}
    for split in SPLITS:
        if not passages[split]:
            print(f"warning: no {split} passage kept (a file is validation when its name contains 'dev'); "
                  f"{OUTPUT_FILES[split]} will be empty", file=sys.stderr)
        stats["splits"][split] = split_totals(split, file_stats)
    write_outputs(out_dir, passages, stats)
    return stats


def resolve_source(cfg: DataConfig) -> str:
    if cfg.squad_dir is not None:
        if cfg.source == "hub":
            raise ConfigError("data.source=hub and --squad_dir were both given; pass one of them")
        return "dir"
    if cfg.source == "dir":
        raise ConfigError("data.source=dir needs --squad_dir DIR (a folder of SQuAD JSON files)")
    return cfg.source


def clean_on_ray(inputs: list[SquadInput], num_workers: int) -> list[list[str]]:
    """Clean every context with Ray Data; result[i][j] is input i's paragraph j, cleaned."""
    ray = init_ray()
    rows = [{"file": i, "index": j, "context": c} for i, inp in enumerate(inputs) for j, c in enumerate(inp.contexts)]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * num_workers)))
    # A task whose worker process dies (killed, out of memory, a lost node) is run again: Ray Data gives
    # its tasks max_retries=-1 for system failures (its own exceptions are not retried). Cleaning is a
    # pure function of the rows and each result lands at its (file, index): the output is unchanged.
    ds = ds.map_batches(clean_batch, batch_format="numpy", compute=ray.data.TaskPoolStrategy(size=num_workers),
                        udf_modifying_row_count=False)
    cleaned: list[list[str | None]] = [[None] * len(inp.contexts) for inp in inputs]
    with tqdm(total=len(rows), desc=f"cleaning passages ({num_workers} Ray workers)", unit="para") as bar:
        for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            for i, j, text in zip(batch["file"].tolist(), batch["index"].tolist(), batch["text"].tolist()):
                cleaned[i][j] = text
            bar.update(len(batch["file"]))
    missing = sum(t is None for texts in cleaned for t in texts)
    if missing:
        raise RuntimeError(f"Ray Data returned {len(rows) - missing} of {len(rows)} cleaned paragraphs")
    return cleaned


def dedupe_and_split(inputs: list[SquadInput], cleaned: list[list[str]], min_words: int) -> tuple[dict, dict]:
    """Apply the module's dedupe and split rule: (passages per split, stats per input name)."""
    order = sorted(range(len(inputs)), key=lambda i: (SPLITS.index(inputs[i].split), inputs[i].name))
    passages: dict[str, list[str]] = {split: [] for split in SPLITS}
    seen: set[str] = set()
    file_stats = {}
    for i in order:
        inp = inputs[i]
        counts = dict.fromkeys(COUNTS, 0)
        counts["paragraphs"] = len(cleaned[i])
        for text in cleaned[i]:
            words = count_words(text)
            if words < max(min_words, 1):
                counts["too_short"] += 1
            elif text in seen:
                counts["duplicates"] += 1
            else:
                seen.add(text)
                passages[inp.split].append(text)
                counts["kept"] += 1
                counts["characters"] += len(text)
                counts["words"] += words
        file_stats[inp.name] = {"split": inp.split, **counts, "bytes": inp.num_bytes, "sha256": inp.sha256}
    return passages, file_stats


def split_totals(split: str, file_stats: dict) -> dict:
    files = [s for s in file_stats.values() if s["split"] == split]
    return {"output": OUTPUT_FILES[split], "files": len(files), **{k: sum(s[k] for s in files) for k in COUNTS}}


def write_outputs(out_dir: Path, passages: dict[str, list[str]], stats: dict) -> None:
    """Write both text files, then stats.json; each write is atomic (temp name, then rename)."""
    # A previous run's stats.json would vouch for a half-replaced pair of text files: drop it first.
    (out_dir / STATS_FILE).unlink(missing_ok=True)
    write_manifest(out_dir, CLEAN_DATA, [*OUTPUT_FILES.values(), STATS_FILE])
    for split, name in OUTPUT_FILES.items():
        data = "".join(p + "\n" for p in passages[split]).encode("utf-8")
        atomic_write_bytes(out_dir / name, data)
        stats["splits"][split].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    atomic_write_json(out_dir / STATS_FILE, stats)
