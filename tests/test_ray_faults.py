"""A Ray worker process killed with `kill -9` in the middle of each Ray stage, and the job still ends
with the outputs of an undisturbed run.

- prepare: a Ray Data task cleaning a block of passages (Ray runs the task again on a new worker);
- tokenize: a Ray actor encoding a unit (Ray restarts the actor and runs its call again);
- training under Ray Train: the rank-0 DeepSpeed worker between two checkpoints (Ray Train's
  FailureConfig restarts the worker group, which resumes from the latest complete checkpoint).

The kill comes from this test process (`os.kill(pid, SIGKILL)`) at a known point: for the Ray Data
stages, the wrapped UDF's third call writes its worker's pid to a file and waits there to be killed
(once; the retried call goes on); for training, a wrapped Ray Train worker function writes each
rank's pid, and the kill comes once train_log.jsonl shows step KILL_AT_STEP. Outputs are compared
byte for byte (text files, stats.json, shards, meta.json: none holds a timing field) and, for
training, every logged loss bit for bit (CPU fp32) and every final weight exactly.

Everything runs in one private local Ray instance (never a `ray start` head found on this machine),
started as the stages start it (init_ray) and shut down at the end; a first test checks that none of its
servers listens on an address other than loopback.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from openllm_ds.checkpoint import load_model
from openllm_ds.config import DataConfig, TokenizerConfig
from openllm_ds.utils import MANIFEST

from helpers import logged, tiny_cfg

pytestmark = pytest.mark.slow

PAUSE_AT_CALL = 2  # the UDF call after this many earlier ones is the one killed: some blocks are done by then
TRAIN = dict(train__num_workers=2, train__max_steps=12, train__save_every=4, train__eval_every=4, train__warmup_steps=2,
             train__micro_batch_size=8, train__log_every=1)
KILL_AT_STEP = 6  # between the checkpoints of steps 4 and 8


@pytest.fixture(scope="module")
def private_ray():
    """The local Ray instance that prepare, tokenize and train start (init_ray: never a head another
    process started, nor the cluster in a RAY_ADDRESS of the environment), this module's own."""
    import ray

    from openllm_ds.utils import init_ray

    ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        init_ray(num_cpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)


def listening_sockets(ray) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of this Ray instance: the driver (this
    process) and every process whose command line names the instance's session dir, with their children
    (the workers, the agents)."""
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    procs = {psutil.Process()}
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(session_dir in arg for arg in p.info["cmdline"] or ()):
                procs |= {p, *p.children(recursive=True)}
    names = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            names[p.pid] = p.name()
    return sorted((c.laddr.ip, c.laddr.port, names[c.pid]) for c in psutil.net_connections(kind="inet")
                  if c.status == psutil.CONN_LISTEN and c.pid in names)


def test_the_local_instance_listens_on_loopback_only(private_ray):
    """Every server of the local instance (GCS, raylet, core workers of the driver, a task and an actor,
    dashboard and runtime-env agents, metrics exporters) listens on loopback, not on every interface."""
    ray = private_ray

    @ray.remote(num_cpus=0)
    def task_pid() -> int:
        import os

        return os.getpid()

    @ray.remote(num_cpus=0)
    class Actor:
        def pid(self) -> int:
            import os

            return os.getpid()

    actor = Actor.remote()
    ray.get([task_pid.remote(), actor.pid.remote()])  # their worker processes are up, with their servers
    deadline = time.monotonic() + 30  # the agents and the metrics servers come up a little after ray.init
    while True:
        sockets = listening_sockets(ray)
        names = {name for _, _, name in sockets}
        if {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    ray.kill(actor)
    print("\n" + "\n".join(f"{f'[{ip}]' if ':' in ip else ip}:{port} {name}" for ip, port, name in sockets))
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::Actor"} <= names, sockets
    assert [s for s in sockets if not is_loopback(s[0])] == []
    assert is_loopback(ray._private.worker._global_node.node_ip_address)  # what the workers advertise


@pytest.fixture(scope="module")
def faults():
    tally = {"injected": 0, "recovered": 0}
    yield tally
    print(f"\nRay worker faults: {tally['injected']} injected (kill -9), {tally['recovered']} recovered")


# ---- what runs inside Ray workers: nested functions and classes, so cloudpickle ships them by value

def fault_hook(fault_dir: Path, pause_at: int | None):
    """A function for a Ray worker to call at the start of every UDF call: it counts the call in
    ``fault_dir/calls``; the first call after ``pause_at`` earlier ones (``None``: never) writes its
    process's pid to ``fault_dir/victim.pid`` and sleeps until the test kills that process. Only one
    call ever claims victim.pid, so the retried call runs through."""
    root = str(fault_dir)

    def hook() -> None:
        import os

        calls = os.path.join(root, "calls")
        os.makedirs(calls, exist_ok=True)
        earlier = len(os.listdir(calls))
        open(os.path.join(calls, f"{os.getpid()}-{time.monotonic_ns()}"), "w").close()
        if pause_at is None or earlier < pause_at:
            return
        claim = os.path.join(root, f"claim-{os.getpid()}")
        with open(claim, "w") as f:
            f.write(str(os.getpid()))
        try:
            os.link(claim, os.path.join(root, "victim.pid"))  # atomic, and with its content already there
        except FileExistsError:
            return
        time.sleep(600)  # killed from outside long before this ends

    return hook


def udf_with_hook(udf, hook):
    def call(batch):
        hook()
        return udf(batch)

    return call


def unit_worker_with_hook(hook):
    from openllm_ds.tokenizer.runners import UnitWorker

    class UnitWorkerWithHook(UnitWorker):
        def encode(self, u, num_buckets):
            hook()
            return super().encode(u, num_buckets)

    return UnitWorkerWithHook


def train_worker_writing_pids(train_worker, fault_dir: Path):
    """Ray Train's worker function, after writing ``rank<R>.<pid>`` to ``fault_dir``."""
    root = str(fault_dir)

    def worker(config):
        import os

        import ray.train

        rank = ray.train.get_context().get_world_rank()
        open(os.path.join(root, f"rank{rank}.{os.getpid()}"), "w").close()
        return train_worker(config)

    return worker


