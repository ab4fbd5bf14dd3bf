"""One writer per output dir, whatever the command: every stage takes ``openllm_ds.output_lock.OutputLock`` on the
directory it writes before it reads or writes anything there; a second command stops at once naming the holder,
and a killed holder leaves no lock behind."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openllm_ds.errors import ConfigError, UserError
from openllm_ds.output_lock import OutputLock, lock_file, output_in_use

from helpers import generated_text

ROOT = Path(__file__).resolve().parents[1]
HELD = r"is in use by openllm-ds test-holder \(pid \d+ on [^,]+, since [\d: -]+\); wait for it to finish, or choose another"


def test_the_lock_names_its_holder_and_goes_with_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alias").symlink_to("out")
    with OutputLock("out", "test-holder"):
        assert lock_file("out") == tmp_path / ".out.lock"
        assert f"openllm-ds test-holder (pid {os.getpid()} on {socket.gethostname()}, since " in \
            (tmp_path / ".out.lock").read_text()
        assert output_in_use("out").startswith("openllm-ds test-holder (pid")
        for spelling in ("out", "out/", "./out", str(tmp_path / "out"), "alias", "sub/../out"):  # one dir, one lock
            with pytest.raises(UserError, match=rf"^--output_dir {spelling} {HELD} --output_dir$"):
                OutputLock(spelling, "export")
        OutputLock("other", "export").release()  # another dir is free
    assert not (tmp_path / ".out.lock").exists() and output_in_use("out") is None
    OutputLock("out", "export").release()


def test_a_killed_holder_leaves_no_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from openllm_ds.output_lock import OutputLock; "
        "lock = OutputLock(sys.argv[1], 'test-holder'); print('locked', flush=True); time.sleep(120)"),
        str(tmp_path / "out")], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=HELD):
            OutputLock(tmp_path / "out", "train")
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".out.lock").exists()  # its file stays, its lock went with the process
    with OutputLock(tmp_path / "out", "train"):
        pass


def test_only_rank_zero_or_the_launcher_holds_a_training_run(tmp_path):
    """Under the deepspeed launcher rank 0 locks (every rank raises its error); Ray Train's workers lock nothing
    (their driver holds the lock for the whole job)."""
    from openllm_ds.train.distributed import DistEnv
    from openllm_ds.train.preflight import RunLock

    out = tmp_path / "run"
    with OutputLock(out, "test-holder"):
        with pytest.raises(ConfigError, match=HELD):
            RunLock(out, DistEnv(rank=0, local_rank=0, world_size=1, device="cpu"))
        RunLock(out, DistEnv(rank=1, local_rank=1, world_size=1, device="cpu")).release()  # not rank 0: no lock
        RunLock(out, DistEnv(rank=0, local_rank=0, world_size=1, device="cpu"), holder=False).release()


TRAIN_YAML = ("name: t\nmodel: {{vocab_size: 300, d_model: 32, n_layers: 1, n_heads: 2, d_ff: 64, max_seq_len: 16}}\n"
              "tokenizer: {{num_workers: 0}}\n"
              "train: {{data_file: text.txt, eval_data: val.txt, tokenizer_dir: {tok}, ds_config: {root}/ds_configs/"
              "zero0.json, micro_batch_size: 2, max_steps: {steps}, warmup_steps: 0, save_every: 50, output_dir: run}}\n")
# (command, the dir it writes, relative to the run dir): each must stop at once while another command holds it
COMMANDS = [
    ("prepare --squad_dir squad --output_dir out", "out"),
    ("train-tokenizer --input text.txt --vocab_size 300 --output_dir out", "out"),
    ("tokenize --input text.txt --tokenizer_dir {tok} --output_dir out --num_workers 0", "out"),
    ("tokenize --input text.txt val.txt --tokenizer_dir {tok} --num_workers 0", "val.tokens"),  # each input's own dir
    ("train --config t.yaml", "run"),
    ("train --config t.yaml --dry_run", "run"),
    ("train --config t.yaml --num_workers 1", "run"),  # Ray Train: its driver locks before Ray starts
    ("prepare-sft --squad_dir squad --output_dir out", "out"),
    ("finetune --model_dir model --data sft --output_dir out --ds_config {root}/ds_configs/zero0.json", "out"),
    ("export --model_dir {run} --format pytorch --output_dir out", "out"),
    ("evaluate --model_dir model --tasks task.yaml --num_workers 0", "model/eval"),
    ("pipeline --config tiny --squad_dir squad --work_dir out", "out"),
]


@pytest.fixture()
def workspace(tmp_path, small_run) -> Path:
    cwd = tmp_path / "cwd"
    (cwd / "squad").mkdir(parents=True)
    (cwd / "squad" / "dev-v1.1.json").write_text('{"version": "1.1", "data": []}')
    (cwd / "text.txt").write_text(generated_text(120, 3))
    (cwd / "val.txt").write_text(generated_text(40, 4))
    (cwd / "t.yaml").write_text(TRAIN_YAML.format(tok=small_run / "tokenizer", root=ROOT, steps=2))
    (cwd / "task.yaml").write_text("kind: cloze\ndata: val.txt\n")
    (cwd / "sft").mkdir()
    for name in ("train.jsonl", "validation.jsonl"):
        (cwd / "sft" / name).write_text('{"prompt": "Where?", "completion": "Here."}\n' * 4)
    shutil.copytree(small_run, cwd / "model")
    return cwd


@pytest.mark.parametrize("command,target", COMMANDS, ids=[c.split(" --")[0] + f" -> {t}" for c, t in COMMANDS])
def test_every_command_stops_at_a_held_output_dir(workspace, small_run, command, target):
    before = sorted(str(p.relative_to(workspace)) for p in workspace.rglob("*"))
    with OutputLock(workspace / target, "test-holder"):
        argv = shlex.split(command.format(tok=small_run / "tokenizer", run=small_run, root=ROOT))
        r = subprocess.run([sys.executable, "-m", "openllm_ds", *argv], cwd=workspace, capture_output=True, text=True,
                           timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-2000:]
    assert re.search(HELD, errors[0]) and f" {target}" in errors[0].replace(str(workspace) + "/", " "), errors[0]
    assert sorted(str(p.relative_to(workspace)) for p in workspace.rglob("*")) == before  # nothing written


def test_two_training_runs_into_one_output_dir(workspace):
    """The real race: a second `openllm-ds train` into the dir a first one is training in stops at once, before its
    checks read the first run's half-written state; once the first is killed (kill -9), the dir is free again."""
    (workspace / "t.yaml").write_text((workspace / "t.yaml").read_text().replace("max_steps: 2", "max_steps: 100000"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "openllm_ds", "train", "--config", "t.yaml"], cwd=workspace,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (workspace / "run/train_log.jsonl").exists():  # training: the lock is held, steps are logged
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.5)
        second = subprocess.run([sys.executable, "-m", "openllm_ds", "train", "--config", "t.yaml"], cwd=workspace,
                                env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by openllm-ds train (pid {first.pid} on {socket.gethostname()}" in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    again = subprocess.run([sys.executable, "-m", "openllm_ds", "train", "--config", "t.yaml", "--dry_run"],
                           cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]

