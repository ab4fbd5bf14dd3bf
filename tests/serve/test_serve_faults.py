"""The built-in server under bad and heavy traffic, as a separate `openllm-ds serve` process on loopback.

A catalogue of malformed requests (bad JSON, wrong types, huge prompts, absurd parameters, missing or
wrong key, bad HTTP) each gets a 4xx with an OpenAI-style error body; 200 concurrent clients get
their own answers with no 5xx; slow and vanishing clients cost nothing; the process stays up and
its log holds no traceback. Plus: loopback by default, constant-time key check, no pickle from a
PyTorch export, and no request that reaches the file system or a shell.
"""

from __future__ import annotations

import builtins
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from helpers import free_port
from openllm_ds.config import ExportConfig
from openllm_ds.errors import UserError
from openllm_ds.export import export

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-llm"
KEY = "k3y-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 128
MAX_BODY = 1 << 20
NUM_CLIENTS = 200
SUBJECTS = ["The Normans", "Super Bowl 50", "Chicago", "Oxygen", "Warsaw", "The Amazon", "A computer", "Beyonce",
            "Frederic Chopin", "The Yuan dynasty"]
VERBS = ["was", "were named after", "is known for", "became", "lies near", "won", "wrote about", "had", "in 1066",
         "and the", "of the", "built", "said that", "moved to", "is a", "has been", "led the", "began in", "called",
         "studied"]


# --- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_export(tmp_path_factory, tokenizer_dir):
    from helpers import make_fake_run

    root = tmp_path_factory.mktemp("serve_faults")
    make_fake_run(root / "run", tokenizer_dir, tie=True, seed=11)
    out = root / MODEL
    export(ExportConfig(model_dir=str(root / "run"), format="huggingface", output_dir=str(out), verify=False))
    return out


