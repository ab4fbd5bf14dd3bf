"""Corpus -> token shards, in one pass over the text, in this process or across Ray workers: any mix of sources,
deduplicated, streamed.

    plan     (driver)  sources -> files -> units (``data/units.py``), each unit read as pieces of 4 MB (the work of
                       one call); nothing of the corpus is read here
    encode   (workers) each piece read once: every document hashed (BLAKE2b-128 of its UTF-8 text) and encoded with
                       EOS after it in that same read; the piece's ids and a row per document written into the output
                       dir (shared storage on a cluster) by the worker itself (``encode.py``)
    dedupe   (workers) from the hashes alone: every copy of a text after the first (in unit order, then document
                       order) is marked; each unit's shard file is joined from its pieces' ids less the marked
                       documents; no text is read or encoded again
    finish   (driver)  meta.json, written last, from the per-unit counts

Who does the work: ``runners.py`` (``--num_workers``: 0 = this process, on a thread per CPU; N Ray actors; ``auto`` =
this process on one machine, and with a Ray cluster below a size where Ray's start-up cannot be won back, else one
actor per CPU of the cluster).

The output depends only on the inputs, the tokenizer and the options: a unit's files are a function of the unit (and
of which of its documents came earlier) alone, units are fixed by ``unit_bytes`` (not by the number of workers), and
the held-out share is chosen by each document's hash (so every copy of a text lands on the same side). So 1, 2 or N
workers, in-process included, write byte-equal shards. A worker killed mid-way is restarted and its unit redone; a
file is written under a temporary name and renamed, so a rerun replaces it whole: no document is lost or written
twice. Everything is written into a temporary sibling of each output dir that replaces it only when complete.

Which dir: ``--output_dir``, or a default derived from the source (``shards_dir_for``); a derived dir belongs to its
source (meta.json's ``source.built_from``), so a second source that derives the same dir is refused, never written
over it or read under its name. The output dir is never read as input, nor is any token shards dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from openllm_ds.data.units import (SHARDS_KIND, UNIT_BYTES, ReadOptions, SourceFile, is_glob, is_hub_source,
                                   plan_units, resolve_sources, source_identity)
from openllm_ds.errors import DataError, UserError
from openllm_ds.tokenizer.encode import PIECE_BYTES
from openllm_ds.tokenizer.runners import InProcess, Job, OnRay, choose_workers
from openllm_ds.tokenizer.shards import FORMAT, META_FILE, TokenShards, is_shard_file, is_shards_dir, token_dtype
from openllm_ds.tokenizer.tokenizer import load_tokenizer
from openllm_ds.utils import (OutputKind, atomic_dir, atomic_write_json, claim_output_dir, describe_entries,
                              ensure_writable_dir)

SHARDS_ROOT = "data/tokens"  # shards of globs, hf: datasets and several sources (tokenizer.shards_root)


def is_shards_entry(name: str) -> bool:
    return name == META_FILE or is_shard_file(name)


SHARDS = OutputKind(SHARDS_KIND, "openllm-ds tokenize", is_shards_entry)


@dataclass
class Output:
    """One shards dir to write: its sources, where, and whether the dir is derived from them (not named by the user)."""

    inputs: list[str]
    dir: Path
    derived: bool
    files: list[SourceFile] = dataclasses.field(default_factory=list)
    source: dict = dataclasses.field(default_factory=dict)  # meta.json's ``source``


def tokenize_corpus(inputs: list[str] | tuple[str, ...] | str, tokenizer_dir: str | Path, output_dir: str | Path | None = None,
                    *, shards_root: str | Path = SHARDS_ROOT, **options) -> dict:
    """Encode every document of ``inputs`` as one corpus into ``output_dir`` (default ``shards_dir_for(inputs)``).
    Options: see ``tokenize_outputs``. Returns meta.json's content plus ``shards_dir``."""
    inputs = [str(inputs)] if isinstance(inputs, (str, Path)) else [str(i) for i in inputs]
    derived = output_dir is None
    out = shards_dir_for(inputs, shards_root) if derived else Path(output_dir)
    return tokenize_outputs([Output(inputs, out, derived)], tokenizer_dir, **options)[0]


