"""A decoder-only transformer, Llama-compatible, in plain PyTorch.

RoPE positions, RMSNorm, SwiGLU feed-forward, optional grouped-query attention and tied
embeddings. The weights are Hugging Face's ``LlamaForCausalLM``'s under the same names, except that
q/k/v and gate/up projections are stacked into one matmul each (fewer, larger matmuls, and fewer
calls per decoded token); openllm_ds/model/hf_map.py splits them. No DeepSpeed, Ray or distributed
code here.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from openllm_ds.config import ModelConfig
from openllm_ds.model.kernels import Linear, LMHead

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


def padding_mask(attention_mask: torch.Tensor, T: int, dtype) -> torch.Tensor:
    """The additive attention bias (B, 1, T, S) of the last T of S positions: each query sees the keys up to its own
    position whose ``attention_mask`` (B, S) is 1. A large negative rather than -inf: a padding query that sees no
    key then averages them (its output is never used) instead of turning into NaN."""
    S = attention_mask.size(1)
    causal = torch.ones(T, S, dtype=torch.bool, device=attention_mask.device).tril(diagonal=S - T)
    allowed = causal & attention_mask.bool()[:, None, None, :]
    return (~allowed).to(dtype) * torch.finfo(dtype).min


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
        # q, k and v in one matmul (HF's q_proj, k_proj, v_proj stacked: see model/hf_map.py)
        self.qkv_proj = Linear(cfg.d_model, (cfg.n_heads + 2 * self.n_kv_heads) * cfg.head_dim)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, kv: KVCache | tuple[torch.Tensor, torch.Tensor] | None = None, mask=None):
        """``mask``: an additive (B, 1, T, S) attention bias (0 or a large negative), for padded batches."""
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
        if mask is not None:  # padding and causality, as the caller built them
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif T == S:
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

    def forward(self, x, cos, sin, kv=None, mask=None):
        a, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, kv, mask)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.post_attention_layernorm(x)))
        return x, new_kv

    def drop(self, x):
        return F.dropout(x, self.dropout, training=True) if self.training and self.dropout else x


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

    def forward(self, idx, targets=None):
        """idx: (B, T) token ids -> logits (B, T, V). Training: with ``targets`` (B, T) -> the mean next-token
        cross-entropy (-100 ignored), computed from the hidden states without keeping the (B, T, V) logits."""
        h = self.norm(self._trunk(idx))
        return self.lm_head(h) if targets is None else self.lm_head(h, targets)

    def decode_step(self, idx, cache: KVCache):
        """Generation: the logits (B, 1, V) of the position after ``idx`` (B, T), which follows the ``cache.pos``
        positions already in ``cache``; ``idx``'s keys and values are added to it."""
        x = self._trunk(idx, cache=cache)
        cache.pos += idx.size(1)
        return self.lm_head(self.norm(x[:, -1:]))  # the next token needs the last position only

    def forward_with_past(self, idx, past: PastKV, attention_mask=None, position_ids=None) -> tuple[torch.Tensor, PastKV]:
        """The ONNX graph's form: logits (B, T, V) of ``idx`` after the per-layer past (k, v) (an empty list: none),
        and the present (k, v) of the past and ``idx`` together. ``attention_mask`` (B, P + T; 0 = padding) and
        ``position_ids`` (B, T) serve left-padded batches, as Hugging Face's models take them."""
        present: PastKV = []
        x = self._trunk(idx, past=past, present=present, attention_mask=attention_mask, position_ids=position_ids)
        return self.lm_head(self.norm(x)), present

    def _trunk(self, idx, cache: KVCache | None = None, past: PastKV | None = None, present: PastKV | None = None,
               attention_mask=None, position_ids=None):
        """The hidden states (B, T, C) after the last block."""
        B, T = idx.shape
        start = cache.pos if cache is not None else past[0][0].size(2) if past else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        dtype = self.embed_tokens.weight.dtype
        if position_ids is None:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        else:  # each row's own positions (B, 1, T, hs): a left-padded row starts at 0 after its padding
            cos, sin = self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1)
        mask = None if attention_mask is None else padding_mask(attention_mask, T, dtype)
        if cos.dtype != dtype:
            cos, sin = cos.to(dtype), sin.to(dtype)
        x = self.embed_tokens(idx)  # (B, T, C)
        if self.training and self.cfg.dropout:
            x = F.dropout(x, self.cfg.dropout)
        for i, layer in enumerate(self.layers):
            if cache is not None:
                x = layer(x, cos, sin, cache)[0]
            elif past is not None:
                x, kv = layer(x, cos, sin, past[i] if i < len(past) else None, mask)
                present.append(kv)
            elif self.gradient_checkpointing and self.training:
                fn = lambda h, blk=layer: blk(h, cos, sin)[0]  # noqa: E731
                x = self.checkpoint_fn(fn, x) if self.checkpoint_fn else checkpoint(fn, x, use_reentrant=False)
            else:
                x = layer(x, cos, sin)[0]
        return x

    def new_kv_cache(self, batch: int, device) -> KVCache:
        return KVCache(self.cfg, batch, device, self.embed_tokens.weight.dtype)
