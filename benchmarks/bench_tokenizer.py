"""Stage 2 timings on the real SQuAD passages: tokenizer training (8k, 32k), from a text file and from the
same passages as JSON Lines (streamed to SentencePiece line by line).

    PYTHONPATH=. python benchmarks/bench_tokenizer.py [--repeats R]

The corpus is `prepare`'s training_data.txt + validation_data.txt built from ../shared/data/squad
(or --data_dir holding those files); training uses training_data.txt as it is, best of R runs.
Corpus -> token shards is measured by bench_corpus.py.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from openllm_ds.config import DataConfig, TokenizerConfig
from openllm_ds.errors import UserError
from openllm_ds.tokenizer import train_tokenizer

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


def vocabulary(tokenizer_dir: Path) -> list[tuple[str, float]]:
    """(piece, score) by id: what the model is, apart from the trainer settings it records."""
    from openllm_ds.tokenizer import load_tokenizer

    sp = load_tokenizer(tokenizer_dir).sp
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--squad_dir", default=str(ROOT.parent / "shared" / "data" / "squad"))
    parser.add_argument("--data_dir", help="a prepared data/clean dir (skips running prepare)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers of prepare")
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

        jsonl = tmp / "training_data.jsonl"
        jsonl.write_text("".join(json.dumps({"text": line}) + "\n" for line in train_file.read_text(
            encoding="utf-8").split("\n") if line.strip()), encoding="utf-8")
        walls = []
        for r in range(args.repeats):
            cfg = TokenizerConfig(input=str(jsonl), output_dir=str(tmp / f"tok-jsonl-{r}"), vocab_size=8000)
            start = time.perf_counter()
            report = train_tokenizer(cfg, validation_file=str(validation_file))
            walls.append(time.perf_counter() - start)
        same = vocabulary(Path(report["output_dir"])) == vocabulary(tokenizer_dir)
        train_lines.append(f"| vocab 8,000, from JSON Lines | {report['train_seconds']:.2f} | {min(walls):.2f} | "
                           f"{report['tokens_per_word']:.3f} (same pieces and scores as from text: {'yes' if same else 'no'}) |")

    print(f"\n## Tokenizer training ({train_mb:.1f} MB of text, best of {args.repeats})\n")
    print("| vocabulary | SentencePiece training (s) | whole train_tokenizer (s) | tokens/word on validation |")
    print("|---|---|---|---|")
    print("\n".join(train_lines))


if __name__ == "__main__":
    main()
