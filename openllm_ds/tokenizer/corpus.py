"""Corpus -> token shards, spread over Ray workers: any mix of sources, deduplicated, streamed.

    plan     (driver)  sources -> files -> units (``data/units.py``); nothing of the corpus is read here
    dedupe   (Ray)     a pool of Ray actors (``num_workers``), each holding the SentencePiece model, hashes each
                       unit's documents (BLAKE2b-128 of the UTF-8 text), the hashes partitioned by value into
                       buckets; per bucket, one call sorts the hashes and marks every copy after the first (in
                       unit order, then document order) as a duplicate. The marks stay in Ray's object store:
                       the driver holds references, never hashes
    encode   (Ray)     the same actors read each unit again, skip its duplicates, encode each document with
                       EOS after it, and write the unit's shard file themselves (``shard_<unit>.bin``, and
                       ``heldout_<unit>.bin`` for the held-out share) into the output directory (shared storage
                       on a cluster); the driver hands out units one at a time and keeps only their counts
    finish   (driver)  meta.json, written last, from the per-unit counts

The output depends only on the inputs, the tokenizer and the options: a unit's files are a function of
the unit alone, units are fixed by ``unit_bytes`` (not by the number of workers), and the held-out
share is chosen by each document's hash (so every copy of a text lands on the same side). So 1, 2 or
N workers, in-process (``num_workers=0``) included, write byte-equal shards. A worker killed mid-way
is restarted and its unit redone; a unit's file is written under a temporary name and renamed, so a
rerun replaces it whole: no document is lost or written twice. Everything is written into a temporary
sibling of the output dir that replaces it only when complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm import tqdm

from openllm_ds.data.documents import read_unit
from openllm_ds.data.units import (UNIT_BYTES, ReadOptions, Unit, UnitCounts, is_glob, is_hub_source, plan_units,
                                   resolve_sources)
from openllm_ds.errors import DataError, UserError
from openllm_ds.tokenizer.shards import FORMAT, META_FILE, TokenShards, is_shard_file, shard_name, token_dtype
from openllm_ds.tokenizer.tokenizer import load_tokenizer
from openllm_ds.utils import (OutputKind, atomic_dir, atomic_write_json, claim_output_dir, describe_entries,
                              ensure_writable_dir, init_ray)

SHARDS_ROOT = "data/tokens"  # shards of globs, hf: datasets and several sources (tokenizer.shards_root)
ENCODE_BATCH_BYTES = 1 << 20  # documents encoded and written together
HASH = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("key", "<u8")])  # key = unit << 32 | document index
MAX_RESTARTS = 3  # a Ray worker that dies is restarted (and its unit redone) this many times


def tokenize_corpus(
    inputs: list[str] | tuple[str, ...] | str,
    tokenizer_dir: str | Path,
    output_dir: str | Path | None = None,
    *,
    options: ReadOptions = ReadOptions(),
    dedup: bool = True,
    holdout: float = 0.0,
    num_workers: int = 2,
    unit_bytes: int = UNIT_BYTES,
    what: str = "--input",
) -> dict:
    """Encode every document of ``inputs`` into ``output_dir`` (default ``shards_dir_for(inputs)``).

    ``holdout``: the share of documents (chosen by hash) written as the held-out split instead of
    training. ``num_workers`` 0 runs in this process without Ray. Returns meta.json's content plus
    ``shards_dir``; when meta.json already records the same inputs (paths, sizes, mtimes), options and
    tokenizer, nothing is recomputed.
    """
    inputs = [str(inputs)] if isinstance(inputs, (str, Path)) else [str(i) for i in inputs]
    if num_workers < 0:
        raise UserError(f"--num_workers must be >= 0 (0: in this process, without Ray), got {num_workers}")
    if not 0.0 <= holdout < 1.0:
        raise UserError(f"--holdout (train.holdout_fraction) must be in [0, 1), got {holdout}")
    tok = load_tokenizer(tokenizer_dir)
    files = resolve_sources(inputs, options, what)
    out = Path(output_dir) if output_dir is not None else shards_dir_for(inputs)
    source = {
        "inputs": [str(i) for i in inputs],
        "files": [f.fingerprint() for f in files],
        "options": dataclasses.asdict(options),
        "dedup": dedup,
        "holdout": holdout,
        "unit_bytes": unit_bytes,
    }
    if (existing := up_to_date_meta(out, source, tok.sha256)) is not None:
        print(f"token shards in {out} are up to date (same inputs, options and tokenizer): "
              f"{existing['num_tokens']:,} tokens, skipping")
        return {**existing, "shards_dir": str(out)}
    check_shards_output_dir(out)
    units = plan_units(files, unit_bytes)
    dtype = token_dtype(tok.vocab_size)
    total_mb = sum(f.size for f in files) / 1e6
    start = time.perf_counter()
    with atomic_dir(out, SHARDS) as tmp:
        runner = (InProcess(tok, units, options, dtype, tmp, holdout) if num_workers == 0 else
                  OnRay(tok, num_workers, units, options, dtype, tmp, holdout))
        try:
            drops, hashed = runner.find_duplicates() if dedup else (None, None)
            results = runner.encode(drops)
        finally:
            runner.close()
        for part in tmp.iterdir():  # a killed worker's unfinished temp file
            if not is_shard_file(part.name):
                part.unlink()
        meta = build_meta(tok, tokenizer_dir, dtype, source, units, results)
        if hashed is not None and hashed != meta["counts"]["documents_read"]:
            raise RuntimeError(f"read {meta['counts']['documents_read']} documents to encode, {hashed} to deduplicate")
        check_not_empty(meta, inputs)
        atomic_write_json(tmp / META_FILE, meta)  # last: its presence marks the dir complete
    seconds = time.perf_counter() - start
    c = meta["counts"]
    held = f", {meta['heldout']['num_documents']:,} held out" if meta.get("heldout") else ""
    print(f"wrote {meta['num_tokens']:,} tokens ({meta['num_documents']:,} documents{held}; {c['duplicates']:,} duplicates "
          f"removed, {c['empty']:,} empty and {c['bad_records']:,} bad records skipped) from {len(files)} file(s) to {out} "
          f"in {seconds:.1f} s ({total_mb / max(seconds, 1e-9):.1f} MB/s) "
          f"{'in this process' if num_workers == 0 else f'with {num_workers} Ray worker(s)'}")
    for example in c["bad_examples"]:
        print(f"  skipped: {example}")
    return {**meta, "shards_dir": str(out), "seconds": round(seconds, 3), "nodes": sorted(runner.nodes)}


def check_inputs(inputs: list[str], options: ReadOptions, what: str = "--input") -> None:
    """Each input names existing files that are not all empty (read in full later, by the workers)."""
    for source in inputs:
        files = resolve_sources([source], options, what)
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


def shards_dir_for(inputs: list[str] | tuple[str, ...] | str, root: str | Path = SHARDS_ROOT) -> Path:
    """Where a source's shards go by default: ``data/clean/training_data.txt`` -> ``data/clean/training_data.tokens``,
    another file or a folder -> ``NAME.tokens`` beside it; a glob, an ``hf:`` dataset or several sources ->
    ``<root>/<name>-<hash>.tokens`` (root: ``data/tokens``)."""
    inputs = [str(inputs)] if isinstance(inputs, (str, Path)) else [str(i) for i in inputs]
    if len(inputs) == 1 and not is_hub_source(inputs[0]) and not is_glob(inputs[0]):
        p = Path(inputs[0]).expanduser()
        return p.with_suffix(".tokens") if p.suffix == ".txt" else p.with_name(p.name + ".tokens")
    digest = hashlib.sha256("\n".join(inputs).encode()).hexdigest()[:10]
    name = "".join(c if c.isalnum() or c in "-." else "_" for c in inputs[0].removeprefix("hf:"))[-60:].strip("_.")
    return Path(root) / f"{name or 'corpus'}-{digest}.tokens"


def up_to_date_meta(out: Path, source: dict, tokenizer_sha256: str) -> dict | None:
    """meta.json of a complete shards dir built from these inputs, with these options and tokenizer, else None."""
    if not (out / META_FILE).is_file():
        return None
    try:
        meta = TokenShards(out).meta
    except UserError:
        return None
    if meta["source"] == json.loads(json.dumps(source)) and meta["tokenizer_sha256"] == tokenizer_sha256:
        return meta
    return None


def is_shards_entry(name: str) -> bool:
    return name == META_FILE or is_shard_file(name)


SHARDS = OutputKind("token shards", "openllm-ds tokenize", is_shards_entry)


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


# ---- one unit's work (the same code in Ray workers and in-process) ------------------------------

def document_hashes(docs) -> np.ndarray:
    """(n, 2) uint64: BLAKE2b-128 of each document's UTF-8 text."""
    raw = b"".join(hashlib.blake2b(d.encode("utf-8"), digest_size=16).digest() for d in docs)
    return np.frombuffer(raw, dtype="<u8").reshape(-1, 2)


