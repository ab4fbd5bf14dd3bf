"""The explicit map between our weights/config and Hugging Face's LlamaForCausalLM.

Used by the exporter (ours -> HF) and by the loader of HF exports (HF -> ours).
"""

from __future__ import annotations

import torch

from openllm_ds.config import ModelConfig
from openllm_ds.errors import UserError

# our per-layer tensor -> the HF tensors it holds, stacked along dim 0 in this order
_LAYER_WEIGHTS = {
    "input_layernorm.weight": ("input_layernorm.weight",),
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attn.o_proj.weight": ("self_attn.o_proj.weight",),
    "post_attention_layernorm.weight": ("post_attention_layernorm.weight",),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.down_proj.weight": ("mlp.down_proj.weight",),
}


def hf_weight_map(cfg: ModelConfig) -> dict[str, tuple[tuple[str, int], ...]]:
    """Our parameter name -> ((HF parameter name, rows), ...): the HF tensors ours stacks along dim 0,
    for every tensor that is stored (rows is None for a tensor that maps whole)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    rows = {"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": kv, "self_attn.v_proj.weight": kv,
            "mlp.gate_proj.weight": cfg.d_ff, "mlp.up_proj.weight": cfg.d_ff}
    names = {"embed_tokens.weight": (("model.embed_tokens.weight", None),), "norm.weight": (("model.norm.weight", None),)}
    for i in range(cfg.n_layers):
        for ours, hf in _LAYER_WEIGHTS.items():
            names[f"layers.{i}.{ours}"] = tuple((f"model.layers.{i}.{h}", rows.get(h)) for h in hf)
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = (("lm_head.weight", None),)
    return names


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> LlamaForCausalLM's (stacked tensors split; views of ours)."""
    out = {}
    for ours, parts in hf_weight_map(cfg).items():
        if len(parts) == 1:
            out[parts[0][0]] = sd[ours]
        else:
            out.update(zip((h for h, _ in parts), sd[ours].split([n for _, n in parts], dim=0)))
    return out


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig, source: str = "model.safetensors"
                       ) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's state dict -> ours (``source`` names the file in errors)."""
    out = {}
    for ours, parts in hf_weight_map(cfg).items():
        tensors = []
        for hf, rows in parts:
            if hf not in hf_sd:
                raise UserError(f"{source} lacks tensor {hf}; re-export the model")
            if rows is not None and hf_sd[hf].shape[0] != rows:
                raise UserError(f"{source}: {hf} has {hf_sd[hf].shape[0]} rows, its config.json says {rows}; "
                                "re-export the model")
            tensors.append(hf_sd[hf])
        out[ours] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
    return out


def to_hf_config(cfg: ModelConfig, bos_id: int = 1, eos_id: int = 2, pad_id: int | None = 3, dtype: str = "float32") -> dict:
    """A LlamaConfig dict with every field transformers and vLLM read."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,
    }


_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings")


def from_hf_config(hf: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a LlamaForCausalLM config.json dict (``source`` names the file in errors)."""
    missing = [k for k in _REQUIRED if not isinstance(hf, dict) or k not in hf]
    if missing:
        raise UserError(f"{source} is not a LlamaForCausalLM config (no {', '.join(missing)}); "
                        "point --model_dir at an export written by `openllm-ds export --format huggingface`")
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 | 4
    rope_theta = hf.get("rope_theta")
    if rope_theta is None:  # transformers 5 nests it under rope_parameters
        rope_theta = rope.get("rope_theta", 10000.0)
    unlike = [f"{key}={value!r}" for key, value, ours in (
        ("model_type", hf.get("model_type", "llama"), "llama"),
        ("hidden_act", hf.get("hidden_act", "silu"), "silu"),
        ("attention_bias", bool(hf.get("attention_bias", False)), False),
        ("mlp_bias", bool(hf.get("mlp_bias", False)), False),
        ("rope type", rope.get("rope_type", rope.get("type", "default")), "default"),
        ("head_dim", hf.get("head_dim") or hf["hidden_size"] // heads, hf["hidden_size"] // heads)) if value != ours]
    if unlike:
        raise UserError(f"{source} describes a model this one cannot reproduce ({', '.join(unlike)}; this model is "
                        "a Llama with SiLU, no biases, plain RoPE and head_dim = hidden_size / num_attention_heads)")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=None if kv == heads else kv,
        d_ff=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        dropout=0.0,
        rope_theta=float(rope_theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
