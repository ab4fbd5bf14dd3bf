"""Training in this process (one rank, DeepSpeed's CPU accelerator) on the real SQuAD token shards.

One shared 60-step run serves several checks (loss, TensorBoard, checkpoints, pruning); resume,
non-finite handling and config errors get short runs of their own.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from openllm_ds.checkpoint import list_checkpoints, load_model
from openllm_ds.errors import ConfigError, DataError, UserError
from openllm_ds.model import Transformer
from openllm_ds.tokenizer import TokenShards
from openllm_ds.train import TrainingError, train
from openllm_ds.train import loop

from helpers import killed_after_checkpoint, logged, tiny_cfg

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_run(token_shards, prepared_data, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-run")
    cfg = tiny_cfg(prepared_data, tokenizer_dir, out)
    return cfg, train(cfg)


def test_loss_falls_on_real_data(tiny_run):
    cfg, summary = tiny_run
    losses = logged(cfg.output_dir)
    assert sorted(losses) == list(range(1, 61))
    assert losses[1] == pytest.approx(math.log(8000), abs=0.05)  # untrained: uniform over the vocabulary
    assert np.mean([losses[s] for s in range(51, 61)]) < losses[1] - 1.5
    assert summary["val_loss"] < math.log(8000) - 1.5
    assert summary["val_perplexity"] == pytest.approx(math.exp(summary["val_loss"]))
    assert summary["final_step"] == 60 and summary["nonfinite_skipped"] == 0
    assert summary["tokens_seen"] == 60 * 8 * 64
    assert summary["num_params"] == Transformer(cfg.model).num_params()
    assert summary["train_loss"] == losses[60]


def test_tensorboard_scalars(tiny_run):
    """The project's groups only (no DeepSpeed Train/Samples), units in the tags, run constants as text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from openllm_ds.train.metrics import SCALARS

    cfg, summary = tiny_run
    acc = EventAccumulator(str(Path(cfg.output_dir) / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == set(SCALARS) - {"train/loss_scale"}  # fp32: no loss scale, a constant 1 before
    assert {t.split("/")[0] for t in tags} == {"train", "perf", "eval"}
    evals = acc.Scalars("eval/loss")
    assert [e.step for e in evals] == [20, 40, 60]
    assert evals[-1].value == pytest.approx(summary["val_loss"], rel=1e-6)
    train_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert train_loss[60] == pytest.approx(summary["train_loss"], rel=1e-6)
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    assert lr[1] == pytest.approx(3e-3 / 10) and lr[10] == pytest.approx(3e-3)
    assert lr[60] == pytest.approx(3e-3 * 0.1)  # cosine down to learning_rate * min_lr_ratio
    assert all(0 < e.value < 1 for e in acc.Scalars("perf/mfu"))
    assert all(0.05 < e.value < 64 for e in acc.Scalars("perf/memory_gb"))  # GiB of resident memory
    assert all(e.value > 0 for e in acc.Scalars("perf/tokens_per_s"))
    texts = {t: acc.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in acc.Tags()["tensors"]}
    assert {"run/config/text_summary", "run/scalars/text_summary"} <= set(texts)
    assert "| precision | fp32 |" in texts["run/config/text_summary"]
    assert f"| parameters | {summary['num_params']:,} |" in texts["run/config/text_summary"]
    assert "| perf/memory_gb | " in texts["run/scalars/text_summary"]
    assert all(0 < e.value < 100 for e in acc.Scalars("train/grad_norm"))


def test_checkpoints_layout_pruning_and_weights(tiny_run, prepared_data):
    cfg, summary = tiny_run
    out = Path(cfg.output_dir)
    assert (out / "run_config.yaml").is_file()
    assert (out / "tokenizer/tokenizer.model").read_bytes() == (Path(cfg.train.tokenizer_dir) / "tokenizer.model").read_bytes()
    assert (out / "checkpoints/latest").read_text().strip() == "step_00000060"
    assert [s for s, _ in list_checkpoints(out)] == [40, 60]  # keep_last 2: step 20 deleted
    assert not (out / "checkpoints/step_00000020").exists()
    state = json.loads((out / "checkpoints/step_00000060/train_state.json").read_text())
    assert state["step"] == 60 and state["tokens_seen"] == 60 * 8 * 64
    assert state["data"] == [[0, 60 * 8, 60 * 8]]  # one source: epoch 0, 480 windows of its order taken
    assert state["source_tokens"] == [60 * 8 * 64] and len(state["data_sha256"]) == 64
    assert state["last_eval_loss"] == summary["val_loss"]

    # The consolidated weights, loaded without DeepSpeed, give the validation loss the run reported,
    # on windows chosen here from the documented rule (evenly spaced, eval_batches x micro of them).
    loaded = load_model(out)
    assert loaded.step == 60 and loaded.kind == "train"
    val = TokenShards(Path(prepared_data / "validation_data.tokens"))
    T, n = 64, 4 * 8
    available = (len(val) - 1) // T
    rows = torch.from_numpy(np.stack([val[w * T : w * T + T + 1] for w in (np.arange(n) * available) // n]))
    with torch.no_grad():
        loss = loaded.model(rows[:, :-1], rows[:, 1:])
    assert float(loss) == pytest.approx(summary["val_loss"], rel=1e-5)


def test_stop_and_resume_repeats_the_uninterrupted_losses(token_shards, prepared_data, tokenizer_dir, tmp_path,
                                                          monkeypatch, capsys):
    common = dict(model__dropout=0.1, train__max_steps=12, train__save_every=3, train__eval_every=6,
                  train__micro_batch_size=4, train__gradient_accumulation_steps=2, train__keep_last=5)
    straight = train(tiny_cfg(prepared_data, tokenizer_dir, tmp_path / "straight", **common))
    assert f"model: {straight['num_params']:,} parameters" in capsys.readouterr().out

    cfg = tiny_cfg(prepared_data, tokenizer_dir, tmp_path / "resumed", **common)
    with killed_after_checkpoint(monkeypatch, 6), pytest.raises(KeyboardInterrupt):
        train(cfg)  # the process is killed right after the step-6 checkpoint
    ckpt = Path(cfg.output_dir) / "checkpoints"
    # a save of step 9 that died half-way: DeepSpeed files but no latest pointing at it
    partial = ckpt / "step_00000009"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    assert (ckpt / "latest").read_text().strip() == "step_00000006"

    resumed = train(cfg)
    assert resumed["resumed_from_step"] == 6 and resumed["final_step"] == 12
    a, b = logged(tmp_path / "straight"), logged(cfg.output_dir)
    assert [b[s] for s in range(7, 13)] == [a[s] for s in range(7, 13)]  # bit-exact
    assert logged(cfg.output_dir, "eval/loss")[12] == logged(tmp_path / "straight", "eval/loss")[12]
    assert resumed["val_loss"] == straight["val_loss"]
    assert (partial / "train_state.json").is_file()  # rewritten by the resumed run when it got there
    assert [s for s, _ in list_checkpoints(cfg.output_dir)] == [3, 6, 9, 12]


def nan_loss_from(monkeypatch, bad_calls):
    """Make the model's loss NaN on the forward calls numbered in ``bad_calls`` (training calls only)."""
    real_forward = Transformer.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, **kw):
        out = real_forward(self, idx, targets, **kw)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                out = out * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", forward)


@pytest.mark.parametrize("ds_config", ["zero0", "zero2"])
def test_a_nonfinite_step_is_skipped(token_shards, prepared_data, tokenizer_dir, tmp_path, monkeypatch, ds_config):
    nan_loss_from(monkeypatch, bad_calls={3})  # step 3 (one micro batch per step)
    cfg = tiny_cfg(prepared_data, tokenizer_dir, tmp_path, train__max_steps=6, train__eval_every=6,
                   train__save_every=6, train__ds_config=str(ROOT / f"ds_configs/{ds_config}.json"))
    summary = train(cfg)
    assert summary["nonfinite_skipped"] == 1
    losses = logged(tmp_path)
    assert math.isnan(losses[3]) and all(math.isfinite(losses[s]) for s in (1, 2, 4, 5, 6))
    weights = load_model(tmp_path).model.state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_persistent_nonfinite_loss_stops_with_the_last_checkpoint_intact(token_shards, prepared_data, tokenizer_dir,
                                                                          tmp_path, monkeypatch, capsys):
    from openllm_ds.cli import main

    nan_loss_from(monkeypatch, bad_calls=set(range(5, 100)))  # from step 5 on, after the rollback too
    argv = ["--data_file", str(prepared_data / "training_data.txt"), "--tokenizer_dir", str(tokenizer_dir),
            "--output_dir", str(tmp_path), "--max_steps", "30", "--save_every", "2", "--batch_size", "8",
            "model.vocab_size=8000", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.d_ff=192",
            "model.max_seq_len=64", "train.eval_batches=2", "train.spike_steps=3", "train.max_rollbacks=1",
            "train.warmup_steps=2", f"train.ds_config={ROOT / 'ds_configs/zero2.json'}"]
    assert main(["train", *argv]) == 2
    captured = capsys.readouterr()
    # first time: steps 5-7 bad -> back to step 4, batches 5-7 skipped; the loss stays NaN -> stop
    assert "step 7: steps 5-7 had non-finite or spiking losses (nan, nan, nan" in captured.out
    assert "rolled back to step_00000004 and skipped the 3 batch(es) since it (rollback 1 of at most 1)" in captured.out
    assert "steps 5-7 had non-finite or spiking losses" in captured.err
    assert "1 rollback(s) made already, train.max_rollbacks=1" in captured.err and "step_00000004" in captured.err
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step_00000004"
    loaded = load_model(tmp_path)
    assert loaded.step == 4
    assert all(torch.isfinite(v).all() for v in loaded.model.state_dict().values())
    assert issubclass(TrainingError, UserError)
    assert logged(tmp_path, "train/rollbacks") == {7: 1.0}


def log_rows(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines()]


def test_a_loss_spike_rolls_back_and_skips_the_batches_since_the_checkpoint(token_shards, prepared_data, tokenizer_dir,
                                                                             tmp_path, monkeypatch, capsys):
    """A poisoned batch at step 43 spikes the loss: the run reloads step 40 and goes on with the batch after
    the poisoned one. It then equals, bit for bit, a clean run whose data jump from batch 41 to batch 44."""
    from openllm_ds.train.data import DataPosition, TrainBatches

    gb = 8  # windows per step
    real_next = TrainBatches.next_batch

    def poisoned(self, pos):  # the 43rd batch: every token the byte <0x00>, which the text never holds
        batch, after, taken = real_next(self, pos)
        if pos.sources == [[0, 42 * gb, 42 * gb]]:
            batch = [(torch.full_like(x, 4), torch.full_like(y, 4)) for x, y in batch]
        return batch, after, taken

    def jumping(self, pos):  # the clean reference: after batch 40, continue at batch 44
        if pos.sources == [[0, 40 * gb, 40 * gb]]:
            pos = DataPosition([[0, 43 * gb, 43 * gb]])
        return real_next(self, pos)

    common = dict(train__max_steps=50, train__save_every=10, train__eval_every=50, train__spike_steps=1,
                  train__spike_factor=1.3)
    monkeypatch.setattr(TrainBatches, "next_batch", poisoned)
    spiked = train(tiny_cfg(prepared_data, tokenizer_dir, tmp_path / "spiked", **common))
    out = capsys.readouterr().out
    monkeypatch.setattr(TrainBatches, "next_batch", jumping)
    clean = train(tiny_cfg(prepared_data, tokenizer_dir, tmp_path / "clean", **common))

    assert spiked["rollbacks"] == 1 and clean["rollbacks"] == 0 and spiked["final_step"] == 50
    rows = [r for r in log_rows(tmp_path / "spiked") if "train/loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, 44)) + list(range(41, 51))  # 41-43 ran twice
    assert rows[42]["train/loss"] > 1.3 * rows[41]["train/loss"]  # the poisoned batch
    assert "step 43: steps 43-43 had non-finite or spiking losses" in out
    assert "rolled back to step_00000040 and skipped the 3 batch(es) since it (rollback 1 of at most 3)" in out
    assert logged(tmp_path / "spiked", "train/rollbacks") == {43: 1.0}
    assert logged(tmp_path / "spiked", "train/rollback_to_step") == {43: 40.0}
    a, b = logged(tmp_path / "spiked"), logged(tmp_path / "clean")
    assert [a[s] for s in range(1, 51)] == [b[s] for s in range(1, 51)]  # bit-exact
    assert spiked["val_loss"] == clean["val_loss"]
    wa, wb = load_model(tmp_path / "spiked").model.state_dict(), load_model(tmp_path / "clean").model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "spiked" / "tensorboard"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/rollbacks")] == [(43, 1.0)]


def test_activation_checkpointing_gives_the_same_losses(token_shards, prepared_data, tokenizer_dir, tmp_path):
    runs = {}
    for on in (False, True):
        cfg = tiny_cfg(prepared_data, tokenizer_dir, tmp_path / str(on), model__dropout=0.1, train__max_steps=3,
                       train__eval_every=3, train__save_every=3, train__gradient_checkpointing=on)
        runs[on] = train(cfg)
        assert logged(cfg.output_dir)
    assert logged(tmp_path / "True") == pytest.approx(logged(tmp_path / "False"), rel=1e-6)


def test_compiled_training_matches_eager_and_resumes_exactly(token_shards, prepared_data, tokenizer_dir, tmp_path):
    def run(name, compile, max_steps=6):
        cfg = tiny_cfg(prepared_data, tokenizer_dir, tmp_path / name, train__max_steps=max_steps, train__eval_every=2,
                       train__save_every=2, train__compile=compile)
        return train(cfg)

    eager, compiled = run("eager", False), run("compiled", True)
    losses = logged(tmp_path / "compiled")
    assert sorted(losses) == list(range(1, 7))
    assert losses == pytest.approx(logged(tmp_path / "eager"), rel=1e-4)  # another kernel order, same step
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)
    # engine.compile() compiles the module in place: the checkpoint holds the model's own names
    loaded = load_model(tmp_path / "compiled")
    assert loaded.step == 6 and set(loaded.model.state_dict()) == set(Transformer(loaded.model_config).state_dict())
    # stop at step 4, resume to 6: the compiled run's own losses again, to the last bits (each compilation may
    # pick kernels whose reduction order differs: two uninterrupted compiled runs differ by ~1e-7 at times;
    # the eager path's resume is bit-exact, tests/test_faults.py)
    run("resumed", True, max_steps=4)
    resumed = run("resumed", True)
    assert resumed["resumed_from_step"] == 4
    assert logged(tmp_path / "resumed") == pytest.approx(losses, rel=1e-6, abs=0)


STEP_PAGE_FAULTS = """
import json, resource, sys, torch
from openllm_ds.config import ModelConfig
from openllm_ds.model import Transformer
from openllm_ds.utils import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.manual_seed(0)
model = Transformer(ModelConfig(vocab_size=8000, d_model=128, n_layers=2, n_heads=4, d_ff=384, max_seq_len=256))
opt = torch.optim.AdamW(model.parameters())
faults = []
for _ in range(10):  # logits of 8 x 256 x 8000 fp32: 65 MB, allocated and freed every step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.randint(0, 8000, (8, 257))
    model(x[:, :-1], x[:, 1:]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_cpu_training_steps_reuse_freed_memory_instead_of_faulting_in_fresh_pages():
    runs = {}
    for mode in ("default", "keep"):
        proc = subprocess.run([sys.executable, "-c", STEP_PAGE_FAULTS, mode], capture_output=True, text=True, timeout=300,
                              cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        runs[mode] = json.loads(proc.stdout.splitlines()[-1])
    assert runs["keep"]["kept"] is True
    default, kept = runs["default"]["faults"][5:], runs["keep"]["faults"][5:]  # after the first steps' growth
    assert min(default) > 4096  # glibc's default maps fresh pages for the big buffers every step
    assert max(kept) < min(default) / 10, (default, kept)


def test_harness_tasks_run_at_each_evaluation(token_shards, prepared_data, tokenizer_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from openllm_ds.evaluation.tasks import run_task

    task = tmp_path / "val_ppl.yaml"
    task.write_text(f"kind: perplexity\ndata: {prepared_data / 'validation_data.txt'}\nlimit: 20\n")
    out = tmp_path / "run"
    cfg = tiny_cfg(prepared_data, tokenizer_dir, out, train__max_steps=4, train__eval_every=2, train__save_every=4,
                   train__eval_tasks=[str(task), "squad_cloze"])
    train(cfg)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    for tag in ("harness/val_ppl/perplexity", "harness/squad_cloze/accuracy"):
        assert [p.step for p in acc.Scalars(tag)] == [2, 4], tag
    ppl = {p.step: p.value for p in acc.Scalars("harness/val_ppl/perplexity")}
    assert ppl[4] < ppl[2] < 8000  # training lowers it from the uniform model's vocabulary size
    # the value logged at step 4 is what the harness gives on the step-4 checkpoint
    assert ppl[4] == pytest.approx(run_task(str(task), out, step=4, progress=False)["value"], rel=1e-5)


@pytest.fixture()
def no_engine(monkeypatch):
    """Config errors must come before any compute: building the engine fails the test."""
    def fail(*a, **k):
        raise AssertionError("the engine was built before the config error was found")

    monkeypatch.setattr(loop, "build_engine", fail)


@pytest.mark.parametrize("overrides, error, message", [
    ({"model__vocab_size": 7999}, ConfigError, r"model.vocab_size=7999 but the tokenizer .* has 8000 tokens; set model.vocab_size=8000"),
    ({"train__tokenizer_dir": "/nonexistent/tok"}, ConfigError, r"train.tokenizer_dir .*/nonexistent/tok does not exist"),
    ({"train__data_file": "/nonexistent/train.txt"}, DataError, r"train.data_file \(--data_file\) /nonexistent/train.txt does not exist"),
    ({"train__eval_data": "/nonexistent/val.txt"}, DataError, r"train.eval_data \(--eval_data\) /nonexistent/val.txt does not exist"),
    ({"train__ds_config": "/nonexistent/ds.json"}, ConfigError, r"train.ds_config /nonexistent/ds.json does not exist"),
    ({"model__max_seq_len": 4096, "train__micro_batch_size": 128}, DataError,
     r"train.data_file .* windows of model.max_seq_len\+1 = 4097 tokens, fewer than one global batch of 128"),
    ({"train__resume": "/nonexistent/step_00000005"}, ConfigError,
     r"train.resume \(--resume\) /nonexistent/step_00000005 does not exist; pass a checkpoints/step_\* dir"),
    ({"train__eval_batches": 0}, ConfigError, r"train.eval_batches must be >= 1"),
    ({"train__eval_tasks": ["no_such_task"]}, ConfigError, r"train.eval_tasks: .*no_such_task"),
])
def test_config_errors_before_any_compute(token_shards, prepared_data, tokenizer_dir, tmp_path, no_engine,
                                          overrides, error, message):
    with pytest.raises(error, match=message):
        train(tiny_cfg(prepared_data, tokenizer_dir, tmp_path, **overrides))


def test_invalid_ds_config_json(token_shards, prepared_data, tokenizer_dir, tmp_path, no_engine):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"train.ds_config .*bad.json is not valid JSON"):
        train(tiny_cfg(prepared_data, tokenizer_dir, tmp_path / "out", train__ds_config=str(bad)))


def test_fresh_run_refuses_an_output_dir_with_checkpoints(tiny_run, prepared_data, tokenizer_dir, no_engine):
    cfg, _ = tiny_run
    with pytest.raises(ConfigError, match=r"already holds checkpoints \(up to step 60\); pass --resume auto"):
        train(tiny_cfg(prepared_data, tokenizer_dir, cfg.output_dir, train__resume="none"))
    with pytest.raises(ConfigError, match=r"different model \(model.d_model: 64 vs 128"):
        train(tiny_cfg(prepared_data, tokenizer_dir, cfg.output_dir, model__d_model=128))


def test_module_help_runs():
    """`python -m openllm_ds train` (the deepspeed launcher's `--module openllm_ds train`, its --local_rank first)."""
    r = subprocess.run([sys.executable, "-m", "openllm_ds", "--local_rank=0", "train", "--help"], cwd=ROOT,
                       capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--ds_config" in r.stdout and "--num_workers" in r.stdout and "section.key=value" in r.stdout
    assert not (ROOT / "openllm_ds" / "train" / "__main__.py").exists()  # one entry point: the CLI


def test_output_dir_of_another_tokenizer_is_refused(token_shards, prepared_data, tokenizer_dir, tmp_path, no_engine):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer/tokenizer.model").write_bytes(b"another model")
    with pytest.raises(ConfigError, match=r"holds a run trained with another tokenizer"):
        train(tiny_cfg(prepared_data, tokenizer_dir, tmp_path))


def test_resume_path_of_a_run_with_another_tokenizer_is_refused(token_shards, prepared_data, tokenizer_dir, tmp_path,
                                                                no_engine):
    """--resume PATH from another run: its tokenizer (the copy in its run dir, the sha256 in its train state)
    must be this run's, even when the vocabulary size is the same."""
    other = tmp_path / "other"
    step = other / "checkpoints/step_00000002"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"weights")
    (step / "train_state.json").write_text(json.dumps({"step": 2, "tokenizer_sha256": "0" * 64}))
    with pytest.raises(ConfigError, match=r"step_00000002 was trained with another tokenizer .*resume with "
                                          r"--tokenizer_dir .*other/tokenizer"):
        train(tiny_cfg(prepared_data, tokenizer_dir, tmp_path / "new", train__resume=str(step)))
    assert not (tmp_path / "new/checkpoints").exists()


def test_ray_job_entry_point_defaults_to_one_worker(capsys, prepared_data, tokenizer_dir, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ray_job_train", ROOT / "ray_jobs/train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    run = ["--config", "tiny", "--tokenizer_dir", str(tokenizer_dir), "--data_file",
           str(prepared_data / "training_data.txt"), "--output_dir", str(tmp_path / "run"), "--dry_run"]
    assert job.main(run) == 0
    out = capsys.readouterr().out
    assert "num_workers: 1" in out.split("train:", 1)[1] and '"world_size": 1' in out
    assert job.main([*run, "--num_workers", "0"]) == 0
    assert "num_workers: 0" in capsys.readouterr().out.split("train:", 1)[1]
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


@pytest.mark.parametrize("script,argv", [
    ("train.py", ["--output_dir", "models/job"]),
    ("train.py", []),  # the default, models/NAME, is relative too
    ("pipeline.py", []),
    ("eval.py", ["--model_dir", "models/tiny", "--tasks", "squad_cloze"]),
    ("tokenize_corpus.py", ["--input", "corpus.txt", "--output_dir", "corpus.tokens"]),
])
def test_ray_jobs_refuse_relative_outputs_in_the_working_dir_copy(script, argv, tmp_path, prepared_data, tokenizer_dir):
    """A `ray job submit` driver runs in Ray's temporary copy of --working-dir (deleted later): a relative
    output path would be written there and lost, so the job stops at once with exit 2, naming the flag."""
    import subprocess
    import sys

    copy = tmp_path / "runtime_resources/working_dir_files/_ray_pkg_0123"
    copy.mkdir(parents=True)
    r = subprocess.run([sys.executable, str(ROOT / "ray_jobs" / script), "--config", str(ROOT / "configs/tiny.yaml"),
                        *argv] if script in ("train.py", "pipeline.py") else
                       [sys.executable, str(ROOT / "ray_jobs" / script), *argv],
                       cwd=copy, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "a Ray job runs in a temporary copy of --working-dir" in r.stderr and "absolute path" in r.stderr, r.stderr
    assert list(copy.iterdir()) == []
    if script == "train.py":  # an absolute one goes on (here: --dry_run)
        r = subprocess.run([sys.executable, str(ROOT / "ray_jobs/train.py"), "--config", str(ROOT / "configs/tiny.yaml"),
                            "--output_dir", str(tmp_path / "job"), "--tokenizer_dir", str(tokenizer_dir),
                            "--data_file", str(prepared_data / "training_data.txt"), "--dry_run"], cwd=copy,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and f"output_dir: {tmp_path / 'job'}" in r.stdout, r.stderr


class _Payload:
    """Unpickling this object runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"__import__('pathlib').Path({str(self.marker)!r}).write_text('pwned')",)


def test_resuming_from_a_checkpoint_with_pickled_code_is_refused(tiny_run, prepared_data, tokenizer_dir, tmp_path):
    """DeepSpeed's engine.load_checkpoint unpickles with weights_only=False; resume forces it on."""
    import shutil

    cfg, _ = tiny_run
    out = tmp_path / "copy"
    shutil.copytree(cfg.output_dir, out)
    tag = out / "checkpoints" / (out / "checkpoints/latest").read_text().strip()
    states = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    marker = tmp_path / "marker"
    torch.save({**states, "extra": _Payload(marker)}, tag / "mp_rank_00_model_states.pt")
    with pytest.raises(ConfigError, match=r"refusing to resume from .*step_00000060: its DeepSpeed files hold pickled"):
        train(tiny_cfg(prepared_data, tokenizer_dir, out, train__max_steps=61))
    assert not marker.exists()
    torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)  # the payload is live
    assert marker.read_text() == "pwned"
