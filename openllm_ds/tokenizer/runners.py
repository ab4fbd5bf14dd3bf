"""Who does the work (``encode.py``): this process (``InProcess``), or a pool of Ray actors (``OnRay``). Both run the
same functions on the same pieces and units and write the same bytes.

    encode   every piece read once: hashed and encoded, its ids and document rows written (``encode_piece``)
    dedup    the hashes partitioned by value into buckets; per bucket, every copy after the first marked (in piece
             order, then document order: the order of the units); the marks merged. On Ray they stay in the object
             store: the driver holds references and one count per piece, never hashes
    finish   each unit's shard files joined from its pieces, less its duplicates (on Ray by the actors, where the marks
             are); a unit read as one piece that lost nothing has its files renamed into place by the driver

``InProcess`` encodes its pieces on one thread per CPU plus one: SentencePiece releases the GIL while it encodes, so
the threads' encoding runs in parallel and one thread's reading and parsing overlaps the others' encoding.

``choose_workers`` picks the runner for ``--num_workers auto``: this process where no Ray cluster is named (no
``RAY_ADDRESS``, no Ray started in this process) and the input is under ``AUTO_LOCAL_MAX_BYTES``: on one machine its
threads use every core with no start-up and no copies between processes, which Ray's actors on the same cores cannot
beat (benchmarks/results.md). With a cluster: this process below ``AUTO_RAY_BYTES`` or with one piece, else Ray.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from openllm_ds.data.units import ReadOptions, Unit
from openllm_ds.errors import DataError
from openllm_ds.tokenizer.encode import (buckets, drops_of_piece, drops_per_piece, duplicates_in_bucket, encode_piece,
                                         finish_unit, merge_sorted, pieces_of)
from openllm_ds.utils import init_ray

MAX_RESTARTS = 3  # a Ray worker that dies is restarted (and its piece or unit redone) this many times
AUTO_RAY_BYTES = 32 * 10**6  # --num_workers auto with a Ray cluster: less input than this is tokenized in this process
# --num_workers auto on one machine: up to this much input in this process, whose memory holds 24 bytes of hash per
# document until the duplicates are found, about 80 at the sort's peak (+120 MB at 1 GB of passages, measured);
# above it the hashes stay in Ray's object store
AUTO_LOCAL_MAX_BYTES = 2 * 10**9


@dataclass(frozen=True)
class Job:
    pieces: list[Unit]  # what one call reads, in order (``index``: its number here)
    piece_unit: list[int]  # the unit each piece belongs to
    unit_pieces: list[range]  # each unit's pieces
    targets: list[tuple[str, int]]  # per unit: the output's temporary dir, the unit's number in that output
    options: ReadOptions
    dtype: str
    holdout: float
    dedup: bool

    @classmethod
    def plan(cls, units: list[Unit], targets: list[tuple[str, int]], options: ReadOptions, dtype: str, holdout: float,
             dedup: bool, piece_bytes: int) -> Job:
        pieces, piece_unit, unit_pieces = [], [], []
        for u, unit in enumerate(units):
            first = len(pieces)
            for piece in pieces_of(unit, piece_bytes):
                pieces.append(Unit(len(pieces), piece.file, piece.start, piece.stop))
                piece_unit.append(u)
            unit_pieces.append(range(first, len(pieces)))
        return cls(pieces, piece_unit, unit_pieces, targets, options, dtype, holdout, dedup)

    def encode(self, p: int, sp) -> tuple[dict, np.ndarray]:
        u = self.piece_unit[p]
        out_dir, local = self.targets[u]
        return encode_piece(self.pieces[p], local, p - self.unit_pieces[u].start, Path(out_dir), self.options, sp,
                            np.dtype(self.dtype), self.holdout)

    def finish(self, u: int, drops: np.ndarray | None) -> dict:
        out_dir, local = self.targets[u]
        return finish_unit(Path(out_dir), local, np.dtype(self.dtype), [drops_of_piece(drops, p) for p in self.unit_pieces[u]])

    def unit_results(self, piece_results: dict[int, dict], drops_per: np.ndarray, finish_here,
                     finish_remote=None) -> list[dict]:
        """Every unit's counts, shard files and digest: ``finish_here(unit)``, or, for a unit whose pieces must be
        joined or which lost documents, ``finish_remote(units)`` when given (Ray: the actors, where the marks are; in
        this process: its threads)."""
        results = []
        for u, pieces in enumerate(self.unit_pieces):
            rs = [piece_results[p] for p in pieces]
            results.append({"unit": u, **{k: sum(r[k] for r in rs) for k in ("documents", "empty", "bad_records",
                                                                             "bytes_read")},
                            "bad_examples": [e for r in rs for e in r["bad_examples"]][:3],
                            "duplicates": int(drops_per[pieces.start:pieces.stop].sum())})
        remote = [r["unit"] for r in results if finish_remote and (r["duplicates"] or len(self.unit_pieces[r["unit"]]) > 1)]
        done = dict(zip(remote, finish_remote(remote))) if remote else {}
        for r in results:
            r.update(done[r["unit"]] if r["unit"] in done else finish_here(r["unit"]))
        return results


def ray_cluster_named() -> bool:
    """A Ray cluster to run on: ``RAY_ADDRESS`` (a ``ray job submit`` job has it), or Ray started in this process."""
    from openllm_ds.settings import ray_address

    return bool(ray_address()) or ("ray" in sys.modules and sys.modules["ray"].is_initialized())


def choose_workers(num_workers: int | str, num_bytes: int, num_pieces: int) -> int | str:
    """``auto``: 0 (this process, on its threads) on one machine below AUTO_LOCAL_MAX_BYTES of input; with a Ray
    cluster, 0 below AUTO_RAY_BYTES or for a single piece; else ``auto`` (Ray, one worker per CPU of the cluster, at
    most one per piece)."""
    if num_workers != "auto":
        return num_workers
    if num_bytes < AUTO_RAY_BYTES or num_pieces < 2:
        return 0
    return "auto" if ray_cluster_named() or num_bytes >= AUTO_LOCAL_MAX_BYTES else 0


def local_threads() -> int:
    """The encoding threads of this process: one per CPU it may run on, plus one whose reading and parsing overlaps
    the others' encoding (measured: 1.90x one thread on 2 cores, against 1.76x with two)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return cpus + 1


