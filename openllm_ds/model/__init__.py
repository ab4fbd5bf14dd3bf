"""The model: a Llama-compatible decoder-only transformer in plain PyTorch."""

from openllm_ds.model.transformer import Transformer, sample_next

__all__ = ["Transformer", "sample_next"]
