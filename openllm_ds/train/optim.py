"""AdamW parameter groups and the learning-rate schedule (linear warmup, cosine decay).

Weight decay (train.weight_decay, 0.01 by default) applies to every matrix: the attention and MLP
projections and the token embedding (tied to the output head, as in nanoGPT and GPT-2). RMSNorm
gains (1-D) are not decayed; the model has no biases.
"""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    params = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}.values()  # tied weight once
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class WarmupCosine:
    """lr multiplier of optimizer step ``step`` (0-based): linear warmup to 1, cosine down to ``min_ratio``.

    Step 0 already trains (1/warmup of the peak); the last step uses exactly ``min_ratio``.
    A callable object, so LambdaLR's state_dict (saved in every engine checkpoint) records it.
    """

    def __init__(self, warmup_steps: int, max_steps: int, min_ratio: float):
        self.warmup_steps, self.max_steps, self.min_ratio = warmup_steps, max_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = self.max_steps - 1 - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(warmup_steps: int, max_steps: int, min_ratio: float):
    """A callable DeepSpeed turns into the engine's scheduler once it has built the optimizer."""

    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, max_steps, min_ratio))

    return make
