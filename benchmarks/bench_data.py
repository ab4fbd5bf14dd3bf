"""Throughput of stage 1 (`prepare`) on the real SQuAD files: 1 Ray worker vs N, side by side.

    PYTHONPATH=. python benchmarks/bench_data.py [--workers N] [--copies K] [--repeats R]

MB/s = input JSON bytes / wall time of the whole `prepare` call (read + validate, Ray Data
cleaning, dedupe, write). Ray is started once and warmed up before timing. ``--copies K`` links
every input file K times under new names (nothing is copied), so K times the paragraphs go
through cleaning (the extra copies all end up as duplicates). A reference row times
``clean_passage`` alone in this process, with no Ray, reading or writing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from openllm_ds.config import DataConfig
from openllm_ds.data import clean_passage, prepare
from openllm_ds.data.clean import invisible_char_table
from openllm_ds.data.sources import list_squad_dir, read_squad_files
from openllm_ds.utils import init_ray

ROOT = Path(__file__).resolve().parents[1]


def linked_inputs(squad_dir: Path, copies: int, folder: Path) -> Path:
    for path in list_squad_dir(squad_dir):
        for k in range(copies):
            (folder / f"copy{k}-{path.name}").symlink_to(path.resolve())
    return folder


def time_prepare(squad_dir: Path, workers: int, repeats: int, out_root: Path) -> float:
    best = float("inf")
    for r in range(repeats):
        out = out_root / f"w{workers}-r{r}"
        start = time.perf_counter()
        prepare(DataConfig(squad_dir=str(squad_dir), output_dir=str(out), num_workers=workers))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--squad_dir", default=str(ROOT.parent / "shared" / "data" / "squad"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="N, compared with 1")
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="best of R runs per row")
    args = parser.parse_args()

    init_ray()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        squad_dir = linked_inputs(Path(args.squad_dir), args.copies, tmp / "in")
        inputs = read_squad_files(list_squad_dir(squad_dir))
        num_bytes = sum(i.num_bytes for i in inputs)
        num_paragraphs = sum(len(i.contexts) for i in inputs)

        invisible_char_table()  # built once per process
        start = time.perf_counter()
        for inp in inputs:
            for context in inp.contexts:
                clean_passage(context)
        clean_only = time.perf_counter() - start

        prepare(DataConfig(squad_dir=str(squad_dir), output_dir=str(tmp / "warmup"), num_workers=args.workers))
        rows = [(w, time_prepare(squad_dir, w, args.repeats, tmp)) for w in sorted({1, args.workers})]

    mb = num_bytes / 1e6
    print(f"\nprepare on {args.squad_dir} x{args.copies}: {len(inputs)} files, {mb:.1f} MB JSON, "
          f"{num_paragraphs} paragraphs; {os.cpu_count()} CPUs; best of {args.repeats}\n")
    print("| run | wall s | MB/s | vs 1 worker |")
    print("|---|---:|---:|---:|")
    for workers, wall in rows:
        print(f"| prepare, {workers} Ray worker{'s' if workers > 1 else ''} | {wall:.2f} | {mb / wall:.1f} | {rows[0][1] / wall:.2f}x |")
    print(f"| clean_passage only (no Ray, no I/O) | {clean_only:.2f} | {mb / clean_only:.1f} | - |")


if __name__ == "__main__":
    main()
