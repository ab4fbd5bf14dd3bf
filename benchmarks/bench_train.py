"""Training throughput and MFU on this machine: our DeepSpeed step vs plain PyTorch vs transformers' Llama.

    PYTHONPATH=. python benchmarks/bench_train.py [--presets tiny,small] [--steps 8] [--rounds 3]

For each preset (configs/<preset>.yaml: model shape, micro batch, context) the same optimizer step
(AdamW, warmup-cosine schedule, clipping 1.0, fp32) is timed four ways on random token ids:
  deepspeed-zeroN   openllm_ds.train's engine and train_step with the preset's ds_config
  deepspeed-zero0   the same without ZeRO
  pytorch           our Transformer in a plain PyTorch loop (no DeepSpeed)
  hf-llama          transformers' LlamaForCausalLM of the same shape (export.hf_map.to_hf_config)
Variants run interleaved for ``--rounds`` rounds (this machine's neighbours make single timings
noisy); the per-step time of a variant is its median. MFU = 6N+12LdT FLOPs per token x tokens/s
over the fp32 ``torch.mm`` peak measured in this run (best of a 4096^3 product, before and after).

Targets: DeepSpeed overhead <= 5% over plain PyTorch; >= 1.2x the tokens/s of hf-llama.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openllm_ds.config import load_run_config  # noqa: E402
from openllm_ds.export.hf_map import to_hf_config  # noqa: E402
from openllm_ds.model import Transformer  # noqa: E402
from openllm_ds.train.distributed import init_distributed  # noqa: E402
from openllm_ds.train.ds_config import build_ds_config, zero_stage  # noqa: E402
from openllm_ds.train.loop import build_engine, train_step  # noqa: E402
from openllm_ds.train.metrics import flops_per_token, measure_matmul_peak  # noqa: E402
from openllm_ds.train.optim import build_lr_scheduler, param_groups  # noqa: E402
from openllm_ds.train.preflight import RunInputs  # noqa: E402


def random_batches(cfg, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = cfg.train
    shape = (t.micro_batch_size, cfg.model.max_seq_len + 1)
    for _ in range(steps):
        rows = [torch.randint(0, cfg.model.vocab_size, shape, generator=g) for _ in range(t.gradient_accumulation_steps)]
        yield [(r[:, :-1], r[:, 1:]) for r in rows]


class PlainStep:
    """One optimizer step of a model in a plain PyTorch loop, with the trainer's optimizer settings."""

    def __init__(self, model, cfg, loss_fn):
        t = cfg.train
        self.model, self.loss_fn, self.clip = model.train(), loss_fn, t.grad_clip
        self.opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.learning_rate, betas=(t.beta1, t.beta2),
                                     eps=1e-8)
        self.sched = build_lr_scheduler(t.warmup_steps, t.max_steps, t.min_lr_ratio)(self.opt)

    def __call__(self, micro_batches) -> float:
        total = 0.0
        for x, y in micro_batches:
            loss = self.loss_fn(self.model, x, y)
            (loss / len(micro_batches)).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return total / len(micro_batches)


def ours_loss(model, x, y):
    return model(x, y)[1]


def hf_loss(model, x, y):
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


def build_variants(cfg, env, ds_configs: list[str]):
    variants = {}
    for path in ds_configs:
        run = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ds_config=path))
        ds = build_ds_config(run, env.world_size, env.device)
        ds["tensorboard"]["enabled"] = False
        engine = build_engine(run, RunInputs(None, ds, "fp32", None), env)
        stage = zero_stage(ds)
        variants[f"deepspeed-zero{stage}"] = (lambda mb, e=engine, s=stage: train_step(e, mb, env, s, "fp32")[0])
    torch.manual_seed(cfg.train.seed)
    variants["pytorch"] = PlainStep(Transformer(cfg.model), cfg, ours_loss)
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = to_hf_config(cfg.model)
    hf_cfg.pop("torch_dtype", None)
    torch.manual_seed(cfg.train.seed)
    hf = LlamaForCausalLM(LlamaConfig(**hf_cfg, attn_implementation="sdpa"))
    variants["hf-llama"] = PlainStep(hf, cfg, hf_loss)
    return variants


def bench_preset(preset: str, args, env, peak: float) -> list[dict]:
    overrides = {"train.max_steps": 1000, "train.warmup_steps": 10}
    if args.micro_batch_size:
        overrides["train.micro_batch_size"] = args.micro_batch_size
    overrides["train.gradient_accumulation_steps"] = args.grad_accum
    cfg = load_run_config(ROOT / f"configs/{preset}.yaml", overrides)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.0))
    ds_configs = [str(ROOT / cfg.train.ds_config)]
    if zero_stage(json.loads(Path(ds_configs[0]).read_text())) != 0:
        ds_configs.append(str(ROOT / "ds_configs/zero0.json"))
    variants = build_variants(cfg, env, ds_configs)
    tokens = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * cfg.model.max_seq_len
    num_params = Transformer(cfg.model).num_params()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, step in variants.items():  # warm-up: allocator, thread pools, first-step optimizer state
        for mb in random_batches(cfg, args.warmup, seed=1):
            step(mb)
    for r in range(args.rounds):
        for name, step in variants.items():
            for mb in random_batches(cfg, args.steps, seed=100 + r):
                t0 = time.perf_counter()
                loss = step(mb)
                times[name].append(time.perf_counter() - t0)
            assert math.isfinite(loss), (name, loss)
    rows = []
    flops_tok = flops_per_token(cfg.model, num_params)
    for name, ts in times.items():
        step_s = statistics.median(ts)
        tps = tokens / step_s
        rows.append({"preset": preset, "variant": name, "params": num_params, "tokens_per_step": tokens,
                     "step_s": step_s, "tokens_per_sec": tps, "mfu": flops_tok * tps / peak})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro_batch_size", type=int, default=None, help="override the presets' micro batch")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--output", default=str(ROOT / "benchmarks/out/train.json"))
    args = p.parse_args(argv)

    env = init_distributed()
    peak_before = measure_matmul_peak(env.torch_device, n=4096, repeats=3)
    rows = []
    for preset in args.presets.split(","):
        rows += bench_preset(preset.strip(), args, env, peak_before)
    peak = max(peak_before, measure_matmul_peak(env.torch_device, n=4096, repeats=3))
    for r in rows:
        r["mfu"] = r["mfu"] * peak_before / peak

    print(f"\nfp32 torch.mm peak (4096^3, best of 3, before/after): {peak_before / 1e9:.1f} / {peak / 1e9:.1f} GFLOP/s; "
          f"{torch.get_num_threads()} threads\n")
    print("| preset | variant | params | tokens/step | step (s) | tokens/s | MFU | vs pytorch | vs hf-llama |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = {x["variant"]: x for x in rows if x["preset"] == r["preset"]}
        r["vs_pytorch"] = r["tokens_per_sec"] / base["pytorch"]["tokens_per_sec"]
        r["vs_hf_llama"] = r["tokens_per_sec"] / base["hf-llama"]["tokens_per_sec"]
        print(f"| {r['preset']} | {r['variant']} | {r['params']:,} | {r['tokens_per_step']:,} | {r['step_s']:.3f} | "
              f"{r['tokens_per_sec']:,.0f} | {100 * r['mfu']:.1f}% | {r['vs_pytorch']:.3f} | {r['vs_hf_llama']:.2f} |")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"peak_flops": peak, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
