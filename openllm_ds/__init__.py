"""openllm-ds: train a GPT-style language model from scratch with DeepSpeed and Ray."""

__version__ = "0.1.0"


def load(path, backend: str = "torch", context_length: int = 2048):
    """Trained weights from a training output, a step dir or any export: ``.generate()``, ``.chat()``,
    ``.perplexity()``, ``.tokenizer`` (see openllm_ds.api)."""
    from openllm_ds.api import load as _load

    return _load(path, backend=backend, context_length=context_length)