# ---- the test's side

def kill_9_when(find_victim, name: str, after_kill=None) -> dict:
    """A thread that polls ``find_victim(record)`` until it names a pid, then kills that process with
    SIGKILL, waits until it is gone and calls ``after_kill(record)``. The returned dict gets ``pid``
    and ``title`` (plus what the callbacks put there) once the kill is done. Set ``record["stop"]``
    when the job has returned: a pid found after that may belong to another process by then."""
    record: dict = {"stop": threading.Event()}

    def run():
        while not record["stop"].wait(0.02):
            pid = find_victim(record)
            if not pid:
                continue
            proc = psutil.Process(pid)
            record["title"] = " ".join(proc.cmdline()).strip()  # a Ray worker's process title: ray::<what it runs>
            assert record["title"].startswith("ray::"), f"pid {pid} is not a Ray worker: {record['title']!r}"
            os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=60)
            if after_kill is not None:
                after_kill(record)
            record["pid"] = pid
            return

    record["thread"] = threading.Thread(target=run, name=f"kill-9-{name}", daemon=True)
    record["thread"].start()
    return record


def stop(kill: dict) -> None:
    kill["stop"].set()
    kill["thread"].join(timeout=60)


def victim_pid(fault_dir: Path):
    def find(record):
        path = fault_dir / "victim.pid"
        return int(path.read_text()) if path.is_file() else None

    return find


def num_calls(fault_dir: Path) -> int:
    return len(list((fault_dir / "calls").iterdir()))


def file_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def reference(private_ray, squad_dir, tmp_path_factory):
    """The undisturbed runs: prepare (its UDF calls counted), a tokenizer, and the validation
    file's shards (their UDF calls counted)."""
    from openllm_ds.data import preparation, prepare
    from openllm_ds.tokenizer import runners, tokenize_corpus, train_tokenizer

    root = tmp_path_factory.mktemp("reference")
    clean = root / "clean"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(preparation, "clean_batch", udf_with_hook(preparation.clean_batch, fault_hook(root / "prepare", None)))
        prepare(DataConfig(source="dir", squad_dir=str(squad_dir), output_dir=str(clean), num_workers=2))
    tokenizer_dir = root / "tokenizer"
    train_tokenizer(TokenizerConfig(input=str(clean / "training_data.txt"), output_dir=str(tokenizer_dir), vocab_size=8000))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runners, "UnitWorker", unit_worker_with_hook(fault_hook(root / "tokenize", None)))
        tokenize_corpus(clean / "validation_data.txt", tokenizer_dir, output_dir=root / "shards", num_workers=2,
                        unit_bytes=300_000)
    return {"clean": clean, "tokenizer_dir": tokenizer_dir, "shards": root / "shards",
            "prepare_calls": num_calls(root / "prepare"), "tokenize_calls": num_calls(root / "tokenize")}


