"""One unit's work, the same in a Ray worker and in-process, in one pass over its text: each document is read once,
hashed (BLAKE2b-128 of its UTF-8 text) and encoded in that same pass, and the unit's ids are written with a row per
document. Deduplication comes after every unit is done, from the hashes alone; then a unit that lost documents has its
shard file cut out of its ids (a unit that lost none has its file renamed into place). No text is read twice.

Files of unit ``k`` of an output (in the output's temporary dir; hidden until finished):

    .unit_00007.train.ids, .unit_00007.heldout.ids   every document's ids, EOS after each, by split, in read order
    .unit_00007.docs                                 a ``DOC`` row per document read, in read order

and, when finished, ``shard_00007.bin`` / ``heldout_00007.bin`` (shards.py): those ids less the duplicates'.
A file is written under a temporary name and renamed, and finishing a unit twice gives the same bytes, so a unit
whose worker is killed is simply done again.
"""

from __future__ import annotations

import hashlib
import os
from itertools import chain
from pathlib import Path

import numpy as np

from openllm_ds.data.documents import read_unit
from openllm_ds.data.units import ReadOptions, Unit, UnitCounts
from openllm_ds.errors import UserError
from openllm_ds.tokenizer.shards import SPLITS, shard_name

ENCODE_BATCH_BYTES = 1 << 20  # documents encoded and written together
HASH = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("key", "<u8")])  # key = unit << 32 | document index
DOC = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("heldout", "u1"), ("tokens", "<u8"), ("bytes", "<u8"),
                ("words", "<u8"), ("max_id", "<u4")])


def ids_name(local: int, split: str) -> str:
    return f".unit_{local:05d}.{split}.ids"


def docs_name(local: int) -> str:
    return f".unit_{local:05d}.docs"


def write_whole(path: Path, data: bytes | np.ndarray) -> None:
    """``path`` written under a temporary name, flushed to disk and renamed: whole or absent."""
    tmp = path.with_name(f"{path.name}.part-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class UnitEncoder:
    """Encodes the documents of one unit a batch at a time into one ids file per split, keeping a ``DOC`` row per
    document."""

    def __init__(self, out_dir: Path, local: int, dtype: np.dtype, sp, holdout: float):
        self.out_dir, self.local, self.dtype, self.sp, self.eos = out_dir, local, dtype, sp, sp.eos_id()
        self.cut = np.uint64(int(holdout * 2**64))  # a document is held out when the low half of its hash is below
        self.splits = ["train", "heldout"] if holdout > 0 else ["train"]
        self.files = {s: open(self._tmp(s), "wb") for s in self.splits}
        self.rows: list[np.ndarray] = []
        self.batch: list[str] = []
        self.sizes: list[int] = []
        self.hashes = bytearray()
        self.batch_bytes = 0

    def _tmp(self, split: str) -> Path:
        return self.out_dir / f"{ids_name(self.local, split)}.part-{os.getpid()}"

    def add(self, doc: str) -> None:
        raw = doc.encode("utf-8")
        self.hashes += hashlib.blake2b(raw, digest_size=16).digest()
        self.batch.append(doc)
        self.sizes.append(len(raw) + 1)  # + the newline each EOS stands for
        self.batch_bytes += len(raw)
        if self.batch_bytes >= ENCODE_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.batch:
            return
        rows = np.zeros(len(self.batch), DOC)
        h = np.frombuffer(bytes(self.hashes), dtype="<u8").reshape(-1, 2)
        rows["hi"], rows["lo"], rows["bytes"] = h[:, 0], h[:, 1], self.sizes
        rows["heldout"] = rows["lo"] < self.cut
        for k, split in enumerate(self.splits):
            mine = np.flatnonzero(rows["heldout"] == k) if len(self.splits) > 1 else slice(None)
            docs = self.batch if isinstance(mine, slice) else [self.batch[i] for i in mine]
            if not docs:
                continue
            ids = self.sp.encode(docs, num_threads=1)
            for d in ids:
                d.append(self.eos)
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
            rows["tokens"][mine] = lengths
            rows["max_id"][mine] = np.maximum.reduceat(flat, np.cumsum(lengths) - lengths)
            if split == "heldout":
                rows["words"][mine] = [len(d.split()) for d in docs]
            self.files[split].write(flat.tobytes())
        self.rows.append(rows)
        self.batch, self.sizes, self.hashes, self.batch_bytes = [], [], bytearray(), 0

    def close(self) -> np.ndarray:
        """Every document's row; the ids files renamed into place (under their hidden names) and the rows written."""
        self.flush()
        for split, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self._tmp(split), self.out_dir / ids_name(self.local, split))
        rows = np.concatenate(self.rows) if self.rows else np.zeros(0, DOC)
        write_whole(self.out_dir / docs_name(self.local), rows)
        return rows

    def abandon(self) -> None:
        for split, f in self.files.items():
            f.close()
            self._tmp(split).unlink(missing_ok=True)


