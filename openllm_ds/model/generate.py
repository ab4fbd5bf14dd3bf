"""Decoding, one loop for every backend: ``generate(model, ids, ...)`` with a ``Transformer`` or an ``OnnxCausalLM``
(anything with ``cfg``, ``new_kv_cache(batch, device)`` and ``decode_step(ids, cache)`` -> the next position's logits)."""

from __future__ import annotations

import torch


@torch.inference_mode()
def generate(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
):
    """Yield (B,) tensors of new tokens one step at a time, using a KV cache.

    temperature 0 is greedy. Stops when every row has produced ``eos_id`` or the context is full: the prompt and the
    new tokens together are at most ``max_seq_len`` tokens (OpenAI's, vLLM's and transformers' rule).
    Runs in inference mode, so the tokens are inference tensors.
    """
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        B = idx.size(0)
        cache = model.new_kv_cache(B, idx.device)
        pos, step_in = 0, idx
        done = [False] * B  # rows that produced eos_id, as Python bools: cheaper per step than ops on a (B,) tensor
        seen = idx
        for _ in range(min(max_new_tokens, model.cfg.max_seq_len - idx.size(1))):
            logits = model.decode_step(step_in, cache)[:, -1]
            pos += step_in.size(1)
            if logits.dtype != torch.float32:
                logits = logits.float()
            if repetition_penalty != 1.0:
                prev = logits.gather(1, seen)
                logits.scatter_(1, seen, torch.where(prev > 0, prev / repetition_penalty, prev * repetition_penalty))
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                if any(done):
                    nxt = nxt.masked_fill(torch.tensor(done, device=nxt.device), eos_id)
                done = [d or t == eos_id for d, t in zip(done, nxt.tolist())]
            yield nxt
            if eos_id is not None and all(done):
                break
            step_in = nxt[:, None]
            if repetition_penalty != 1.0:
                seen = torch.cat((seen, step_in), dim=1)
    finally:
        if was_training:
            model.train()


def sample_next(logits, temperature: float, top_k: int | None, top_p: float | None, generator=None):
    """logits: (B, V) -> (B,) token ids.

    Any temperature > 0 and any repetition penalty > 0 sample: the logits are clamped to finite values and shifted
    so that the largest is 0 before the division, so the best token keeps probability mass however small the
    temperature (an overflow to inf, and the NaN of inf - inf, cannot reach the sampler)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    finfo = torch.finfo(logits.dtype)
    logits = logits.clamp(finfo.min, finfo.max)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, finfo.tiny)
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
