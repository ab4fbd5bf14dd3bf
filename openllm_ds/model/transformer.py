"""A decoder-only transformer, Llama-compatible, in plain PyTorch.

RoPE positions, RMSNorm, SwiGLU feed-forward, optional grouped-query attention and tied
embeddings. The weight layout mirrors Hugging Face's ``LlamaForCausalLM`` one-to-one, so the
export is a rename (see openllm_ds/export/hf.py). No DeepSpeed, Ray or distributed code here.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from openllm_ds.config import ModelConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 as Llama does, then cast back
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs), HF's rotate_half layout
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hs); cos/sin: (T, hs)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, kv: tuple[torch.Tensor, torch.Tensor] | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # generation: prepend the cached keys/values
            k, v = torch.cat((kv[0], k), dim=2), torch.cat((kv[1], v), dim=2)
        new_kv = (k, v)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        S = k.size(2)
        if T == S:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        elif T == 1:  # one new query attends to every cached key: no mask needed
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # T new queries attend to all S cached keys up to their own position
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y), new_kv


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, kv=None):
        a, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, kv)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.post_attention_layernorm(x)))
        return x, new_kv


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
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

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, start_pos: int = 0):
        """idx: (B, T) token ids. Returns (logits (B, T, V), loss or None[, new kv cache]).

        With ``targets`` (B, T) the mean next-token cross-entropy is returned (-100 ignored).
        With ``kv_cache`` (a list, possibly empty) the updated cache is returned third.
        """
        B, T = idx.shape
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        cos = self.rope_cos[start_pos : start_pos + T].to(self.embed_tokens.weight.dtype)
        sin = self.rope_sin[start_pos : start_pos + T].to(self.embed_tokens.weight.dtype)
        x = self.drop(self.embed_tokens(idx))  # (B, T, C)
        new_cache: KVCache = []
        for i, layer in enumerate(self.layers):
            if kv_cache is not None:
                x, kv = layer(x, cos, sin, kv_cache[i] if i < len(kv_cache) else None)
                new_cache.append(kv)
            elif self.gradient_checkpointing and self.training:
                fn = lambda h, blk=layer: blk(h, cos, sin)[0]  # noqa: E731
                x = self.checkpoint_fn(fn, x) if self.checkpoint_fn else checkpoint(fn, x, use_reentrant=False)
            else:
                x = layer(x, cos, sin)[0]
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        if kv_cache is not None:
            return logits, loss, new_cache
        return logits, loss

    @torch.no_grad()
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
        """
        was_training = self.training
        self.eval()
        try:
            B = idx.size(0)
            cache: KVCache = []
            pos, step_in = 0, idx
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
            seen = idx
            for _ in range(max_new_tokens):
                if pos + step_in.size(1) > self.cfg.max_seq_len:
                    break
                logits, _, cache = self(step_in, kv_cache=cache, start_pos=pos)
                pos += step_in.size(1)
                logits = logits[:, -1, :].float()
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
            self.train(was_training)


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
