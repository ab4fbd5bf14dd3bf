"""Perplexity evaluation throughput: openllm_ds's sliding window vs transformers' Llama, same windows.

    PYTHONPATH=. python benchmarks/bench_eval.py [--tokenizer_dir data/tokenizer] [--max_tokens 40000]

A tiny random model (configs/tiny.yaml's shape, the tokenizer's vocabulary) scores
../shared/data/wikitext-2/wiki.test.raw as `openllm-ds evaluate` does (documents joined with EOS,
window = max_seq_len). The same weights in transformers' LlamaForCausalLM (through the export's
config and weight-name map) run the identical batches of windows; the two total NLLs must agree.
Timings alternate the two implementations batch by batch (the median of ``--repeats`` passes), so
load from other processes falls on both alike; a third row times ``perplexity()`` end to end, once.
Without a tokenizer dir, an 8k BPE tokenizer is trained on the SQuAD train subset first (~1 s).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from openllm_ds.config import ModelConfig, TokenizerConfig, load_run_config
from openllm_ds.evaluation.sliding_window import encode_documents, perplexity, read_documents, sliding_windows
from openllm_ds.model.hf_map import to_hf_config, to_hf_state_dict
from openllm_ds.model import Transformer
from openllm_ds.tokenizer import load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def get_tokenizer(tokenizer_dir: str | None, work: Path):
    if tokenizer_dir and (Path(tokenizer_dir) / "tokenizer.model").is_file():
        return load_tokenizer(tokenizer_dir)
    import json

    squad = json.loads((SHARED / "squad" / "train-v1.1-subset.json").read_text())
    text = work / "contexts.txt"
    text.write_text("\n".join(" ".join(p["context"].split()) for a in squad["data"] for p in a["paragraphs"]) + "\n")
    train_tokenizer(TokenizerConfig(input=str(text), output_dir=str(work / "tok"), vocab_size=8000))
    return load_tokenizer(work / "tok")


def build_models(cfg: ModelConfig, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ours = Transformer(cfg).to(device).eval()
    hf_cfg = {k: v for k, v in to_hf_config(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf = LlamaForCausalLM(LlamaConfig(**hf_cfg, attn_implementation="sdpa"))
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    if cfg.tie_embeddings:
        hf.tie_weights()
    return ours, hf.to(device).eval()


def window_batches(ids: torch.Tensor, max_seq_len: int, stride: int, batch_size: int):
    """The (inputs, targets) batches of openllm_ds.evaluation.sliding_window.perplexity."""
    windows = sliding_windows(ids.numel(), max_seq_len, stride)
    batches = []
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        T = max(e - b for b, e, _ in batch)
        x = torch.zeros(len(batch), T, dtype=torch.long)
        y = torch.full((len(batch), T), -100, dtype=torch.long)
        for row, (b, e, n) in enumerate(batch):
            x[row, : e - b] = ids[b:e]
            y[row, e - b - n : e - b] = ids[e - n + 1 : e + 1]
        batches.append((x, y))
    return windows, batches


@torch.no_grad()
def batch_nll(logits_fn, x: torch.Tensor, y: torch.Tensor, device: str) -> float:
    logits = logits_fn(x.to(device))
    return float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.to(device).reshape(-1),
                                 ignore_index=-100, reduction="sum").double())


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def interleaved(impls: dict, batches, device: str, repeats: int) -> tuple[dict, dict]:
    """Seconds per implementation over all batches, alternating implementations batch by batch
    (and which goes first), so that load from other processes hits both alike."""
    seconds = {name: [] for name in impls}
    totals = {}
    for r in range(repeats):
        spent = {name: 0.0 for name in impls}
        nll = {name: 0.0 for name in impls}
        for i, (x, y) in enumerate(batches):
            order = list(impls) if (i + r) % 2 == 0 else list(reversed(impls))
            for name in order:
                sync()
                t = time.perf_counter()
                nll[name] += batch_nll(impls[name], x, y, device)
                sync()
                spent[name] += time.perf_counter() - t
        for name in impls:
            seconds[name].append(spent[name])
        totals = nll
    return {name: statistics.median(v) for name, v in seconds.items()}, totals


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer_dir", default="data/tokenizer")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"), help="run preset whose model shape to use")
    p.add_argument("--max_tokens", type=int, default=40_000, help="tokens of wiki.test.raw to score (0 = all)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as work:
        tok = get_tokenizer(args.tokenizer_dir, Path(work))
    shape = load_run_config(args.config).model
    cfg = ModelConfig(**{**shape.__dict__, "vocab_size": tok.vocab_size, "dropout": 0.0})
    docs = read_documents(SHARED / "wikitext-2" / "wiki.test.raw")
    ids = torch.tensor(encode_documents(tok, docs))
    if args.max_tokens:
        ids = ids[: args.max_tokens + 1]
    ours, hf = build_models(cfg, args.device)
    L = cfg.max_seq_len
    print(f"model: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, context {L}, vocab {cfg.vocab_size} "
          f"({ours.num_params() / 1e6:.2f}M params); {ids.numel() - 1:,} tokens of wiki.test.raw; device {args.device}, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size}")

    impls = {
        "openllm_ds": lambda x: ours(x),
        "transformers LlamaForCausalLM": lambda x: hf(input_ids=x).logits,
    }
    rows = []
    for stride in (L, L // 2):
        windows, batches = window_batches(ids, L, stride, args.batch_size)
        forward_tokens = sum(e - b for b, e, _ in windows)
        scored = ids.numel() - 1
        interleaved(impls, batches[:2], args.device, 1)  # warm-up
        seconds, nll = interleaved(impls, batches, args.device, args.repeats)
        # the library function end to end (batching, progress bookkeeping included)
        (lib_nll, lib_n), lib_seconds = timed(lambda: perplexity(ours, ids, L, stride, args.batch_size, progress=False))
        assert lib_n == scored and abs(lib_nll - nll["openllm_ds"]) <= 1e-6 * abs(lib_nll)
        a, b = nll.values()
        rel = abs(a - b) / abs(b)
        for name, t in [*seconds.items(), ("openllm_ds perplexity() end to end", lib_seconds)]:
            total = lib_nll if name.endswith("end to end") else nll[name]
            rows.append((name, stride, len(windows), scored, t, scored / t, forward_tokens / t, total / scored, rel))

    print()
    print("| implementation | stride | windows | scored tokens | seconds | scored tok/s | forward tok/s | loss (nats/tok) | rel. NLL diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, stride, nw, n, t, sps, fps, loss, rel in rows:
        print(f"| {name} | {stride} | {nw} | {n:,} | {t:.2f} | {sps:,.0f} | {fps:,.0f} | {loss:.4f} | {rel:.1e} |")
    print()
    for i in range(0, len(rows), 3):
        print(f"stride {rows[i][1]}: openllm_ds / transformers forward throughput, interleaved = {rows[i][5] / rows[i + 1][5]:.2f}x")


if __name__ == "__main__":
    main()
