"""Sampling parameters: every value in a documented range generates, edges included, on every surface (the built-in
server's requests, `openllm-ds generate`'s function, `openllm_ds.load(...).generate`); every value outside is one
error naming the parameter as that surface spells it (a 400 over HTTP). One check does both for all of them:
``openllm_ds.inference.sampling.SamplingParams``."""

from __future__ import annotations

import http.client
import json
import math

import pytest
import torch

import openllm_ds
from openllm_ds.errors import UserError
from openllm_ds.evaluation import generate_text
from openllm_ds.model import generate, sample_next
from openllm_ds.inference.sampling import SamplingError, SamplingParams
from openllm_ds.serve import start_server

PROMPT = "river castle"
# in range, edges included: each must generate (no NaN, no traceback, no 500)
IN_RANGE = [("temperature", 0.0), ("temperature", 1e-300), ("temperature", 5e-324), ("temperature", 2.0),
            ("top_p", 1e-300), ("top_p", 1.0), ("top_k", 1), ("top_k", 0), ("top_k", 10_000),
            ("repetition_penalty", 1e-300), ("repetition_penalty", 1e300), ("repetition_penalty", 1.0),
            ("seed", 0), ("seed", 2**63 - 1), ("seed", 2**64 - 1), ("seed", -(2**63)),
            ("n", 1), ("n", 16), ("stop", ["x" * 256] * 4), ("stop", "e")]
# out of range: one error naming the parameter (JSON cannot carry NaN: those are HTTP's invalid JSON, tested there)
OUT_OF_RANGE = [("temperature", -0.1), ("temperature", 2.0001), ("temperature", math.nan), ("temperature", "1"),
                ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("top_k", 2.5), ("repetition_penalty", 0.0),
                ("repetition_penalty", -1.0), ("repetition_penalty", math.inf), ("seed", 2**64), ("seed", -(2**63) - 1),
                ("seed", 1.5), ("n", 0), ("n", 17), ("stop", [""]), ("stop", ["a"] * 5), ("stop", ["x" * 257]),
                ("stop", [None]), ("stop", ["a\x00"]), ("max_tokens", 0), ("max_tokens", True)]
API_NAMES = {"max_tokens": "max_new_tokens"}
CLI_NAMES = {"max_tokens": "max_new_tokens", "n": "num_samples"}  # generate_text's arguments (its flags: --NAME)


@pytest.fixture(scope="module")
def lm(small_run):
    with openllm_ds.load(small_run, context_length=32) as lm:
        yield lm


@pytest.fixture(scope="module")
def server(lm):
    with start_server(completer=lm.completer) as srv:
        yield srv


def post(server, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def sampled(param: str, value) -> dict:
    """The parameter, with sampling on (temperature 1, a seed) unless it is the one tested."""
    return {"temperature": 1.0, "seed": 7, param: value}


@pytest.mark.parametrize("param,value", IN_RANGE, ids=[f"{p}={v!r}"[:40] for p, v in IN_RANGE])
def test_every_value_in_range_generates_everywhere(param, value, lm, server, small_run):
    params = SamplingParams(max_tokens=4, **sampled(param, value))  # the one check accepts it
    status, body = post(server, {"model": lm.completer.model_name, "prompt": PROMPT, "max_tokens": 4,
                                 **sampled(param, value)})
    assert status == 200, body
    assert len(body["choices"]) == params.n and body["usage"]["completion_tokens"] <= 4 * params.n
    assert all(c["finish_reason"] in ("stop", "length") and isinstance(c["text"], str) for c in body["choices"])
    if param != "n":
        assert isinstance(lm.generate(PROMPT, max_new_tokens=4, **sampled(param, value)), str)
    if param != "stop":
        cli = sampled(CLI_NAMES.get(param, param), value)
        texts = generate_text(str(small_run), PROMPT, max_new_tokens=4, stream=False, **cli)
        assert len(texts) == params.n and all(isinstance(t, str) for t in texts)


@pytest.mark.parametrize("param,value", OUT_OF_RANGE, ids=[f"{p}={v!r}"[:40] for p, v in OUT_OF_RANGE])
def test_every_value_out_of_range_is_one_error_naming_it_everywhere(param, value, lm, server, small_run):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**{"max_tokens": 4, param: value})
    assert e.value.param == param and str(e.value).startswith(param)
    if param != "n":
        with pytest.raises(UserError, match=rf"^{API_NAMES.get(param, param)}\b"):
            lm.generate(PROMPT, **{"max_new_tokens": 4, API_NAMES.get(param, param): value})
    if param != "stop":
        name = CLI_NAMES.get(param, param)
        with pytest.raises(UserError, match=rf"^--{name} "):
            generate_text(str(small_run), PROMPT, stream=False, **{"max_new_tokens": 4, name: value})
    if isinstance(value, float) and not math.isfinite(value):
        return  # not JSON
    status, body = post(server, {"model": lm.completer.model_name, "prompt": PROMPT, "max_tokens": 4, param: value})
    assert status == 400 and body["error"]["param"] == param, body