def hash_unit(unit: Unit, options: ReadOptions, num_buckets: int) -> tuple[dict, list[np.ndarray]]:
    """Counts, and the unit's document hashes split into ``num_buckets`` by value."""
    try:
        h = document_hashes(read_unit(unit, options, UnitCounts()))
    except UserError as e:
        return {"unit": unit.index, "error": str(e)}, [np.empty(0, HASH)] * num_buckets
    rows = np.empty(len(h), HASH)
    rows["hi"], rows["lo"] = h[:, 0], h[:, 1]
    rows["key"] = (np.uint64(unit.index) << np.uint64(32)) | np.arange(len(h), dtype=np.uint64)
    bucket = rows["hi"] % np.uint64(num_buckets)
    return {"unit": unit.index, "documents": len(h)}, [rows[bucket == b] for b in range(num_buckets)]


def duplicates_in_bucket(*parts: np.ndarray) -> np.ndarray:
    """Keys (unit << 32 | index) of every document whose text came earlier; sorted."""
    rows = np.concatenate(parts) if parts else np.empty(0, HASH)
    rows = rows[np.lexsort((rows["key"], rows["lo"], rows["hi"]))]
    repeat = np.zeros(len(rows), bool)
    repeat[1:] = (rows["hi"][1:] == rows["hi"][:-1]) & (rows["lo"][1:] == rows["lo"][:-1])
    return np.sort(rows["key"][repeat])