def tokenize_each(inputs: list[str], tokenizer_dir: str | Path, *, shards_root: str | Path = SHARDS_ROOT,
                  what: str = "--input", **options) -> list[dict]:
    """Each input into its own default shards dir (``shards_dir_for``), in one run: exact duplicates are removed
    across all of them (the first copy kept, in input order), as with one output dir."""
    dirs = derived_shards_dirs(inputs, shards_root, what)
    return tokenize_outputs([Output([str(i)], d, True) for i, d in zip(inputs, dirs)], tokenizer_dir, what=what,
                            **options)


def tokenize_outputs(outputs: list[Output], tokenizer_dir: str | Path, *, options: ReadOptions = ReadOptions(),
                     dedup: bool = True, holdout: float = 0.0, num_workers: int | str = "auto",
                     unit_bytes: int = UNIT_BYTES, piece_bytes: int = PIECE_BYTES, what: str = "--input") -> list[dict]:
    """Every output's sources, tokenized in one run: ``dedup`` removes exact duplicates across all of them;
    ``holdout``: the share of documents (chosen by hash) written as the held-out split instead of training;
    ``num_workers``: 0 = this process, N Ray workers, ``auto``. When each output's meta.json already records the same
    inputs (paths, sizes, mtimes), options and tokenizer, nothing is recomputed. ``unit_bytes``: the input of one
    shard file; ``piece_bytes``: of one call (the output does not depend on it)."""
    if num_workers != "auto" and (not isinstance(num_workers, int) or num_workers < 0):
        raise UserError(f"--num_workers must be auto or >= 0 (0: in this process, without Ray), got {num_workers}")
    if not 0.0 <= holdout < 1.0:
        raise UserError(f"--holdout (train.holdout_fraction) must be in [0, 1), got {holdout}")
    tok = load_tokenizer(tokenizer_dir)
    files = resolve_sources([i for o in outputs for i in o.inputs], options, what, exclude=tuple(o.dir for o in outputs))
    earlier: list[Output] = []
    for o in outputs:
        o.files = [f for f in files if f.source in o.inputs]
        o.source = {"inputs": o.inputs, "built_from": built_from(o.inputs, o.dir),
                    "files": [f.fingerprint() for f in o.files], "options": dataclasses.asdict(options),
                    "dedup": dedup, "holdout": holdout, "unit_bytes": unit_bytes}
        if dedup and earlier:  # documents of these sources were removed from this one
            o.source["deduplicated_after"] = [{"built_from": built_from(e.inputs, o.dir), "files": e.source["files"]}
                                              for e in earlier]
        earlier.append(o)
        if o.derived:
            check_derived_dir(o)
    metas = [up_to_date_meta(o.dir, o.source, tok.sha256) for o in outputs]
    if all(m is not None for m in metas):
        for o, m in zip(outputs, metas):
            print(f"token shards in {o.dir} are up to date (same inputs, options and tokenizer): "
                  f"{m['num_tokens']:,} tokens, skipping")
        return [{**m, "shards_dir": str(o.dir)} for o, m in zip(outputs, metas)]
    for o in outputs:
        check_shards_output_dir(o.dir)
    return _tokenize(outputs, tok, tokenizer_dir, options, dedup, holdout, num_workers, unit_bytes, piece_bytes)


