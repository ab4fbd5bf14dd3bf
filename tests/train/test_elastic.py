"""Resume on another number of ranks (DeepSpeed's universal checkpoint), and warm starts from trained weights.

The elastic runs all train 6 steps with a checkpoint every 2 and a global batch of 16 windows: 2 ranks x micro 8,
or 1 rank x micro 8 x 2 accumulation steps (the data order depends on the global batch only). A run cut back to its
step-2 checkpoint and resumed on the other number of ranks, or under another ZeRO stage (0-3), must log the
losses of the uninterrupted run within 1e-4 (only the order of float additions differs), on the same
learning-rate schedule.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openllm_ds.checkpoint import load_model
from openllm_ds.train import train

from helpers import TRAINED_SHAPE, free_port
from openllm_ds.train.launch import printed_summary

from helpers import logged, tiny_cfg, train_flags

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
ATOL = 1e-4
RUN = dict(train__max_steps=STEPS, train__save_every=2, train__eval_every=2, train__keep_last=3,
           train__warmup_steps=2, train__micro_batch_size=8)

pytestmark = pytest.mark.slow


def two_ranks(prepared_data, tokenizer_dir, out, stage) -> dict:
    """`deepspeed --module openllm_ds train ...`: the CLI's own entry point under the launcher (the launcher's
    --local_rank comes before the stage)."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "openllm_ds", "train", *train_flags(prepared_data, tokenizer_dir, out, f"zero{stage}"),
           "train.save_every=2", "train.eval_every=2", "train.keep_last=3"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return printed_summary(r.stdout) | {"stdout": r.stdout}


def one_rank(prepared_data, tokenizer_dir, out, stage, **kw) -> dict:
    return train(tiny_cfg(prepared_data, tokenizer_dir, out, train__ds_config=str(ROOT / f"ds_configs/zero{stage}.json"),
                          **{**RUN, **kw}))


def cut_back(src: Path, dst: Path, step: int) -> Path:
    """A copy of run ``src`` as if it had stopped after its checkpoint of ``step``."""
    shutil.copytree(src, dst)
    tag = f"step_{step:08d}"
    for d in (dst / "checkpoints").glob("step_*"):
        if d.name > tag:
            shutil.rmtree(d)
    (dst / "checkpoints/latest").write_text(tag + "\n")
    return dst / "checkpoints" / tag


