"""openllm-ds: train a GPT-style language model from scratch with DeepSpeed and Ray."""

__version__ = "0.1.0"