def _tokenize(outputs: list[Output], tok, tokenizer_dir, options, dedup, holdout, num_workers, unit_bytes,
              piece_bytes) -> list[dict]:
    dtype = token_dtype(tok.vocab_size)
    per_output = [plan_units(o.files, unit_bytes) for o in outputs]
    total = sum(f.size for o in outputs for f in o.files)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_dir(o.dir, SHARDS)) for o in outputs]
        units, targets = [], []
        for tmp, planned in zip(tmps, per_output):
            for local, unit in enumerate(planned):
                units.append(unit)
                targets.append((str(tmp.resolve()), local))
        job = Job.plan(units, targets, options, dtype.name, holdout, dedup, piece_bytes)
        workers = choose_workers(num_workers, total, len(job.pieces))
        runner = InProcess(job, tok.sp) if workers == 0 else OnRay(job, tok, workers)
        results = runner.run()
        metas, first = [], 0
        for o, tmp, planned in zip(outputs, tmps, per_output):
            for part in tmp.iterdir():  # the ids and rows of each unit, a killed worker's unfinished file
                if not is_shard_file(part.name):
                    part.unlink()
            mine = results[first:first + len(planned)]
            for local, r in enumerate(mine):
                r["unit"] = local
            first += len(planned)
            meta = build_meta(tok, tokenizer_dir, dtype, o.source, planned, mine)
            check_not_empty(meta, o.inputs)
            atomic_write_json(tmp / META_FILE, meta)  # last: its presence marks the dir complete
            metas.append(meta)
    seconds = time.perf_counter() - start
    how = (f"in this process ({runner.threads} thread{'s' if runner.threads > 1 else ''})" if workers == 0
           else f"with {getattr(runner, 'num_workers', workers)} Ray worker(s)")
    timing = f" in {seconds:.1f} s ({total / 1e6 / max(seconds, 1e-9):.1f} MB/s) {how}"
    for o, meta in zip(outputs, metas):
        c = meta["counts"]
        held = f", {meta['heldout']['num_documents']:,} held out" if meta.get("heldout") else ""
        print(f"wrote {meta['num_tokens']:,} tokens ({meta['num_documents']:,} documents{held}; {c['duplicates']:,} "
              f"duplicates removed, {c['empty']:,} empty and {c['bad_records']:,} bad records skipped) from "
              f"{len(o.files)} file(s) to {o.dir}{timing if len(outputs) == 1 else ''}")
        for example in c["bad_examples"]:
            print(f"  skipped: {example}")
    if len(outputs) > 1:
        print(f"tokenized {total / 1e6:.1f} MB into {len(outputs)} shards dirs{timing}")
    return [{**m, "shards_dir": str(o.dir), "seconds": round(seconds, 3), "nodes": sorted(runner.nodes)}
            for o, m in zip(outputs, metas)]


def check_inputs(inputs: list[str], options: ReadOptions, what: str = "--input", exclude=()) -> None:
    """Each input names existing files that are not all empty (read in full later, by the workers)."""
    for source in inputs:
        files = resolve_sources([source], options, what, exclude=exclude)
        small = sum(f.size for f in files) < 1 << 20
        if small and not any(_has_text(f.path) for f in files if f.format not in ("parquet", "arrow")) \
                and not any(f.format in ("parquet", "arrow") for f in files):
            raise DataError(f"{what} {source} is empty; it needs documents (e.g. one a line in a text file)")


def _has_text(path: str) -> bool:
    with open(path, "rb") as f:
        return bool(f.read().strip())


def summary(meta: dict) -> dict:
    """What `openllm-ds tokenize` prints: meta.json without its per-file lists."""
    held = meta.get("heldout")
    return {"shards_dir": meta["shards_dir"], "num_tokens": meta["num_tokens"], "num_documents": meta["num_documents"],
            "num_shards": len(meta["shards"]), "dtype": meta["dtype"], "vocab_size": meta["vocab_size"],
            "heldout": {k: held[k] for k in ("num_tokens", "num_documents")} if held else None,
            "counts": meta["counts"], "source_sha256": meta["source_sha256"], "files": len(meta["files"]),
            **({"seconds": meta["seconds"]} if "seconds" in meta else {})}


# ---- where shards go, and what they were built from ---------------------------------------------

