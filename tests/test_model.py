"""The model: shapes, causality, KV-cache generation, and logits parity with transformers' Llama."""

import math

import pytest
import torch

from openllm_ds.config import ModelConfig
from openllm_ds.export.hf_map import hf_weight_map, to_hf_config
from openllm_ds.model import Transformer

CFG = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, d_ff=96, max_seq_len=32, dropout=0.0)


def _model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def test_forward_shapes_and_initial_loss():
    m = _model()
    idx = torch.randint(0, CFG.vocab_size, (3, 16))
    targets = torch.randint(0, CFG.vocab_size, (3, 16))
    logits, loss = m(idx, targets)
    assert logits.shape == (3, 16, CFG.vocab_size)
    # small init: on random targets an untrained model's loss is close to ln(V)
    assert abs(loss.item() - math.log(CFG.vocab_size)) < 0.2


def test_causal_prefix_logits_do_not_depend_on_future_tokens():
    m = _model()
    a = torch.randint(0, CFG.vocab_size, (1, 20))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % CFG.vocab_size
    la, _ = m(a)
    lb, _ = m(b)
    torch.testing.assert_close(la[0, :10], lb[0, :10])
    assert not torch.allclose(la[0, 10:], lb[0, 10:])


def test_num_params_counts_tied_embedding_once():
    tied = _model()
    untied = _model(ModelConfig(**{**CFG.__dict__, "tie_embeddings": False}))
    assert untied.num_params() - tied.num_params() == CFG.vocab_size * CFG.d_model
    per_layer = 4 * 64 * 64 + 3 * 64 * 96 + 2 * 64
    assert tied.num_params() == 97 * 64 + 2 * per_layer + 64


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_kv_cache_generation_matches_full_recompute(kv_heads):
    m = _model(ModelConfig(**{**CFG.__dict__, "n_kv_heads": kv_heads}))
    prompt = torch.randint(0, CFG.vocab_size, (2, 5))
    cached = torch.stack(list(m.generate(prompt, 10, temperature=0)), dim=1)
    seq = prompt
    for _ in range(10):  # greedy without a cache
        nxt = m(seq)[0][:, -1].argmax(-1, keepdim=True)
        seq = torch.cat((seq, nxt), dim=1)
    assert torch.equal(cached, seq[:, 5:])


def test_generate_stops_at_eos_and_is_seeded():
    m = _model()
    prompt = torch.randint(0, CFG.vocab_size, (1, 4))
    first = next(m.generate(prompt, 1, temperature=0)).item()
    out = list(m.generate(prompt, 10, temperature=0, eos_id=first))
    assert len(out) == 1 and out[0].item() == first
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    s1 = [t.item() for t in m.generate(prompt, 8, temperature=0.9, top_k=20, top_p=0.9, generator=g1)]
    s2 = [t.item() for t in m.generate(prompt, 8, temperature=0.9, top_k=20, top_p=0.9, generator=g2)]
    assert s1 == s2


def test_gradient_checkpointing_gives_same_gradients():
    m = _model()
    m.train()
    idx = torch.randint(0, CFG.vocab_size, (2, 12))
    m(idx, idx)[1].backward()
    ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.gradient_checkpointing = True
    m(idx, idx)[1].backward()
    for r, p in zip(ref, m.parameters()):
        torch.testing.assert_close(r, p.grad)


@pytest.mark.parametrize("tie,kv_heads", [(True, None), (False, 2)])
def test_logits_match_transformers_llama(tie, kv_heads):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": tie, "n_kv_heads": kv_heads})
    ours = _model(cfg)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(cfg))).eval()
    sd = ours.state_dict()
    missing, unexpected = hf.load_state_dict({h: sd[o] for o, h in hf_weight_map(cfg).items()}, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tie else set())
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ref = hf(idx).logits
    assert (ours(idx)[0] - ref).abs().max().item() < 1e-4