def assert_continues(out: Path, reference: Path, steps, atol=ATOL):
    got, want = logged(out), logged(reference)
    for s in steps:
        assert got[s] == pytest.approx(want[s], abs=atol), s
    got_lr, want_lr = logged(out, "train/lr"), logged(reference, "train/lr")
    assert [got_lr[s] for s in steps] == pytest.approx([want_lr[s] for s in steps], rel=1e-9)


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_fewer_and_more_ranks(prepared_data, tokenizer_dir, token_shards, tmp_path, stage, capsys):
    ref2, ref1 = tmp_path / "ref2", tmp_path / "ref1"
    two_ranks(prepared_data, tokenizer_dir, ref2, stage)
    one_rank(prepared_data, tokenizer_dir, ref1, stage, train__gradient_accumulation_steps=2)

    # 2 ranks -> 1: the config asks for no accumulation; the checkpoint's global batch of 16 is kept
    down = tmp_path / "down"
    tag = cut_back(ref2, down, 2)
    capsys.readouterr()
    summary = one_rank(prepared_data, tokenizer_dir, down, stage)
    said = capsys.readouterr().out
    assert (f"step_00000002 was written with ZeRO-{stage} on 2 rank(s) and resumes with ZeRO-{stage} on 1 rank(s) "
            "through DeepSpeed's universal checkpoint") in said
    assert "train.gradient_accumulation_steps 1 -> 2 keeps its global batch of 16 windows" in said
    assert summary["resumed_from_step"] == 2 and summary["world_size"] == 1 and summary["final_step"] == STEPS
    assert (tag / "universal" / "zero").is_dir() and not (tag / ".universal.partial").exists()
    assert_continues(down, ref2, range(3, STEPS + 1))
    assert logged(down, "eval/loss")[STEPS] == pytest.approx(logged(ref2, "eval/loss")[STEPS], abs=ATOL)
    state = json.loads((down / f"checkpoints/step_{STEPS:08d}/train_state.json").read_text())
    assert (state["world_size"], state["zero_stage"], state["global_batch"]) == (1, stage, 16)
    assert summary["tokens_seen"] == STEPS * 16 * 64

    # a second resume with no change (1 rank again, from the converted run's own step 4) is bit-exact
    again = tmp_path / "again"
    tag4 = cut_back(down, again, 4)
    capsys.readouterr()
    summary = one_rank(prepared_data, tokenizer_dir, again, stage)
    assert "universal" not in capsys.readouterr().out and not (tag4 / "universal").exists()
    assert summary["resumed_from_step"] == 4
    assert [logged(again)[s] for s in (5, 6)] == [logged(down)[s] for s in (5, 6)]

    # 2 ranks -> 1 with the optimizer offloaded to the host (DeepSpeedCPUAdam: a C++ op built once, ~2 min)
    from deepspeed.ops.op_builder import CPUAdamBuilder

    if CPUAdamBuilder().is_compatible():
        offload = tmp_path / "offload"
        cut_back(ref2, offload, 2)
        train(tiny_cfg(prepared_data, tokenizer_dir, offload, **{**RUN, "train__ds_config": str(
            ROOT / f"ds_configs/zero{stage}_offload.json")}))
        assert_continues(offload, ref2, range(3, STEPS + 1))

    # 2 ranks under this stage -> 1 under the other (ZeRO-2 <-> ZeRO-3): the same universal checkpoint; and -> 1
    # without ZeRO (a stage-0 checkpoint made from it)
    for other in (3 if stage == 2 else 2, 0):
        across = tmp_path / f"across{other}"
        tag = cut_back(ref2, across, 2)
        capsys.readouterr()
        one_rank(prepared_data, tokenizer_dir, across, other)
        said = capsys.readouterr().out
        assert f"written with ZeRO-{stage} on 2 rank(s) and resumes with ZeRO-{other} on 1 rank(s)" in said
        assert (tag / "zero0").is_dir() == (other == 0)
        assert_continues(across, ref2, range(3, STEPS + 1))

    # 2 ranks without ZeRO -> 1 under this stage: the plain AdamW state laid out as a universal checkpoint
    ref0, from0 = tmp_path / "ref0", tmp_path / "from0"
    two_ranks(prepared_data, tokenizer_dir, ref0, 0)
    cut_back(ref0, from0, 2)
    one_rank(prepared_data, tokenizer_dir, from0, stage)
    assert_continues(from0, ref0, range(3, STEPS + 1))

    # 1 rank -> 2
    up = tmp_path / "up"
    tag = cut_back(ref1, up, 2)
    summary = two_ranks(prepared_data, tokenizer_dir, up, stage)
    assert "resumes with ZeRO-%d on 2 rank(s)" % stage in summary["stdout"]
    assert summary["resumed_from_step"] == 2 and summary["world_size"] == 2
    assert (tag / "universal").is_dir()
    assert_continues(up, ref1, range(3, STEPS + 1))


