"""A corpus at GB scale -> token shards on Ray, against one plain process; the driver's memory; and
training speed from a many-shard mixture against one shard file.

    PYTHONPATH=. python benchmarks/bench_corpus.py [--gb 1.0] [--small_mb 100] [--workers 2] [--train_steps 30]

Corpus: numbered variants ("<k>. <passage>") of the real SQuAD passages (`prepare` on ../shared/data/squad)
and WikiText-2's test lines, one document a line, --gb GB in one text file, and its first --small_mb MB
in another. Every row is a process of its own, timed from start to exit (Ray's start-up included):
  - the baseline: a plain SentencePiece loop in one process, no Ray, streaming (read a line, encode it,
    append the ids with EOS; ids written every 1 MB);
  - `openllm-ds tokenize --num_workers 1` and `--num_workers N` (deduplication on, the default), at both
    sizes. Peak RSS is the tokenize process's own (the driver's VmHWM); the Ray workers are other
    processes. The 1- and N-worker shards are checked byte-equal.
Training: the tiny model for --train_steps steps on (a) one source tokenized into one shard file, and
(b) the same text cut into three sources, each in ~120 shard files, mixed 0.5/0.3/0.2. The runs take
turns (a, b, a, b, a, b); tokens/s is the median over steps 5..N of each run. The data path alone
(`TrainBatches.next_batch`, 300 steps, in-process) is timed for both too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
# A process's peak RSS: VmHWM of /proc/self/status (ru_maxrss would carry the parent's peak across fork + exec).
PEAK = ("def peak_kb():\n    for line in open('/proc/self/status'):\n        if line.startswith('VmHWM:'):\n"
        "            return int(line.split()[1])\n")
CLI = (PEAK + "import sys\nfrom openllm_ds.cli import main\nrc = main(sys.argv[1:])\n"
       "print(f'MAXRSS {peak_kb()}', file=sys.stderr)\nsys.exit(rc)\n")
PLAIN_LOOP = PEAK + """
import sys
from itertools import chain
import numpy as np
import sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
eos, buf, n = sp.eos_id(), [], 0
with open(sys.argv[2], encoding="utf-8") as f, open(sys.argv[3], "wb") as out:
    for line in f:
        line = line.rstrip("\\n")
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
    """Numbered variants of ``lines`` up to ``num_bytes``; returns the number of documents."""
    written, k = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < num_bytes:
            chunk = "".join(f"{k + i}. {line}\n" for i, line in enumerate(lines))
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


