"""Export-stage speed on the CPU, side by side in one run; prints markdown tables.

    PYTHONPATH=. python benchmarks/bench_export.py [--model_dir models/tiny] [--threads 1]
        [--new_tokens 128] [--repeats 5]

1. Generation at batch 1: our KV-cache ``openllm_ds.model.generate`` against transformers'
   ``generate`` (greedy, KV cache on) on the Hugging Face export of the same weights, and
   onnxruntime with model.onnx (its past inputs). Exactly ``--new_tokens`` tokens each (no EOS stop);
   tokens/s = new tokens / wall time of the whole call (prefill included), median of R runs.
   The greedy tokens of all three are compared.
2. One forward pass (input_ids -> logits): PyTorch against onnxruntime with model.onnx, the
   offline-optimised graph and the int8 graph, median of R runs. Each row also gives the fp32
   engines' matmul GFLOP/s and their share of that engine's own fp32 matmul peak (one 1024^3 matmul,
   best of R, measured in the same run): PyTorch's (MKL) and onnxruntime's (MLAS). "ORT at peak" is
   the speed-up onnxruntime would show if the whole forward pass ran at its matmul peak: the most
   any fp32 graph change could give on this CPU with this many threads.

Without ``--model_dir`` the model is a random one of the tiny preset's shape (configs/tiny.yaml)
with the tokenizer of ``--tokenizer_dir`` (default data/tokenizer; when absent one is trained on
../shared/data/squad). Random weights time the same as trained ones. PyTorch and onnxruntime use
the same number of threads (``--threads``, default 1: this is a shared 2-core machine, and one
thread per engine gives the steadiest numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from openllm_ds.config import ExportConfig, load_run_config
from openllm_ds.export import export
from openllm_ds.checkpoint.onnx import OnnxCausalLM
from openllm_ds.model import generate

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
          "a region in France. They were descended from Norse raiders and pirates")


def tokenizer_dir(args, tmp: Path) -> Path:
    if Path(args.tokenizer_dir).is_dir():
        return Path(args.tokenizer_dir)
    from openllm_ds.config import DataConfig, TokenizerConfig
    from openllm_ds.data import prepare
    from openllm_ds.tokenizer import train_tokenizer

    print(f"{args.tokenizer_dir} not found: training an 8k tokenizer on {args.squad_dir}")
    prepare(DataConfig(source="dir", squad_dir=args.squad_dir, output_dir=str(tmp / "clean")))
    train_tokenizer(TokenizerConfig(input=str(tmp / "clean" / "training_data.txt"), output_dir=str(tmp / "tok"), vocab_size=8000))
    return tmp / "tok"


def random_run(args, tmp: Path) -> Path:
    """A training output holding a random model of the tiny preset's shape."""
    import shutil

    from safetensors.torch import save_file

    from openllm_ds.model import Transformer

    tok = tokenizer_dir(args, tmp)
    cfg = load_run_config(ROOT / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    d = tmp / "run" / "checkpoints" / "step_00000000"
    d.mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not (cfg.model.tie_embeddings and k == "lm_head.weight")}
    save_file(sd, str(d / "model.safetensors"))
    (d / "train_state.json").write_text(json.dumps({"step": 0}))
    cfg.save(d / "run_config.yaml")
    cfg.save(tmp / "run" / "run_config.yaml")
    (tmp / "run" / "checkpoints" / "latest").write_text(d.name)
    shutil.copytree(tok, tmp / "run" / "tokenizer")
    return tmp / "run"


def median_seconds(fns: list, repeats: int) -> list[float]:
    """Median wall time of each function; the functions take turns, so load changes hit all alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def generation_rows(hf_dir: Path, onnx_dir: Path, args) -> list[str]:
    from transformers import AutoModelForCausalLM

    from openllm_ds.checkpoint import load_model
    from openllm_ds.tokenizer import load_tokenizer

    ours = load_model(hf_dir).model
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    lm = OnnxCausalLM(onnx_dir, variant="auto", num_threads=args.threads)
    ids = torch.tensor([load_tokenizer(hf_dir).encode(PROMPT)])
    n = min(args.new_tokens, ours.cfg.max_seq_len - ids.size(1))
    out = {}

    def run_ours():
        with torch.inference_mode():
            out["ours"] = torch.stack(list(generate(ours, ids, n, temperature=0)), 1)

    def run_hf():
        with torch.inference_mode():
            out["hf"] = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                    pad_token_id=hf.config.pad_token_id)[:, ids.size(1):]

    def run_onnx():
        out["onnx"] = torch.stack(list(generate(lm, ids, n, temperature=0)), 1)

    t_ours, t_hf, t_onnx = median_seconds([run_ours, run_hf, run_onnx], args.repeats)
    same_hf = torch.equal(out["ours"], out["hf"])
    same_onnx = torch.equal(out["ours"], out["onnx"])
    return [
        f"prompt {ids.size(1)} tokens, {n} new tokens, batch 1, greedy\n",
        "| engine | tokens/s | ms/token | vs transformers | same tokens as ours |",
        "|---|---:|---:|---:|---|",
        f"| transformers `generate` (export, KV cache) | {n / t_hf:.1f} | {1e3 * t_hf / n:.2f} | 1.00x | {'yes' if same_hf else 'NO'} |",
        f"| ours `openllm_ds.model.generate` (KV cache) | {n / t_ours:.1f} | {1e3 * t_ours / n:.2f} | {t_hf / t_ours:.2f}x | - |",
        f"| onnxruntime model.onnx ({lm.variant}) | {n / t_onnx:.1f} | {1e3 * t_onnx / n:.2f} | {t_hf / t_onnx:.2f}x | {'yes' if same_onnx else 'NO'} |",
    ]


def forward_flops(cfg, batch: int, tokens: int) -> int:
    """Matmul FLOPs of one forward pass: the projections and LM head, and causal attention (QK^T and
    AV over the keys at or before each query)."""
    per_token = cfg.n_layers * cfg.d_model * ((cfg.n_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
                                              + cfg.n_heads * cfg.head_dim + 3 * cfg.d_ff) + cfg.d_model * cfg.vocab_size
    attention = 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * tokens * (tokens + 1) // 2
    return 2 * batch * (tokens * per_token + attention)


def matmul_peaks(threads: int, repeats: int, n: int = 1024) -> tuple[float, float]:
    """GFLOP/s of one fp32 n x n x n matmul, best of ``repeats``: PyTorch's and onnxruntime's."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from openllm_ds.checkpoint.onnx import session_options

    spec = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in ("a", "b", "c")]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", spec[:2], spec[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])
    a, b = torch.randn(n, n), torch.randn(n, n)
    feeds = {"a": a.numpy(), "b": b.numpy()}
    best = [float("inf"), float("inf")]
    for _ in range(repeats + 1):
        for i, fn in enumerate((lambda: torch.mm(a, b), lambda: session.run(None, feeds))):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return 2 * n**3 / best[0] / 1e9, 2 * n**3 / best[1] / 1e9