def test_prepare_survives_a_killed_ray_data_task(reference, squad_dir, tmp_path, monkeypatch, faults):
    from openllm_ds.data import preparation, prepare

    fault_dir = tmp_path / "faults"
    monkeypatch.setattr(preparation, "clean_batch", udf_with_hook(preparation.clean_batch, fault_hook(fault_dir, PAUSE_AT_CALL)))
    kill = kill_9_when(victim_pid(fault_dir), "prepare")
    stats = prepare(DataConfig(source="dir", squad_dir=str(squad_dir), output_dir=str(tmp_path / "clean"), num_workers=2))
    stop(kill)
    assert "pid" in kill, "no Ray Data task was killed"
    faults["injected"] += 1
    assert kill["title"].startswith("ray::MapBatches("), kill["title"]  # the task's worker process
    assert not psutil.pid_exists(kill["pid"])

    # the killed call's task ran again on another worker, and the output is the undisturbed one
    assert num_calls(fault_dir) >= reference["prepare_calls"] + 1
    assert file_bytes(tmp_path / "clean") == file_bytes(reference["clean"])
    assert stats == json.loads((reference["clean"] / "stats.json").read_text())
    assert stats["splits"]["train"]["kept"] > 2000 and stats["splits"]["validation"]["kept"] > 2000
    faults["recovered"] += 1
    print(f"\nprepare: killed {kill['title']!r} (pid {kill['pid']}) in UDF call {PAUSE_AT_CALL + 1}; "
          f"{num_calls(fault_dir)} UDF calls vs {reference['prepare_calls']} undisturbed; outputs byte-equal")


def test_tokenize_survives_a_killed_ray_actor(reference, tmp_path, monkeypatch, faults):
    from openllm_ds.tokenizer import TokenShards, runners, tokenize_corpus

    fault_dir = tmp_path / "faults"
    monkeypatch.setattr(runners, "UnitWorker", unit_worker_with_hook(fault_hook(fault_dir, PAUSE_AT_CALL)))
    kill = kill_9_when(victim_pid(fault_dir), "tokenize")
    out = tmp_path / "shards"
    meta = tokenize_corpus(reference["clean"] / "validation_data.txt", reference["tokenizer_dir"], output_dir=out,
                           num_workers=2, unit_bytes=300_000)
    stop(kill)
    assert "pid" in kill, "no tokenizing actor was killed"
    faults["injected"] += 1
    assert "UnitWorkerWithHook" in kill["title"], kill["title"]  # the actor's process: ray::UnitWorkerWithHook...
    assert not psutil.pid_exists(kill["pid"])

    assert num_calls(fault_dir) >= reference["tokenize_calls"] + 1
    want, got = file_bytes(reference["shards"]), file_bytes(out)
    assert sorted(want) == [MANIFEST, "meta.json"] + [f"shard_{u:05d}.bin" for u in range(6)]
    # meta.json records its source relative to the dir (source.built_from), which lies elsewhere here
    want_meta, got_meta = (json.loads(files.pop("meta.json")) for files in (want, got))
    assert got_meta["source"].pop("built_from") == [os.path.relpath(reference["clean"] / "validation_data.txt", tmp_path)]
    want_meta["source"].pop("built_from")
    assert got == want and got_meta == want_meta  # no document lost or written twice; no temporary file left
    assert meta["num_documents"] == len((reference["clean"] / "validation_data.txt").read_text().splitlines())
    assert len(TokenShards(out)) == meta["num_tokens"] > 300_000
    faults["recovered"] += 1
    print(f"\ntokenize: killed {kill['title']!r} (pid {kill['pid']}) in UDF call {PAUSE_AT_CALL + 1}; "
          f"{num_calls(fault_dir)} UDF calls vs {reference['tokenize_calls']} undisturbed; shards byte-equal")


