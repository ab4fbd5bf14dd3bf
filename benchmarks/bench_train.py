"""Training throughput and MFU on this machine: our DeepSpeed step vs plain PyTorch vs transformers' Llama.

    PYTHONPATH=. python benchmarks/bench_train.py [--presets tiny,small] [--steps 8] [--rounds 3]

For each preset (configs/<preset>.yaml: model shape, micro batch, context) the same optimizer step
(AdamW, warmup-cosine schedule, clipping 1.0, fp32) is timed four ways on random token ids:
  deepspeed-zeroN   openllm_ds.train's engine and train_step with the preset's ds_config
  deepspeed-zero0   the same without ZeRO
  pytorch           our Transformer in a plain PyTorch loop (no DeepSpeed)
  hf-llama          transformers' LlamaForCausalLM of the same shape (model.hf_map.to_hf_config)
Unless ``--no_compile``, also with train.compile (torch.compile through DeepSpeed's engine.compile()):
  deepspeed-zeroN+compile, pytorch+compile (its "vs pytorch" reference), hf-llama+compile (shown
  for reference; "vs hf-llama" is always against the eager model, transformers' default)
Variants take turns step by step for ``--rounds`` x ``--steps`` steps (this machine's neighbours make
single timings noisy); the per-step time of a variant is its median. MFU = 6N+12LdT FLOPs per token x tokens/s
over the fp32 ``torch.mm`` peak (a 4096^3 product, best of 2) timed after every turn of the variants
(median): the machine's drift hits the peak as it hits the steps.

Targets: DeepSpeed overhead <= 5% over plain PyTorch; >= 1.2x the tokens/s of hf-llama.

Also printed per preset, as the ceiling the MFU column can approach: the step's own weight GEMMs
alone (forward, input-gradient and weight-gradient products of every linear layer and the head, at
the preset's shapes, random data) as a fraction of the same peak.
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
from openllm_ds.model.hf_map import to_hf_config  # noqa: E402
from openllm_ds.model import Transformer  # noqa: E402
from openllm_ds.train.distributed import init_distributed  # noqa: E402
from openllm_ds.train.ds_config import build_ds_config, zero_stage  # noqa: E402
from openllm_ds.train.loop import build_engine, train_step  # noqa: E402
from openllm_ds.train.metrics import flops_per_token  # noqa: E402
from openllm_ds.train.optim import build_lr_scheduler, param_groups  # noqa: E402
from openllm_ds.train.preflight import RunInputs  # noqa: E402
from openllm_ds.utils import keep_freed_memory  # noqa: E402


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
    return model(x, y)


def hf_loss(model, x, y):
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


COMPILED = "+compile"
PEAK_N = 4096


def build_variants(cfg, env, ds_configs: list[str], compile: bool = False):
    variants = {}
    for path, compiled in [(p, False) for p in ds_configs] + [(ds_configs[0], True)] * compile:
        run = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ds_config=path, compile=compiled))
        ds = build_ds_config(run, env.world_size, env.device)
        ds.pop("tensorboard", None)  # no DeepSpeed monitor while timing (the shipped JSONs have none)
        engine, _ = build_engine(run, RunInputs(None, ds, "fp32", None), env)
        stage = zero_stage(ds)
        name = f"deepspeed-zero{stage}" + COMPILED * compiled
        variants[name] = (lambda mb, e=engine, s=stage: train_step(e, mb, env, s, "fp32")[0])
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = to_hf_config(cfg.model)
    hf_cfg.pop("torch_dtype", None)
    references = {"pytorch": (lambda: Transformer(cfg.model), ours_loss),
                  "hf-llama": (lambda: LlamaForCausalLM(LlamaConfig(**hf_cfg, attn_implementation="sdpa")), hf_loss)}
    # the compiled plain loop is the compiled step's "vs pytorch" reference; the compiled transformers
    # model is shown for reference only: "vs hf-llama" compares with the eager one, transformers' default
    for name, (make, loss_fn) in references.items():
        for suffix in ("", COMPILED)[: 1 + compile]:
            torch.manual_seed(cfg.train.seed)
            model = make()
            if suffix:
                model.compile()  # in place, as engine.compile() does
            variants[name + suffix] = PlainStep(model, cfg, loss_fn)
    return variants


def weight_gemms(cfg):
    """The step's weight GEMMs, to run alone: for every linear y = x W^T (K -> N) over M = micro batch x
    context tokens, the products x W^T (M,K,N), dy W (M,N,K) and dy^T x (N,M,K). Returns (FLOPs, run)."""
    c = cfg.model
    m = cfg.train.micro_batch_size * c.max_seq_len
    qkv = (c.n_heads + 2 * c.num_kv_heads) * c.head_dim
    linears = [(c.d_model, qkv), (c.n_heads * c.head_dim, c.d_model), (c.d_model, 2 * c.d_ff), (c.d_ff, c.d_model)]
    products = {}
    for k, n in set(linears) | {(c.d_model, c.vocab_size)}:
        for a, b, d in ((m, k, n), (m, n, k), (n, m, k)):
            products[(a, b, d)] = (torch.randn(a, b), torch.randn(b, d))
    order = [(a, b, d) for k, n in linears * c.n_layers + [(c.d_model, c.vocab_size)]
             for a, b, d in ((m, k, n), (m, n, k), (n, m, k))]

    def run():
        for shape in order:
            torch.mm(*products[shape])

    return sum(2.0 * a * b * d for a, b, d in order), run


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def micro_batch_for(preset: str, spec: str | None) -> int | None:
    """``--micro_batch_size``: "4" (every preset) or "small=4,medium=2" (the others keep theirs)."""
    if not spec:
        return None
    if "=" not in spec:
        return int(spec)
    pairs = dict(item.split("=", 1) for item in spec.split(","))
    return int(pairs[preset]) if preset in pairs else None


def bench_preset(preset: str, args, env) -> list[dict]:
    overrides = {"train.max_steps": 1000, "train.warmup_steps": 10}
    micro = micro_batch_for(preset, args.micro_batch_size)
    if micro:
        overrides["train.micro_batch_size"] = micro
    overrides["train.gradient_accumulation_steps"] = args.grad_accum
    cfg = load_run_config(ROOT / f"configs/{preset}.yaml", overrides)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.0))
    ds_configs = [str(ROOT / cfg.train.ds_config)]
    if zero_stage(json.loads(Path(ds_configs[0]).read_text())) != 0:
        ds_configs.append(str(ROOT / "ds_configs/zero0.json"))
    variants = build_variants(cfg, env, ds_configs, args.compile)
    tokens = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * cfg.model.max_seq_len
    num_params = Transformer(cfg.model).num_params()
    times: dict[str, list[float]] = {name: [] for name in variants}
    compile_s = {}
    for name, step in variants.items():  # warm-up: allocator, thread pools, first-step optimizer state
        for i, mb in enumerate(random_batches(cfg, max(args.warmup, 1), seed=1)):
            seconds = timed(lambda: step(mb))
            if i == 0 and name.endswith(COMPILED):
                compile_s[name] = seconds
    # the peak and the GEMMs-alone ceiling take their turns too, so that MFU compares like with like
    a, b = torch.randn(PEAK_N, PEAK_N), torch.randn(PEAK_N, PEAK_N)
    gemm_flops, gemms = weight_gemms(cfg)
    gemms()
    peaks, gemm_s = [], []
    names = list(variants)
    for r in range(args.rounds):  # the variants take turns step by step: the machine's drift hits all alike
        for i, mb in enumerate(random_batches(cfg, args.steps, seed=100 + r)):
            first = (r * args.steps + i) % len(names)  # and each goes first in turn (no place is favoured)
            for name in names[first:] + names[:first]:
                step = variants[name]
                t0 = time.perf_counter()
                loss = step(mb)
                times[name].append(time.perf_counter() - t0)
                assert math.isfinite(loss), (name, loss)
            peaks.append(2.0 * PEAK_N**3 / min(timed(lambda: torch.mm(a, b)) for _ in range(2)))
            gemm_s.append(timed(gemms))
    peak = statistics.median(peaks)
    rows = []
    flops_tok = flops_per_token(cfg.model, num_params)
    for name, ts in times.items():
        step_s = statistics.median(ts)
        tps = tokens / step_s
        rows.append({"preset": preset, "variant": name, "params": num_params, "tokens_per_step": tokens,
                     "step_s": step_s, "tokens_per_sec": tps, "peak_flops": peak, "mfu": flops_tok * tps / peak,
                     "peak_range": [min(peaks), max(peaks)],
                     "gemm_ceiling": gemm_flops / statistics.median(gemm_s) / peak,
                     "first_step_s": compile_s.get(name)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro_batch_size", default=None,
                   help="override the presets' micro batch: N for all, or PRESET=N[,PRESET=N]")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--no_compile", dest="compile", action="store_false",
                   help="skip the train.compile (torch.compile) variants")
    p.add_argument("--output", default=str(ROOT / "benchmarks/out/train.json"))
    args = p.parse_args(argv)

    env = init_distributed()
    if env.device == "cpu":
        keep_freed_memory()  # as train() does; every variant runs in this process with it
    rows = []
    for preset in args.presets.split(","):
        rows += bench_preset(preset.strip(), args, env)

    print(f"\n{torch.get_num_threads()} threads; MFU against the fp32 torch.mm peak ({PEAK_N}^3) timed between the "
          "steps (median; range):")
    for preset in dict.fromkeys(r["preset"] for r in rows):
        r = next(x for x in rows if x["preset"] == preset)
        lo, hi = r["peak_range"]
        print(f"  {preset}: {r['peak_flops'] / 1e9:.1f} GFLOP/s ({lo / 1e9:.1f}-{hi / 1e9:.1f})")
    print()
    print("| preset | variant | params | tokens/step | step (s) | tokens/s | MFU | vs pytorch | vs hf-llama |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = {x["variant"]: x for x in rows if x["preset"] == r["preset"]}
        own_loop = "pytorch" + COMPILED * r["variant"].endswith(COMPILED)  # compiled against compiled
        r["vs_pytorch"] = r["tokens_per_sec"] / base[own_loop]["tokens_per_sec"]
        r["vs_hf_llama"] = r["tokens_per_sec"] / base["hf-llama"]["tokens_per_sec"]
        print(f"| {r['preset']} | {r['variant']} | {r['params']:,} | {r['tokens_per_step']:,} | {r['step_s']:.3f} | "
              f"{r['tokens_per_sec']:,.0f} | {100 * r['mfu']:.1f}% | {r['vs_pytorch']:.3f} | {r['vs_hf_llama']:.2f} |")
    print()
    for preset in dict.fromkeys(r["preset"] for r in rows):
        r = next(x for x in rows if x["preset"] == preset)
        print(f"{preset}: the step's weight GEMMs alone, timed between the steps, run at {100 * r['gemm_ceiling']:.1f}% "
              "of the peak: the ceiling of its MFU")
    for r in rows:
        if r["first_step_s"] is not None:
            print(f"{r['preset']} {r['variant']}: first step, compiling included, {r['first_step_s']:.0f} s")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