def merge_sorted(*parts: np.ndarray) -> np.ndarray:
    return np.sort(np.concatenate(parts)) if parts else np.empty(0, np.uint64)


def drops_of_unit(drops: np.ndarray | None, unit: int) -> np.ndarray:
    """Sorted document indexes of ``unit`` to skip."""
    if drops is None or not len(drops):
        return np.empty(0, np.uint64)
    lo, hi = np.searchsorted(drops, [np.uint64(unit) << np.uint64(32), np.uint64(unit + 1) << np.uint64(32)])
    return drops[lo:hi] & np.uint64(0xFFFFFFFF)


class SplitWriter:
    """Appends one split's ids of a unit to ``<name>.part-<pid>``; ``close`` renames it into place."""

    def __init__(self, out_dir: Path, name: str, dtype: np.dtype):
        self.path = out_dir / name
        self.tmp = out_dir / f".{name}.part-{os.getpid()}"
        self.dtype, self.file = dtype, None
        self.stats = {"file": name, "num_tokens": 0, "num_documents": 0, "num_bytes": 0, "max_id": 0}

    def write(self, docs: list[str], ids: list[list[int]], eos: int) -> None:
        if not docs:
            return
        if self.file is None:
            self.file = open(self.tmp, "wb")
        for d in ids:
            d.append(eos)
        flat = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=sum(map(len, ids)))
        self.file.write(flat.tobytes())
        s = self.stats
        s["num_tokens"] += int(flat.size)
        s["num_documents"] += len(docs)
        s["num_bytes"] += sum(len(d.encode("utf-8")) + 1 for d in docs)  # + the newline each EOS stands for
        s["max_id"] = max(s["max_id"], int(flat.max()))

    def close(self) -> dict | None:
        if self.file is None:
            self.path.unlink(missing_ok=True)  # an earlier attempt's file of a unit with nothing kept
            return None
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.stats