def logged_lines(out: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    """Every (step, value) line of train_log.jsonl, in order, the steps repeated after a restart included;
    a last line cut in half by a kill is skipped."""
    path = out / "train_log.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if key in row:
            rows.append((row["step"], float(row[key])))
    return rows


def latest_step(out: Path) -> int:
    latest = out / "checkpoints/latest"
    tag_dir = latest.parent / latest.read_text().strip()
    return json.loads((tag_dir / "train_state.json").read_text())["step"]


def test_ray_train_survives_a_killed_worker(reference, tmp_path, monkeypatch, faults):
    from openllm_ds.train import launch
    from openllm_ds.train import ray_launcher

    data, tok = reference["clean"], reference["tokenizer_dir"]
    undisturbed = tmp_path / "undisturbed"
    ref_summary = launch(tiny_cfg(data, tok, undisturbed, **TRAIN))
    assert ref_summary["final_step"] == 12 and ref_summary["world_size"] == 2

    fault_dir = tmp_path / "faults"
    fault_dir.mkdir()
    monkeypatch.setattr(ray_launcher, "_train_worker", train_worker_writing_pids(ray_launcher._train_worker, fault_dir))
    out = tmp_path / "killed"

    def rank0_after_kill_step(record):
        steps = [s for s, _ in logged_lines(out)]
        if not steps or max(steps) < KILL_AT_STEP:
            return None
        [pid_file] = fault_dir.glob("rank0.*")  # the first worker group's rank 0
        record["reached"] = max(steps)
        return int(pid_file.name.split(".")[1])

    def note_latest(record):  # rank 0 wrote `latest`, and it is dead: this is where the job must resume
        record["latest"] = latest_step(out)

    kill = kill_9_when(rank0_after_kill_step, "ray-train", note_latest)
    # resume none (a fresh run): after the restart the job must still continue from its own checkpoint
    summary = launch(tiny_cfg(data, tok, out, train__resume="none", **TRAIN))
    stop(kill)
    assert "pid" in kill, "the training worker was not killed"
    faults["injected"] += 1
    assert "RayTrainWorker" in kill["title"], kill["title"]

    # a second worker group: both ranks started twice, the new ones resumed from the checkpoint
    # that was latest when rank 0 died (step 4, or 8 if the kill came late)
    pids = {r: sorted(int(p.name.split(".")[1]) for p in fault_dir.glob(f"rank{r}.*")) for r in (0, 1)}
    assert len(pids[0]) == len(pids[1]) == 2 and kill["pid"] in pids[0], pids
    assert summary["final_step"] == 12 and summary["world_size"] == 2
    resumed = summary["resumed_from_step"]
    assert resumed == kill["latest"] in (4, 8) and resumed < kill["reached"], (resumed, kill)

    # every logged loss, the repeated steps included, is the undisturbed run's, bit for bit
    want = logged(undisturbed)
    lines = logged_lines(out)
    assert sorted(want) == list(range(1, 13)) and {s for s, _ in lines} == set(want)
    assert [s for s, _ in lines].count(resumed + 1) == 2  # the first step after the checkpoint ran twice
    assert lines == [(s, want[s]) for s, _ in lines]
    assert logged(out, "eval/loss") == logged(undisturbed, "eval/loss")
    assert summary["val_loss"] == ref_summary["val_loss"] and summary["train_loss"] == ref_summary["train_loss"]
    ours, ref = load_model(out), load_model(undisturbed)
    assert ours.step == ref.step == 12
    ref_sd, our_sd = ref.model.state_dict(), ours.model.state_dict()
    assert sorted(our_sd) == sorted(ref_sd)
    for name, tensor in ref_sd.items():
        assert torch.equal(our_sd[name], tensor), name
    faults["recovered"] += 1
    print(f"\nray train: killed rank 0 {kill['title']!r} (pid {kill['pid']}) after step {kill['reached']}; the worker "
          f"group restarted from step {resumed}; {len(lines)} loss lines, all equal to the undisturbed run's")


def train_worker_failing_to_save(train_worker, fault_dir: Path):
    """Ray Train's worker function, noting each start, whose checkpoint write at step 4 fails on every rank
    as a full disk would (the loop's own CheckpointWriteError, raised in the worker process)."""
    root = str(fault_dir)

    def worker(config):
        import os

        import ray.train

        from openllm_ds.train import loop
        from openllm_ds.train.checkpointing import CheckpointWriteError

        rank = ray.train.get_context().get_world_rank()
        open(os.path.join(root, f"rank{rank}.{os.getpid()}"), "w").close()
        real_save = loop.save_checkpoint

        def save(engine, cfg, state, env, stage):
            if state.step == 4:
                raise CheckpointWriteError(f"could not write checkpoint step_00000004 (OSError: [Errno 28] No space "
                                           f"left on device); rank {rank}")
            return real_save(engine, cfg, state, env, stage)

        loop.save_checkpoint = save
        return train_worker(config)

    return worker


def test_an_error_of_the_run_itself_is_reported_not_retried(reference, tmp_path, monkeypatch):
    """A UserError (here a failed checkpoint write) recurs on a retry: the job stops at once with it."""
    from openllm_ds.train import launch
    from openllm_ds.train import ray_launcher
    from openllm_ds.train.checkpointing import CheckpointWriteError

    fault_dir = tmp_path / "starts"
    fault_dir.mkdir()
    monkeypatch.setattr(ray_launcher, "_train_worker", train_worker_failing_to_save(ray_launcher._train_worker, fault_dir))
    with pytest.raises(CheckpointWriteError, match=r"No space left on device\); rank 0"):
        launch(tiny_cfg(reference["clean"], reference["tokenizer_dir"], tmp_path / "out", **TRAIN))
    starts = sorted(p.name.split(".")[0] for p in fault_dir.iterdir())
    assert starts == ["rank0", "rank1"]  # one worker group, not max_failures + 1 of them
