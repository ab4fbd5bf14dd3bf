"""One unit's work, the same in a Ray worker and in-process, in one pass over its text: each document is read once,
hashed (BLAKE2b-128 of its UTF-8 text) and encoded in that same pass, and the ids are written with a row per
document. Deduplication comes after every unit is read, from the hashes alone; then each unit's shard files are cut
out of its ids (a unit that lost none and was read as one piece has its files renamed into place). No text is read
twice.

Pieces. A unit of text or JSON Lines (a byte range, 16 MB by default) is read as pieces of ``PIECE_BYTES``: the same
documents, in the same order (a document belongs to the piece its first byte lies in, as to the unit), but work
small enough to keep every worker busy to the end. The unit's shard file (its output) joins its pieces.

Files of piece ``p`` of unit ``k`` of an output (in the output's temporary dir; hidden until finished):

    .unit_00007.0003.train.ids, .unit_00007.0003.heldout.ids   every document's ids, EOS after each, by split
    .unit_00007.0003.docs                                      a ``DOC`` row per document read, in read order

and, when finished, ``shard_00007.bin`` / ``heldout_00007.bin`` (shards.py): the pieces' ids less the duplicates'.
A file is written under a temporary name and renamed, and finishing a unit twice gives the same bytes, so a piece
or unit whose worker is killed is simply done again.
"""

from __future__ import annotations

import dataclasses
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
PIECE_BYTES = 4 * 2**20  # text read by one call; a unit's pieces join into its shard file
HASH = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("key", "<u8")])  # key = piece << 32 | document index
DOC = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("heldout", "u1"), ("tokens", "<u8"), ("bytes", "<u8"),
                ("words", "<u8"), ("max_id", "<u4")])


def ids_name(local: int, part: int, split: str) -> str:
    return f".unit_{local:05d}.{part:04d}.{split}.ids"


def docs_name(local: int, part: int) -> str:
    return f".unit_{local:05d}.{part:04d}.docs"


def pieces_of(unit: Unit, piece_bytes: int = PIECE_BYTES) -> list[Unit]:
    """The byte ranges a unit of text or JSON Lines is read in (one piece for the others: a compressed file, a JSON
    array, row groups); their documents, in order, are the unit's."""
    if unit.file.format in ("parquet", "arrow", "json_array") or unit.file.compression:
        return [unit]
    starts = range(unit.start, unit.stop, piece_bytes)
    return [dataclasses.replace(unit, start=a, stop=min(a + piece_bytes, unit.stop)) for a in starts] or [unit]


def write_whole(path: Path, data: np.ndarray) -> None:
    """``path`` written under a temporary name and renamed: whole or absent (a file only this run reads: not synced)."""
    tmp = path.with_name(f"{path.name}.part-{os.getpid()}")
    data.tofile(tmp)
    os.replace(tmp, path)


class PieceEncoder:
    """Encodes the documents of one piece a batch at a time into one ids file per split, keeping a ``DOC`` row per
    document."""

    def __init__(self, out_dir: Path, local: int, part: int, dtype: np.dtype, sp, holdout: float):
        self.out_dir, self.local, self.part = out_dir, local, part
        self.dtype, self.sp, self.eos = dtype, sp, sp.eos_id()
        self.cut = np.uint64(int(holdout * 2**64))  # a document is held out when the low half of its hash is below
        self.splits = ["train", "heldout"] if holdout > 0 else ["train"]
        self.files = {s: open(self._tmp(s), "wb") for s in self.splits}
        self.rows: list[np.ndarray] = []
        self.batch: list[str] = []
        self.sizes: list[int] = []
        self.hashes = bytearray()
        self.batch_bytes = 0

    def _tmp(self, split: str) -> Path:
        return self.out_dir / f"{ids_name(self.local, self.part, split)}.part-{os.getpid()}"

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
            os.replace(self._tmp(split), self.out_dir / ids_name(self.local, self.part, split))
        rows = np.concatenate(self.rows) if self.rows else np.zeros(0, DOC)
        write_whole(self.out_dir / docs_name(self.local, self.part), rows)
        return rows

    def abandon(self) -> None:
        for split, f in self.files.items():
            f.close()
            self._tmp(split).unlink(missing_ok=True)