def encode_unit(unit: Unit, options: ReadOptions, sp, dtype: np.dtype, out_dir: Path, drops: np.ndarray,
                holdout: float) -> dict:
    """Read, deduplicate, split and encode one unit; write its shard file(s). Returns its counts."""
    counts = UnitCounts()
    eos = sp.eos_id()
    cut = int(holdout * 2**64)  # a document is held out when the low half of its hash is below this
    writers = {"train": SplitWriter(out_dir, shard_name("train", unit.index), dtype)}
    if holdout > 0:
        writers["heldout"] = SplitWriter(out_dir, shard_name("heldout", unit.index), dtype)
    digest = hashlib.sha256()
    batch: dict[str, list[str]] = {k: [] for k in writers}
    batch_bytes, read, duplicates, next_drop = 0, 0, 0, 0
    words = 0

    def flush():
        nonlocal batch_bytes
        for split, docs in batch.items():
            writers[split].write(docs, sp.encode(docs, num_threads=1), eos)
            docs.clear()
        batch_bytes = 0

    try:
        for doc in read_unit(unit, options, counts):
            index = read
            read += 1
            h = hashlib.blake2b(doc.encode("utf-8"), digest_size=16).digest()
            digest.update(h)
            if next_drop < len(drops) and drops[next_drop] == index:
                next_drop += 1
                duplicates += 1
                continue
            split = "heldout" if int.from_bytes(h[8:], "little") < cut else "train"
            if split == "heldout":
                words += len(doc.split())
            batch[split].append(doc)
            batch_bytes += len(doc)
            if batch_bytes >= ENCODE_BATCH_BYTES:
                flush()
        flush()
    except UserError as e:
        for w in writers.values():
            if w.file is not None:
                w.file.close()
                w.tmp.unlink(missing_ok=True)
        return {"unit": unit.index, "error": str(e)}
    if next_drop != len(drops):
        raise RuntimeError(f"unit {unit.index}: {len(drops) - next_drop} duplicates past its {read} documents")
    shards = {split: w.close() for split, w in writers.items()}
    if shards.get("heldout"):
        shards["heldout"]["num_words"] = words
    return {"unit": unit.index, "documents": read, "duplicates": duplicates, "empty": counts.empty,
            "bad_records": counts.bad_records, "bad_examples": counts.bad_examples, "bytes_read": counts.bytes_read,
            "digest": digest.hexdigest(), "shards": shards}


# ---- runners ----------------------------------------------------------------------------------

class InProcess:
    """Every unit in this process, one after another (``num_workers=0``)."""

    def __init__(self, tok, units: list[Unit], options: ReadOptions, dtype: np.dtype, out_dir: Path, holdout: float):
        self.tok, self.units, self.options, self.dtype, self.out_dir, self.holdout = tok, units, options, dtype, out_dir, holdout
        self.nodes = set()

    def find_duplicates(self) -> tuple[np.ndarray, int]:
        parts, total = [], 0
        for unit in tqdm(self.units, desc="hashing documents", unit="unit", disable=len(self.units) < 2):
            counts, (rows,) = hash_unit(unit, self.options, 1)
            raise_error(counts)
            parts.append(rows)
            total += counts["documents"]
        return duplicates_in_bucket(*parts), total

    def encode(self, drops) -> list[dict]:
        results = []
        for unit in tqdm(self.units, desc="tokenizing", unit="unit"):
            result = encode_unit(unit, self.options, self.tok.sp, self.dtype, self.out_dir,
                                 drops_of_unit(drops, unit.index), self.holdout)
            raise_error(result)
            results.append(result)
        return results

    def close(self) -> None:
        pass


