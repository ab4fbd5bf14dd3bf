"""The benchmarks build their DeepSpeed engines from the shipped configs as training does, and take a step.

Their timings are not tested; what is tested is that a change to the run's DeepSpeed config reaches them too
(bench_train, bench_elastic and bench_finetune each build an engine of their own).
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_benchmark_engine_takes_a_step_from_the_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench_train, bench_elastic, bench_finetune = (importlib.import_module(m) for m in
                                                 ("bench_train", "bench_elastic", "bench_finetune"))
    from openllm_ds.train.distributed import init_distributed
    from openllm_ds.train.loop import train_step

    env = init_distributed()
    cfg = bench_elastic.run_config("tiny", 2, tmp_path / "run")  # tiny at 64 tokens, one sequence a step
    batch = next(iter(bench_train.random_batches(cfg, 1)))
    zero = [str(ROOT / f"ds_configs/zero{stage}.json") for stage in (2, 0)]
    losses = {name: step(batch) for name, step in bench_train.build_variants(cfg, env, zero).items()}
    losses["bench_elastic"] = train_step(bench_elastic.engine_for(cfg, env), batch, env, 2, "fp32")[0]
    losses["bench_finetune"] = bench_finetune.engine_step(cfg, env)(batch)
    assert set(losses) == {"deepspeed-zero2", "deepspeed-zero0", "pytorch", "hf-llama", "bench_elastic",
                           "bench_finetune"}
    for name, loss in losses.items():  # a first step on random ids: about ln(vocab)
        assert math.isfinite(loss) and abs(loss - math.log(cfg.model.vocab_size)) < 0.5, (name, loss)
