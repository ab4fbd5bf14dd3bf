"""Fault injection: `kill -9` of a training process at random moments, resumed each time.

The run checkpoints every step, so a kill lands in the middle of a step or in the middle of a
checkpoint write (DeepSpeed's files, the consolidated weights, `latest`, pruning). After every kill
`latest` must name a complete checkpoint, the next run must resume from exactly that one (never a
partial one), and in the end the per-step losses must equal those of an uninterrupted run, bit for
bit (CPU fp32; one rank, and two gloo ranks under the deepspeed launcher).
"""

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openllm_ds.checkpoint import list_checkpoints
from helpers import free_port
from openllm_ds.train.launch import printed_summary

from helpers import logged, train_flags

ROOT = Path(__file__).resolve().parents[2]
STEPS = 60
KILLS = {1: 10, 2: 4}  # kill points per run of the suite: one rank, and two ranks under the deepspeed launcher

pytestmark = pytest.mark.slow


def train_cmd(prepared_data, tokenizer_dir, out, ranks: int) -> list[str]:
    if ranks == 1:
        launcher = [sys.executable, "-m", "openllm_ds", "train"]
    else:
        launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
                    str(free_port()), "--module", "openllm_ds", "train"]
    return [*launcher, *train_flags(prepared_data, tokenizer_dir, out, max_steps=STEPS),
            "train.save_every=1", "train.keep_last=3"]


def latest_step(out: Path) -> int:
    latest = out / "checkpoints/latest"
    if not latest.is_file():
        return 0
    tag_dir = latest.parent / latest.read_text().strip()
    assert (tag_dir / "train_state.json").is_file() and (tag_dir / "model.safetensors").is_file(), \
        f"latest names an incomplete checkpoint: {tag_dir}"
    return json.loads((tag_dir / "train_state.json").read_text())["step"]


def logged_steps(out: Path) -> list[int]:
    """Steps in train_log.jsonl, ignoring a last line the kill cut in half."""
    path = out / "train_log.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass
    return steps


@pytest.mark.parametrize("ranks", [1, 2])
def test_kill_9_at_random_moments_resumes_exactly(token_shards, prepared_data, tokenizer_dir, tmp_path, ranks):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    reference = tmp_path / "reference"
    r = subprocess.run(train_cmd(prepared_data, tokenizer_dir, reference, ranks), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "killed"
    rng = random.Random(20261202)
    kills, starts = [], []
    while True:
        before, lines = latest_step(out), len(logged_steps(out))
        log = open(tmp_path / f"run{len(starts)}.out", "w")
        proc = subprocess.Popen(train_cmd(prepared_data, tokenizer_dir, out, ranks), cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        starts.append((before, Path(log.name)))
        deadline = time.monotonic() + 300
        while proc.poll() is None and len(logged_steps(out)) <= lines:  # until this run has logged a step
            assert time.monotonic() < deadline, "the resumed run made no progress"
            time.sleep(0.05)
        if len(kills) < KILLS[ranks]:
            time.sleep(rng.uniform(0.0, 0.6))  # somewhere in the next steps or checkpoint writes
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank at once, as a crashed node
                proc.wait()
                log.close()
                reached = max(logged_steps(out))
                kept = latest_step(out)  # asserts that latest names a complete checkpoint
                partial = [d.name for d in (out / "checkpoints").glob("step_*") if not (d / "train_state.json").is_file()]
                kills.append({"reached": reached, "latest": kept, "lost": reached - kept, "partial": partial})
                continue
        proc.wait(timeout=600)  # the last start goes on to the end
        log.close()
        break
    assert proc.returncode == 0, Path(log.name).read_text()[-3000:]

    assert len(kills) >= KILLS[ranks], f"the run finished after {len(kills)} kills; lengthen STEPS"
    # every restart resumed from the checkpoint latest named when it started, never a partial one
    # (a kill before the first checkpoint completed leaves nothing to resume: that start begins afresh)
    for before, path in starts[1:]:
        text = path.read_text()
        if before == 0:
            assert "resumed from" not in text, text[-2000:]
        else:
            assert f"at step {before} (epoch" in text, text[-2000:]
    summary = printed_summary(starts[-1][1].read_text())
    assert summary["world_size"] == ranks and summary["final_step"] == STEPS and summary["resumed_from_step"] == (starts[-1][0] or None)
    # the killed-and-resumed run logged exactly the uninterrupted run's losses
    got, want = logged(out), logged(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in range(1, STEPS + 1)] == [want[s] for s in range(1, STEPS + 1)]
    assert logged(out, "eval/loss") == logged(reference, "eval/loss")
    assert [s for s, _ in list_checkpoints(out)] == [STEPS - 2, STEPS - 1, STEPS]
    lost = [k["lost"] for k in kills]
    print(f"\n{len(kills)} kills, {sum(bool(k['partial']) for k in kills)} during a checkpoint write; steps lost per "
          f"kill: median {statistics.median(lost)}, worst {max(lost)}; {kills}")
    assert max(lost) <= 1  # a checkpoint every step: at most the step in flight is lost


@pytest.mark.parametrize("where", ["engine", "weights", "torch.save"])
def test_a_failed_checkpoint_write_stops_clearly_and_the_previous_one_loads(
        token_shards, prepared_data, tokenizer_dir, tmp_path, monkeypatch, capsys, where):
    """A full disk during the step-4 checkpoint (in DeepSpeed's files, in our consolidated weights, or inside
    DeepSpeed's own torch.save, which reports it as a RuntimeError): the run stops with one clear message,
    leaves no partial step dir, and resumes from step 2."""
    import errno

    from openllm_ds.checkpoint import load_model
    from openllm_ds.train import checkpointing
    from openllm_ds.cli import main

    argv = [*train_flags(prepared_data, tokenizer_dir, tmp_path, max_steps=6), "train.save_every=2"]
    real_save, real_write = checkpointing.save_checkpoint, checkpointing.write_safetensors

    def no_space(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    full = "OSError: [Errno 28] No space left on device"
    if where == "torch.save":
        import torch

        real_torch_save = torch.save
        full = "RuntimeError: PytorchStreamWriter failed writing file data/0: file write failed"

        def torch_save(obj, f, *a, **kw):
            real_torch_save(obj, f, *a, **kw)  # a partial file on disk, then the error
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

        def engine_save(engine, cfg, state, env, stage):
            if state.step == 4:
                monkeypatch.setattr(torch, "save", torch_save)
            return real_save(engine, cfg, state, env, stage)

        monkeypatch.setattr("openllm_ds.train.loop.save_checkpoint", engine_save)
    elif where == "engine":
        def engine_save(engine, cfg, state, env, stage):
            if state.step == 4:
                monkeypatch.setattr(engine, "save_checkpoint", no_space)
            return real_save(engine, cfg, state, env, stage)

        monkeypatch.setattr("openllm_ds.train.loop.save_checkpoint", engine_save)
    else:
        def write(tensors, path):
            if path.parent.name == "step_00000004":
                no_space()
            return real_write(tensors, path)

        monkeypatch.setattr(checkpointing, "write_safetensors", write)
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and f"step_00000004 ({full})" in err
    assert "the previous checkpoint step_00000002 is intact" in err and "--resume auto" in err
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step_00000002"
    assert not (tmp_path / "checkpoints/step_00000004").exists()
    assert load_model(tmp_path).step == 2

    monkeypatch.undo()
    assert main(["train", *argv]) == 0  # space again: the run resumes from step 2 and finishes
    assert printed_summary(capsys.readouterr().out)["resumed_from_step"] == 2
    assert load_model(tmp_path).step == 6