class OnRay:
    """A pool of ``num_workers`` Ray actors (``UnitWorker``), each holding the SentencePiece model and the
    list of units; the driver hands each actor one unit at a time and collects small results.

    Why actors fed by the driver rather than a Ray Data pipeline: a unit is seconds of work and its result
    a few numbers, so there is nothing for Ray Data's streaming executor to stream; starting it (its stats,
    autoscaling and locality actors, then the map workers) cost 8 s of a 300 MB run on 2 cores (42.0 s vs
    33.8 s for the same encoding), a fifth of the work. Faults are Ray's own: an actor whose process dies is
    restarted and its pending call run again (``max_restarts``, ``max_task_retries``); hashing is a pure
    function of the unit, and a unit's shard file is written under a temporary name and renamed, so a rerun
    leaves the same bytes. ``SPREAD`` places the actors across the cluster's nodes.
    """

    def __init__(self, tok, num_workers: int, units: list[Unit], options: ReadOptions, dtype: np.dtype, out_dir: Path,
                 holdout: float):
        ray = self.ray = init_ray()
        self.units, self.num_workers, self.nodes = units, num_workers, set()
        cpus = min(1.0, ray.cluster_resources().get("CPU", 1.0) / num_workers)
        # the arguments live in the object store while this object holds them: a restarted actor finds them there
        self.args = [ray.put(units), ray.put(tok.sp.serialized_model_proto())]
        worker = ray.remote(num_cpus=cpus, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS,
                            scheduling_strategy="SPREAD")(UnitWorker)
        self.actors = [worker.remote(self.args, options, dtype.name, str(out_dir.resolve()), holdout)
                       for _ in range(num_workers)]

    def find_duplicates(self) -> tuple:
        buckets = 2 * self.num_workers
        parts: list = [None] * len(self.units)
        total = 0
        hashing = lambda actor, u: actor.hash.options(num_returns=buckets + 1).remote(u, buckets)  # noqa: E731
        for u, refs, counts in self.map(hashing, f"hashing documents ({self.num_workers} Ray workers)",
                                        first_ref=lambda refs: refs[0]):
            raise_error(counts)
            total += counts["documents"]
            parts[u] = refs[1:]
        # every bucket's hashes to one actor, the buckets' duplicates merged by another; the driver keeps references
        per_bucket = [self.actors[b % self.num_workers].duplicates.remote(*[p[b] for p in parts]) for b in range(buckets)]
        merged = self.actors[0].merge.remote(*per_bucket)
        self.ray.wait([merged], fetch_local=False)
        return merged, total

    def encode(self, drops) -> list[dict]:
        results = []
        for u, _, result in self.map(lambda actor, u: actor.encode.remote(u, drops),
                                     f"tokenizing ({self.num_workers} Ray workers)"):
            raise_error(result)
            self.nodes.add(result.pop("node"))
            results.append(result)
        return sorted(results, key=lambda r: r["unit"])

    def map(self, call, desc: str, first_ref=lambda ref: ref):
        """(unit, refs, first result) for every unit, as the actors finish them; one unit in flight per actor,
        so a free actor takes the next and none idles at the end while another holds queued work."""
        ray, todo, running = self.ray, list(range(len(self.units))), {}

        def submit(actor):
            if todo:
                u = todo.pop(0)
                refs = call(actor, u)
                running[first_ref(refs)] = (actor, u, refs)

        for actor in self.actors:
            submit(actor)
        with tqdm(total=len(self.units), desc=desc, unit="unit") as bar:
            while running:
                (done,), _ = ray.wait(list(running), num_returns=1)
                actor, u, refs = running.pop(done)
                submit(actor)
                bar.update(1)
                yield u, refs, ray.get(done)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


class UnitWorker:
    """Ray actor: the tokenizer and the unit list; hashes, deduplicates and encodes units on request."""

    def __init__(self, args: list, options: ReadOptions, dtype: str, out_dir: str, holdout: float):
        import ray
        import sentencepiece as spm

        units, model_proto = ray.get(args)
        self.units, self.options, self.dtype, self.out_dir, self.holdout = units, options, np.dtype(dtype), Path(out_dir), holdout
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.node = ray.get_runtime_context().get_node_id()

    def hash(self, u: int, num_buckets: int):
        counts, parts = hash_unit(self.units[u], self.options, num_buckets)
        return (counts, *parts)

    def duplicates(self, *parts: np.ndarray) -> np.ndarray:
        return duplicates_in_bucket(*parts)

    def merge(self, *parts: np.ndarray) -> np.ndarray:
        return merge_sorted(*parts)

    def encode(self, u: int, drops: np.ndarray | None) -> dict:
        result = encode_unit(self.units[u], self.options, self.sp, self.dtype, self.out_dir, drops_of_unit(drops, u),
                             self.holdout)
        return {**result, "node": self.node}


def raise_error(result: dict) -> None:
    if "error" in result:
        raise DataError(result["error"])


# ---- meta.json --------------------------------------------------------------------------------

def build_meta(tok, tokenizer_dir, dtype: np.dtype, source: dict, units: list[Unit], results: list[dict]) -> dict:
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