def train_tokens_per_sec(py: str, out: Path, args: list[str], steps: int) -> float:
    argv = [py, "-c", CLI, "train", "--config", str(ROOT / "configs/tiny.yaml"), "--output_dir", str(out),
            "--max_steps", str(steps), "--eval_every", str(steps), "--save_every", str(steps), "--resume", "none",
            "train.log_every=1", "train.eval_batches=2", "tokenizer.num_workers=0", *args]
    run(argv, f"training {out.name}")
    rates = [json.loads(line)["train/tokens_per_sec"] for line in (out / "train_log.jsonl").read_text().splitlines()
             if "train/tokens_per_sec" in line]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the large corpus")
    parser.add_argument("--small_mb", type=float, default=100, help="size of the small corpus (RSS comparison)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="N, compared with 1")
    parser.add_argument("--train_steps", type=int, default=30)
    args = parser.parse_args()
    py = sys.executable

    from openllm_ds.config import TokenizerConfig
    from openllm_ds.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        lines = documents()
        train_txt = tmp / "train.txt"
        train_txt.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tok = tmp / "tok"
        train_tokenizer(TokenizerConfig(input=str(train_txt), output_dir=str(tok), vocab_size=8000))

        sizes = {"small": int(args.small_mb * 1e6), "large": int(args.gb * 1e9)}
        corpora, docs = {}, {}
        for name, size in sizes.items():
            corpora[name] = tmp / f"{name}.txt"
            docs[name] = write_corpus(corpora[name], lines, size)
        rows, rss, digests = [], {}, {}
        for name in ("small", "large"):
            mb = corpora[name].stat().st_size / 1e6
            seconds, peak = run([py, "-c", PLAIN_LOOP, str(tok / "tokenizer.model"), str(corpora[name]),
                                 str(tmp / f"{name}.loop.bin")], "plain loop")
            base = seconds
            rows.append((name, mb, "plain SentencePiece loop, 1 process, no Ray (baseline)", 1, seconds, peak, base))
            (tmp / f"{name}.loop.bin").unlink()
            for workers in (1, args.workers):
                out = tmp / f"{name}-{workers}.tokens"
                seconds, peak = run([py, "-c", CLI, "tokenize", "--input", str(corpora[name]), "--tokenizer_dir",
                                     str(tok), "--output_dir", str(out), "--num_workers", str(workers)],
                                    f"tokenize {name} with {workers} worker(s)")
                rows.append((name, mb, "`openllm-ds tokenize` (Ray actors)", workers, seconds, peak, base))
                rss[name, workers] = peak
                digests[name, workers] = dir_digest(out)
                meta = json.loads((out / "meta.json").read_text())
                shards = len(meta["shards"])
            for workers in (1, args.workers):
                import shutil

                shutil.rmtree(tmp / f"{name}-{workers}.tokens")
            assert digests[name, 1] == digests[name, args.workers], "1 and N workers wrote different shards"

        # training: one shard file vs a mixture of three sources in many shards
        part = tmp / "part"
        part.mkdir()
        text = corpora["small"].read_text(encoding="utf-8").split("\n")[:-1][:120_000]
        single = tmp / "single.txt"
        single.write_text("\n".join(text) + "\n", encoding="utf-8")
        thirds = [text[i::3] for i in range(3)]
        for i, t in enumerate(thirds):
            (part / f"s{i}.txt").write_text("\n".join(t) + "\n", encoding="utf-8")
        cut = tmp / "cut"
        run([py, "-c", CLI, "tokenize", "--input", str(single), "--tokenizer_dir", str(tok), "--output_dir",
             str(tmp / "single.tokens"), "--num_workers", "0", "--holdout", "0.01", "--unit_bytes", str(10**10)],
            "tokenize single")
        many = []
        for i in range(3):
            d = cut / f"s{i}.tokens"
            run([py, "-c", CLI, "tokenize", "--input", str(part / f"s{i}.txt"), "--tokenizer_dir", str(tok),
                 "--output_dir", str(d), "--num_workers", "0", "--holdout", "0.01", "--unit_bytes", "200000"],
                f"tokenize part {i}")
            many.append(str(d))
        num_many = sum(len(json.loads((Path(d) / "meta.json").read_text())["shards"]) for d in many)
        common = ["--tokenizer_dir", str(tok)]
        rates = {"single": [], "mixture": []}
        batch_us = batch_assembly_us(tmp / "single.tokens", many, [0.5, 0.3, 0.2])
        for r in range(3):
            rates["single"].append(train_tokens_per_sec(py, tmp / f"train-single-{r}", [
                *common, "--data_file", str(tmp / "single.tokens")], args.train_steps))
            rates["mixture"].append(train_tokens_per_sec(py, tmp / f"train-mixture-{r}", [
                *common, "--data_files", *many, "--data_weights", "0.5", "0.3", "0.2"], args.train_steps))

    print(f"\n## Corpus -> token shards ({os.cpu_count()} CPUs, vocab 8k; every row one process, Ray start-up "
          "included)\n")
    print("| corpus | MB | what | workers | seconds | MB/s | speed-up vs baseline | peak RSS of the process (MB) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, mb, what, workers, seconds, peak, base in rows:
        print(f"| {name} ({docs[name]:,} documents) | {mb:,.0f} | {what} | {workers} | {seconds:.1f} | {mb / seconds:.2f} "
              f"| {base / seconds:.2f}x | {peak:,.0f} |")
    w = args.workers
    print(f"\nDriver peak RSS, {args.small_mb:.0f} MB -> {sizes['large'] / 1e6:,.0f} MB of input: "
          f"{rss['small', 1]:,.0f} -> {rss['large', 1]:,.0f} MB with 1 worker "
          f"({rss['large', 1] / rss['small', 1] - 1:+.1%}), {rss['small', w]:,.0f} -> {rss['large', w]:,.0f} MB with {w} "
          f"({rss['large', w] / rss['small', w] - 1:+.1%}). Shards of 1 and {w} workers byte-equal at both sizes "
          f"({shards} shard files for the large corpus).")
    print(f"\n## Training from one shard file vs a mixture of three sources in {num_many} shard files "
          f"(tiny, {args.train_steps} steps, median tokens/s of steps 5-{args.train_steps}, runs in turn)\n")
    print("| data | run 1 | run 2 | run 3 | median | assembling one step's batch (data only, in-process) |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, v in rates.items():
        print(f"| {k} | {' | '.join(f'{x:,.0f}' for x in v)} | {statistics.median(v):,.0f} | {batch_us[k]:,.0f} µs |")
    print(f"\nmixture / single, median tokens/s: {statistics.median(rates['mixture']) / statistics.median(rates['single']):.3f}"
          f" (runs of the same data differ by up to "
          f"{max(max(v) / min(v) - 1 for v in rates.values()):.1%} here); the batch assembly takes "
          f"{batch_us['mixture']:,.0f} vs {batch_us['single']:,.0f} µs of a step of "
          f"{16 * 256 / statistics.median(rates['single']) * 1e6:,.0f} µs")


if __name__ == "__main__":
    main()