def raise_error(result: dict) -> None:
    if "error" in result:
        raise DataError(result["error"])


class InProcess:
    """Every piece and unit in this process (``num_workers=0``): the pieces, then the units to join, on
    ``local_threads()`` threads (at most one per piece), results taken in order; the first error cancels the work not
    yet started."""

    def __init__(self, job: Job, sp):
        self.job, self.sp, self.nodes = job, sp, set()
        self.threads = max(1, min(local_threads(), len(job.pieces)))

    def run(self) -> list[dict]:
        job, results, hashes = self.job, {}, []
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="encode")
        try:
            done = pool.map(lambda p: job.encode(p, self.sp), range(len(job.pieces)))
            for p, (result, h) in enumerate(tqdm(done, total=len(job.pieces), desc=f"tokenizing ({self.threads} threads)",
                                                 unit="piece")):
                raise_error(result)
                results[p] = result
                hashes.append(h)
            drops = duplicates_in_bucket(*hashes) if job.dedup else np.empty(0, np.uint64)
            del hashes
            return job.unit_results(results, drops_per_piece(drops, len(job.pieces)), lambda u: job.finish(u, drops),
                                    lambda units: list(pool.map(lambda u: job.finish(u, drops), units)))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after an error: the running calls end, no new one starts


class OnRay:
    """A pool of Ray actors (``UnitWorker``), each holding the SentencePiece model and the job; the driver hands each
    actor one piece at a time, then one unit at a time to finish, and keeps small results and references.

    Start-up: when this process starts Ray (no instance yet), a thread of this process encodes pieces (the same code,
    so the same bytes) while Ray starts; it takes no new piece once the actors exist. Ray's start (``ray.init`` 2.5 s, and
    10 s to a first result of `tokenize` on a quiet 2-core machine; benchmarks/results.md) is then spent on the
    corpus instead of waiting.

    Why actors fed by the driver rather than a Ray Data pipeline: a piece is a second of work and its result a few
    numbers, so there is nothing for Ray Data's streaming executor to stream; starting it cost 8 s of a 300 MB run on
    2 cores. Faults are Ray's own: an actor whose process dies is restarted and its pending call run again
    (``max_restarts``, ``max_task_retries``); a call's work is a pure function of its piece or unit, and its files
    are written under temporary names and renamed, so a rerun leaves the same bytes. ``SPREAD`` places the actors
    across the cluster's nodes.
    """

    def __init__(self, job: Job, tok, num_workers: int | str):
        self.job, self.tok, self.requested, self.nodes = job, tok, num_workers, set()
        self.todo = deque(range(len(job.pieces)))
        self.lock = threading.Lock()
        self.ready = threading.Event()  # the actors exist: this process takes no new piece
        self.stop = threading.Event()  # an error somewhere: nobody takes a new piece
        self.results: dict[int, dict] = {}
        self.parts: dict[int, list] = {}  # piece -> its hashes' bucket references
        self.local_hashes: dict[int, np.ndarray] = {}  # pieces this process encoded while Ray started
        self.actors, self.error, self.ray = [], None, None

    def take(self) -> int | None:
        with self.lock:
            return None if self.stop.is_set() or not self.todo else self.todo.popleft()

    def run(self) -> list[dict]:
        import ray

        self.bar = tqdm(total=len(self.job.pieces), desc="tokenizing (Ray workers starting)", unit="piece")
        try:
            if ray.is_initialized():
                self.start_and_encode()
            else:  # Ray starts in this (the main) thread: the processes it starts die with the thread that started them
                helper = threading.Thread(target=self.encode_here_until_ready, name="encode-while-ray-starts", daemon=True)
                helper.start()
                self.start_and_encode()
                helper.join()
            if self.error is not None:
                raise self.error
            return self.deduplicate_and_finish()
        finally:
            self.bar.close()
            for actor in self.actors:
                ray.kill(actor)

    def encode_here_until_ready(self) -> None:
        try:
            while not self.ready.is_set() and (p := self.take()) is not None:
                result, hashes = self.job.encode(p, self.tok.sp)
                raise_error(result)
                with self.lock:
                    self.results[p], self.local_hashes[p] = result, hashes
                    self.bar.update(1)
        except BaseException as e:  # noqa: BLE001 - the Ray thread stops too, then it is raised
            self.error = self.error or e
            self.stop.set()

    def start_and_encode(self) -> None:
        try:
            ray = self.ray = init_ray()
            cluster_cpus = ray.cluster_resources().get("CPU", 1.0)
            num_workers = self.requested
            if num_workers == "auto":
                num_workers = max(1, min(int(cluster_cpus), len(self.job.pieces)))
            self.num_workers = num_workers
            # the arguments live in the object store while this object holds them: a restarted actor finds them there
            self.args = [ray.put(self.job), ray.put(self.tok.sp.serialized_model_proto())]
            worker = ray.remote(num_cpus=min(1.0, cluster_cpus / num_workers), max_restarts=MAX_RESTARTS,
                                max_task_retries=MAX_RESTARTS, scheduling_strategy="SPREAD")(UnitWorker)
            self.actors = [worker.remote(self.args) for _ in range(num_workers)]
            self.ready.set()
            self.bar.set_description(f"tokenizing ({num_workers} Ray workers)")
            k = self.num_buckets = 2 * num_workers
            for p, refs, result in self.map(lambda actor, p: actor.encode.options(num_returns=k + 1).remote(p, k),
                                            self.take, first_ref=lambda refs: refs[0]):
                raise_error(result)
                self.nodes.add(result.pop("node"))
                with self.lock:
                    self.results[p], self.parts[p] = result, refs[1:]
        except BaseException as e:  # noqa: BLE001 - raised by the driver's thread
            self.error = self.error or e
            self.stop.set()
        finally:
            self.ready.set()

    def map(self, call, take, first_ref=lambda ref: ref):
        """(item, refs, first result) for every item ``take`` hands out, as the actors finish them; one item in flight
        per actor, so a free actor takes the next and none idles at the end while another holds queued work."""
        ray, running = self.ray, {}

        def submit(actor):
            if (item := take()) is not None:
                refs = call(actor, item)
                running[first_ref(refs)] = (actor, item, refs)

        for actor in self.actors:
            submit(actor)
        while running:
            (done,), _ = ray.wait(list(running), num_returns=1)
            actor, item, refs = running.pop(done)
            result = ray.get(done)
            if isinstance(result, dict) and "error" in result:
                self.stop.set()
            submit(actor)
            with self.lock:
                self.bar.update(1)
            yield item, refs, result

    def deduplicate_and_finish(self) -> list[dict]:
        ray, job, n = self.ray, self.job, len(self.job.pieces)
        merged = None
        if job.dedup:
            k = self.num_buckets
            for p, hashes in self.local_hashes.items():
                self.parts[p] = [ray.put(b) for b in buckets(hashes, k)]
            self.local_hashes.clear()
            # every bucket's hashes to one actor, the buckets' duplicates merged by another; the driver keeps references
            per_bucket = [self.actors[b % len(self.actors)].duplicates.remote(*[self.parts[p][b] for p in range(n)])
                          for b in range(k)]
            self.parts.clear()
            merged = self.actors[0].merge.remote(*per_bucket)
            drops_per = ray.get(self.actors[0].drops_per_piece.remote(merged, n))
        else:
            drops_per = np.zeros(n, np.int64)

        def finish_remote(units: list[int]) -> list[dict]:
            queue = deque(units)
            self.bar.reset(total=len(units))
            self.bar.set_description("joining pieces, removing duplicates")
            done = {u: r for u, _, r in self.map(lambda actor, u: actor.finish.remote(u, merged),
                                                 lambda: queue.popleft() if queue else None)}
            return [done[u] for u in units]

        return job.unit_results(self.results, drops_per, lambda u: job.finish(u, None), finish_remote)


class UnitWorker:
    """Ray actor: the tokenizer and the job; encodes pieces, finds duplicates and finishes units on request."""

    def __init__(self, args: list):
        import ray
        import sentencepiece as spm

        self.job, model_proto = ray.get(args)
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.node = ray.get_runtime_context().get_node_id()

    def encode(self, p: int, num_buckets: int):
        result, hashes = self.job.encode(p, self.sp)
        return ({**result, "node": self.node}, *buckets(hashes, num_buckets))

    def duplicates(self, *parts: np.ndarray) -> np.ndarray:
        return duplicates_in_bucket(*parts)

    def merge(self, *parts: np.ndarray) -> np.ndarray:
        return merge_sorted(*parts)

    def drops_per_piece(self, drops: np.ndarray, num_pieces: int) -> np.ndarray:
        return drops_per_piece(drops, num_pieces)

    def finish(self, u: int, drops: np.ndarray | None) -> dict:
        return self.job.finish(u, drops)
