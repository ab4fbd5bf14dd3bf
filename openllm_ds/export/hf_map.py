"""The explicit map between our weights/config and Hugging Face's LlamaForCausalLM.

Used by the exporter (ours -> HF) and by the loader of HF exports (HF -> ours).
"""

from __future__ import annotations

from openllm_ds.config import ModelConfig
from openllm_ds.errors import UserError

_LAYER_WEIGHTS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def hf_weight_map(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> HF parameter name, for every tensor that is stored."""
    names = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    for i in range(cfg.n_layers):
        for w in _LAYER_WEIGHTS:
            names[f"layers.{i}.{w}"] = f"model.layers.{i}.{w}"
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


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
    rope_theta = hf.get("rope_theta")
    if rope_theta is None:  # transformers 5 nests it under rope_parameters
        rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
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