def encode_piece(piece: Unit, local: int, part: int, out_dir: Path, options: ReadOptions, sp, dtype: np.dtype,
                 holdout: float) -> tuple[dict, np.ndarray]:
    """Read ``piece`` (part ``part`` of unit ``local`` of its output) once: hash and encode each document, write its
    ids and rows. Returns its counts and its documents' hashes (``HASH``, keyed by ``piece.index``)."""
    counts = UnitCounts()
    encoder = PieceEncoder(out_dir, local, part, dtype, sp, holdout)
    try:
        for doc in read_unit(piece, options, counts):
            encoder.add(doc)
        rows = encoder.close()
    except UserError as e:
        encoder.abandon()
        return {"piece": piece.index, "error": str(e)}, np.empty(0, HASH)
    except BaseException:
        encoder.abandon()
        raise
    hashes = np.empty(len(rows), HASH)
    hashes["hi"], hashes["lo"] = rows["hi"], rows["lo"]
    hashes["key"] = (np.uint64(piece.index) << np.uint64(32)) | np.arange(len(rows), dtype=np.uint64)
    return {"piece": piece.index, "documents": len(rows), "empty": counts.empty, "bad_records": counts.bad_records,
            "bad_examples": counts.bad_examples, "bytes_read": counts.bytes_read}, hashes


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


def drops_per_piece(drops: np.ndarray, num_pieces: int) -> np.ndarray:
    """How many documents each piece loses."""
    return np.bincount((drops >> np.uint64(32)).astype(np.int64), minlength=num_pieces)


def drops_of_piece(drops: np.ndarray | None, piece: int) -> np.ndarray:
    """Sorted document indexes of ``piece`` to drop."""
    if drops is None or not len(drops):
        return np.empty(0, np.int64)
    lo, hi = np.searchsorted(drops, [np.uint64(piece) << np.uint64(32), np.uint64(piece + 1) << np.uint64(32)])
    return (drops[lo:hi] & np.uint64(0xFFFFFFFF)).astype(np.int64)


def finish_unit(out_dir: Path, local: int, dtype: np.dtype, drops: list[np.ndarray]) -> dict:
    """The shard files of unit ``local``: its pieces' ids, joined, less the documents ``drops`` names (per piece); one
    piece that loses none is renamed into place whole. Returns the files' entries for meta.json (``shards``) and the
    digest of the unit's documents (their hashes, in order); the same files and entries when run again."""
    rows = [np.fromfile(out_dir / docs_name(local, part), dtype=DOC) for part in range(len(drops))]
    keep = []
    for r, d in zip(rows, drops):
        keep.append(np.ones(len(r), bool))
        keep[-1][d] = False
    for k, split in enumerate(SPLITS):
        final = out_dir / shard_name(split, local)
        kept = [kp[r["heldout"] == k] for r, kp in zip(rows, keep)]
        if not any(m.any() for m in kept):
            continue  # no file for a split without a document
        ids = [out_dir / ids_name(local, part, split) for part in range(len(drops))]
        if len(ids) == 1 and kept[0].all():
            if ids[0].exists():  # else: renamed by an earlier run of this call
                os.replace(ids[0], final)
            continue
        tmp = final.with_name(f"{final.name}.part-{os.getpid()}")
        with open(tmp, "wb") as f:
            for path, r, m in zip(ids, rows, kept):
                if m.any():
                    tokens = np.fromfile(path, dtype=dtype)
                    f.write(tokens[np.repeat(m, r["tokens"][r["heldout"] == k].astype(np.int64))].tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    every = np.concatenate(rows) if rows else np.zeros(0, DOC)
    return {"shards": split_stats(every, np.concatenate(keep) if keep else np.zeros(0, bool), local),
            "digest": hashlib.sha256(np.stack([every["hi"], every["lo"]], axis=1).tobytes()).hexdigest()}
