"""DeepSpeed config generation, the batch triplet, the schedule, parameter groups and batch sampling."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from openllm_ds.config import ModelConfig
from openllm_ds.errors import ConfigError
from openllm_ds.model import Transformer
from openllm_ds.train import build_ds_config
from openllm_ds.train.data import DataPosition, EvalWindows, TrainBatches
from openllm_ds.train.distributed import DistEnv
from openllm_ds.train.optim import WarmupCosine, param_groups

from helpers import run_cfg

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "ds_configs").glob("*.json"))


def write_json(tmp_path, obj, name="ds.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


def test_every_shipped_ds_config_resolves_without_auto_left():
    names = {p.stem for p in SHIPPED}
    assert names == {"zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"}
    for path in SHIPPED:
        raw = json.loads(path.read_text())
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping"):
            assert raw[key] == "auto", (path.name, key)
        assert raw["optimizer"]["params"]["lr"] == "auto" and raw["fp16"]["enabled"] == "auto"
        for device in ("cpu", "cuda"):
            ds = build_ds_config(run_cfg(path), world_size=2, device=device)
            assert "auto" not in json.dumps(ds), (path.name, device)
            assert ds["zero_optimization"]["stage"] == int(path.stem[4])


def test_auto_values_come_from_the_run_config():
    cfg = run_cfg(ROOT / "ds_configs/zero3.json", train__micro_batch_size=4, train__gradient_accumulation_steps=3,
                  train__learning_rate=1e-3, train__beta2=0.98, train__weight_decay=0.05, train__grad_clip=0.5)
    ds = build_ds_config(cfg, world_size=2, device="cpu")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (24, 4, 3)
    assert ds["gradient_clipping"] == 0.5
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW"
    assert (params["lr"], params["betas"], params["weight_decay"]) == (1e-3, [0.9, 0.98], 0.05)
    assert params["torch_adam"] is True  # no FusedAdam JIT build on CPU
    assert ds["fp16"]["enabled"] is False and ds["bf16"]["enabled"] is False
    zero = ds["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) \
        == (64 * 64, int(0.9 * 64 * 64), 640)
    assert "tensorboard" not in ds  # the trainer writes the run's TensorBoard; DeepSpeed's monitor stays off


def test_a_deepspeed_monitor_turned_on_writes_a_run_of_its_own(tmp_path):
    cfg = run_cfg(ROOT / "ds_configs/zero2.json")
    base = json.loads((ROOT / "ds_configs/zero2.json").read_text())
    for enabled, want in (("auto", False), (True, True)):
        cfg_file = tmp_path / f"ds-{enabled}.json"
        cfg_file.write_text(json.dumps({**base, "tensorboard": {"enabled": enabled, "output_path": "auto",
                                                                "job_name": "auto"}}))
        ds = build_ds_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ds_config=str(cfg_file))),
                             world_size=1, device="cpu")
        assert ds["tensorboard"] == {"enabled": want, "output_path": "/tmp/run-x/tensorboard", "job_name": "deepspeed"}


def test_precision_resolution():
    z2 = ROOT / "ds_configs/zero2.json"
    gpu = build_ds_config(run_cfg(z2), 1, "cuda")
    assert gpu["fp16"]["enabled"] is True and gpu["fp16"]["loss_scale"] == 0 and gpu["bf16"]["enabled"] is False
    assert gpu["optimizer"]["params"]["torch_adam"] is True  # torch's fused AdamW: no FusedAdam build (nvcc)
    # contiguous gradient buffer: against GPU memory fragmentation; on a CPU only a copy
    assert gpu["zero_optimization"]["contiguous_gradients"] is True
    assert build_ds_config(run_cfg(z2), 1, "cpu")["zero_optimization"]["contiguous_gradients"] is False
    bf16 = build_ds_config(run_cfg(z2, train__precision="bf16"), 1, "cuda")
    assert bf16["bf16"]["enabled"] is True and bf16["fp16"]["enabled"] is False
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a CUDA GPU"):
        build_ds_config(run_cfg(z2, train__precision="fp16"), 1, "cpu")
    offload = build_ds_config(run_cfg(ROOT / "ds_configs/zero2_offload.json"), 1, "cpu")
    assert "torch_adam" not in offload["optimizer"]["params"]  # offload keeps DeepSpeedCPUAdam


def test_impossible_batch_triplet_names_the_key(tmp_path):
    base = json.loads((ROOT / "ds_configs/zero2.json").read_text())
    p = write_json(tmp_path, {**base, "train_batch_size": 30})
    with pytest.raises(ConfigError, match=r"train_batch_size=30 is impossible .* multiple of .* = 16"):
        build_ds_config(run_cfg(p, train__micro_batch_size=8), world_size=2, device="cpu")
    p = write_json(tmp_path, {**base, "train_batch_size": 32})
    with pytest.raises(ConfigError, match=r"train_batch_size=32 disagrees .* gives 16"):
        build_ds_config(run_cfg(p, train__micro_batch_size=8), world_size=2, device="cpu")
    assert build_ds_config(run_cfg(p, train__micro_batch_size=8, train__gradient_accumulation_steps=2), 2, "cpu")[
        "train_batch_size"] == 32
    p = write_json(tmp_path, {**base, "train_micro_batch_size_per_gpu": 4})
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=4 disagrees .*train.micro_batch_size"):
        build_ds_config(run_cfg(p, train__micro_batch_size=8), world_size=1, device="cpu")


def test_bad_ds_config_files(tmp_path):
    with pytest.raises(ConfigError, match=r"train.ds_config .*nope.json does not exist"):
        build_ds_config(run_cfg(tmp_path / "nope.json"), 1, "cpu")
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": "auto",')
    with pytest.raises(ConfigError, match=r"train.ds_config .*bad.json is not valid JSON"):
        build_ds_config(run_cfg(bad), 1, "cpu")
    p = write_json(tmp_path, {"zero_optimization": {"stage": 2, "round_robin_gradients": "auto"}})
    with pytest.raises(ConfigError, match=r"zero_optimization.round_robin_gradients"):
        build_ds_config(run_cfg(p), 1, "cpu")
    p = write_json(tmp_path, {"fp16": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"fp16.enabled=True contradicts train.precision=auto"):
        build_ds_config(run_cfg(p), 1, "cpu")


def test_heads_must_divide_d_model():
    with pytest.raises(ConfigError, match=r"model.n_heads \(5\) must divide model.d_model \(64\)"):
        run_cfg(ROOT / "ds_configs/zero2.json", model__n_heads=5)


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup_steps=10, max_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    # halfway through the decay the cosine is at the mean of 1 and min_ratio
    assert f(10 + 99 // 2) == pytest.approx(0.55, abs=0.02)
    assert f(109) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))
    assert WarmupCosine(0, 5, 0.0)(0) == pytest.approx(1.0)


def test_param_groups_decay_matrices_only():
    model = Transformer(ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16))
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    # 2 norms per layer + the final norm; the tied embedding appears once
    assert len(no_decay["params"]) == 5
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


def test_one_rank_with_accumulation_sees_the_global_batch_of_two_ranks():
    tokens = np.arange(10_000, dtype=np.int64)  # token i == i, so a row names its window
    T = 16
    one = TrainBatches([tokens], [1.0], T, micro_batch=4, grad_accum=2, env=DistEnv(0, 0, 1, "cpu"), seed=7)
    two = [TrainBatches([tokens], [1.0], T, micro_batch=4, grad_accum=1, env=DistEnv(r, r, 2, "cpu"), seed=7)
           for r in (0, 1)]
    pos1 = pos2 = DataPosition.start(1)
    for _ in range(3):
        mb1, pos1, taken = one.next_batch(pos1)
        rank_batches = [b.next_batch(pos2) for b in two]
        pos2 = rank_batches[0][1]
        assert pos1 == pos2 and taken == [8]
        rows1 = torch.cat([x for x, _ in mb1])
        rows2 = torch.cat([mb[0][0] for mb, _, _ in rank_batches])
        assert torch.equal(rows1, rows2)
        x, y = mb1[0]
        assert x.shape == (4, T) and torch.equal(y[:, :-1], x[:, 1:])  # targets are inputs shifted by one
        assert torch.all(x[:, 0] % T == 0)  # windows start at multiples of max_seq_len


def test_batches_cover_an_epoch_without_repeats_and_resume_from_a_position():
    tokens = np.arange(16 * 50 + 1, dtype=np.int64)
    b = TrainBatches([tokens], [1.0], 16, micro_batch=4, grad_accum=3, env=DistEnv(0, 0, 1, "cpu"), seed=3)
    assert b.num_windows == [50] and b.steps_per_epoch == 4
    pos, starts = DataPosition.start(1), []
    for _ in range(4):
        mbs, pos, _ = b.next_batch(pos)
        starts += [int(x[i, 0]) // 16 for x, _ in mbs for i in range(x.size(0))]
    assert len(set(starts)) == 48  # no window twice within an epoch (2 left over)
    mbs, after, _ = b.next_batch(pos)
    assert after == DataPosition([[1, 12, 60]])  # the 5th step starts epoch 1
    again, _, _ = TrainBatches([tokens], [1.0], 16, 4, 3, DistEnv(0, 0, 1, "cpu"), seed=3).next_batch(pos)
    assert all(torch.equal(a[0], c[0]) for a, c in zip(mbs, again))
    other, _, _ = TrainBatches([tokens], [1.0], 16, 4, 3, DistEnv(0, 0, 1, "cpu"), seed=4).next_batch(DataPosition.start(1))
    first, _, _ = b.next_batch(DataPosition.start(1))
    assert not torch.equal(other[0][0], first[0][0])


def test_a_mixture_keeps_every_source_within_one_window_of_its_weight():
    """Three sources weighted 5:3:2 (source k's token i is 100000 k + i, so a row names its source and window):
    each step's slots follow the largest lag; each source's own order has no repeat within its epoch; the
    global batch is the same whether one rank accumulates or three ranks split it."""
    T = 8
    sources = [np.arange(T * n + 1, dtype=np.int64) + 100_000 * k for k, n in enumerate((40, 30, 9))]
    weights = [0.5, 0.3, 0.2]
    one = TrainBatches(sources, weights, T, micro_batch=5, grad_accum=3, env=DistEnv(0, 0, 1, "cpu"), seed=1)
    three = [TrainBatches(sources, weights, T, micro_batch=5, grad_accum=1, env=DistEnv(r, r, 3, "cpu"), seed=1)
             for r in range(3)]
    pos = DataPosition.start(3)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for step in range(1, 9):
        mbs, after, taken = one.next_batch(pos)
        rows = torch.cat([x for x, _ in mbs])
        split = torch.cat([b.next_batch(pos)[0][0][0] for b in three])
        assert torch.equal(rows, split)
        assert sum(taken) == 15 and [p[2] for p in after.sources] == [a + t for a, t in
                                                                        zip([p[2] for p in pos.sources], taken)]
        for k, w in enumerate(weights):
            assert abs(after.sources[k][2] - w * 15 * step) < 1  # within one window of the weight
        for r in rows[:, 0].tolist():
            seen[r // 100_000].append((r % 100_000) // T)
        pos = after
    first_repeat = next(i for i, w in enumerate(seen[0]) if w in seen[0][:i])
    assert len(seen[0]) == 60 and 40 - 9 <= first_repeat <= 40  # no repeat until the epoch's last partial take
    assert after.sources[2][0] >= 1  # the small source (9 windows) is in a later epoch
    # resuming from a saved position continues the same sequence
    again = TrainBatches(sources, weights, T, 5, 3, DistEnv(0, 0, 1, "cpu"), seed=1)
    assert torch.equal(torch.cat([x for x, _ in again.next_batch(pos)[0]]),
                       torch.cat([x for x, _ in one.next_batch(pos)[0]]))


def test_eval_windows_split_evenly_across_ranks():
    tokens = np.arange(32 * 100 + 1, dtype=np.int64)
    shares = [EvalWindows(tokens, 32, num_requested=7, micro_batch=2, env=DistEnv(r, r, 2, "cpu")) for r in (0, 1)]
    assert len(shares[0].windows) == 6  # rounded down to a multiple of the world size
    seen = [int(x[i, 0]) // 32 for w in shares for x, _ in w.batches() for i in range(x.size(0))]
    assert sorted(seen) == [0, 16, 33, 50, 66, 83]
    assert [sum(x.size(0) for x, _ in w.batches()) for w in shares] == [3, 3]


def test_ids_past_the_vocabulary_stop_the_run_naming_the_shards(tmp_path):
    """Shard bytes changed after they were written (same size, so meta.json's counts still agree): the batch
    holding them stops the run with a DataError naming the shards dir, not an IndexError in the embedding."""
    from openllm_ds.errors import DataError
    from openllm_ds.tokenizer import TokenShards

    from helpers import write_shards

    write_shards(tmp_path, np.arange(16 * 10 + 1) % 90, [], 100)
    raw = np.fromfile(tmp_path / "shard_00000.bin", dtype="<u2")
    raw[40] = 4000  # within uint16, past the vocabulary of 100
    raw.tofile(tmp_path / "shard_00000.bin")
    shards = TokenShards(tmp_path)
    b = TrainBatches([shards], [1.0], 16, micro_batch=10, grad_accum=1, env=DistEnv(0, 0, 1, "cpu"), seed=0)
    with pytest.raises(DataError, match=rf"token shards {tmp_path} hold id 4000, past the vocabulary of 100: .*tokenize "
                                        r"again"):
        b.next_batch(DataPosition.start(1))
