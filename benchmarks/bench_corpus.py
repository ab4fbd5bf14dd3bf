"""Corpus -> token shards, in one pass, against one plain process; Ray's start-up and the size where `--num_workers
auto` starts using it; the driver's memory; and training speed from a many-shard mixture against one shard file.

    PYTHONPATH=. python benchmarks/bench_corpus.py [--sizes_mb 100,300,1000] [--formats text,jsonl] [--workers 1,2]
        [--threshold_mb 8,16,32,64,128] [--train_steps 20]

Corpus: numbered variants ("<k>. <passage>") of the real SQuAD passages (`prepare` on ../shared/data/squad, or
$OPENLLM_SHARED_DATA) and WikiText-2's test lines, one document a line, in a text file of each size, and as JSON
Lines of the same size with the text in a `content` field (`{"id": k, "content": ..., "meta": {...}}`). Every row
is a process of its own, timed from start to exit (Python's and Ray's start-up included), and the rows of one size
and format run one after another:
  - the baseline: a plain SentencePiece loop in one process, no Ray, streaming (read a line, parse it for JSON Lines,
    encode it, append the ids with EOS; ids written every 1 MB);
  - `openllm-ds tokenize --num_workers auto` (the default: on one machine, this process on a thread per CPU plus
    one) and `--num_workers N` (N Ray workers) for each N of --workers (deduplication on, the default). Peak RSS is the tokenize process's own (the driver's VmHWM); the Ray workers
    are other processes. The shards of every row of one corpus are checked byte-equal.
Ray's start-up: `tokenize` of a one-document file with 1 worker minus with 0 (nothing to encode, so nothing hides
it). The `auto` threshold: text files of --threshold_mb sizes, in this process (0) against 2 Ray workers.
Training: the tiny model for --train_steps steps (0: skipped) on (a) one source tokenized into one shard file, and
(b) the same text cut into three sources, each in ~120 shard files, mixed 0.5/0.3/0.2. The runs take turns (a, b,
a, b, a, b); tokens/s is the median over steps 5..N of each run. The data path alone (`TrainBatches.next_batch`,
300 steps, in-process) is timed for both too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OPENLLM_SHARED_DATA", ROOT.parent / "shared" / "data"))
# A process's peak RSS: VmHWM of /proc/self/status (ru_maxrss would carry the parent's peak across fork + exec).
PEAK = ("def peak_kb():\n    for line in open('/proc/self/status'):\n        if line.startswith('VmHWM:'):\n"
        "            return int(line.split()[1])\n")
CLI = (PEAK + "import sys\nfrom openllm_ds.cli import main\nrc = main(sys.argv[1:])\n"
       "print(f'MAXRSS {peak_kb()}', file=sys.stderr)\nsys.exit(rc)\n")
PLAIN_LOOP = PEAK + """
import json, sys
from itertools import chain
import numpy as np
import sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
eos, buf, n = sp.eos_id(), [], 0
records = sys.argv[2].endswith(".jsonl")
with open(sys.argv[2], encoding="utf-8") as f, open(sys.argv[3], "wb") as out:
    for line in f:
        line = json.loads(line)["content"] if records else line.rstrip("\\n")
        if line.strip():
            ids = sp.encode(line)
            ids.append(eos)
            buf.append(ids)
            n += len(line)
            if n >= 1 << 20:
                out.write(np.fromiter(chain.from_iterable(buf), dtype=np.uint16).tobytes())
                buf, n = [], 0
    out.write(np.fromiter(chain.from_iterable(buf), dtype=np.uint16).tobytes())
print(f"MAXRSS {peak_kb()}", file=sys.stderr)
"""


def run(argv: list[str], what: str, env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a child process; its stderr's MAXRSS line gives the RSS."""
    start = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{what} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rss = [line for line in r.stderr.splitlines() if line.startswith("MAXRSS ")]
    return seconds, int(rss[-1].split()[1]) / 1024