@pytest.fixture(scope="module")
def server(hf_export, tmp_path_factory):
    """`openllm-ds serve` in its own process, with the default --host, an API key and its log in a file."""
    port = free_port()
    log_file = tmp_path_factory.mktemp("serve_log") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OPENLLM_API_KEY", None)
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "openllm_ds.cli", "serve", "--model_path", str(hf_export),
                                 "--port", str(port), "--engine", "builtin", "--api_key", KEY,
                                 "--max_length", str(CONTEXT)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, f"the server exited: {log_file.read_text()[-3000:]}"
            try:
                if call(port, "GET", "/health", auth=False)[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, log_file.read_text()[-3000:]
            time.sleep(0.2)
        yield proc, port, log_file
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def completer(hf_export):
    from openllm_ds.inference import load_completer

    return load_completer(hf_export, "torch", context_length=CONTEXT, model_name=MODEL)


# --- HTTP helpers ----------------------------------------------------------------------------------

def call(port: int, method: str, path: str, body=None, headers: dict | None = None, auth: bool = True,
         timeout: float = 60):
    """(status, response headers, parsed JSON body or None) over a fresh connection."""
    if isinstance(body, (dict, list, int, float)) or body is None and method == "POST":
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={**(AUTH if auth else {}), **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return resp.status, resp.headers, json.loads(data) if data else None  # headers: case-insensitive


def raw_exchange(port: int, data: bytes, timeout: float = 20) -> tuple[int, dict, bytes]:
    """Send bytes as they are; (status, headers, body) of the first response (the server must answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection without an answer (got {buf!r})"
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, headers, body


def completion(**kw) -> dict:
    return {"model": MODEL, "prompt": "The Normans were", "max_tokens": 4, "temperature": 0, **kw}


def chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Who were the Normans?"}], "max_tokens": 4,
            "temperature": 0, **kw}


def assert_openai_error(status: int, body, want_status: int, param=None, code=None):
    assert status == want_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"], body
    assert err["type"] == "invalid_request_error", body
    if param is not None:
        assert err["param"] == param, body
    if code is not None:
        assert err["code"] == code, body


def good_completion(port: int) -> str:
    status, _, body = call(port, "POST", "/v1/completions", completion())
    assert status == 200 and body["object"] == "text_completion", body
    assert body["usage"]["completion_tokens"] >= 1
    return body["choices"][0]["text"]


# --- the catalogue ---------------------------------------------------------------------------------
# (id, method, path, body, extra headers, status, param, code); body: dict/list -> JSON, str/bytes as they are

C, CH = "/v1/completions", "/v1/chat/completions"
CATALOGUE = [
    # not JSON, or not an object
    ("not-json", "POST", C, "{not json", None, 400, None, "invalid_json"),
    ("empty-body", "POST", C, b"", None, 400, None, "invalid_json"),
    ("trailing-garbage", "POST", C, json.dumps(completion()) + " x", None, 400, None, "invalid_json"),
    ("body-list", "POST", C, [completion()], None, 400, None, None),
    ("body-number", "POST", C, 42, None, 400, None, None),
    ("body-string", "POST", C, '"hello"', None, 400, None, None),
    ("body-null", "POST", C, "null", None, 400, None, None),
    ("nan", "POST", C, '{"model": "tiny-llm", "prompt": "x", "temperature": NaN}', None, 400, None, "invalid_json"),
    ("infinity", "POST", C, '{"model": "tiny-llm", "prompt": "x", "top_p": Infinity}', None, 400, None, "invalid_json"),
    ("minus-infinity", "POST", C, '{"model": "tiny-llm", "prompt": "x", "seed": -Infinity}', None, 400, None,
     "invalid_json"),
    ("nested-100k-deep", "POST", C, "[" * 100_000 + "]" * 100_000, None, 400, None, "invalid_json"),
    ("int-of-5000-digits", "POST", C, '{"model": "tiny-llm", "prompt": "x", "seed": ' + "9" * 5000 + "}", None, 400,
     None, "invalid_json"),
    ("not-utf8", "POST", C, b'{"model": "tiny-llm", "prompt": "caf\xe9 \xff\xfe"}', None, 400, None, "invalid_json"),
    ("lone-surrogate-prompt", "POST", C, '{"model": "tiny-llm", "prompt": "x \\ud800"}', None, 400, None,
     "invalid_json"),
    ("lone-surrogate-model", "POST", C, '{"model": "\\udfff", "prompt": "x"}', None, 400, None, "invalid_json"),
    # sizes and framing
    ("no-content-length", "POST", C, None, {"Content-Length": None}, 411, None, "length_required"),
    ("negative-content-length", "POST", C, None, {"Content-Length": "-5"}, 400, None, "bad_request"),
    ("content-length-not-a-number", "POST", C, None, {"Content-Length": "ten"}, 400, None, "bad_request"),
    ("oversized-prompt", "POST", C, completion(prompt="word " * 300, max_tokens=1), None, 400, "prompt",
     "context_length_exceeded"),
    ("many-special-tokens", "POST", C, completion(prompt="</s>" * 200_000), None, 400, "prompt",
     "context_length_exceeded"),
    ("17-prompts", "POST", C, completion(prompt=["x"] * 17), None, 400, "prompt", None),
    # model
    ("model-missing", "POST", C, {"prompt": "x"}, None, 400, "model", None),
    ("model-a-number", "POST", C, completion(model=123), None, 400, "model", None),
    ("model-unknown", "POST", C, completion(model="gpt-4"), None, 404, "model", "model_not_found"),
    ("model-a-path", "POST", C, completion(model="../../../../etc/passwd"), None, 404, "model", "model_not_found"),
    ("model-a-list", "POST", C, completion(model=[MODEL]), None, 400, "model", None),
    # prompt
    ("prompt-missing", "POST", C, {"model": MODEL}, None, 400, "prompt", None),
    ("prompt-a-number", "POST", C, completion(prompt=42), None, 400, "prompt", None),
    ("prompt-list-of-lists-of-strings", "POST", C, completion(prompt=[["a", "b"]]), None, 400, "prompt", None),
    ("prompt-ids-out-of-vocab", "POST", C, completion(prompt=[5, 10**9]), None, 400, "prompt", None),
    ("prompt-ids-negative", "POST", C, completion(prompt=[[5, -1]]), None, 400, "prompt", None),
    ("prompt-bools", "POST", C, completion(prompt=[True, False]), None, 400, "prompt", None),
    ("prompt-empty-list", "POST", C, completion(prompt=[]), None, 400, "prompt", None),
    ("prompt-an-object", "POST", C, completion(prompt={"text": "x"}), None, 400, "prompt", None),
    # sampling parameters
    ("max_tokens-a-string", "POST", C, completion(max_tokens="ten"), None, 400, "max_tokens", None),
    ("max_tokens-1e12", "POST", C, completion(max_tokens=10**12), None, 400, "max_tokens", "context_length_exceeded"),
    ("max_tokens-beyond-context", "POST", C, completion(max_tokens=CONTEXT), None, 400, "max_tokens",
     "context_length_exceeded"),
    ("max_tokens-0", "POST", C, completion(max_tokens=0), None, 400, "max_tokens", None),
    ("max_tokens-negative", "POST", C, completion(max_tokens=-5), None, 400, "max_tokens", None),
    ("max_tokens-float", "POST", C, completion(max_tokens=1.5), None, 400, "max_tokens", None),
    ("max_tokens-bool", "POST", C, completion(max_tokens=True), None, 400, "max_tokens", None),
    ("temperature-a-string", "POST", C, completion(temperature="hot"), None, 400, "temperature", None),
    ("temperature-negative", "POST", C, completion(temperature=-0.5), None, 400, "temperature", None),
    ("temperature-1e308", "POST", C, completion(temperature=1e308), None, 400, "temperature", None),
    ("top_p-2", "POST", C, completion(top_p=2), None, 400, "top_p", None),
    ("top_p-0", "POST", C, completion(top_p=0), None, 400, "top_p", None),
    ("n-0", "POST", C, completion(n=0), None, 400, "n", None),
    ("n-10000", "POST", C, completion(n=10000), None, 400, "n", None),
    ("n-a-string", "POST", C, completion(n="two"), None, 400, "n", None),
    ("stop-a-number", "POST", C, completion(stop=5), None, 400, "stop", None),
    ("stop-list-of-numbers", "POST", C, completion(stop=[1, 2]), None, 400, "stop", None),
    ("stop-empty-string", "POST", C, completion(stop=[""]), None, 400, "stop", None),
    ("stop-5-strings", "POST", C, completion(stop=list("abcde")), None, 400, "stop", None),
    ("stop-100k-chars", "POST", C, completion(stop="x" * 100_000), None, 400, "stop", None),
    ("seed-2**70", "POST", C, completion(seed=2**70), None, 400, "seed", None),
    ("seed-a-string", "POST", C, completion(seed="42"), None, 400, "seed", None),
    ("seed-a-float", "POST", C, completion(seed=1.5), None, 400, "seed", None),
    ("stream-a-string", "POST", C, completion(stream="yes"), None, 400, "stream", None),
    ("stream_options-a-string", "POST", C, completion(stream=True, stream_options="usage"), None, 400,
     "stream_options", None),
    ("logprobs-5", "POST", C, completion(logprobs=5), None, 400, "logprobs", None),
    ("echo-true", "POST", C, completion(echo=True), None, 400, "echo", None),
    ("best_of-3", "POST", C, completion(best_of=3), None, 400, "best_of", None),
    ("presence_penalty-a-list", "POST", C, completion(presence_penalty=[1]), None, 400, "presence_penalty", None),
    ("logit_bias", "POST", C, completion(logit_bias={"5": 100}), None, 400, "logit_bias", None),
    ("unknown-parameter", "POST", C, completion(foo=1), None, 400, "foo", "unknown_parameter"),
    ("chat-parameter-on-completions", "POST", C, completion(messages=[]), None, 400, "messages", "unknown_parameter"),
    ("user-a-number", "POST", C, completion(user=5), None, 400, "user", None),
    # text that is not text (openllm_ds.text.check_text): named by its field, a 400 like any bad parameter
    ("prompt-holding-NUL", "POST", C, completion(prompt="The \u0000 Normans"), None, 400, "prompt", None),
    ("prompt-list-holding-NUL", "POST", C, completion(prompt=["ok", "bad \u0000"]), None, 400, "prompt", None),
    ("prompt-list-holding-null", "POST", C, completion(prompt=["ok", None]), None, 400, "prompt", None),
    ("stop-holding-NUL", "POST", C, completion(stop=["\u0000"]), None, 400, "stop", None),
    ("message-content-holding-NUL", "POST", CH, chat(messages=[{"role": "user", "content": "hi\u0000"}]), None, 400,
     "messages[0].content", None),
    ("lone-surrogate-escape", "POST", C, b'{"model": "tiny-llm", "prompt": "\\udc80 x"}', None, 400, None,
     "invalid_json"),
    ("utf8-encoded-surrogate", "POST", C, b'{"model": "tiny-llm", "prompt": "\xed\xa0\x80"}', None, 400, None,
     "invalid_json"),
    ("latin-1-body", "POST", C, b'{"model": "tiny-llm", "prompt": "caf\xe9"}', None, 400, None, "invalid_json"),
    # sampling parameters out of their one set of ranges (openllm_ds.inference.sampling)
    ("top_k-negative", "POST", C, completion(top_k=-1), None, 400, "top_k", None),
    ("top_k-a-float", "POST", C, completion(top_k=2.5), None, 400, "top_k", None),
    ("repetition_penalty-0", "POST", C, completion(repetition_penalty=0), None, 400, "repetition_penalty", None),
    ("seed-2**64", "POST", C, completion(seed=2**64), None, 400, "seed", None),
    ("temperature-just-above-2", "POST", C, completion(temperature=2.000001), None, 400, "temperature", None),
    ("chat-max_completion_tokens-0", "POST", CH, chat(max_completion_tokens=0), None, 400, "max_completion_tokens",
     None),
    # chat
    ("messages-missing", "POST", CH, {"model": MODEL}, None, 400, "messages", None),
    ("messages-a-string", "POST", CH, chat(messages="hi"), None, 400, "messages", None),
    ("messages-empty", "POST", CH, chat(messages=[]), None, 400, "messages", None),
    ("message-not-an-object", "POST", CH, chat(messages=["hi"]), None, 400, "messages[0]", None),
    ("message-without-role", "POST", CH, chat(messages=[{"content": "hi"}]), None, 400, "messages[0]", None),
    ("message-role-a-list", "POST", CH, chat(messages=[{"role": ["user"], "content": "hi"}]), None, 400,
     "messages[0]", None),
    ("message-role-unknown", "POST", CH, chat(messages=[{"role": "wizard", "content": "hi"}]), None, 400,
     "messages[0]", None),
    ("message-without-content", "POST", CH, chat(messages=[{"role": "user"}]), None, 400, "messages[0].content", None),
    ("message-content-a-number", "POST", CH, chat(messages=[{"role": "user", "content": 5}]), None, 400,
     "messages[0].content", None),
    ("message-content-an-image", "POST", CH,
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]),
     None, 400, "messages[0].content", None),
    ("max_completion_tokens-a-string", "POST", CH, chat(max_completion_tokens="x"), None, 400,
     "max_completion_tokens", None),
    ("chat-max_tokens-a-string-beside-max_completion_tokens", "POST", CH, chat(max_tokens="x", max_completion_tokens=2),
     None, 400, "max_tokens", None),
    ("response_format-json", "POST", CH, chat(response_format={"type": "json_object"}), None, 400, "response_format",
     None),
    ("tools", "POST", CH, chat(tools=[{"type": "function", "function": {"name": "f"}}]), None, 400, "tools", None),
    ("prompt-on-chat", "POST", CH, chat(prompt="x"), None, 400, "prompt", "unknown_parameter"),
    ("chat-oversized", "POST", CH, chat(messages=[{"role": "user", "content": "word " * 300}]), None, 400, "messages",
     "context_length_exceeded"),
    # routes and methods
    ("GET-completions", "GET", C, None, None, 405, None, "method_not_allowed"),
    ("POST-models", "POST", "/v1/models", {}, None, 405, None, "method_not_allowed"),
    ("PUT-models", "PUT", "/v1/models", None, None, 405, None, "method_not_allowed"),
    ("DELETE-completions", "DELETE", C, None, None, 405, None, "method_not_allowed"),
    ("PATCH-chat", "PATCH", CH, {}, None, 405, None, "method_not_allowed"),
    ("OPTIONS", "OPTIONS", C, None, None, 405, None, "method_not_allowed"),
    ("unknown-method", "BREW", C, None, None, 405, None, "method_not_allowed"),
    ("unknown-path", "GET", "/v1/engines", None, None, 404, None, "not_found"),
    ("unknown-POST-path", "POST", "/v1/embeddings", {"model": MODEL, "input": "x"}, None, 404, None, "not_found"),
    ("unknown-model-card", "GET", "/v1/models/gpt-4", None, None, 404, "model", "model_not_found"),
    ("model-card-path-traversal", "GET", "/v1/models/../../etc/passwd", None, None, 404, "model", "model_not_found"),
    ("model-card-encoded-traversal", "GET", "/v1/models/..%2F..%2Fetc%2Fpasswd", None, None, 404, "model",
     "model_not_found"),
]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_malformed_request_gets_a_4xx_openai_error(server, case):
    _, port, _ = server
    name, method, path, body, headers, status, param, code = case
    if headers and None in headers.values():  # http.client adds Content-Length itself: send the bytes raw
        raw = f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
        got, _, data = raw_exchange(port, raw.encode())
        assert_openai_error(got, json.loads(data), status, param, code)
        return
    if headers and "Content-Length" in headers:
        raw = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
               f"Content-Length: {headers['Content-Length']}\r\n\r\n{{}}")
        got, resp_headers, data = raw_exchange(port, raw.encode())
        assert_openai_error(got, json.loads(data), status, param, code)
        assert resp_headers["connection"] == "close"  # the framing is unknown: never reuse the connection
        return
    got, resp_headers, data = call(port, method, path, body)
    assert_openai_error(got, data, status, param, code)
    assert resp_headers["Content-Type"] == "application/json"
    if status == 405:  # the methods the path takes
        assert resp_headers["Allow"] == {C: "POST", CH: "POST", "/v1/models": "GET"}[path]


def test_bodies_over_the_limit_get_413_before_they_are_read(server):
    _, port, _ = server
    for length in (MAX_BODY + 1, 10**12, 10**40):  # announced, never sent: the server must not wait for it
        t = time.time()
        status, headers, data = raw_exchange(port, f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: "
                                                   f"Bearer {KEY}\r\nContent-Length: {length}\r\n\r\n".encode())
        if length == 10**40:  # too long a number for uvicorn's HTTP parser: it refuses the request itself
            assert_openai_error(status, json.loads(data), 400, None, "bad_request")
        else:
            assert_openai_error(status, json.loads(data), 413, None, "request_too_large")
        assert headers["connection"] == "close" and time.time() - t < 5
    # sent for real: a 1 MiB prompt inside a body just over the limit
    status, _, data = call(port, "POST", "/v1/completions", completion(prompt="x" * MAX_BODY))
    assert_openai_error(status, data, 413, None, "request_too_large")
    # chunked bodies have no length up front: refused
    status, headers, data = raw_exchange(port, f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                               f"{KEY}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode())
    assert_openai_error(status, json.loads(data), 411, None, "length_required")
    assert headers["connection"] == "close"
    # two different Content-Lengths (request smuggling): refused
    status, _, data = raw_exchange(port, f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                                         "Content-Length: 2\r\nContent-Length: 40\r\n\r\n{}".encode())
    assert_openai_error(status, json.loads(data), 400, None, "bad_request")


def test_malformed_http_gets_a_json_4xx(server):
    _, port, _ = server
    cases = [
        (b"GET /health HTTP/1.1 extra\r\n\r\n", 400),  # four words in the request line
        (b"\x00\xff garbage\r\n\r\n", 400),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 400),  # request line too long
        (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n", 400),
        (b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", 400),  # header line too long
    ]  # uvicorn's h11 parser answers all of these itself (a 400, never 414/431), in OpenAI's JSON shape
    for data, want in cases:
        status, headers, body = raw_exchange(port, data)
        assert_openai_error(status, json.loads(body), want, None, "bad_request")
        assert headers["connection"] == "close"
    # HEAD: a 405 with no body
    status, headers, _ = raw_exchange(port, f"HEAD /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                                            "Connection: close\r\n\r\n".encode())
    assert status == 405 and headers["allow"] == "GET"


def test_a_body_sent_with_a_get_is_not_taken_for_a_second_request(server):
    _, port, _ = server
    smuggled = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n"
    data = (f"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: {len(smuggled)}\r\n\r\n{smuggled}").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):  # the server closes after the one answer
            received += chunk
    assert received.count(b"HTTP/1.1 ") == 1 and b"connection: close" in received.lower()
    assert json.loads(received.partition(b"\r\n\r\n")[2]) == {"status": "ok", "model": MODEL}


# --- authentication --------------------------------------------------------------------------------

def test_every_endpoint_but_health_needs_the_key(server):
    _, port, _ = server
    endpoints = [("GET", "/v1/models", None), ("GET", f"/v1/models/{MODEL}", None), ("POST", C, completion()),
                 ("POST", CH, chat()), ("GET", "/v1/nothing", None), ("POST", C, "{not json")]
    wrong = [None, "", "Bearer", "Bearer ", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", "Bearer wrong", f"Basic {KEY}",
             KEY, f"Token {KEY}", f"Bearer {KEY.upper()}", "Bearer " + "x" * 10_000]
    for method, path, body in endpoints:
        for header in wrong:
            headers = {} if header is None else {"Authorization": header}
            status, resp_headers, data = call(port, method, path, body, headers=headers, auth=False)
            assert status == 401, (method, path, header, data)
            assert_openai_error(status, data, 401, None, "invalid_api_key")
            assert resp_headers["WWW-Authenticate"] == "Bearer"
    assert call(port, "GET", "/health", auth=False)[:1] == (200,)
    status, _, data = call(port, "GET", "/v1/models", headers={"Authorization": f"bearer  {KEY} "}, auth=False)
    assert status == 200 and [m["id"] for m in data["data"]] == [MODEL]


def test_the_key_is_compared_in_constant_time(completer, monkeypatch):
    import hmac

    from openllm_ds.serve import start_server

    seen = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: seen.append((a, b)) or real(a, b))
    with start_server(completer=completer, api_key="abc") as srv:
        assert call(srv.port, "GET", "/v1/models", headers={"Authorization": "Bearer abd"}, auth=False)[0] == 401
        assert call(srv.port, "GET", "/v1/models", headers={"Authorization": "Bearer abc"}, auth=False)[0] == 200
    assert seen == [(b"abd", b"abc"), (b"abc", b"abc")]


def test_an_empty_api_key_is_refused(hf_export, completer):
    from openllm_ds.serve import serve, start_server

    with pytest.raises(UserError, match="--api_key .*is empty"):
        start_server(completer=completer, api_key="  ")
    with pytest.raises(UserError, match="--api_key .*is empty"):
        serve(hf_export, engine="builtin", api_key="")
    # an empty OPENLLM_API_KEY is refused too (it used to start a server with no authentication at all)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENLLM_API_KEY": ""}
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "openllm_ds.cli", "serve", "--model_path", str(hf_export), "--engine",
                        "builtin", "--port", str(port)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: OPENLLM_API_KEY is empty" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


# --- binding ----------------------------------------------------------------------------------------

def test_the_server_listens_on_loopback_only_by_default(server):
    import inspect

    from openllm_ds.cli import build_parser
    from openllm_ds.serve import serve, start_server

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(start_server).parameters["host"].default == "127.0.0.1"
    proc, port, log_file = server  # started without --host
    assert f"at http://127.0.0.1:{port}/v1" in log_file.read_text()
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True) \
        if os.path.exists("/usr/bin/ss") or os.path.exists("/bin/ss") else None
    if out is not None and out.returncode == 0:
        assert f"127.0.0.1:{port}" in out.stdout and f"0.0.0.0:{port}" not in out.stdout and f"*:{port}" not in out.stdout
    with pytest.raises(ConnectionRefusedError):  # another loopback address of this machine: not listened on
        socket.create_connection(("127.0.0.2", port), timeout=5).close()


# --- slow, vanishing and leaving clients ------------------------------------------------------------

def test_slow_aborted_and_silent_clients_cost_nothing(server):
    _, port, _ = server
    body = json.dumps(completion()).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    # a client that dribbles its request a few bytes at a time is answered normally
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        data = head.encode() + body
        for i in range(0, len(data), 16):
            sock.sendall(data[i:i + 16])
            time.sleep(0.01)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 ")
    # clients that go away: before the headers end, mid-body, right after connecting, after a body and no read
    for data in (head[:30].encode(), head.encode() + body[:10], b"", head.encode() + body):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(data)
        sock.close()
    # a pile of silent connections holds no generation slot
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    try:
        t = time.time()
        good_completion(port)
        assert time.time() - t < 20
    finally:
        for s in silent:
            s.close()


def test_clients_leaving_mid_stream_free_their_slots(server):
    _, port, _ = server
    body = json.dumps(completion(prompt="The University of Chicago", max_tokens=CONTEXT - 10, stream=True,
                                 temperature=1.0, seed=1)).encode()
    for _ in range(8):  # twice the server's 4 generation slots: a leaked slot would block the request below
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert b"text/event-stream" in sock.recv(4096)
    status, _, data = call(port, "POST", "/v1/completions", completion(max_tokens=2), timeout=30)
    assert status == 200 and data["usage"]["completion_tokens"] >= 1


def test_a_body_that_stalls_gets_408(completer):
    from openllm_ds.serve import start_server

    with start_server(completer=completer, body_timeout=0.5) as srv:
        status, headers, data = raw_exchange(srv.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                                       b"Content-Length: 100\r\n\r\n{\"model\"")
        assert_openai_error(status, json.loads(data), 408, None, "request_timeout")
        assert headers["connection"] == "close"
        assert call(srv.port, "GET", "/health")[0] == 200


# --- 200 concurrent clients -------------------------------------------------------------------------

def _ask(port: int, i: int, prompt: str, stream: bool) -> tuple[int, str, str]:
    """(status, text, response id) of one sampled completion, seeded by i; a stream's text is put together."""
    body = completion(prompt=prompt, max_tokens=6, temperature=1.0, seed=1000 + i, stream=stream)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers=AUTH)
        resp = conn.getresponse()
        data = resp.read().decode()
    finally:
        conn.close()
    if resp.status != 200:
        return resp.status, data, ""
    if not stream:
        out = json.loads(data)
        return 200, out["choices"][0]["text"], out["id"]
    events = [line[len("data: "):] for line in data.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", data
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1, data
    return 200, "".join(c["choices"][0]["text"] for c in chunks), chunks[0]["id"]


def test_200_concurrent_clients_get_their_own_answers(server):
    proc, port, log_file = server
    prompts = [f"{s} {v}" for v in VERBS for s in SUBJECTS]
    assert len(set(prompts)) == NUM_CLIENTS
    streams = [i % 4 == 3 for i in range(NUM_CLIENTS)]  # a quarter of the clients stream
    t0 = time.time()
    alone = [_ask(port, i, p, s) for i, (p, s) in enumerate(zip(prompts, streams))]  # one at a time
    t_serial = time.time() - t0
    assert all(status == 200 for status, _, _ in alone), [a for a in alone if a[0] != 200][:3]
    # seeded sampling from a random model: nearly every answer differs, so a mix-up could not hide
    assert len({text for _, text, _ in alone}) >= NUM_CLIENTS - 5

    barrier = threading.Barrier(NUM_CLIENTS)

    def client(i):
        barrier.wait(timeout=60)  # all 200 connect at the same moment
        return _ask(port, i, prompts[i], streams[i])

    t0 = time.time()
    with ThreadPoolExecutor(NUM_CLIENTS) as pool:
        together = list(pool.map(client, range(NUM_CLIENTS)))
    t_concurrent = time.time() - t0
    statuses = [status for status, _, _ in together]
    assert statuses == [200] * NUM_CLIENTS, {s: statuses.count(s) for s in set(statuses)}
    mixed = [i for i in range(NUM_CLIENTS) if together[i][1] != alone[i][1]]
    assert mixed == [], f"{len(mixed)} answers differ from the same request sent alone, e.g. #{mixed[:5]}"
    assert len({rid for _, _, rid in together}) == NUM_CLIENTS  # every response its own id
    assert proc.poll() is None
    print(f"\n{NUM_CLIENTS} clients: one at a time {t_serial:.1f} s, all at once {t_concurrent:.1f} s, "
          f"{statuses.count(200)} x 200")


# --- nothing from a request reaches the file system or a shell --------------------------------------

def test_no_request_reaches_the_file_system_or_a_shell(completer, monkeypatch, tmp_path):
    from openllm_ds.serve import start_server

    with start_server(completer=completer, api_key=KEY) as srv:
        calls = []

        def record(name, real):
            def wrapper(*a, **kw):
                # the server's threads; FastAPI looks up its endpoints' own source files (inspect.getsourcefile)
                if threading.current_thread().name.startswith(("openllm-ds-server", "openllm-ds-generate")) \
                        and not str(a[:1][0] if a else "").endswith(".py"):
                    calls.append((name, a[:1]))
                return real(*a, **kw)
            return wrapper

        for mod, name in ((builtins, "open"), (os, "open"), (os, "system"), (os, "popen"), (os, "execvpe"),
                          (subprocess, "Popen"), (os, "listdir"), (os, "stat"), (os, "remove"), (os, "unlink")):
            monkeypatch.setattr(mod, name, record(f"{mod.__name__}.{name}", getattr(mod, name)))
        marker = tmp_path / "pwned"
        nasty = [f"$(touch {marker})", f"; touch {marker}", f"`touch {marker}`", f"../../../../{marker}",
                 str(marker), "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"]
        for text in nasty:
            assert call(srv.port, "POST", C, completion(model=text))[0] == 404
            assert call(srv.port, "GET", f"/v1/models/{text.replace(' ', '%20')}")[0] in (400, 404)
            assert call(srv.port, "POST", C, completion(prompt=text, max_tokens=2))[0] == 200
            assert call(srv.port, "POST", CH, chat(messages=[{"role": "user", "content": text}], max_tokens=2))[0] == 200
            assert call(srv.port, "POST", C, completion(stop=text[:200], max_tokens=2))[0] == 200
        monkeypatch.undo()
    assert calls == [], calls[:12]
    assert not marker.exists()


# --- weights_only loading of a PyTorch export --------------------------------------------------------

class _Payload:
    """Unpickling this object runs code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"__import__('pathlib').Path({str(self.marker)!r}).write_text('pwned')",)


def test_a_pytorch_export_with_pickled_code_is_refused(hf_export, tmp_path):
    from openllm_ds.cli import main as cli_main
    from openllm_ds.inference import load_completer
    from openllm_ds.serve import serve

    export(ExportConfig(model_dir=str(hf_export), format="pytorch", output_dir=str(tmp_path / "pt"), verify=False))
    state = torch.load(tmp_path / "pt" / "model.pt", weights_only=True)
    # the payload is live: loaded without weights_only it writes its marker
    proof = tmp_path / "proof"
    torch.save({**state, "extra": _Payload(proof)}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert proof.read_text() == "pwned"

    marker = tmp_path / "marker"
    torch.save({**state, "extra": _Payload(marker)}, tmp_path / "pt" / "model.pt")
    with pytest.raises(UserError, match="refusing to load .*pickled objects other than tensors"):
        load_completer(tmp_path / "pt", "torch", context_length=CONTEXT)
    with pytest.raises(UserError, match="refusing to load"):
        serve(tmp_path / "pt", engine="builtin", port=free_port())
    assert cli_main(["serve", "--model_path", str(tmp_path / "pt"), "--engine", "builtin",
                     "--port", str(free_port())]) == 2
    assert not marker.exists()


def test_a_zero_checkpoint_with_pickled_code_is_refused(tokenizer_dir, tmp_path):
    """DeepSpeed's zero_to_fp32 unpickles with weights_only=False; export (and serve --backend onnx) force it on."""
    pytest.importorskip("deepspeed")
    import tempfile

    from helpers import make_fake_run

    from openllm_ds.inference import load_completer

    run = tmp_path / "run"
    make_fake_run(run, tokenizer_dir)
    tag = run / "checkpoints" / "step_00000010"
    (tag / "model.safetensors").unlink()  # ZeRO shards only, as a DeepSpeed save from elsewhere
    marker = tmp_path / "marker"
    for name in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"):
        torch.save({"optimizer_state_dict": {"zero_stage": 2}, "module": {}, "extra": _Payload(marker)}, tag / name)
    with pytest.raises(UserError, match="refusing to load .*step_00000010.*pickled objects"):
        export(ExportConfig(model_dir=str(run), format="huggingface", output_dir=str(tmp_path / "hf"), verify=False))
    before = set(Path(tempfile.gettempdir()).glob("openllm-ds-onnx-*"))
    with pytest.raises(UserError, match="refusing to load"):
        load_completer(run, "onnx", context_length=CONTEXT)
    assert set(Path(tempfile.gettempdir()).glob("openllm-ds-onnx-*")) == before  # its temporary dir is gone
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)  # the payload is live
    assert marker.read_text() == "pwned"


# --- after everything ---------------------------------------------------------------------------------

def test_the_server_process_is_still_up_and_logged_no_error(server):
    proc, port, log_file = server
    assert proc.poll() is None
    assert call(port, "GET", "/health", auth=False)[2] == {"status": "ok", "model": MODEL}
    text = good_completion(port)
    assert text == good_completion(port)  # greedy: the same answer again
    status, _, data = call(port, "POST", CH, chat())
    assert status == 200 and data["choices"][0]["message"]["role"] == "assistant"
    log = log_file.read_text()
    assert "Traceback" not in log and "Exception occurred" not in log and '" 500 ' not in log, log[-3000:]