def shards_dir_for(inputs: list[str] | tuple[str, ...] | str, root: str | Path = SHARDS_ROOT) -> Path:
    """Where a source's shards go by default: ``data/clean/training_data.txt`` -> ``data/clean/training_data.tokens``,
    another file or a folder -> ``NAME.tokens`` beside it; a glob, an ``hf:`` dataset or several sources ->
    ``<root>/<name>-<hash>.tokens`` (root: ``data/tokens``). ``derived_shards_dirs`` refuses two sources that get
    one dir (``X.txt`` and a folder ``X``)."""
    inputs = [str(inputs)] if isinstance(inputs, (str, Path)) else [str(i) for i in inputs]
    if len(inputs) == 1 and not is_hub_source(inputs[0]) and not is_glob(inputs[0]):
        p = Path(inputs[0]).expanduser()
        return p.with_suffix(".tokens") if p.suffix == ".txt" else p.with_name(p.name + ".tokens")
    digest = hashlib.sha256("\n".join(inputs).encode()).hexdigest()[:10]
    name = "".join(c if c.isalnum() or c in "-." else "_" for c in inputs[0].removeprefix("hf:"))[-60:].strip("_.")
    return Path(root) / f"{name or 'corpus'}-{digest}.tokens"


def derived_shards_dirs(specs: list[str], root: str | Path = SHARDS_ROOT, what: str = "--input") -> list[Path]:
    """The shards dir of each source of one command (a shards dir given as a source is its own; another source's is
    derived by ``shards_dir_for``). One rule for every list of sources: a source listed twice (under any spelling),
    or two sources whose shards would share one dir, is refused, naming both."""
    dirs: dict[str, str] = {}  # resolved dir -> the source it belongs to
    out = []
    for spec in map(str, specs):
        d = Path(spec) if is_shards_dir(spec) else shards_dir_for(spec, root)
        key = os.path.abspath(d.expanduser())
        if key in dirs:
            other = dirs[key]
            if source_identity(other) == source_identity(spec):
                raise UserError(f"{what} lists {spec} twice{f' (as {other} and {spec})' if other != spec else ''}; "
                                "list each source once (a mixture weighs a source with --data_weights)")
            raise UserError(f"{what} {other} and {spec} would both have their token shards in {d}; rename one of "
                            "them, or tokenize one with `openllm-ds tokenize --output_dir DIR` and pass DIR")
        dirs[key] = spec
        out.append(d)
    return out


def check_derived_dir(o: Output) -> None:
    """A derived dir holding the shards of another source is refused, naming both: never replaced, never read."""
    recorded = recorded_sources(o.dir)
    if recorded is not None and recorded != o.source["built_from"]:
        raise UserError(f"{o.dir} holds the token shards of {', '.join(recorded)}, and {', '.join(o.inputs)} would "
                        f"get the same default dir; rename one of them, or tokenize {', '.join(o.inputs)} with "
                        "`openllm-ds tokenize --output_dir DIR` and pass DIR")


def built_from(inputs: list[str], shards_dir: Path) -> list[str]:
    """What meta.json records a shards dir was built from: each source relative to the dir's parent (``X.txt`` for
    ``X.tokens`` beside it), so that a copied or moved project still matches, and ``X.txt`` and a folder ``X`` do not."""
    return [source_identity(i, shards_dir.parent) for i in inputs]


def recorded_sources(shards_dir: Path) -> list[str] | None:
    """The sources a shards dir records it was built from (None: no complete dir, or written before this was kept)."""
    if not (shards_dir / META_FILE).is_file():
        return None
    try:
        return TokenShards(shards_dir).meta["source"].get("built_from")
    except (UserError, AttributeError):
        return None


def built_shards_dir(spec: str, root: str | Path = SHARDS_ROOT) -> Path:
    """The shards dir a stage reads for ``spec``: ``spec`` itself when it is one, else its derived dir, once that
    dir's meta.json says it was built from ``spec``; else a UserError naming what it holds."""
    if is_shards_dir(spec):
        return Path(spec)
    d = shards_dir_for(spec, root)
    recorded = recorded_sources(d)
    if recorded is not None and recorded != built_from([spec], d):
        raise UserError(f"{d} holds the token shards of {', '.join(recorded)}, not of {spec}; tokenize {spec} "
                        "again (openllm-ds tokenize, or train), or pass the right shards dir")
    return d