def documents() -> list[str]:
    from openllm_ds.config import DataConfig
    from openllm_ds.data import prepare

    with tempfile.TemporaryDirectory() as tmp:
        prepare(DataConfig(source="dir", squad_dir=str(SHARED / "squad"), output_dir=tmp, num_workers=1))
        lines = []
        for name in ("training_data.txt", "validation_data.txt"):
            lines += [x for x in (Path(tmp) / name).read_text(encoding="utf-8").split("\n") if x.strip()]
    wiki = SHARED / "wikitext-2" / "wiki.test.raw"
    lines += [x.strip() for x in wiki.read_text(encoding="utf-8").split("\n") if x.strip()]
    return lines


def write_corpus(path: Path, lines: list[str], num_bytes: int) -> int:
    """Numbered variants of ``lines`` up to ``num_bytes``, as text or (``.jsonl``) JSON Lines; returns the number of
    documents."""
    written, k = 0, 0
    records = path.suffix == ".jsonl"
    with open(path, "w", encoding="utf-8") as f:
        while written < num_bytes:
            chunk = "".join((json.dumps({"id": k + i, "content": f"{k + i}. {line}", "meta": {"source": "bench"}},
                                        ensure_ascii=False) if records else f"{k + i}. {line}") + "\n"
                            for i, line in enumerate(lines))
            k += len(lines)
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
    return k


def dir_digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        if p.suffix == ".bin":
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def tokenize(py: str, src: Path, tok: Path, out: Path, workers: str, *extra: str) -> tuple[float, float]:
    return run([py, "-c", CLI, "tokenize", "--input", str(src), "--tokenizer_dir", str(tok), "--output_dir", str(out),
                "--num_workers", workers, "--text_field", "content", *extra], f"tokenize {src.name} with {workers}")


def train_tokens_per_sec(py: str, out: Path, args: list[str], steps: int) -> float:
    argv = [py, "-c", CLI, "train", "--config", str(ROOT / "configs/tiny.yaml"), "--output_dir", str(out),
            "--max_steps", str(steps), "--eval_every", str(steps), "--save_every", str(steps), "--resume", "none",
            "train.log_every=1", "train.eval_batches=2", "tokenizer.num_workers=0", *args]
    run(argv, f"training {out.name}")
    rates = [json.loads(line)["perf/tokens_per_s"] for line in (out / "train_log.jsonl").read_text().splitlines()
             if "perf/tokens_per_s" in line]
    return statistics.median(rates[4:])


def batch_assembly_us(single: Path, many: list[str], weights: list[float], steps: int = 300) -> dict[str, float]:
    """Microseconds per step of TrainBatches.next_batch (tiny's global batch of 16 x 257 tokens), one source vs
    the mixture: the data path alone, without the model."""
    from openllm_ds.tokenizer import TokenShards
    from openllm_ds.train.data import DataPosition, TrainBatches
    from openllm_ds.train.distributed import DistEnv

    env = DistEnv(0, 0, 1, "cpu")
    out = {}
    for name, dirs, w in (("single", [str(single)], [1.0]), ("mixture", many, weights)):
        batches = TrainBatches([TokenShards(d) for d in dirs], w, 256, 16, 1, env, seed=0)
        pos = DataPosition.start(len(dirs))
        start = time.perf_counter()
        for _ in range(steps):
            _, pos, _ = batches.next_batch(pos)
        out[name] = (time.perf_counter() - start) / steps * 1e6
    return out


