"""Binary token shards: the corpus as one stream of ids, each document followed by EOS.

Layout of a shards dir (default: ``<text file>.tokens/`` beside the text):
  shard_00000.bin, shard_00001.bin, ...  raw little-endian arrays (uint16 while vocab <= 65,536, else
                                         uint32), up to ``tokens_per_shard`` ids each; a document
                                         may continue into the next shard
  meta.json                              counts, dtype, eos_id, the sha256 of the source text and of
                                         tokenizer.model; written last, so its presence means complete
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from openllm_ds.errors import DataError

META_FILE = "meta.json"
SHARD_NAME = "shard_{:05d}.bin"
TOKENS_PER_SHARD = 100_000_000
META_KEYS = ("vocab_size", "dtype", "num_tokens", "num_documents", "eos_id", "tokenizer_sha256",
             "source_file", "source_sha256", "shards")


def shards_dir_for(text_file: str | Path) -> Path:
    """data/clean/training_data.txt -> data/clean/training_data.tokens"""
    return Path(text_file).with_suffix(".tokens")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


class ShardWriter:
    """Append id arrays; a new shard file starts every ``tokens_per_shard`` ids."""

    def __init__(self, out_dir: Path, dtype: np.dtype, tokens_per_shard: int = TOKENS_PER_SHARD):
        if tokens_per_shard < 1:
            raise ValueError(f"tokens_per_shard must be >= 1, got {tokens_per_shard}")
        self.out_dir, self.dtype, self.tokens_per_shard = Path(out_dir), np.dtype(dtype), tokens_per_shard
        self.shards: list[dict] = []
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        while ids.size:
            if self._file is None or self.shards[-1]["num_tokens"] == self.tokens_per_shard:
                self._open_next()
            room = self.tokens_per_shard - self.shards[-1]["num_tokens"]
            head, ids = ids[:room], ids[room:]
            self._file.write(head.tobytes())
            self.shards[-1]["num_tokens"] += int(head.size)

    def _open_next(self) -> None:
        self._close_file()
        name = SHARD_NAME.format(len(self.shards))
        self._file = open(self.out_dir / name, "wb")
        self.shards.append({"file": name, "num_tokens": 0})

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> list[dict]:
        self._close_file()
        return self.shards


class TokenShards:
    """Read-only view of a shards dir as one int64-indexable token stream (memmapped)."""

    def __init__(self, shards_dir: str | Path):
        self.dir = Path(shards_dir)
        self.meta = read_meta(self.dir)
        self.dtype = np.dtype(self.meta["dtype"])
        self.arrays: list[np.ndarray] = []
        for shard in self.meta["shards"]:
            path = self.dir / shard["file"]
            expected = shard["num_tokens"] * self.dtype.itemsize
            size = path.stat().st_size if path.is_file() else None
            if size != expected:
                raise DataError(
                    f"token shard {path} has {'no file' if size is None else f'{size} bytes'}, meta.json says "
                    f"{expected} bytes; delete {self.dir} and tokenize again"
                )
            self.arrays.append(np.memmap(path, dtype=self.dtype, mode="r") if expected else np.empty(0, self.dtype))
        self.offsets = np.cumsum([0] + [a.size for a in self.arrays])  # start of each shard in the stream
        if self.offsets[-1] != self.meta["num_tokens"]:
            raise DataError(f"{self.dir / META_FILE}: shards hold {self.offsets[-1]} tokens, num_tokens says "
                            f"{self.meta['num_tokens']}; delete {self.dir} and tokenize again")

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.meta["eos_id"]

    @property
    def num_documents(self) -> int:
        return self.meta["num_documents"]

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

    def __getstate__(self) -> dict:
        return {"dir": self.dir}  # DataLoader workers re-open the memmaps instead of copying tokens

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["dir"])

    def __repr__(self) -> str:
        return f"TokenShards({str(self.dir)!r}, num_tokens={len(self)}, shards={len(self.arrays)}, dtype={self.dtype})"


def read_meta(shards_dir: Path) -> dict:
    path = shards_dir / META_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing: {shards_dir} is not a complete token shards dir; "
                        "run tokenization (openllm-ds train tokenizes the data file first)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); delete {shards_dir} and tokenize again") from None
    missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else list(META_KEYS)
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; delete {shards_dir} and tokenize again")
    return meta
