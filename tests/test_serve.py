"""The built-in OpenAI-compatible server, driven by the official openai client on loopback; engine choice."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from openllm_ds.config import ExportConfig
from openllm_ds.errors import UserError
from openllm_ds.export import export
from openllm_ds.serve import choose_engine, load_engine, serve, start_server, vllm_command
from openllm_ds.tokenizer import load_tokenizer

openai = pytest.importorskip("openai")
MODEL = "tiny-llm"
PROMPTS = [
    "The Normans were", "Super Bowl 50 was", "The University of Chicago", "Oxygen is a chemical element",
    "In 1066 the", "The Amazon rainforest", "Warsaw is the capital", "A computer program is",
]


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory, tokenizer_dir):
    from test_export import make_fake_run

    root = tmp_path_factory.mktemp("serve")
    model = make_fake_run(root / "run", tokenizer_dir, tie=True, seed=11)[10]
    out = root / "export"
    export(ExportConfig(model_dir=str(root / "run"), format="huggingface", output_dir=str(out), verify=False))
    return out, model


@pytest.fixture(scope="module")
def engine(hf_export):
    return load_engine(hf_export[0], "torch", max_length=128, model_name=MODEL)


@pytest.fixture(scope="module")
def server(engine):
    with start_server(engine=engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def greedy_tokens(model, ids: list[int], max_new: int, eos: int = 2) -> list[int]:
    out = []
    for t in model.generate(torch.tensor([ids]), max_new, temperature=0):
        out.append(t.item())
        if out[-1] == eos:
            break
    return out


def raw_request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else None


# --- endpoints ----------------------------------------------------------------------------------------

def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].owned_by == "openllm-ds"
    assert client.models.retrieve(MODEL).id == MODEL
    assert raw_request(server, "GET", "/health") == (200, {"status": "ok", "model": MODEL})
    status, body = raw_request(server, "GET", "/v1/nothing")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_greedy_completion_is_our_generate(client, hf_export, tokenizer_dir):
    _, model = hf_export
    tok = load_tokenizer(tokenizer_dir)
    ids = tok.encode(PROMPTS[0])
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    gen = greedy_tokens(model, ids, 12)
    assert r.object == "text_completion" and r.model == MODEL
    assert tok.decode(ids) + r.choices[0].text == tok.decode(ids + [t for t in gen if t != 2])
    assert r.choices[0].finish_reason == ("stop" if gen[-1] == 2 else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), len(gen), len(ids) + len(gen))


def test_streaming_concatenates_to_the_full_answer(client):
    for prompt in PROMPTS[:3]:
        full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks][-1] == full.choices[0].finish_reason
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1]) and len(chunks) > 5
    messages = [{"role": "user", "content": "Who were the Normans?"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=15, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=15, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_chat_uses_the_exported_chat_template(client, engine, hf_export):
    transformers = pytest.importorskip("transformers")
    messages = [{"role": "system", "content": "You answer questions about Wikipedia."},
                {"role": "user", "content": "Where is Normandy?"},
                {"role": "assistant", "content": "In France."},
                {"role": "user", "content": "Who named it?"}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_export[0]))
    want = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert engine.encode(engine.render_chat(messages)) == list(want)
    assert 2 in want  # the assistant turn ends with </s> as one token
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(want) and r.usage.completion_tokens <= 5


def test_seed_makes_sampling_reproducible(client):
    kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=1.0, top_p=0.95)
    a = client.completions.create(seed=42, **kw)
    b = client.completions.create(seed=42, **kw)
    c = client.completions.create(seed=43, **kw)
    assert a.choices[0].text == b.choices[0].text != c.choices[0].text
    many = client.completions.create(seed=42, n=3, **kw)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert len({ch.text for ch in many.choices}) == 3
    assert many == client.completions.create(seed=42, n=3, **kw).model_copy(update={"id": many.id, "created": many.created})
    if all(ch.finish_reason == "length" for ch in many.choices):
        assert many.usage.completion_tokens == 3 * 16


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=24, temperature=0).choices[0].text
    words = full.split()
    stop = " " + words[len(words) // 2]
    cut = full[: full.index(stop)]
    for stream in (False, True):
        r = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop, "@@@"],
                                      stream=stream)
        if stream:
            chunks = list(r)
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert (text, reason) == (cut, "stop")


def test_concurrent_requests_each_get_their_own_answer(client):
    def ask(prompt):
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0).choices[0].text

    sequential = [ask(p) for p in PROMPTS]
    assert len(set(sequential)) == len(PROMPTS)
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(ask, PROMPTS))
    assert concurrent == sequential


def test_client_leaving_mid_stream_frees_its_slot(server, client, engine):
    body = json.dumps({"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 100, "temperature": 0, "stream": True})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        assert b"text/event-stream" in sock.recv(4096)
    deadline = time.time() + 10
    while engine._slots._value != engine.max_concurrency and time.time() < deadline:
        time.sleep(0.05)
    assert engine._slots._value == engine.max_concurrency
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens >= 1


# --- errors -------------------------------------------------------------------------------------------

def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, client):
    status, body = raw_request(server, "POST", "/v1/completions", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128") as e:
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=500)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="'temperature' must be >= 0"):
        client.completions.create(model=MODEL, prompt="x", temperature=-0.5)
    with pytest.raises(openai.BadRequestError, match="leaves no room"):
        client.completions.create(model=MODEL, prompt="word " * 300, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="'n' must be an integer"):
        client.completions.create(model=MODEL, prompt="x", extra_body={"n": "two"})
    with pytest.raises(openai.BadRequestError, match="'max_tokens' must be >= 1"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="'stop' must be a string or a list"):
        client.completions.create(model=MODEL, prompt="x", extra_body={"stop": 5})
    with pytest.raises(openai.BadRequestError, match="needs a role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="'presence_penalty' is not supported"):
        client.completions.create(model=MODEL, prompt="x", presence_penalty=1.0)
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, prompt="x" * (1 << 20))
    assert e.value.status_code == 413
    status, body = raw_request(server, "GET", "/v1/completions")
    assert status == 405
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1


def test_a_server_bug_is_a_500_and_the_server_keeps_serving(client, engine, monkeypatch):
    monkeypatch.setattr(engine, "complete", lambda ids, params: 1 / 0)
    with pytest.raises(openai.InternalServerError, match="internal server error"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    monkeypatch.undo()
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_api_key(engine):
    with start_server(engine=engine, api_key="s3cret-key") as srv:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0).models.list()
        status, body = raw_request(srv, "POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "x"}).encode(),
                                   {"Content-Type": "application/json"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert raw_request(srv, "GET", "/health")[0] == 200  # health needs no key
        good = openai.OpenAI(base_url=srv.base_url, api_key="s3cret-key", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_onnx_backend_gives_the_torch_answers(hf_export, client):
    with start_server(hf_export[0], backend="onnx", max_length=128, model_name=MODEL) as srv:
        tmp = srv.engine.cleanup[0]
        assert (tmp / "decoder_with_past.onnx").is_file() and srv.engine.backend == "onnx"
        onnx_client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0)
        for prompt in PROMPTS[:3]:
            kw = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
            assert onnx_client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text
    assert not tmp.exists()


def test_torch_backend_serves_a_pytorch_export(hf_export, engine, tmp_path):
    export(ExportConfig(model_dir=str(hf_export[0]), format="pytorch", output_dir=str(tmp_path / "pt"), verify=False))
    from openllm_ds.serve import SamplingParams

    pt_engine = load_engine(tmp_path / "pt", "torch", max_length=128)
    ids = engine.encode(PROMPTS[4])
    params = SamplingParams(max_tokens=10, temperature=0)
    assert pt_engine.complete(ids, params) == engine.complete(ids, params)
    with pytest.raises(UserError, match="is an ONNX export; serve it with --backend onnx"):
        (tmp_path / "fake_onnx").mkdir()
        for name in ("decoder_with_past.onnx", "config.json"):
            (tmp_path / "fake_onnx" / name).write_text("{}")
        load_engine(tmp_path / "fake_onnx", "torch")


# --- engine choice and vLLM ---------------------------------------------------------------------------

def test_engine_choice_without_vllm(hf_export):
    assert choose_engine("auto", "torch", hf_export[0]) == "builtin"  # vLLM is not installed here
    with pytest.raises(UserError, match="--engine vllm: vLLM is not installed"):
        choose_engine("vllm", "torch", hf_export[0])
    with pytest.raises(UserError, match="--engine must be one of"):
        choose_engine("tgi", "torch", hf_export[0])
    with pytest.raises(UserError, match="--engine vllm: vLLM is not installed"):
        serve(hf_export[0], engine="vllm")


def test_engine_choice_and_command_with_vllm(hf_export, tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_engine("auto", "torch", hf_export[0]) == "builtin"
    with pytest.raises(UserError, match="no CUDA GPU"):
        choose_engine("vllm", "torch", hf_export[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_engine("auto", "torch", hf_export[0]) == "vllm"
    assert choose_engine("auto", "onnx", hf_export[0]) == "builtin"
    assert choose_engine("builtin", "torch", hf_export[0]) == "builtin"
    with pytest.raises(UserError, match="serves a Hugging Face export"):
        choose_engine("vllm", "torch", tmp_path)

    cmd = vllm_command(hf_export[0], "127.0.0.1", 8123, 512, "tiny")
    i = cmd.index("--host")
    assert cmd[i:] == ["--host", "127.0.0.1", "--port", "8123", "--max-model-len", "128", "--served-model-name", "tiny"]
    assert cmd[1:3] == ["serve", str(hf_export[0])] or cmd[1:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model"]

    seen = {}
    monkeypatch.setattr(os, "execvpe", lambda file, args, env: seen.update(file=file, args=args, env=env))
    serve(hf_export[0], port=8123, engine="auto", api_key="k3y", model_name="tiny")
    assert seen["args"] == cmd and seen["env"]["VLLM_API_KEY"] == "k3y" and "k3y" not in seen["args"]


def test_cli_serve_runs_until_stopped(hf_export):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "openllm_ds.cli", "serve", "--model_path", str(hf_export[0]),
                             "--port", str(port), "--engine", "builtin", "--api_key", "abc", "--model_name", MODEL],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.3)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="abc", max_retries=0)
        assert c.completions.create(model=MODEL, prompt="The", max_tokens=3, temperature=0).usage.completion_tokens >= 1
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"serving '{MODEL}'" in out and f"http://127.0.0.1:{port}/v1" in out