def corpus_rows(py: str, tmp: Path, tok: Path, lines: list[str], sizes: list[int], formats: list[str],
                workers: list[str]) -> None:
    print(f"\n## Corpus -> token shards ({os.cpu_count()} CPUs, vocab 8k; every row one process, Ray start-up "
          "included)\n")
    print("| corpus | MB | what | workers | seconds | MB/s | speed-up vs baseline | peak RSS of the process (MB) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    rss: dict[tuple, float] = {}
    for mb in sizes:
        for fmt in formats:
            src = tmp / f"corpus-{mb}.{'jsonl' if fmt == 'jsonl' else 'txt'}"
            docs = write_corpus(src, lines, mb * 10**6)
            real_mb = src.stat().st_size / 1e6
            name = f"{fmt} ({docs:,} documents)"
            base, peak = run([py, "-c", PLAIN_LOOP, str(tok / "tokenizer.model"), str(src), str(tmp / "loop.bin")],
                             "plain loop")
            (tmp / "loop.bin").unlink()
            what = "plain SentencePiece loop" + (" (json.loads per line)" if fmt == "jsonl" else "") + ", no Ray"
            print(f"| {name} | {real_mb:,.0f} | {what} (baseline) | 1 | {base:.1f} | {real_mb / base:.2f} | 1.00x "
                  f"| {peak:,.0f} |", flush=True)
            digests = {}
            for w in ["auto", *workers]:
                out = tmp / f"out-{w}.tokens"
                seconds, peak = tokenize(py, src, tok, out, w)
                meta = json.loads((out / "meta.json").read_text())
                digests[w] = dir_digest(out)
                rss[mb, fmt, w] = peak
                shutil.rmtree(out)
                print(f"| {name} | {real_mb:,.0f} | `openllm-ds tokenize` ({len(meta['shards'])} shard files) | {w} | "
                      f"{seconds:.1f} | {real_mb / seconds:.2f} | {base / seconds:.2f}x | {peak:,.0f} |", flush=True)
            src.unlink()
            assert len(set(digests.values())) == 1, f"{name}: the workers' shards differ: {digests}"
    small, large = min(sizes), max(sizes)
    for w in ["auto", *workers]:
        print(f"\nDriver peak RSS, {small} MB -> {large:,} MB of text with {w} worker(s): {rss[small, formats[0], w]:,.0f} "
              f"-> {rss[large, formats[0], w]:,.0f} MB ({rss[large, formats[0], w] / rss[small, formats[0], w] - 1:+.1%}).")
    print("Shards of every row of one corpus byte-equal (" + ", ".join(["auto", *workers]) + " workers).")


def start_up_and_threshold(py: str, tmp: Path, tok: Path, lines: list[str], threshold_mb: list[int]) -> None:
    one = tmp / "one.txt"
    one.write_text(lines[0] + "\n", encoding="utf-8")
    runs = {w: [] for w in ("0", "1")}
    for _ in range(3):
        for w in runs:
            runs[w].append(tokenize(py, one, tok, tmp / f"one-{w}.tokens", w)[0])
            shutil.rmtree(tmp / f"one-{w}.tokens")
    zero, ray = statistics.median(runs["0"]), statistics.median(runs["1"])
    print(f"\n## Ray's start-up, and where `--num_workers auto` starts using it\n\n`tokenize` of a one-document "
          f"file (median of 3): {zero:.1f} s in this process, {ray:.1f} s with 1 Ray worker: Ray's start-up costs "
          f"{ray - zero:.1f} s here.\n")
    if not threshold_mb:
        return
    print("| text MB | in this process (0) s | 2 Ray workers s | 2 workers / in-process |")
    print("|---:|---:|---:|---:|")
    for mb in threshold_mb:
        src = tmp / f"threshold-{mb}.txt"
        write_corpus(src, lines, mb * 10**6)
        times = {}
        for w in ("0", "2"):
            times[w] = tokenize(py, src, tok, tmp / "t.tokens", w)[0]
            shutil.rmtree(tmp / "t.tokens")
        src.unlink()
        print(f"| {mb} | {times['0']:.1f} | {times['2']:.1f} | {times['2'] / times['0']:.2f} |", flush=True)


def training_rows(py: str, tmp: Path, tok: Path, lines: list[str], steps: int) -> None:
    part = tmp / "part"
    part.mkdir()
    source = tmp / "source.txt"
    write_corpus(source, lines, 100 * 10**6)
    text = source.read_text(encoding="utf-8").split("\n")[:-1][:120_000]
    single = tmp / "single.txt"
    single.write_text("\n".join(text) + "\n", encoding="utf-8")
    thirds = [text[i::3] for i in range(3)]
    for i, t in enumerate(thirds):
        (part / f"s{i}.txt").write_text("\n".join(t) + "\n", encoding="utf-8")
    cut = tmp / "cut"
    tokenize(py, single, tok, tmp / "single.tokens", "0", "--holdout", "0.01", "--unit_bytes", str(10**10))
    many = []
    for i in range(3):
        d = cut / f"s{i}.tokens"
        tokenize(py, part / f"s{i}.txt", tok, d, "0", "--holdout", "0.01", "--unit_bytes", "200000")
        many.append(str(d))
    num_many = sum(len(json.loads((Path(d) / "meta.json").read_text())["shards"]) for d in many)
    common = ["--tokenizer_dir", str(tok)]
    rates = {"single": [], "mixture": []}
    batch_us = batch_assembly_us(tmp / "single.tokens", many, [0.5, 0.3, 0.2])
    for r in range(3):
        rates["single"].append(train_tokens_per_sec(py, tmp / f"train-single-{r}", [
            *common, "--data_file", str(tmp / "single.tokens")], steps))
        rates["mixture"].append(train_tokens_per_sec(py, tmp / f"train-mixture-{r}", [
            *common, "--data_files", *many, "--data_weights", "0.5", "0.3", "0.2"], steps))
    print(f"\n## Training from one shard file vs a mixture of three sources in {num_many} shard files "
          f"(tiny, {steps} steps, median tokens/s of steps 5-{steps}, runs in turn)\n")
    print("| data | run 1 | run 2 | run 3 | median | assembling one step's batch (data only, in-process) |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, v in rates.items():
        print(f"| {k} | {' | '.join(f'{x:,.0f}' for x in v)} | {statistics.median(v):,.0f} | {batch_us[k]:,.0f} µs |")
    print(f"\nmixture / single, median tokens/s: {statistics.median(rates['mixture']) / statistics.median(rates['single']):.3f}"
          f" (runs of the same data differ by up to {max(max(v) / min(v) - 1 for v in rates.values()):.1%} here); the "
          f"batch assembly takes {batch_us['mixture']:,.0f} vs {batch_us['single']:,.0f} µs of a step of "
          f"{16 * 256 / statistics.median(rates['single']) * 1e6:,.0f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes_mb", default="100,300,1000", help="corpus sizes, MB (comma-separated)")
    parser.add_argument("--formats", default="text,jsonl", help="text and/or jsonl")
    parser.add_argument("--workers", default="1,2", help="Ray workers of the rows beside auto")
    parser.add_argument("--threshold_mb", default="8,16,32,64,128", help="text sizes for the auto threshold ('' : none)")
    parser.add_argument("--train_steps", type=int, default=20, help="0: no training rows")
    args = parser.parse_args()
    py = sys.executable
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731

    from openllm_ds.config import TokenizerConfig
    from openllm_ds.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        lines = documents()
        train_txt = tmp / "train.txt"
        train_txt.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tok = tmp / "tok"
        train_tokenizer(TokenizerConfig(input=str(train_txt), output_dir=str(tok), vocab_size=8000))
        start_up_and_threshold(py, tmp, tok, lines, ints(args.threshold_mb))
        corpus_rows(py, tmp, tok, lines, ints(args.sizes_mb), args.formats.split(","),
                    [w for w in args.workers.split(",") if w.strip()])
        if args.train_steps:
            training_rows(py, tmp, tok, lines, args.train_steps)


if __name__ == "__main__":
    main()
