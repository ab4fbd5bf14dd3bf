"""Several ranks: the deepspeed launcher (2 gloo ranks, ZeRO-2 and ZeRO-3), Ray Train workers, ZeRO-Offload.

Each multi-rank run trains micro 8 x 1 accumulation step x 2 ranks and must log the same per-step
losses as one rank with micro 8 x 2 accumulation steps on the same 16 windows per step: only the
order of float additions differs (gradient averaging over ranks vs over micro batches), which
stays far inside rtol 1e-5 over these few steps.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openllm_ds.checkpoint import load_model
from openllm_ds.train import launch, train
from openllm_ds.train.launch import printed_summary

from helpers import DISTRIBUTED_STEPS as STEPS, free_port, logged, tiny_cfg, train_flags

ROOT = Path(__file__).resolve().parents[2]
RTOL = 1e-5
COMMON = dict(train__max_steps=STEPS, train__eval_every=3, train__save_every=3, train__warmup_steps=2,
              train__micro_batch_size=8)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_rank(token_shards, prepared_data, tokenizer_dir, tmp_path_factory):
    """The reference: one rank, 2 accumulation steps."""
    out = tmp_path_factory.mktemp("one-rank")
    summary = train(tiny_cfg(prepared_data, tokenizer_dir, out, train__gradient_accumulation_steps=2, **COMMON))
    return out, summary


def assert_same_losses(out, reference):
    got, want = logged(out), logged(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=RTOL), step
    assert logged(out, "eval/loss") == pytest.approx(logged(reference, "eval/loss"), rel=RTOL)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_under_the_deepspeed_launcher_match_one_rank(one_rank, prepared_data, tokenizer_dir, tmp_path, stage):
    reference, ref_summary = one_rank
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "openllm_ds", "train", *train_flags(prepared_data, tokenizer_dir, out, f"zero{stage}")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = printed_summary(r.stdout)
    assert summary["world_size"] == 2 and summary["zero_stage"] == stage and summary["final_step"] == STEPS
    assert summary["tokens_seen"] == ref_summary["tokens_seen"]
    assert_same_losses(out, reference)

    # ZeRO-3 partitions every weight across the ranks; the consolidated file still holds them whole
    ours, ref = load_model(out), load_model(reference)
    assert ours.step == STEPS
    for name, tensor in ref.model.state_dict().items():
        assert ours.model.state_dict()[name].shape == tensor.shape and tensor.numel() > 0
        torch.testing.assert_close(ours.model.state_dict()[name], tensor, rtol=1e-4, atol=2e-5)


def test_ray_train_workers_match_one_rank_and_resume(one_rank, prepared_data, tokenizer_dir, tmp_path):
    reference, ref_summary = one_rank
    out = tmp_path / "ray"
    cfg = tiny_cfg(prepared_data, tokenizer_dir, out, train__num_workers=2, **COMMON)
    summary = launch(cfg)
    assert summary["world_size"] == 2 and summary["final_step"] == STEPS
    assert summary["output_dir"] == str(out.resolve())
    assert_same_losses(out, reference)
    assert summary["val_loss"] == pytest.approx(ref_summary["val_loss"], rel=RTOL)

    # the same job submitted again with more steps continues from its latest checkpoint
    more = tiny_cfg(prepared_data, tokenizer_dir, out, train__num_workers=2, **{**COMMON, "train__max_steps": STEPS + 2})
    summary = launch(more)
    assert summary["resumed_from_step"] == STEPS and summary["final_step"] == STEPS + 2
    assert sorted(logged(out)) == list(range(1, STEPS + 3))
    assert load_model(out).step == STEPS + 2


def test_zero2_offload_matches_zero2(one_rank, prepared_data, tokenizer_dir, tmp_path):
    """ZeRO-Offload keeps the optimizer on the host with DeepSpeedCPUAdam (a C++ op DeepSpeed builds once,
    ~2 min on 2 cores, cached in ~/.cache/torch_extensions)."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    if not CPUAdamBuilder().is_compatible():
        pytest.skip("DeepSpeedCPUAdam cannot be built here (no C++ toolchain)")
    reference, _ = one_rank
    cfg = tiny_cfg(prepared_data, tokenizer_dir, tmp_path, train__gradient_accumulation_steps=2,
                   train__ds_config=str(ROOT / "ds_configs/zero2_offload.json"), **COMMON)
    train(cfg)
    assert_same_losses(tmp_path, reference)


def test_ray_job_submit_trains_on_a_real_head_and_resumes(one_rank, prepared_data, tokenizer_dir, tmp_path, ray_head):
    """`ray job submit --working-dir . -- python ray_jobs/train.py ...` as the README gives it, twice:
    the second job (more steps, same --output_dir) continues from the first one's latest checkpoint."""
    env, address = ray_head
    reference, _ = one_rank
    out = tmp_path / "job"
    for max_steps in (STEPS, STEPS + 2):
        cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
               "--", "python", "ray_jobs/train.py", "--num_workers", "2",
               *train_flags(prepared_data, tokenizer_dir, out, max_steps=max_steps)]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert "succeeded" in r.stdout
        summary = printed_summary(r.stdout)
        assert summary["world_size"] == 2 and summary["final_step"] == max_steps
    assert summary["resumed_from_step"] == STEPS
    got, want = logged(out), logged(reference)
    assert sorted(got) == list(range(1, STEPS + 3))
    assert [got[s] for s in range(1, STEPS + 1)] == pytest.approx([want[s] for s in range(1, STEPS + 1)], rel=RTOL)
    assert load_model(out).step == STEPS + 2


def test_ray_train_across_two_nodes(one_rank, prepared_data, tokenizer_dir, tmp_path, monkeypatch):
    """Two Ray nodes on this machine (Ray's own cluster utilities), one CPU each: the two 1-CPU workers
    cannot share a node, so the run spans both, and still matches one rank."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        reference, _ = one_rank
        summary = launch(tiny_cfg(prepared_data, tokenizer_dir, tmp_path, train__num_workers=2, **COMMON))
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2 and all(n["Resources"]["CPU"] == 1 for n in nodes)
        assert summary["world_size"] == 2 and summary["final_step"] == STEPS
        assert_same_losses(tmp_path, reference)
    finally:
        ray.shutdown()
        cluster.shutdown()
