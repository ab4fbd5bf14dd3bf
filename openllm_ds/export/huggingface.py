"""Hugging Face export: a plain LlamaForCausalLM directory that transformers and vLLM load as is.

Files: config.json, model.safetensors (HF parameter names, through the explicit map in hf_map.py;
a tied embedding is stored once as model.embed_tokens.weight with tie_word_embeddings true),
generation_config.json, the tokenizer files, README.md (model card) and openllm_ds.json.

The tokenizer files carry the prompt convention (tokenizer/hf_files.py): BOS is `</s>`, put before
every text by the tokenizer itself, so `model.generate(**tok(text))` and vLLM start generating where
`openllm-ds generate` and the built-in server do.
"""

from __future__ import annotations

from pathlib import Path

import torch

from openllm_ds.model.hf_map import to_hf_config, to_hf_state_dict
from openllm_ds.checkpoint import EXPORT_INFO, LoadedModel
from openllm_ds.export.common import (
    HF_DTYPE_NAMES, TORCH_DTYPES, copy_tokenizer_files, encode_for_verification, export_info, verification_texts,
)
from openllm_ds.errors import VerificationError
from openllm_ds.tokenizer.hf_files import PROMPT_PREFIX, apply_prompt_convention
from openllm_ds.utils import atomic_write_json, atomic_write_text

# Largest max|logits difference| accepted by --verify, per export dtype. fp32 must match to float
# rounding; fp16/bf16 exports are compared with our model cast to the same dtype, and both sides
# round differently in their reductions.
VERIFY_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1.5e-1}


def hf_state_dict(src: LoadedModel, dtype: str) -> dict[str, torch.Tensor]:
    hf = to_hf_state_dict(src.model.state_dict(), src.model_config)
    return {name: t.detach().to(TORCH_DTYPES[dtype]).contiguous() for name, t in hf.items()}


def hf_config(src: LoadedModel, dtype: str) -> dict:
    tok = src.tokenizer
    cfg = to_hf_config(src.model_config, bos_id=tok.prompt_prefix_id, eos_id=tok.eos_id,
                       pad_id=tok.pad_id if tok.pad_id >= 0 else None, dtype=HF_DTYPE_NAMES[dtype])
    cfg["dtype"] = cfg["torch_dtype"]  # transformers 5 reads "dtype", older readers "torch_dtype"
    return cfg


def write_hf_files(src: LoadedModel, out: Path, dtype: str) -> None:
    """What transformers (and optimum) read beside the weights: config.json (Llama), generation_config.json and the
    tokenizer files with the prompt convention."""
    atomic_write_json(out / "config.json", hf_config(src, dtype))
    tok = src.tokenizer
    atomic_write_json(out / "generation_config.json", {
        "bos_token_id": tok.prompt_prefix_id, "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id if tok.pad_id >= 0 else None,
    })
    copy_tokenizer_files(src, out)
    # the prompt convention, and model_max_length = the model's context (the tokenizer has no limit)
    apply_prompt_convention(out, tok.prompt_prefix_id, src.model_config.max_seq_len)