def encode_unit(unit: Unit, local: int, out_dir: Path, options: ReadOptions, sp, dtype: np.dtype,
                holdout: float) -> tuple[dict, np.ndarray]:
    """Read unit ``unit`` (number ``local`` in its output) once: hash and encode each document, write its ids and
    rows. Returns its counts (what every copy of it kept: ``shards``) and its documents' hashes (``HASH``)."""
    counts = UnitCounts()
    encoder = UnitEncoder(out_dir, local, dtype, sp, holdout)
    try:
        for doc in read_unit(unit, options, counts):
            encoder.add(doc)
        rows = encoder.close()
    except UserError as e:
        encoder.abandon()
        return {"unit": unit.index, "error": str(e)}, np.empty(0, HASH)
    except BaseException:
        encoder.abandon()
        raise
    hashes = np.empty(len(rows), HASH)
    hashes["hi"], hashes["lo"] = rows["hi"], rows["lo"]
    hashes["key"] = (np.uint64(unit.index) << np.uint64(32)) | np.arange(len(rows), dtype=np.uint64)
    digest = hashlib.sha256(np.stack([rows["hi"], rows["lo"]], axis=1).tobytes()).hexdigest()  # the hashes in order
    result = {"unit": unit.index, "documents": len(rows), "empty": counts.empty, "bad_records": counts.bad_records,
              "bad_examples": counts.bad_examples, "bytes_read": counts.bytes_read, "digest": digest,
              "shards": split_stats(rows, np.ones(len(rows), bool), local)}
    return result, hashes


def split_stats(rows: np.ndarray, keep: np.ndarray, local: int) -> dict:
    """Per split, the shard file's entry in meta.json for the documents ``keep`` marks (None: no document)."""
    out = {}
    for k, split in enumerate(SPLITS):
        kept = rows[keep & (rows["heldout"] == k)]
        if not len(kept):
            out[split] = None
            continue
        out[split] = {"file": shard_name(split, local), "num_tokens": int(kept["tokens"].sum()),
                      "num_documents": len(kept), "num_bytes": int(kept["bytes"].sum()),
                      "max_id": int(kept["max_id"].max())}
        if split == "heldout":
            out[split]["num_words"] = int(kept["words"].sum())
    return out


# ---- after every unit: the duplicates, then each unit's shard files -----------------------------

def duplicates_in_bucket(*parts: np.ndarray) -> np.ndarray:
    """Keys (unit << 32 | index) of every document whose text came earlier (in unit order, then document order);
    sorted."""
    rows = np.concatenate(parts) if parts else np.empty(0, HASH)
    rows = rows[np.lexsort((rows["key"], rows["lo"], rows["hi"]))]
    repeat = np.zeros(len(rows), bool)
    repeat[1:] = (rows["hi"][1:] == rows["hi"][:-1]) & (rows["lo"][1:] == rows["lo"][:-1])
    return np.sort(rows["key"][repeat])


def buckets(hashes: np.ndarray, num_buckets: int) -> list[np.ndarray]:
    """The hashes partitioned by value: every copy of a text lands in the same bucket."""
    which = hashes["hi"] % np.uint64(num_buckets)
    return [hashes[which == b] for b in range(num_buckets)]


def merge_sorted(*parts: np.ndarray) -> np.ndarray:
    return np.sort(np.concatenate(parts)) if parts else np.empty(0, np.uint64)


def drops_per_unit(drops: np.ndarray, num_units: int) -> np.ndarray:
    """How many documents each unit loses."""
    return np.bincount((drops >> np.uint64(32)).astype(np.int64), minlength=num_units)


def drops_of_unit(drops: np.ndarray | None, unit: int) -> np.ndarray:
    """Sorted document indexes of ``unit`` to drop."""
    if drops is None or not len(drops):
        return np.empty(0, np.int64)
    lo, hi = np.searchsorted(drops, [np.uint64(unit) << np.uint64(32), np.uint64(unit + 1) << np.uint64(32)])
    return (drops[lo:hi] & np.uint64(0xFFFFFFFF)).astype(np.int64)


def finish_unit(out_dir: Path, local: int, dtype: np.dtype, drops: np.ndarray) -> dict:
    """The shard files of a unit: its ids less the documents ``drops`` names (an ids file that loses none is renamed
    into place whole). Returns the files' entries for meta.json; the same files and entries when run again."""
    rows = np.fromfile(out_dir / docs_name(local), dtype=DOC)
    keep = np.ones(len(rows), bool)
    keep[drops] = False
    for k, split in enumerate(SPLITS):
        ids, final = out_dir / ids_name(local, split), out_dir / shard_name(split, local)
        mine = rows["heldout"] == k
        kept = keep[mine]
        if not kept.any():
            continue  # no file for a split without a document
        if kept.all():
            if ids.exists():  # else: renamed by an earlier run of this call
                os.replace(ids, final)
        else:
            tokens = np.fromfile(ids, dtype=dtype)
            write_whole(final, tokens[np.repeat(kept, rows["tokens"][mine].astype(np.int64))])
    return split_stats(rows, keep, local)
