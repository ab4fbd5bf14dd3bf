"""A run's validation data is never its own training data: ``check_validation_apart``, before any work.

Validation on the documents a run trains on measures how well it memorises them, not how it does on text it has
not seen, and every eval loss the run logs would say the wrong thing. The run stops (it does not warn: a warning
scrolls away while the numbers stay in TensorBoard and the reports) when a validation source shares a file with a
training source:

- the same file or folder by another path (relative or absolute, ``~``, ``..``, a trailing slash, a symlink, a
  hard link, a folder that holds the file, a glob that matches it, token shards built from it);
- a byte-identical copy of a training file.

Without ``--eval_data`` there is always a way on: the run holds out ``train.holdout_fraction`` of each source's
documents (chosen by hash, never trained on). A fine-tune's conversations are checked alike (``--data`` against
``--eval_data``; `openllm-ds prepare-sft` splits them by passage).
"""

from __future__ import annotations

import os
from pathlib import Path

from openllm_ds.config import RunConfig, validation_source
from openllm_ds.errors import ConfigError, UserError
from openllm_ds.utils import read_json, sha256_file


def check_validation_apart(cfg: RunConfig) -> None:
    t = cfg.train
    training = [spec for spec, _ in t.sources]
    if cfg.finetune.model_dir:  # a fine-tune: its conversations (finetune_run_config put them in train.*)
        eval_name, key_name = "finetune.eval_data (--eval_data)", "finetune.data (--data)"
        fix = "pass held-out conversations as --eval_data (`openllm-ds prepare-sft` writes validation.jsonl)"
    else:
        eval_name = "train.eval_data (--eval_data)" if t.eval_data else "the validation file"
        key_name = "train.data_files (--data_files)" if t.data_files else "train.data_file (--data_file)"
        fix = ("pass held-out data as --eval_data, or leave --eval_data out to hold out train.holdout_fraction of the "
               "documents")
    if cfg.eval_data:
        validation = [(eval_name, cfg.eval_data)]
    else:
        validation = [("the validation file of --data_files", v) for spec in training if (v := validation_source(spec))]
    if not validation:
        return  # a held-out share of each source: apart by construction
    options = cfg.tokenizer.read_options()
    seen: dict[tuple, tuple[str, str]] = {}  # file identity -> (training source, the file's path)
    by_size: dict[int, list[tuple[str, str]]] = {}
    for spec in training:
        for key, path, size in files_of(spec, options):
            seen.setdefault(key, (spec, path))
            if size is not None:
                by_size.setdefault(size, []).append((spec, path))
    for name, spec in validation:
        for key, path, size in files_of(spec, options):
            found = None
            if key in seen:
                source, trained = seen[key]
                found = path if trained == path else f"{path} (the same file as {trained})"
            else:
                for source, trained in by_size.get(size, ()) if size else ():
                    if sha256_file(trained) == sha256_file(path):
                        found = f"{path} (a byte-identical copy of {trained})"
                        break
            if found:
                raise ConfigError(f"{name} {spec} is training data: {found} is what {key_name} {source} trains on; "
                                  f"validation on training data measures memorisation, not generalisation: {fix}")


def files_of(spec: str, options) -> list[tuple[tuple, str, int | None]]:
    """(identity, path, size) of every file a source reads: a local file's identity is its device and inode (every
    path to it, hard links too), an ``hf:`` dataset's its name (no size: not compared byte for byte); token shards
    stand for the files they were built from (meta.json), where those still exist."""
    from openllm_ds.data.units import is_hub_source, resolve_sources
    from openllm_ds.tokenizer.shards import META_FILE, is_shards_dir

    if is_hub_source(spec):
        return [(("hf", spec.strip()), spec, None)]
    if is_shards_dir(spec):
        try:
            meta = read_json(Path(spec) / META_FILE, "rebuild the shards", expect=dict)
            paths = [f["path"] for f in meta["source"]["files"]]
        except (UserError, KeyError, TypeError):
            return []  # a damaged shards dir: the run's own loader says so
        return [(key, p, os.path.getsize(p)) for p in paths if (key := _identity(p)) is not None]
    try:
        files = resolve_sources([spec], options, "source")
    except UserError:
        return []  # a source that cannot be read: the run's own checks say so, with the flag that named it
    return [(key, f.path, f.size) for f in files if (key := _identity(f.path)) is not None]


def _identity(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return ("file", st.st_dev, st.st_ino)
