"""PyTorch export: our own state dict as plain tensors, for ``torch.load(..., weights_only=True)``.

Files: model.pt (parameter name -> tensor; a tied embedding is one storage under both names),
config.json (the ModelConfig fields), the tokenizer files and openllm_ds.json. Load with::

    cfg = ModelConfig(**json.load(open("config.json")))
    model = Transformer(cfg)
    model.load_state_dict(torch.load("model.pt", weights_only=True))
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from openllm_ds.checkpoint import EXPORT_INFO, PYTORCH_WEIGHTS, LoadedModel, load_model
from openllm_ds.errors import VerificationError
from openllm_ds.export.common import (TORCH_DTYPES, copy_tokenizer_files, encode_for_verification, export_info,
                                      verification_texts)
from openllm_ds.utils import atomic_write_json

WEIGHTS_FILE = PYTORCH_WEIGHTS


def export_pytorch(src: LoadedModel, out: Path, dtype: str = "fp32", verify: bool = True) -> dict:
    state = {k: v.detach().to(TORCH_DTYPES[dtype]) for k, v in src.model.state_dict().items()}
    if src.model_config.tie_embeddings:  # keep one shared storage, as in the model
        state["lm_head.weight"] = state["embed_tokens.weight"]
    torch.save(state, out / WEIGHTS_FILE)
    atomic_write_json(out / "config.json", dataclasses.asdict(src.model_config))
    copy_tokenizer_files(src, out)
    atomic_write_json(out / EXPORT_INFO, {**export_info(src), "format": "pytorch", "dtype": dtype})
    report = {"dtype": dtype}
    report["verification"] = verify_pytorch(out, src, dtype) if verify else {"skipped": "--no-verify"}
    return report


def verify_pytorch(out: Path, src: LoadedModel, dtype: str) -> dict:
    reloaded = load_model(out).model
    ref_model = src.model if dtype == "fp32" else _cast(src.model, TORCH_DTYPES[dtype])
    max_diff = 0.0
    texts = verification_texts(src)
    for text in texts:
        ids = torch.tensor([encode_for_verification(src, text)])
        with torch.no_grad():
            max_diff = max(max_diff, (reloaded(ids).float() - ref_model(ids).float()).abs().max().item())
    if max_diff != 0.0:
        raise VerificationError(f"the model reloaded from {out / WEIGHTS_FILE} gives other logits (max diff {max_diff:.3g})")
    return {"verified": True, "max_abs_diff": max_diff, "num_texts": len(texts)}


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype).eval()