def export_huggingface(src: LoadedModel, out: Path, dtype: str = "fp32", verify: bool = True) -> dict:
    from safetensors.torch import save_file

    save_file(hf_state_dict(src, dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
    write_hf_files(src, out, dtype)
    atomic_write_json(out / EXPORT_INFO, {**export_info(src), "format": "huggingface", "dtype": dtype})
    atomic_write_text(out / "README.md", model_card(src, dtype))
    report = {"dtype": dtype}
    report["verification"] = verify_huggingface(out, src, dtype) if verify else {"skipped": "--no-verify"}
    return report


def verify_huggingface(out: Path, src: LoadedModel, dtype: str = "fp32") -> dict:
    """Load the export with transformers; token ids and logits must match ours on real text."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        print("verification skipped: transformers is not installed (pip install 'openllm-ds[test]')")
        return {"skipped": "transformers is not installed"}
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    hf_model = AutoModelForCausalLM.from_pretrained(str(out), dtype=TORCH_DTYPES[dtype]).eval()
    ours = src.model if dtype == "fp32" else _cast_copy(src.model, TORCH_DTYPES[dtype])
    texts = verification_texts(src)
    max_diff = 0.0
    num_tokens = 0
    for text in texts:
        want = src.tokenizer.encode(text)
        got = hf_tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        if got != want:
            raise VerificationError(f"AutoTokenizer on {out} gives other ids than SentencePiece for {text[:60]!r}: "
                                    f"{got[:8]}... vs {want[:8]}...")
        prompt = hf_tok(text, verbose=False)["input_ids"]
        if prompt != src.tokenizer.encode_prompt(text):
            raise VerificationError(f"AutoTokenizer on {out} does not start a prompt with {tok_prefix(src)} for "
                                    f"{text[:60]!r}: {prompt[:8]}...")
        if hf_tok.decode(want) != src.tokenizer.decode(want):
            raise VerificationError(f"AutoTokenizer on {out} decodes {text[:60]!r} differently from SentencePiece")
        ids = torch.tensor([encode_for_verification(src, text)])
        with torch.no_grad():
            ref = ours(ids).float()
            got_logits = hf_model(ids).logits.float()
        max_diff = max(max_diff, (ref - got_logits).abs().max().item())
        num_tokens += ids.numel()
    want_ids = {"bos": src.tokenizer.prompt_prefix_id, "eos": src.tokenizer.eos_id, "pad": src.tokenizer.pad_id}
    for name, want_id in want_ids.items():
        if getattr(hf_tok, f"{name}_token_id") != want_id:
            raise VerificationError(f"AutoTokenizer on {out}: {name}_token_id is not {want_id}")
    tol = VERIFY_TOLERANCE[dtype]
    if not max_diff < tol:
        raise VerificationError(f"transformers' logits differ from ours by {max_diff:.3g} (> {tol}) on {out}")
    return {"verified": True, "max_abs_diff": max_diff, "tolerance": tol, "num_texts": len(texts),
            "num_tokens": num_tokens, "tokenizer_ids_match": True}


def tok_prefix(src: LoadedModel) -> str:
    return f"{PROMPT_PREFIX} (id {src.tokenizer.prompt_prefix_id})"


def _cast_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype).eval()


def model_card(src: LoadedModel, dtype: str) -> str:
    cfg, tok, info = src.model_config, src.tokenizer, export_info(src)
    run = src.run_config
    name = src.run_name or "openllm-ds model"
    ppl = f"{info['val_perplexity']:.2f}" if info["val_perplexity"] is not None else "not recorded"
    loss = f"{info['val_loss']:.4f}" if info["val_loss"] is not None else "not recorded"
    data_file = run.train.data_file if run else "see the training run"
    tok_type = run.tokenizer.model_type if run else "bpe"
    steps = f"{src.step:,}" if src.step is not None else "unknown"
    tokens = f"{info['tokens_seen']:,}" if isinstance(info.get("tokens_seen"), int) else "not recorded"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
language: [en]
datasets: [rajpurkar/squad]
tags: [llama, causal-lm, openllm-ds]
---

# {name}

A GPT-style (Llama-architecture) language model trained from scratch with openllm-ds
(DeepSpeed + Ray) on the Wikipedia passages of SQuAD.
It is a small base model for experiments: it continues text, it is not instruction-tuned.

## Model

| | |
|---|---|
| architecture | `LlamaForCausalLM` (RoPE, RMSNorm, SwiGLU) |
| parameters | {info['num_params']:,} |
| layers / hidden size / heads / KV heads | {cfg.n_layers} / {cfg.d_model} / {cfg.n_heads} / {cfg.num_kv_heads} |
| feed-forward size | {cfg.d_ff} |
| context length | {cfg.max_seq_len} tokens |
| vocabulary | {cfg.vocab_size:,} |
| tied input/output embeddings | {str(cfg.tie_embeddings).lower()} |
| weights dtype | {HF_DTYPE_NAMES[dtype]} |

## Training

| | |
|---|---|
| data | Wikipedia passages of SQuAD v1.1 (CC BY-SA 4.0), `{data_file}` |
| training steps | {steps} |
| tokens seen | {tokens} |
| validation loss | {loss} |
| validation perplexity | {ppl} |
| source checkpoint | `{src.path}` |

## Tokenizer

SentencePiece {tok_type.upper()} with byte fallback, {tok.vocab_size:,} tokens; `<unk>`={tok.unk_id},
`<s>`={tok.bos_id} (unused), `</s>`={tok.eos_id}, `<pad>`={tok.pad_id}. Training documents each end
with `</s>`, so a document starts after one: the tokenizer's BOS token is `</s>` (as GPT-2's is
`<|endoftext|>`) and `tok(text)` puts it first; `tok(text, add_special_tokens=False)` gives the same
ids as `tokenizer.model`.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("path/to/this/dir")
model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")
out = model.generate(**tok("The Normans were", return_tensors="pt"), max_new_tokens=30, do_sample=False)
print(tok.decode(out[0], skip_special_tokens=True))
```

Serve it with an OpenAI-compatible API: `openllm-ds serve --model_path path/to/this/dir` (vLLM where it
is installed, else the built-in server), or vLLM directly:
`python -m vllm.entrypoints.openai.api_server --model path/to/this/dir`.
"""
