"""CPU kernels of the model, each kept for a measured reason (the model file reads without them).

- ``Linear``: a decoding step (one token) multiplies by a transposed, contiguous copy of the weight: 1.2-1.5x
  faster than ``x @ W^T`` on MKL for one row.
- ``LMHead`` + ``LinearCrossEntropy``: the training loss from the hidden states in one pass over the logits
  (F.cross_entropy makes three more), a tenth of a CPU training step at a 32k vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Linear(nn.Linear):
    """nn.Linear without bias, faster for one token per sequence on the CPU under inference mode (a
    decoding step, as in generate).

    On MKL, x @ W^T for one row of x runs 1.2-1.5x slower than the same product with W^T stored
    contiguous, (in, out). So a decoding step multiplies by a transposed copy of the weight (memory for
    a second copy of the weights, once the model has decoded), made on first use and again when the
    weight moves or changes in place (its version counter); train() and eval() drop it. A write
    through ``weight.data`` bypasses the version counter: call eval() after one.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.packed = None  # (weight's data_ptr and version, weight transposed and contiguous)

    def forward(self, x):
        if self.training or not torch.is_inference_mode_enabled() or x.size(-2) != 1 or not x.is_cpu:
            return F.linear(x, self.weight)
        key = (self.weight.data_ptr(), self.weight._version)
        packed = self.packed
        if packed is None or packed[0] != key:
            packed = self.packed = (key, self.weight.t().contiguous())
        return x @ packed[1]

    def train(self, mode: bool = True):
        self.packed = None
        return super().train(mode)


class LMHead(Linear):
    """The output projection; given targets it returns the loss instead of the logits."""

    def forward(self, x, targets=None):
        if targets is None:
            return super().forward(x)
        x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
        if x.device.type == "cpu" and x.dtype == torch.float32:
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                return LinearCrossEntropy.apply(x, self.weight, targets)
            return LinearCrossEntropy.loss_only(x, self.weight, targets)
        return F.cross_entropy(super().forward(x).float(), targets, ignore_index=-100)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``x @ weight.T`` against ``targets`` (-100 ignored), for fp32 on the CPU.

    F.cross_entropy on the logits makes three more passes over a (tokens x vocab) tensor (log-softmax,
    its backward, a one-hot fill), a tenth of a CPU training step at a 32k vocabulary. Here the forward
    pass turns the logits, in place and a cache-sized block of rows at a time, into their gradient
    softmax - one-hot, and the backward pass multiplies it out: the same numbers, one pass.
    """

    @staticmethod
    def blocks(logits, targets):
        rows = max(1, 2**20 // logits.size(1))  # ~4 MB of logits per block
        for i in range(0, logits.size(0), rows):
            yield logits[i : i + rows], targets[i : i + rows]

    @staticmethod
    def loss_only(x, weight, targets):
        logits = x @ weight.t()  # (N, V)
        total = logits.new_zeros(())
        for block, t in LinearCrossEntropy.blocks(logits, targets):
            keep = t != -100
            nll = torch.logsumexp(block, dim=-1) - block.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
            total += nll[keep].sum()
        return total / (targets != -100).sum()

    @staticmethod
    def forward(ctx, x, weight, targets):
        logits = x @ weight.t()  # (N, V), becomes the gradient
        total = logits.new_zeros(())
        for block, t in LinearCrossEntropy.blocks(logits, targets):
            t = t[:, None]
            target_logit = block.gather(1, t.clamp(min=0))
            top = block.amax(dim=-1, keepdim=True)
            block.sub_(top).exp_()
            sums = block.sum(dim=-1, keepdim=True)
            block.div_(sums)  # softmax
            block.scatter_add_(1, t.clamp(min=0), torch.full_like(target_logit, -1.0))
            nll = top + sums.log_() - target_logit
            ignored = t == -100
            if ignored.any():
                block.masked_fill_(ignored, 0.0)
                nll.masked_fill_(ignored, 0.0)
            total += nll.sum()
        count = (targets != -100).sum()
        ctx.save_for_backward(x, weight, logits, count)
        return total / count

    @staticmethod
    def backward(ctx, grad):
        x, weight, g, count = ctx.saved_tensors
        scale = grad / count
        grad_x = (g @ weight).mul_(scale) if ctx.needs_input_grad[0] else None
        grad_w = (g.t() @ x).mul_(scale) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def transposed_weights_ready(model: torch.nn.Module) -> bool | None:
    """Whether every ``Linear`` of ``model`` holds the current transposed copy of its weight (the CPU decode step's
    fast path, made by a first decode); None where that path does not apply (a model off the CPU)."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    if not linears or not linears[0].weight.is_cpu:
        return None
    return all(m.packed is not None and m.packed[0] == (m.weight.data_ptr(), m.weight._version) for m in linears)