def up_to_date_meta(out: Path, source: dict, tokenizer_sha256: str) -> dict | None:
    """meta.json of a complete shards dir built from these sources (whatever their spelling), files, options and
    tokenizer, else None."""
    if not (out / META_FILE).is_file():
        return None
    try:
        meta = TokenShards(out).meta
    except UserError:
        return None
    same = {k: v for k, v in json.loads(json.dumps(source)).items() if k != "inputs"}
    if {k: v for k, v in meta["source"].items() if k != "inputs"} == same and meta["tokenizer_sha256"] == tokenizer_sha256:
        return meta
    return None


def check_shards_output_dir(out: Path) -> None:
    """The dir is replaced whole, so it may hold only what this stage writes."""
    if out.exists() and not out.is_dir():
        raise UserError(f"token shards output {out} is a file; pass a directory")
    other = claim_output_dir(out, SHARDS, "token shards output")
    if other:
        raise UserError(f"token shards output {out} holds other files ({describe_entries(other)}); "
                        "pass a new or empty directory")
    ensure_writable_dir(out.parent, f"token shards output {out}: parent directory")


def check_not_empty(meta: dict, inputs: list[str]) -> None:
    c = meta["counts"]
    if meta["num_documents"] == 0:
        skipped = (f"{c['documents_read']:,} documents read, {c['duplicates']:,} duplicates, "
                   f"{c['empty']:,} empty and {c['bad_records']:,} bad records skipped")
        example = f"; e.g. {c['bad_examples'][0]}" if c["bad_examples"] else ""
        held = f", {meta['heldout']['num_documents']:,} held out" if meta.get("heldout") else ""
        raise DataError(f"{', '.join(inputs)}: no document left to train on ({skipped}{held}){example}; "
                        "check the inputs, --text_field and --doc_separator")


# ---- meta.json --------------------------------------------------------------------------------

def build_meta(tok, tokenizer_dir, dtype, source: dict, units: list, results: list[dict]) -> dict:
    def split_part(split: str) -> dict:
        shards = [{**r["shards"][split], "unit": r["unit"]} for r in results if r["shards"].get(split)]
        part = {"num_tokens": sum(s["num_tokens"] for s in shards),
                "num_documents": sum(s["num_documents"] for s in shards),
                "num_bytes": sum(s["num_bytes"] for s in shards)}
        if split == "heldout":
            part["num_words"] = sum(s.pop("num_words", 0) for s in shards)
        return {**part, "shards": shards}

    per_file: dict[str, dict] = {}
    for unit, r in zip(units, results):
        f = per_file.setdefault(unit.file.path, {"path": unit.file.path, "documents": 0, "duplicates": 0, "empty": 0,
                                                 "bad_records": 0})
        for k in ("documents", "duplicates", "empty", "bad_records"):
            f[k] += r[k]
    counts = {k: sum(r[k] for r in results) for k in ("duplicates", "empty", "bad_records")}
    counts["documents_read"] = sum(r["documents"] for r in results)
    counts["bad_examples"] = [e for r in results for e in r["bad_examples"]][:3]
    meta = {
        "format": FORMAT,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "eos_id": tok.eos_id,
        "tokenizer_sha256": tok.sha256,
        "tokenizer_dir": str(tokenizer_dir),
        "source": source,
        # the documents read (before deduplication), hashed in order
        "source_sha256": hashlib.sha256("".join(r["digest"] for r in results).encode()).hexdigest(),
        **split_part("train"),
        "counts": counts,
        "files": list(per_file.values()),
    }
    if source["holdout"] > 0:
        meta["heldout"] = split_part("heldout")
    return meta
