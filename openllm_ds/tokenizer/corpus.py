"""Corpus -> token shards: encode a one-document-per-line text file across Ray Data workers.

The driver reads the file and hands Ray Data blocks of lines; a fixed pool of actors, each holding
the SentencePiece model, turns a block into one byte string of ids (EOS after every document);
the driver writes the results in the file's order (``preserve_order``), so the shards are the same
whatever the number of workers. Blank lines are not documents and are skipped.
"""

from __future__ import annotations

import contextlib
import math
import time
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm import tqdm

from openllm_ds.errors import UserError
from openllm_ds.tokenizer.shards import (META_FILE, SHARD_NAME, TOKENS_PER_SHARD, ShardWriter, TokenShards,
                                         shards_dir_for, token_dtype)
from openllm_ds.tokenizer.tokenizer import load_tokenizer
from openllm_ds.tokenizer.train import check_text_file, read_lines
from openllm_ds.utils import atomic_dir, atomic_write_json, ensure_writable_dir, init_ray, sha256_file

MAX_LINES_PER_BLOCK = 2048


def tokenize_file(
    text_file: str | Path,
    tokenizer_dir: str | Path,
    output_dir: str | Path | None = None,
    num_workers: int = 2,
    *,
    tokens_per_shard: int = TOKENS_PER_SHARD,
) -> dict:
    """Encode ``text_file`` into ``output_dir`` (default ``shards_dir_for(text_file)``).

    Returns meta.json's content plus ``shards_dir``. When meta.json already records the same
    source and tokenizer sha256, nothing is recomputed.
    """
    if num_workers < 1:
        raise UserError(f"num_workers must be >= 1, got {num_workers}")
    text_path = check_text_file(text_file, "text file")
    tok = load_tokenizer(tokenizer_dir)
    out = Path(output_dir) if output_dir is not None else shards_dir_for(text_path)
    source_sha256 = sha256_file(text_path)

    if (existing := up_to_date_meta(out, source_sha256, tok.sha256)) is not None:
        print(f"token shards in {out} are up to date (same text and tokenizer sha256): "
              f"{existing['num_tokens']:,} tokens, skipping")
        return {**existing, "shards_dir": str(out)}
    check_shards_output_dir(out)

    documents = read_lines(text_path)
    dtype = token_dtype(tok.vocab_size)
    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, dtype, tokens_per_shard)
        num_documents = 0
        with tqdm(total=len(documents), unit="doc", desc=f"tokenizing {text_path.name}") as bar:
            for ids, n in encode_with_ray(documents, tok.sp.serialized_model_proto(), dtype, num_workers):
                writer.write(ids)
                num_documents += n
                bar.update(n)
        shards = writer.close()
        if num_documents != len(documents):
            raise RuntimeError(f"encoded {num_documents} documents of {len(documents)}")
        meta = {
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "num_tokens": sum(s["num_tokens"] for s in shards),
            "num_documents": num_documents,
            "eos_id": tok.eos_id,
            "tokenizer_sha256": tok.sha256,
            "tokenizer_dir": str(tokenizer_dir),
            "source_file": str(text_path),
            "source_sha256": source_sha256,
            "shards": shards,
        }
        atomic_write_json(tmp / META_FILE, meta)  # last: its presence marks the dir complete
    seconds = time.perf_counter() - start
    print(f"wrote {meta['num_tokens']:,} tokens ({num_documents:,} documents, {len(shards)} shard(s), {dtype.name}) "
          f"to {out} in {seconds:.1f} s with {num_workers} Ray worker(s)")
    return {**meta, "shards_dir": str(out)}


class EncodeBlock:
    """Ray Data actor: a block of lines -> one row holding the ids of all its documents, EOS after each."""

    def __init__(self, model_proto: bytes, dtype: str):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.dtype = np.dtype(dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # One document at a time: the batch call would start a thread per core in every worker.
        docs = [self.sp.encode(text) for text in batch["text"].tolist()]
        eos = [self.sp.eos_id()]
        count = sum(len(d) for d in docs) + len(docs)
        ids = np.fromiter(chain.from_iterable(d + eos for d in docs), dtype=self.dtype, count=count)
        return {"ids": np.array([ids.tobytes()], dtype=object), "num_documents": np.array([len(docs)])}


def encode_with_ray(documents: list[str], model_proto: bytes, dtype: np.dtype, num_workers: int):
    """Yield (ids, num_documents) per block, in the order of ``documents``."""
    import pyarrow as pa

    ray = init_ray()
    from ray.data import ActorPoolStrategy, DataContext

    # Enough blocks to keep every worker busy, few enough to keep per-block overhead small.
    lines_per_block = max(1, min(MAX_LINES_PER_BLOCK, math.ceil(len(documents) / (4 * num_workers))))
    blocks = [pa.table({"text": documents[i:i + lines_per_block]}) for i in range(0, len(documents), lines_per_block)]
    cpus_per_worker = min(1.0, ray.cluster_resources().get("CPU", 1.0) / num_workers)
    # An actor whose process dies (killed, out of memory, a lost node) is restarted and its block encoded
    # again: Ray Data creates its actors with max_restarts=-1 and max_task_retries=-1 (setting them through
    # map_batches' ray_remote_args is deprecated since Ray 2.60). With preserve_order, each block's ids are
    # written once and in order, so the shards are the same as without the failure.
    with preserve_order(DataContext.get_current()):
        ds = ray.data.from_arrow(blocks).map_batches(
            EncodeBlock,
            fn_constructor_args=(model_proto, dtype.name),  # the model bytes: workers need no shared disk
            batch_size=None,  # one whole block per call
            batch_format="numpy",
            compute=ActorPoolStrategy(size=num_workers),
            num_cpus=cpus_per_worker,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            for ids, n in zip(batch["ids"], batch["num_documents"]):
                yield np.frombuffer(ids, dtype=dtype), int(n)


@contextlib.contextmanager
def preserve_order(ctx):
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = before


def up_to_date_meta(out: Path, source_sha256: str, tokenizer_sha256: str) -> dict | None:
    """meta.json of a complete shards dir built from this text with this tokenizer, else None."""
    if not (out / META_FILE).is_file():
        return None
    try:
        meta = TokenShards(out).meta
    except UserError:
        return None
    if meta["source_sha256"] == source_sha256 and meta["tokenizer_sha256"] == tokenizer_sha256:
        return meta
    return None


def check_shards_output_dir(out: Path) -> None:
    """The dir is replaced whole, so it may hold only shards and meta.json."""
    if out.exists() and not out.is_dir():
        raise UserError(f"token shards output {out} is a file; pass a directory")
    if out.is_dir():
        shard_names = SHARD_NAME.split("{")[0]
        other = sorted(p.name for p in out.iterdir() if p.name != META_FILE and not p.name.startswith(shard_names))
        if other:
            raise UserError(f"token shards output {out} holds other files ({', '.join(other[:5])}); "
                            "pass a new or empty directory")
    ensure_writable_dir(out.parent, f"token shards output {out}: parent directory")
