"""A decoder-only transformer, Llama-compatible, in plain PyTorch.

RoPE positions, RMSNorm, SwiGLU feed-forward, optional grouped-query attention and tied
embeddings. The weights are Hugging Face's ``LlamaForCausalLM``'s under the same names, except that
q/k/v and gate/up projections are stacked into one matmul each (fewer, larger matmuls, and fewer
calls per decoded token); openllm_ds/export/hf_map.py splits them. No DeepSpeed, Ray or distributed
code here.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from openllm_ds.config import ModelConfig

PastKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v): (B, nkv, S, hs)


class KVCache:
    """Keys and values of every layer for generation, preallocated to max_seq_len and written in place
    (a list of per-layer tensors grown by concatenation costs a copy of the whole history each step).
    Left uninitialised: a position is read only after it has been written."""

    def __init__(self, cfg: ModelConfig, batch: int, device, dtype):
        shape = (batch, cfg.num_kv_heads, cfg.max_seq_len, cfg.head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = 0  # positions filled

    def update(self, layer: int, k, v):
        """Store k, v (B, nkv, T, hs) at the next T positions; the keys and values of all positions so far."""
        T, end = k.size(2), self.pos + k.size(2)
        self.k[layer].narrow(2, self.pos, T).copy_(k)
        self.v[layer].narrow(2, self.pos, T).copy_(v)
        return self.k[layer].narrow(2, 0, end), self.v[layer].narrow(2, 0, end)


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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)  # one fused op
        # normalise in fp32 as Llama does, then cast back
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and a signed sin, (T, hs) each, in HF's rotate_half layout (see apply_rope)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, hs/2)
    return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-freqs.sin(), freqs.sin()), dim=-1)


def apply_rope(x, cos, signed_sin):
    # x: (B, nh, T, hs). rotate_half(x) * sin == roll(x, hs/2) * signed_sin, exactly, in fewer ops
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer  # its slot in a KVCache
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.num_kv_heads, cfg.head_dim
        # q, k and v in one matmul (HF's q_proj, k_proj, v_proj stacked: see export/hf_map.py)
        self.qkv_proj = Linear(cfg.d_model, (cfg.n_heads + 2 * self.n_kv_heads) * cfg.head_dim)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, kv: KVCache | tuple[torch.Tensor, torch.Tensor] | None = None):
        B, T, _ = x.shape
        nh, nkv = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).view(B, T, nh + 2 * nkv, self.head_dim).transpose(1, 2)  # (B, nh + 2 nkv, T, hs)
        qk, v = qkv.split((nh + nkv, nkv), dim=1)
        q, k = apply_rope(qk, cos, sin).split((nh, nkv), dim=1)  # (B, nh, T, hs), (B, nkv, T, hs)
        if isinstance(kv, KVCache):  # generation: attend to the cached positions too
            k, v = kv.update(self.layer, k, v)
        elif kv is not None:  # the list form (ONNX past/present): prepend the past keys/values
            k, v = torch.cat((kv[0], k), dim=2), torch.cat((kv[1], v), dim=2)
        new_kv = (k, v)
        if nkv != nh:
            k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        S = k.size(2)
        if T == S:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        elif T == 1:  # one new query attends to every cached key: no mask needed
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # T new queries attend to all S cached keys up to their own position
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, nh * self.head_dim)
        return self.o_proj(y), new_kv


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.d_model, 2 * cfg.d_ff)  # HF's gate_proj, up_proj stacked
        self.down_proj = Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, kv=None):
        a, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, kv)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.post_attention_layernorm(x)))
        return x, new_kv

    def drop(self, x):
        return F.dropout(x, self.dropout, training=True) if self.training and self.dropout else x


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


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = False
        self.checkpoint_fn = None  # the trainer may set DeepSpeed's activation checkpointing here
        self.apply(self._init_weights)
        # GPT-2 style: scale the residual output projections by depth
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def num_params(self) -> int:
        """Unique parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def forward(self, idx, targets=None, kv_cache: KVCache | PastKV | None = None, start_pos: int = 0,
                last_only: bool = False):
        """idx: (B, T) token ids. Returns (logits (B, T, V), None[, kv cache]), or with ``targets``
        (B, T) (None, the mean next-token cross-entropy, -100 ignored): the loss comes from the hidden
        states without keeping the (B, T, V) logits. ``last_only``: logits (B, 1, V) of the last position.

        With ``kv_cache`` the cache is returned third: a ``KVCache`` is updated in place (``start_pos``
        is its fill); a list (possibly empty) of per-layer past (k, v) gives the list of the present ones.
        """
        B, T = idx.shape
        if isinstance(kv_cache, KVCache):
            start_pos = kv_cache.pos
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        dtype = self.embed_tokens.weight.dtype
        cos, sin = self.rope_cos[start_pos : start_pos + T], self.rope_sin[start_pos : start_pos + T]
        if cos.dtype != dtype:
            cos, sin = cos.to(dtype), sin.to(dtype)
        x = self.embed_tokens(idx)  # (B, T, C)
        if self.training and self.cfg.dropout:
            x = F.dropout(x, self.cfg.dropout)
        new_cache: PastKV = []
        for i, layer in enumerate(self.layers):
            if isinstance(kv_cache, KVCache):
                x = layer(x, cos, sin, kv_cache)[0]
            elif kv_cache is not None:
                x, kv = layer(x, cos, sin, kv_cache[i] if i < len(kv_cache) else None)
                new_cache.append(kv)
            elif self.gradient_checkpointing and self.training:
                fn = lambda h, blk=layer: blk(h, cos, sin)[0]  # noqa: E731
                x = self.checkpoint_fn(fn, x) if self.checkpoint_fn else checkpoint(fn, x, use_reentrant=False)
            else:
                x = layer(x, cos, sin)[0]
        if targets is not None:
            logits, loss = None, self.lm_head(self.norm(x), targets)
        elif last_only:
            logits, loss = self.lm_head(self.norm(x[:, -1:])), None
        else:
            logits, loss = self.lm_head(self.norm(x)), None
        if isinstance(kv_cache, KVCache):
            kv_cache.pos += T
            return logits, loss, kv_cache
        if kv_cache is not None:
            return logits, loss, new_cache
        return logits, loss

    def new_kv_cache(self, batch: int, device) -> KVCache:
        return KVCache(self.cfg, batch, device, self.embed_tokens.weight.dtype)

    @torch.inference_mode()
    def generate(
        self,
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

        temperature 0 is greedy. Stops when every row has produced ``eos_id`` or the context is full.
        Runs in inference mode, so the tokens are inference tensors.
        """
        was_training = self.training
        if was_training:
            self.eval()
        try:
            B = idx.size(0)
            cache = self.new_kv_cache(B, idx.device)
            pos, step_in = 0, idx
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
            seen = idx
            for _ in range(max_new_tokens):
                if pos + step_in.size(1) > self.cfg.max_seq_len:
                    break
                logits, _, cache = self(step_in, kv_cache=cache, start_pos=pos, last_only=True)
                pos += step_in.size(1)
                logits = logits[:, -1]
                if logits.dtype != torch.float32:
                    logits = logits.float()
                if repetition_penalty != 1.0:
                    prev = logits.gather(1, seen)
                    logits.scatter_(1, seen, torch.where(prev > 0, prev / repetition_penalty, prev * repetition_penalty))
                nxt = sample_next(logits, temperature, top_k, top_p, generator)
                if eos_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                    done |= nxt == eos_id
                yield nxt
                if eos_id is not None and bool(done.all()):
                    break
                step_in = nxt[:, None]
                if repetition_penalty != 1.0:
                    seen = torch.cat((seen, step_in), dim=1)
        finally:
            if was_training:
                self.train()


def sample_next(logits, temperature: float, top_k: int | None, top_p: float | None, generator=None):
    """logits: (B, V) -> (B,) token ids."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
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