def test_max_tokens_that_exactly_fill_the_context(lm, server, small_run):
    """The server takes max_tokens up to what fits the context (more is OpenAI's context_length_exceeded); the
    API and `generate` stop where the context ends."""
    room = 32 - len(lm.completer.encode(PROMPT))
    status, body = post(server, {"model": lm.completer.model_name, "prompt": PROMPT, "max_tokens": room,
                                 "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] <= room, body
    status, body = post(server, {"model": lm.completer.model_name, "prompt": PROMPT, "max_tokens": room + 1})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert isinstance(lm.generate(PROMPT, max_new_tokens=10**9), str)
    _, reasons, tokens = lm.completer.complete(lm.completer.encode(PROMPT), SamplingParams(max_tokens=10**9, temperature=0))
    assert tokens <= room and reasons[0] in ("stop", "length")
    assert isinstance(generate_text(str(small_run), PROMPT, max_new_tokens=room, temperature=0.0, stream=False)[0], str)


def test_sample_next_keeps_every_edge_finite():
    """Extreme logits, the smallest and largest temperatures, a penalty that overflows the logits: always valid ids
    (torch.multinomial raises on a NaN or inf probability)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g) * 1e30
    logits[1, :] = torch.finfo(torch.float32).max
    logits[2, :7] = float("inf")  # what a repetition penalty of 1e-300 makes of a positive logit
    logits[3, :] = -float("inf")
    logits[3, 5] = float("inf")
    for temperature in (5e-324, 1e-300, 1e-45, 1e-3, 2.0):
        for top_k, top_p in ((None, None), (1, None), (None, 1e-300), (50, 0.5)):
            ids = sample_next(logits.clone(), temperature, top_k, top_p, g)
            assert ids.shape == (4,) and bool(((ids >= 0) & (ids < 300)).all())
            assert int(ids[3]) == 5  # the only finite choice


class _Repeats:
    """A model that always prefers the tokens it has seen: repetition penalties of every size act on every step."""

    def __init__(self):
        from openllm_ds.config import ModelConfig

        self.cfg = ModelConfig(vocab_size=50, d_model=8, n_layers=1, n_heads=1, d_ff=8, max_seq_len=64)

    def new_kv_cache(self, batch, device):
        return []

    def decode_step(self, idx, cache):
        logits = torch.full((idx.size(0), idx.size(1), 50), -3.0)
        logits[..., :3] = 40.0
        return logits


@pytest.mark.parametrize("penalty", [1e-300, 1e-3, 1.0, 7.0, 1e300])
def test_repetition_penalty_edges_decode_to_the_end(penalty):
    for temperature in (0.0, 1e-300, 1.0, 2.0):
        steps = list(generate(_Repeats(), torch.tensor([[0, 1, 2, 3]] * 2), 40, temperature=temperature,
                              repetition_penalty=penalty, generator=torch.Generator().manual_seed(1)))
        assert len(steps) == 40 and all(bool(((t >= 0) & (t < 50)).all()) for t in steps)