def test_a_damaged_conversion_says_what_resumes_the_step(prepared_data, tokenizer_dir, token_shards, tmp_path):
    """A step's universal/ conversion that does not load is not the step: the message says the step is intact and
    names what works (its own layout, or the conversion made again), never --resume none; and both ways resume."""
    from openllm_ds.errors import ConfigError

    ref = tmp_path / "ref"
    one_rank(prepared_data, tokenizer_dir, ref, 2, train__max_steps=2)  # ZeRO-2 on 1 rank: step 2
    converted = tmp_path / "converted"
    cut_back(ref, converted, 2)
    one_rank(prepared_data, tokenizer_dir, converted, 3, train__max_steps=3)  # under ZeRO-3: converts step 2
    damaged = tmp_path / "damaged"
    tag = cut_back(converted, damaged, 2)
    assert (tag / "universal" / "zero").is_dir()
    for f in (tag / "universal").rglob("*.pt"):
        f.write_bytes(f.read_bytes()[:20])  # every file of the conversion truncated; the step's own files intact
    with pytest.raises(ConfigError) as e:
        one_rank(prepared_data, tokenizer_dir, damaged, 3, train__max_steps=3)
    said = str(e.value)
    assert f"could not load {tag / 'universal'}, the conversion of {tag} to this run's layout" in said
    assert f"the step itself is intact and openllm-ds made that conversion: delete {tag / 'universal'}" in said
    assert "resume it as it was written, with --ds_config ds_configs/zero2.json on 1 rank(s)" in said
    assert "--resume none" not in said
    own = tmp_path / "own"  # as it was written: the damaged conversion is not used
    shutil.copytree(damaged, own)
    assert one_rank(prepared_data, tokenizer_dir, own, 2, train__max_steps=3)["resumed_from_step"] == 2
    shutil.rmtree(tag / "universal")  # converted again on the next resume
    assert one_rank(prepared_data, tokenizer_dir, damaged, 3, train__max_steps=3)["resumed_from_step"] == 2


def test_ray_train_resumes_on_fewer_workers(prepared_data, tokenizer_dir, token_shards, tmp_path):
    """`--num_workers 2`, then the same job with `--num_workers 1`; the reference goes on with 2 ranks."""
    from openllm_ds.train import launch

    out = tmp_path / "ray"
    cfg = dict(train__ds_config=str(ROOT / "ds_configs/zero2.json"), **{**RUN, "train__max_steps": 4})
    first = launch(tiny_cfg(prepared_data, tokenizer_dir, out, train__num_workers=2, **cfg))
    assert first["world_size"] == 2 and first["final_step"] == 4
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    flags = train_flags(prepared_data, tokenizer_dir, reference, "zero2", max_steps=STEPS)
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "openllm_ds", "train", *flags, "train.save_every=2", "train.eval_every=2", "train.keep_last=3"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    summary = launch(tiny_cfg(prepared_data, tokenizer_dir, out, train__num_workers=1, **{**cfg, "train__max_steps": STEPS}))
    assert summary["world_size"] == 1 and summary["resumed_from_step"] == 4 and summary["final_step"] == STEPS
    assert (out / "checkpoints/step_00000004/universal").is_dir()
    assert_continues(out, reference, (5, 6))


@pytest.mark.parametrize("source", ["hf", "run", "run/checkpoints/step_00000150", "llama-shards"])
def test_init_from_trained_weights(trained_export, prepared_data, tokenizer_dir, token_shards, tmp_path, source, capsys):
    """A new run (step 0, its own optimizer and schedule) from an HF export of ours, a training output, one of its
    step dirs, or a Llama checkpoint as transformers saves one (in safetensors shards, no tokenizer.model): with a
    learning rate of 1e-9, one step leaves the source's weights as they were."""
    hf, model = trained_export
    path = hf.parent / source
    if source == "llama-shards":
        from transformers import LlamaForCausalLM

        path = tmp_path / "llama"
        LlamaForCausalLM.from_pretrained(hf).save_pretrained(path, max_shard_size="300KB")
        assert (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").exists()
    shape = {f"model__{k}": v for k, v in TRAINED_SHAPE.items()}
    cfg = tiny_cfg(prepared_data, tokenizer_dir, tmp_path / "warm", train__init_from=str(path), train__max_steps=1,
                   train__learning_rate=1e-9, train__warmup_steps=0, train__eval_every=1, train__save_every=1,
                   model__tie_embeddings=True, **shape)
    summary = train(cfg)
    assert f"starting from the weights of {path} (train.init_from): step 0" in capsys.readouterr().out
    assert summary["final_step"] == 1 and summary["resumed_from_step"] is None
    warm = load_model(tmp_path / "warm").model.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(warm[name], tensor, rtol=0, atol=1e-6)
    # trained weights: the first step's loss is far below the ~9.0 (ln 8000) of a fresh model
    assert summary["train_loss"] < 7.0
