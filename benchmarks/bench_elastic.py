"""Resume on another number of ranks: how long the universal-checkpoint conversion and its load take.

    PYTHONPATH=. python benchmarks/bench_elastic.py [--preset small] [--stages 2,3]

For each ZeRO stage: two gloo ranks (DeepSpeed's launcher running this script with --write) build the
preset's model with openllm_ds.train's engine, train one step on random ids and save a checkpoint as
training does; then one rank here converts it with the trainer's own path (DeepSpeed's ds_to_universal,
into the step's universal/ dir) and loads it into a fresh one-rank engine through checkpoint.load_universal.
The step is short (micro batch 1, 64 tokens): the conversion's cost depends on the parameters and the
optimizer state only.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openllm_ds.config import load_run_config  # noqa: E402
from openllm_ds.train.checkpointing import TrainState, load_checkpoint, save_checkpoint  # noqa: E402
from openllm_ds.train.elastic import convert_to_universal  # noqa: E402
from openllm_ds.train.distributed import init_distributed  # noqa: E402
from openllm_ds.train.ds_config import build_ds_config  # noqa: E402
from openllm_ds.train.loop import build_engine, train_step  # noqa: E402
from openllm_ds.train.preflight import RunInputs  # noqa: E402

TAG = "step_00000001"


def run_config(preset: str, stage: int, out: Path):
    cfg = load_run_config(str(ROOT / f"configs/{preset}.yaml"), {
        "train.ds_config": str(ROOT / f"ds_configs/zero{stage}.json"), "train.micro_batch_size": 1,
        "train.gradient_accumulation_steps": 1, "train.output_dir": str(out), "model.max_seq_len": 64,
        "model.dropout": 0.0, "train.precision": "fp32"})
    return cfg


def engine_for(cfg, env):
    ds = build_ds_config(cfg, env.world_size, env.device)
    ds.pop("tensorboard", None)  # no DeepSpeed monitor while timing (the shipped JSONs have none)
    return build_engine(cfg, RunInputs(None, ds, "fp32", None), env)[0]


def write(preset: str, stage: int, out: Path) -> None:
    """One rank of the two: one step, then the checkpoint."""
    env = init_distributed()
    cfg = run_config(preset, stage, out)
    engine = engine_for(cfg, env)
    g = torch.Generator().manual_seed(env.rank)
    ids = torch.randint(0, cfg.model.vocab_size, (1, 65), generator=g)
    train_step(engine, [(ids[:, :-1], ids[:, 1:])], env, stage, "fp32")
    save_checkpoint(engine, cfg, TrainState(step=1), env, stage)  # as training does: DeepSpeed's files + weights


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench(preset: str, stage: int, work: Path) -> dict:
    out = work / f"zero{stage}"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(Path(__file__).resolve()), "--write", str(out), "--preset", preset, "--stages", str(stage)]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"the two-rank writer failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    tag_dir = out / "checkpoints" / TAG
    env = init_distributed()
    cfg = run_config(preset, stage, out)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, gradient_accumulation_steps=2))
    t0 = time.perf_counter()
    universal = convert_to_universal(tag_dir, env, cfg.model)
    convert_s = time.perf_counter() - t0
    engine = engine_for(cfg, env)
    t0 = time.perf_counter()
    load_checkpoint(engine, tag_dir, env, universal=True, model_cfg=cfg.model)
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in engine.module.parameters()) if stage != 3 else \
        sum(p.ds_numel for p in engine.module.parameters())
    return {"stage": stage, "params": params, "checkpoint_mb": size_mb(tag_dir) - size_mb(universal),
            "universal_mb": size_mb(universal), "convert_s": convert_s, "load_s": load_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--stages", default="2,3")
    p.add_argument("--write", default=None, help=argparse.SUPPRESS)  # one rank of the two-rank writer
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # what the deepspeed launcher passes
    args = p.parse_args(argv)
    if args.write:
        write(args.preset, int(args.stages), Path(args.write))
        return 0
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)  # its load notes go to stdout, which is the results table
    work = Path(tempfile.mkdtemp(prefix="bench-elastic-"))
    try:
        rows = [bench(args.preset, int(s), work) for s in args.stages.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.preset} preset, a checkpoint of 2 gloo ranks resumed on 1 ({torch.get_num_threads()} threads):\n")
    print("| ZeRO stage | params | checkpoint (MB) | universal (MB) | conversion (s) | load on 1 rank (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['params']:,} | {r['checkpoint_mb']:.0f} | {r['universal_mb']:.0f} | "
              f"{r['convert_s']:.1f} | {r['load_s']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
