"""Binary token shards: a corpus as one stream of ids, each document followed by EOS.

Layout of a shards dir (``tokenize_corpus`` writes it; default ``<source>.tokens/`` beside the source):
  shard_00000.bin, shard_00003.bin, ...     raw little-endian ids (uint16 while vocab <= 65,536, else
                                            uint32), one file per input unit that kept a document (the
                                            number is the unit's); documents never span files; the same
                                            bytes whoever wrote them (tokenizer/corpus.py)
  heldout_00000.bin, ...                    the held-out documents of each unit, when a share is held out
  meta.json                                 counts per file and in total, dtype, eos_id, the largest id
                                            of each file, the tokenizer's sha256, what was read and how;
                                            written last, so its presence means complete

``TokenShards(dir)`` reads the training stream, ``TokenShards(dir, "heldout")`` the held-out one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from openllm_ds.errors import DataError
from openllm_ds.utils import read_json

META_FILE = "meta.json"
FORMAT = 2
SPLITS = {"train": "shard", "heldout": "heldout"}  # split -> file prefix
META_KEYS = ("format", "vocab_size", "dtype", "eos_id", "tokenizer_sha256", "source", "num_tokens", "num_documents",
             "shards")


def is_shards_dir(spec: str) -> bool:
    """A data spec naming token shards already written (a dir with meta.json), not a corpus to tokenize."""
    p = Path(spec)
    return not spec.startswith("hf:") and p.is_dir() and (p / META_FILE).is_file()


def shard_name(split: str, unit: int) -> str:
    return f"{SPLITS[split]}_{unit:05d}.bin"


def is_shard_file(name: str) -> bool:
    return any(name.startswith(prefix + "_") and name.endswith(".bin") for prefix in SPLITS.values())


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


class TokenShards:
    """Read-only view of one split of a shards dir as one int64-indexable token stream (memmapped)."""

    def __init__(self, shards_dir: str | Path, split: str = "train"):
        self.dir, self.split = Path(shards_dir), split
        self.meta = read_meta(self.dir)
        part = split_meta(self.meta, split, self.dir)
        self.dtype = np.dtype(self.meta["dtype"])
        self.num_documents = int(part["num_documents"])
        self.arrays: list[np.ndarray] = []
        for shard in part["shards"]:
            path = self.dir / shard["file"]
            expected = shard["num_tokens"] * self.dtype.itemsize
            size = path.stat().st_size if path.is_file() else None
            if size != expected:
                raise DataError(
                    f"token shard {path} has {'no file' if size is None else f'{size} bytes'}, meta.json says "
                    f"{expected} bytes; delete {self.dir} and tokenize again"
                )
            if shard.get("max_id", 0) >= self.vocab_size:
                raise DataError(f"token shard {path} holds id {shard['max_id']} >= vocab_size {self.vocab_size} "
                                f"(meta.json); delete {self.dir} and tokenize again")
            self.arrays.append(np.memmap(path, dtype=self.dtype, mode="r") if expected else np.empty(0, self.dtype))
        self.offsets = np.cumsum([0] + [a.size for a in self.arrays])  # start of each shard in the stream
        if self.offsets[-1] != part["num_tokens"]:
            raise DataError(f"{self.dir / META_FILE}: {split} shards hold {self.offsets[-1]} tokens, num_tokens says "
                            f"{part['num_tokens']}; delete {self.dir} and tokenize again")

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.meta["eos_id"]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int | slice) -> int | np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self._span(start, stop)
            positions = np.arange(start, stop, step)
            if not positions.size:
                return np.empty(0, dtype=np.int64)
            lo = int(positions.min())
            return self._span(lo, int(positions.max()) + 1)[positions - lo]
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"token index {index} out of range for {len(self)} tokens")
        shard = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return int(self.arrays[shard][i - self.offsets[shard]])

    def _span(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int64, gathered across shard boundaries."""
        if stop <= start:
            return np.empty(0, dtype=np.int64)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        for k in range(first, len(self.arrays)):
            lo, hi = self.offsets[k], self.offsets[k + 1]
            if lo >= stop:
                break
            parts.append(self.arrays[k][max(start, lo) - lo:min(stop, hi) - lo])
        return np.concatenate(parts).astype(np.int64)

    def documents(self, tokenizer) -> list[str]:
        """The documents of this split, decoded (each ends at an EOS)."""
        ids = self[:]
        ends = np.flatnonzero(ids == self.eos_id)
        starts = np.concatenate([[0], ends[:-1] + 1])
        return [tokenizer.decode(ids[a:b]) for a, b in zip(starts, ends)]

    def shard_of(self, index: int) -> Path:
        """The file holding token ``index`` (for messages)."""
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.dir / split_meta(self.meta, self.split, self.dir)["shards"][k]["file"]

    def __getstate__(self) -> dict:
        return {"dir": self.dir, "split": self.split}  # DataLoader workers re-open the memmaps instead of copying

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["dir"], state.get("split", "train"))

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.dir)!r}, {self.split!r}, num_tokens={len(self)}, shards={len(self.arrays)}, "
                f"dtype={self.dtype})")


def split_meta(meta: dict, split: str, shards_dir: Path) -> dict:
    """The counts and shard list of one split ("train": the top level of meta.json)."""
    if split == "train":
        return meta
    part = meta.get(split)
    if not part:
        raise DataError(f"{shards_dir} holds no {split} documents (tokenized with holdout 0); tokenize again with a "
                        "held-out share, or pass the validation data yourself")
    return part


def read_meta(shards_dir: Path) -> dict:
    path = shards_dir / META_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing: {shards_dir} is not a complete token shards dir; "
                        "run tokenization (openllm-ds tokenize, or openllm-ds train, which tokenizes its data first)")
    meta = read_json(path, f"delete {shards_dir} and tokenize again", expect=dict, error=DataError)
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)} (written by an older version?); delete {shards_dir} "
                        "and tokenize again")
    if meta["format"] != FORMAT:
        raise DataError(f"{path} has format {meta['format']}, this version reads {FORMAT}; delete {shards_dir} and "
                        "tokenize again")
    return meta
