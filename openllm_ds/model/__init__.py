"""The model: a Llama-compatible decoder-only transformer in plain PyTorch, its decoding loop, and the map of
its weight names to Hugging Face's."""

from openllm_ds.model.generate import generate, sample_next
from openllm_ds.model.transformer import Transformer

__all__ = ["Transformer", "generate", "sample_next"]
