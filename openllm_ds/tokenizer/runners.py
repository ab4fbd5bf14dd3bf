"""Who does the units' work (``encode.py``): this process (``InProcess``), or a pool of Ray actors (``OnRay``). Both run
the same functions on the same units and write the same bytes.

    encode   every unit read once: hashed and encoded, its ids and document rows written (``encode_unit``)
    dedup    the hashes partitioned by value into buckets; per bucket, every copy after the first marked (in unit order,
             then document order); the marks merged. On Ray they stay in the object store: the driver holds references
             and one count per unit, never hashes
    finish   a unit that lost documents has its shard files cut out of its ids (by a worker on Ray); a unit that lost
             none has its files renamed into place

``choose_workers`` picks the runner for ``--num_workers auto``: this process below ``AUTO_RAY_BYTES`` of input or with
one unit, where Ray's start-up (seconds) cannot be won back.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from openllm_ds.data.units import ReadOptions, Unit
from openllm_ds.errors import DataError
from openllm_ds.tokenizer.encode import (buckets, drops_of_unit, drops_per_unit, duplicates_in_bucket,
                                         encode_unit, finish_unit, merge_sorted)
from openllm_ds.utils import init_ray

MAX_RESTARTS = 3  # a Ray worker that dies is restarted (and its unit redone) this many times
AUTO_RAY_BYTES = 64 * 10**6  # --num_workers auto: less input than this is tokenized in this process (see README)


@dataclass(frozen=True)
class Job:
    units: list[Unit]
    targets: list[tuple[str, int]]  # per unit: the output's temporary dir, the unit's number in that output
    options: ReadOptions
    dtype: str
    holdout: float
    dedup: bool

    def encode(self, u: int, sp) -> tuple[dict, np.ndarray]:
        out_dir, local = self.targets[u]
        return encode_unit(self.units[u], local, Path(out_dir), self.options, sp, np.dtype(self.dtype), self.holdout)

    def finish(self, u: int, drops: np.ndarray | None) -> dict:
        out_dir, local = self.targets[u]
        return finish_unit(Path(out_dir), local, np.dtype(self.dtype), drops_of_unit(drops, u))


def choose_workers(num_workers: int | str, num_bytes: int, num_units: int) -> int | str:
    """``auto``: 0 (this process) for less than AUTO_RAY_BYTES of input or a single unit, else ``auto`` (Ray, one
    worker per CPU of the cluster, at most one per unit)."""
    if num_workers != "auto":
        return num_workers
    return 0 if num_bytes < AUTO_RAY_BYTES or num_units < 2 else "auto"


def raise_error(result: dict) -> None:
    if "error" in result:
        raise DataError(result["error"])


def finish_all(job: Job, results: list[dict], drops_per: np.ndarray, finish_losing) -> None:
    """Every unit's shard files and entries: the units that lost documents by ``finish_losing(units)`` (on Ray: by the
    actors, where the marks are), the others renamed into place here. ``results`` get ``duplicates`` and ``shards``."""
    losing = [r["unit"] for r in results if drops_per[r["unit"]]]
    cut = dict(zip(losing, finish_losing(losing))) if losing else {}
    for r in results:
        r["duplicates"] = int(drops_per[r["unit"]])
        r["shards"] = cut[r["unit"]] if r["unit"] in cut else job.finish(r["unit"], None)


class InProcess:
    """Every unit in this process, one after another (``num_workers=0``)."""

    def __init__(self, job: Job, sp):
        self.job, self.sp, self.nodes = job, sp, set()

    def run(self) -> list[dict]:
        results, hashes = [], []
        for u in tqdm(range(len(self.job.units)), desc="tokenizing", unit="unit"):
            result, h = self.job.encode(u, self.sp)
            raise_error(result)
            results.append(result)
            hashes.append(h)
        drops = duplicates_in_bucket(*hashes) if self.job.dedup else np.empty(0, np.uint64)
        del hashes
        finish_all(self.job, results, drops_per_unit(drops, len(self.job.units)),
                   lambda units: [self.job.finish(u, drops) for u in units])
        return results


class OnRay:
    """A pool of Ray actors (``UnitWorker``), each holding the SentencePiece model and the job; the driver hands each
    actor one unit at a time and keeps small results and references.

    Start-up: when this process starts Ray (no instance yet), a thread of this process encodes units (the same code,
    so the same bytes) while Ray starts; it takes no new unit once the actors exist. Ray's start (3-5 s on a 2-core
    machine) is then spent on the corpus instead of waiting.

    Why actors fed by the driver rather than a Ray Data pipeline: a unit is seconds of work and its result a few
    numbers, so there is nothing for Ray Data's streaming executor to stream; starting it cost 8 s of a 300 MB run on
    2 cores. Faults are Ray's own: an actor whose process dies is restarted and its pending call run again
    (``max_restarts``, ``max_task_retries``); a unit's work is a pure function of the unit, and its files are
    written under temporary names and renamed, so a rerun leaves the same bytes. ``SPREAD`` places the actors across
    the cluster's nodes.
    """

    def __init__(self, job: Job, tok, num_workers: int | str):
        self.job, self.tok, self.requested, self.nodes = job, tok, num_workers, set()
        self.todo = deque(range(len(job.units)))
        self.lock = threading.Lock()
        self.ready = threading.Event()  # the actors exist: this process takes no new unit
        self.stop = threading.Event()  # an error somewhere: nobody takes a new unit
        self.results: dict[int, dict] = {}
        self.parts: dict[int, list] = {}  # unit -> its hashes' bucket references
        self.local_hashes: dict[int, np.ndarray] = {}  # units this process encoded while Ray started
        self.actors, self.error = [], None

    def take(self) -> int | None:
        with self.lock:
            return None if self.stop.is_set() or not self.todo else self.todo.popleft()

    def run(self) -> list[dict]:
        import ray

        self.bar = tqdm(total=len(self.job.units), desc="tokenizing (Ray workers starting)", unit="unit")
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
            while not self.ready.is_set() and (u := self.take()) is not None:
                result, hashes = self.job.encode(u, self.tok.sp)
                raise_error(result)
                with self.lock:
                    self.results[u], self.local_hashes[u] = result, hashes
                    self.bar.update(1)
        except BaseException as e:  # noqa: BLE001 - the Ray thread stops too, then it is raised
            self.error = self.error or e
            self.stop.set()

    def start_and_encode(self) -> None:
        try:
            ray = self.ray = init_ray()
            num_workers = self.requested
            if num_workers == "auto":
                num_workers = max(1, min(int(ray.cluster_resources().get("CPU", 1)), len(self.job.units)))
            self.num_workers = num_workers
            cpus = min(1.0, ray.cluster_resources().get("CPU", 1.0) / num_workers)
            # the arguments live in the object store while this object holds them: a restarted actor finds them there
            self.args = [ray.put(self.job), ray.put(self.tok.sp.serialized_model_proto())]
            worker = ray.remote(num_cpus=cpus, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS,
                                scheduling_strategy="SPREAD")(UnitWorker)
            self.actors = [worker.remote(self.args) for _ in range(num_workers)]
            self.ready.set()
            self.bar.set_description(f"tokenizing ({num_workers} Ray workers)")
            k = 2 * num_workers  # hash buckets
            self.num_buckets = k
            for u, refs, result in self.map(lambda actor, u: actor.encode.options(num_returns=k + 1).remote(u, k),
                                            self.take, first_ref=lambda refs: refs[0]):
                raise_error(result)
                self.nodes.add(result.pop("node"))
                with self.lock:
                    self.results[u], self.parts[u] = result, refs[1:]
        except BaseException as e:  # noqa: BLE001 - raised by the driver's thread
            self.error = self.error or e
            self.stop.set()
        finally:
            self.ready.set()

    def map(self, call, take, first_ref=lambda ref: ref):
        """(unit, refs, first result) for every unit ``take`` hands out, as the actors finish them; one unit in flight
        per actor, so a free actor takes the next and none idles at the end while another holds queued work."""
        ray, running = self.ray, {}

        def submit(actor):
            if (u := take()) is not None:
                refs = call(actor, u)
                running[first_ref(refs)] = (actor, u, refs)

        for actor in self.actors:
            submit(actor)
        while running:
            (done,), _ = ray.wait(list(running), num_returns=1)
            actor, u, refs = running.pop(done)
            result = ray.get(done)
            if isinstance(result, dict) and "error" in result:
                self.stop.set()
            submit(actor)
            with self.lock:
                self.bar.update(1)
            yield u, refs, result

    def deduplicate_and_finish(self) -> list[dict]:
        ray, job = self.ray, self.job
        results = [self.results[u] for u in range(len(job.units))]
        if not job.dedup:
            finish_all(job, results, np.zeros(len(job.units), np.int64), None)
            return results
        k = self.num_buckets
        for u, hashes in self.local_hashes.items():
            self.parts[u] = [ray.put(b) for b in buckets(hashes, k)]
        self.local_hashes.clear()
        # every bucket's hashes to one actor, the buckets' duplicates merged by another; the driver keeps references
        per_bucket = [self.actors[b % len(self.actors)].duplicates.remote(*[self.parts[u][b] for u in range(len(job.units))])
                      for b in range(k)]
        self.parts.clear()
        merged = self.actors[0].merge.remote(*per_bucket)
        drops_per = ray.get(self.actors[0].drops_per_unit.remote(merged, len(job.units)))

        def finish_remote(units: list[int]) -> list[dict]:
            queue = deque(units)
            done = {u: shards for u, _, shards in self.map(lambda actor, u: actor.finish.remote(u, merged),
                                                            lambda: queue.popleft() if queue else None)}
            return [done[u] for u in units]

        self.bar.reset(total=int((drops_per > 0).sum()))
        self.bar.set_description("removing duplicates")
        finish_all(job, results, drops_per, finish_remote)
        return results


class UnitWorker:
    """Ray actor: the tokenizer and the job; encodes units, finds duplicates and finishes units on request."""

    def __init__(self, args: list):
        import ray
        import sentencepiece as spm

        self.job, model_proto = ray.get(args)
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.node = ray.get_runtime_context().get_node_id()

    def encode(self, u: int, num_buckets: int):
        result, hashes = self.job.encode(u, self.sp)
        return ({**result, "node": self.node}, *buckets(hashes, num_buckets))

    def duplicates(self, *parts: np.ndarray) -> np.ndarray:
        return duplicates_in_bucket(*parts)

    def merge(self, *parts: np.ndarray) -> np.ndarray:
        return merge_sorted(*parts)

    def drops_per_unit(self, drops: np.ndarray, num_units: int) -> np.ndarray:
        return drops_per_unit(drops, num_units)

    def finish(self, u: int, drops: np.ndarray) -> dict:
        return self.job.finish(u, drops)