def forward_rows(hf_dir: Path, onnx_dir: Path, args) -> list[str]:
    from openllm_ds.checkpoint import load_model

    ours = load_model(hf_dir).model
    variants = {v: OnnxCausalLM(onnx_dir, variant=v, num_threads=args.threads) for v in ("fp32", "optimized", "int8")}
    peak_torch, peak_ort = matmul_peaks(args.threads, args.repeats)
    rows = [f"fp32 matmul peak (1024^3, {args.threads} thread(s), best of {args.repeats}): PyTorch {peak_torch:.1f} GFLOP/s, "
            f"onnxruntime {peak_ort:.1f} GFLOP/s\n",
            "| input (batch x tokens) | PyTorch ms | onnxruntime ms | ORT optimised ms | ORT int8 ms | ORT / PyTorch speed-up | optimised | int8 "
            "| GFLOP | PyTorch GFLOP/s (% of peak) | onnxruntime GFLOP/s (% of peak) | ORT at peak |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    g = torch.Generator().manual_seed(0)
    for b, t in ((1, 32), (1, ours.cfg.max_seq_len), (8, 128)):
        ids = torch.randint(4, ours.cfg.vocab_size, (b, t), generator=g)
        np_ids = ids.numpy()

        def torch_forward():
            with torch.inference_mode():
                ours(ids)

        fns = [torch_forward] + [lambda lm=lm: lm.logits(np_ids) for lm in variants.values()]
        t_torch, *t_variants = median_seconds(fns, args.repeats)
        t_ort = dict(zip(variants, t_variants))
        gflop = forward_flops(ours.cfg, b, t) / 1e9
        rows.append(f"| {b} x {t} | {1e3 * t_torch:.2f} | {1e3 * t_ort['fp32']:.2f} | {1e3 * t_ort['optimized']:.2f} | "
                    f"{1e3 * t_ort['int8']:.2f} | {t_torch / t_ort['fp32']:.2f}x | {t_torch / t_ort['optimized']:.2f}x | "
                    f"{t_torch / t_ort['int8']:.2f}x | {gflop:.3f} | {gflop / t_torch:.1f} ({gflop / t_torch / peak_torch:.0%}) | "
                    f"{gflop / t_ort['fp32']:.1f} ({gflop / t_ort['fp32'] / peak_ort:.0%}) | {t_torch * peak_ort / gflop:.2f}x |")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", default=None, help="training output or HF export (default: random tiny-preset model)")
    p.add_argument("--tokenizer_dir", default="data/tokenizer")
    p.add_argument("--squad_dir", default=str(ROOT.parent / "shared" / "data" / "squad"))
    p.add_argument("--threads", type=int, default=1, help="threads for PyTorch and onnxruntime alike")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = Path(args.model_dir) if args.model_dir else random_run(args, tmp)
        hf = export(ExportConfig(model_dir=str(model_dir), format="huggingface", output_dir=str(tmp / "hf")))
        onnx = export(ExportConfig(model_dir=str(model_dir), format="onnx", output_dir=str(tmp / "onnx"),
                                   optimize_for_inference=True, quantize_int8=True))
        import onnxruntime
        import transformers

        print(f"\n## Export benchmarks ({hf['num_params']:,} parameters, {'random weights' if not args.model_dir else model_dir})\n")
        print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.2f}; {args.threads} thread(s) for PyTorch and onnxruntime; torch {torch.__version__}, "
              f"transformers {transformers.__version__}, onnxruntime {onnxruntime.__version__}\n")
        print(f"export seconds: huggingface {hf['seconds']} (verified, max |dlogit| {hf['verification']['max_abs_diff']:.2g}); "
              f"onnx + optimised + int8 {onnx['seconds']} (int8 max |dlogit| "
              f"{onnx['verification']['int8']['max_abs_diff']:.3g} of max |logit| {onnx['verification']['int8']['max_abs_logit']:.3g})\n")
        print("### Generation (CPU, batch 1)\n")
        print("\n".join(generation_rows(tmp / "hf", tmp / "onnx", args)))
        print("\n### Forward pass: onnxruntime vs PyTorch\n")
        print("\n".join(forward_rows(tmp / "hf", tmp / "onnx", args)))


if __name__ == "__main__":
    main()
