"""Stage 2 timings on the real SQuAD passages: tokenizer training (8k, 32k) and corpus -> shards MB/s.

    PYTHONPATH=. python benchmarks/bench_tokenizer.py [--workers N] [--copies K] [--repeats R]

The corpus is `prepare`'s training_data.txt + validation_data.txt built from ../shared/data/squad
(or --data_dir holding those files). Training uses training_data.txt as it is. For throughput the
two files are written ``--copies K`` times into one text file, so there is enough work to
measure. MB/s = text bytes / wall time of the whole call, best of R runs. Rows, side by side:
  - `tokenize_file` with 1 Ray worker and with N (read, Ray Data encode, shard writing, hashing);
    Ray is started and warmed up before timing;
  - a single process with no Ray: a plain `SentencePieceProcessor.encode` loop over the lines, plus
    concatenation with EOS and one file write (the baseline for the speed-ups);
  - SentencePiece's own multithreaded batch encode (N threads), no file writing, for reference.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from openllm_ds.config import DataConfig, TokenizerConfig
from openllm_ds.errors import UserError
from openllm_ds.tokenizer import load_tokenizer, tokenize_file, train_tokenizer
from openllm_ds.tokenizer.shards import token_dtype
from openllm_ds.utils import init_ray

ROOT = Path(__file__).resolve().parents[1]


def prepared_corpus(args, tmp: Path) -> Path:
    if args.data_dir:
        return Path(args.data_dir)
    from openllm_ds.data import prepare

    out = tmp / "clean"
    prepare(DataConfig(source="dir", squad_dir=args.squad_dir, output_dir=str(out), num_workers=args.workers))
    return out


def best_of(repeats: int, fn) -> float:
    best = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        fn(r)
        best = min(best, time.perf_counter() - start)
    return best


def train_rows(train_file: Path, validation_file: Path, tmp: Path, repeats: int) -> tuple[list[str], Path]:
    """Best of R: SentencePiece training alone, and the whole train_tokenizer call (HF files, report)."""
    rows, tokenizer_8k = [], None
    for vocab in (8000, 32000):
        reports, walls = [], []
        try:
            for r in range(repeats):
                cfg = TokenizerConfig(input=str(train_file), output_dir=str(tmp / f"tok-{vocab}-{r}"), vocab_size=vocab)
                start = time.perf_counter()
                reports.append(train_tokenizer(cfg, validation_file=str(validation_file)))
                walls.append(time.perf_counter() - start)
        except UserError as e:
            rows.append(f"| vocab {vocab:,} | - | - | does not work on this corpus: {e} |")
            continue
        tokenizer_8k = tokenizer_8k or Path(reports[0]["output_dir"])
        rows.append(f"| vocab {vocab:,} | {min(r['train_seconds'] for r in reports):.2f} | {min(walls):.2f} | "
                    f"{reports[0]['tokens_per_word']:.3f} |")
    return rows, tokenizer_8k


def plain_loop(text_file: Path, tokenizer_dir: Path, out_file: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    lines = [line for line in text_file.read_text(encoding="utf-8").split("\n") if line.strip()]
    ids = [np.array(tok.encode(line) + [tok.eos_id], dtype=token_dtype(tok.vocab_size)) for line in lines]
    np.concatenate(ids).tofile(out_file)


def batch_encode(text_file: Path, tokenizer_dir: Path, threads: int) -> None:
    tok = load_tokenizer(tokenizer_dir)
    lines = [line for line in text_file.read_text(encoding="utf-8").split("\n") if line.strip()]
    tok.sp.encode(lines, num_threads=threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--squad_dir", default=str(ROOT.parent / "shared" / "data" / "squad"))
    parser.add_argument("--data_dir", help="a prepared data/clean dir (skips running prepare)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="N, compared with 1")
    parser.add_argument("--copies", type=int, default=10, help="copies of the corpus in the tokenized file")
    parser.add_argument("--repeats", type=int, default=3, help="best of R runs per row")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clean = prepared_corpus(args, tmp)
        train_file, validation_file = clean / "training_data.txt", clean / "validation_data.txt"
        train_mb = train_file.stat().st_size / 1e6
        train_lines, tokenizer_dir = train_rows(train_file, validation_file, tmp, args.repeats)
        if tokenizer_dir is None:
            raise SystemExit("an 8k vocabulary does not train on this corpus: " + train_lines[0])

        corpus = tmp / "corpus.txt"
        corpus.write_bytes((train_file.read_bytes() + validation_file.read_bytes()) * args.copies)
        mb = corpus.stat().st_size / 1e6
        start = time.perf_counter()
        init_ray()
        ray_start = time.perf_counter() - start
        tokenize_file(corpus, tokenizer_dir, output_dir=tmp / "warmup", num_workers=args.workers)

        metas = {}

        def ray_run(workers: int):
            return lambda r: metas.setdefault(workers, tokenize_file(corpus, tokenizer_dir, tmp / f"w{workers}-{r}",
                                                                     num_workers=workers))

        rows = [
            ("plain SentencePiece loop, 1 process, no Ray (baseline)", 1,
             best_of(args.repeats, lambda r: plain_loop(corpus, tokenizer_dir, tmp / f"loop-{r}.bin"))),
            ("tokenize_file (Ray Data)", 1, best_of(args.repeats, ray_run(1))),
            ("tokenize_file (Ray Data)", args.workers, best_of(args.repeats, ray_run(args.workers))),
            ("SentencePiece batch encode in threads, no writing (reference)", args.workers,
             best_of(args.repeats, lambda r: batch_encode(corpus, tokenizer_dir, args.workers))),
        ]
        num_tokens = metas[1]["num_tokens"]
        assert metas[1]["shards"] == metas[args.workers]["shards"]

    baseline = rows[0][2]
    print(f"\n## Tokenizer training ({train_mb:.1f} MB of text, best of {args.repeats})\n")
    print("| vocabulary | SentencePiece training (s) | whole train_tokenizer (s) | tokens/word on validation |")
    print("|---|---|---|---|")
    print("\n".join(train_lines))
    print(f"\n## Corpus -> token shards ({mb:.1f} MB, {num_tokens:,} tokens, vocab 8k, {os.cpu_count()} CPUs, "
          f"best of {args.repeats}; Ray start-up {ray_start:.1f} s, not counted)\n")
    print("| what | workers | seconds | MB/s | speed-up vs baseline |\n|---|---|---|---|---|")
    for name, workers, seconds in rows:
        print(f"| {name} | {workers} | {seconds:.2f} | {mb / seconds:.1f} | {baseline / seconds:.2f}x |")


if __name__ == "__main__":
    main()
