"""The model: shapes, causality, KV-cache generation, and logits parity with transformers' Llama."""

import math

import pytest
import torch
import torch.nn.functional as F

from openllm_ds.config import ModelConfig
from openllm_ds.model.hf_map import from_hf_state_dict, to_hf_config, to_hf_state_dict
from openllm_ds.model import Transformer, generate

CFG = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, d_ff=96, max_seq_len=32, dropout=0.0)


def _model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def test_forward_shapes_and_initial_loss():
    m = _model()
    idx = torch.randint(0, CFG.vocab_size, (3, 16))
    targets = torch.randint(0, CFG.vocab_size, (3, 16))
    logits = m(idx)
    assert logits.shape == (3, 16, CFG.vocab_size)
    loss = m(idx, targets)  # with targets: the loss, from the hidden states
    assert loss.shape == ()
    # small init: on random targets an untrained model's loss is close to ln(V)
    assert abs(loss.item() - math.log(CFG.vocab_size)) < 0.2
    assert loss.item() == pytest.approx(F.cross_entropy(logits.view(-1, CFG.vocab_size), targets.view(-1)).item(),
                                        rel=1e-6)


@pytest.mark.parametrize("grad", [True, False])
def test_loss_and_gradients_equal_cross_entropy_on_the_logits(grad):
    """The CPU loss path (logits turned into their gradient in place) against F.cross_entropy, with
    ignored targets (-100) and more rows than one block."""
    torch.manual_seed(1)
    m = Transformer(ModelConfig(**{**CFG.__dict__, "vocab_size": 5000})).train()
    idx = torch.randint(0, 5000, (3, 32))
    targets = torch.randint(0, 5000, (3, 32))
    targets[:, ::5] = -100
    with torch.set_grad_enabled(grad):
        loss = m(idx, targets)
    if grad:
        loss.backward()
    ours = {n: p.grad.clone() for n, p in m.named_parameters()} if grad else None
    m.zero_grad()
    logits = m(idx)
    ref = F.cross_entropy(logits.view(-1, 5000), targets.view(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    if grad:
        ref.backward()
        for n, p in m.named_parameters():
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-5, atol=1e-7)


def test_causal_prefix_logits_do_not_depend_on_future_tokens():
    m = _model()
    a = torch.randint(0, CFG.vocab_size, (1, 20))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % CFG.vocab_size
    la = m(a)
    lb = m(b)
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
    cached = torch.stack(list(generate(m, prompt, 10, temperature=0)), dim=1)
    seq = prompt
    for _ in range(10):  # greedy without a cache
        nxt = m(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat((seq, nxt), dim=1)
    assert torch.equal(cached, seq[:, 5:])
    # the decoding steps' logits (one token, last position only, transposed weights) equal the full pass's
    torch.testing.assert_close(_step_logits(m, seq, 5), m(seq)[:, 4:], rtol=1e-5, atol=1e-5)


def _step_logits(m, seq, prompt_len):
    """Logits at positions prompt_len - 1 onwards, as generate computes them: a prefill, then one token a step."""
    cache = m.new_kv_cache(seq.size(0), seq.device)
    with torch.inference_mode():
        out = [m.decode_step(seq[:, :prompt_len], cache)]
        out += [m.decode_step(seq[:, i : i + 1], cache) for i in range(prompt_len, seq.size(1))]
    return torch.cat(out, dim=1)


def test_decoding_sees_weights_loaded_after_it():
    """The decoding step's transposed weight copies follow the weights: load_state_dict writes in place."""
    m, other = _model(seed=0), _model(seed=1)
    seq = torch.randint(0, CFG.vocab_size, (1, 12))
    list(generate(m, seq[:, :4], 3, temperature=0))  # makes the copies
    m.load_state_dict(other.state_dict())
    torch.testing.assert_close(_step_logits(m, seq, 4), other(seq)[:, 3:], rtol=1e-5, atol=1e-5)


def test_generate_stops_at_eos_and_is_seeded():
    m = _model()
    prompt = torch.randint(0, CFG.vocab_size, (1, 4))
    first = next(generate(m, prompt, 1, temperature=0)).item()
    out = list(generate(m, prompt, 10, temperature=0, eos_id=first))
    assert len(out) == 1 and out[0].item() == first
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    s1 = [t.item() for t in generate(m, prompt, 8, temperature=0.9, top_k=20, top_p=0.9, generator=g1)]
    s2 = [t.item() for t in generate(m, prompt, 8, temperature=0.9, top_k=20, top_p=0.9, generator=g2)]
    assert s1 == s2


class _Scripted:
    """A model whose row r says script[r][k] at step k."""

    cfg = CFG

    def __init__(self, script: list[list[int]]):
        self.script, self.step = torch.tensor(script), 0

    def new_kv_cache(self, batch, device):
        return None

    def decode_step(self, idx, cache):
        self.step += 1
        return F.one_hot(self.script[:, self.step - 1], CFG.vocab_size).float()[:, None]


def test_generate_fills_finished_rows_with_eos_until_every_row_is_done():
    script = [[5, 6, 2, 7, 8, 9, 9], [5, 2, 6, 7, 8, 9, 9], [5, 6, 7, 8, 2, 9, 9]]
    out = torch.stack(list(generate(_Scripted(script), torch.zeros(3, 1, dtype=torch.long), 7, temperature=0,
                                    eos_id=2)), dim=1)
    assert out.tolist() == [[5, 6, 2, 2, 2], [5, 2, 2, 2, 2], [5, 6, 7, 8, 2]]


def test_gradient_checkpointing_gives_same_gradients():
    m = _model()
    m.train()
    idx = torch.randint(0, CFG.vocab_size, (2, 12))
    m(idx, idx).backward()
    ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.gradient_checkpointing = True
    m(idx, idx).backward()
    for r, p in zip(ref, m.parameters()):
        torch.testing.assert_close(r, p.grad)


@pytest.mark.parametrize("tie,kv_heads", [(True, None), (False, 2)])
def test_logits_match_transformers_llama(tie, kv_heads):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": tie, "n_kv_heads": kv_heads})
    ours = _model(cfg)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(cfg))).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tie else set())
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ref = hf(idx).logits
    assert (ours(idx) - ref).abs().max().item() < 1e-4


def test_hf_weight_map_round_trip_splits_the_stacked_projections():
    cfg = ModelConfig(**{**CFG.__dict__, "n_kv_heads": 2, "tie_embeddings": False})
    sd = _model(cfg).state_dict()
    hf = to_hf_state_dict(sd, cfg)
    assert hf["model.layers.1.self_attn.q_proj.weight"].shape == (64, 64)
    assert hf["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)  # 2 kv heads x 16
    assert torch.equal(hf["model.layers.1.self_attn.v_proj.weight"], sd["layers.1.self_attn.qkv_proj.weight"][96:])
    assert torch.equal(hf["model.layers.0.mlp.up_proj.weight"], sd["layers.0.mlp.gate_up_proj.weight"][96:])
    back = from_hf_state_dict(hf, cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
