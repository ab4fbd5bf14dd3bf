"""The built-in OpenAI-compatible HTTP server (standard library only).

Routes: ``GET /health`` (no auth), ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` answers with server-sent
events over chunked HTTP/1.1: ``data: {...}`` ... ``data: [DONE]``). With an API key every route
but /health needs ``Authorization: Bearer KEY`` (compared in constant time). Bodies are bounded
(``max_body_bytes``); errors are OpenAI-style JSON with a 4xx status, and the server keeps serving.
"""

from __future__ import annotations

import hmac
import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from openllm_ds.serve.engine import CompletionEngine, model_card
from openllm_ds.serve.protocol import (
    APIError, GenerationRequest, chunk_body, new_id, now, parse_request, response_body, usage_chunk,
)

MAX_BODY_BYTES = 1 << 20
log = logging.getLogger("openllm_ds.serve")


class OpenAIServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never blocks shutdown
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], engine: CompletionEngine, api_key: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, log_requests: bool = True):
        self.engine = engine
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.log_requests = log_requests
        self.created = now()
        super().__init__(address, OpenAIHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class OpenAIHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    server_version = "openllm-ds"
    timeout = 120  # seconds a client may stay silent mid-request
    server: OpenAIServer

    # --- routing -----------------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch({"/health": self._health, "/v1/models": self._models}, prefix_routes={"/v1/models/": self._model})

    def do_POST(self):
        self._dispatch({"/v1/completions": self._completions, "/v1/chat/completions": self._chat})

    def do_PUT(self):
        self._method_not_allowed()

    do_DELETE = do_PATCH = do_PUT

    def _dispatch(self, routes: dict, prefix_routes: dict | None = None):
        path = self.path.split("?", 1)[0]
        self._body_read = False
        try:
            if path != "/health":
                self._authorize()
            handler = routes.get(path)
            arg = None
            if handler is None:
                for prefix, h in (prefix_routes or {}).items():
                    if path.startswith(prefix):
                        handler, arg = h, path[len(prefix):]
            if handler is None:
                other = {"GET": ("/v1/completions", "/v1/chat/completions"), "POST": ("/health", "/v1/models")}
                if path in other.get(self.command, ()):
                    raise APIError(405, f"{self.command} is not allowed on {path}", code="method_not_allowed")
                raise APIError(404, f"no route {self.command} {path}; see /v1/models, /v1/completions, /v1/chat/completions",
                               code="not_found")
            handler(arg) if arg is not None else handler()
        except APIError as e:
            # An unread request body would be taken for the next request: close such connections.
            unread = self.command == "POST" and not self._body_read
            self._send_json(e.status, e.body(), close=unread or e.status in (411, 413))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # a bug: answer 500, log it, keep serving
            log.exception("error while answering %s %s", self.command, path)
            err = APIError(500, "internal server error; the server log has the details", type="server_error",
                           code="internal_error")
            self._send_json(500, err.body(), close=True)

    def _method_not_allowed(self):
        self._send_json(405, APIError(405, f"{self.command} is not allowed", code="method_not_allowed").body(), close=True)

    # --- request helpers ---------------------------------------------------------------------------
    def _authorize(self):
        key = self.server.api_key
        if key is None:
            return
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise APIError(401, "Incorrect API key provided: pass 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def _read_json(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise APIError(411, "chunked request bodies are not supported; send Content-Length", code="length_required")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise APIError(411, "a JSON body with a Content-Length header is required", code="length_required") from None
        if length < 0 or length > self.server.max_body_bytes:
            raise APIError(413, f"request body of {length} bytes exceeds the limit of {self.server.max_body_bytes}",
                           code="request_too_large")
        raw = self.rfile.read(length)
        self._body_read = True
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    # --- responses ---------------------------------------------------------------------------------
    def _send_json(self, status: int, body: dict, close: bool = False):
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _send_event(self, payload: dict | str):
        data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        chunk = f"data: {data}\n\n".encode()
        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        self.wfile.flush()

    def _end_stream(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def log_message(self, format, *args):
        if self.server.log_requests:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    # --- endpoints ---------------------------------------------------------------------------------
    def _health(self):
        self._send_json(200, {"status": "ok", "model": self.server.engine.model_name})

    def _models(self):
        card = {**model_card(self.server.engine), "created": self.server.created}
        self._send_json(200, {"object": "list", "data": [card]})

    def _model(self, model_id: str):
        engine = self.server.engine
        if model_id != engine.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        self._send_json(200, {**model_card(engine), "created": self.server.created})

    def _completions(self):
        self._generate(parse_request(self._read_json(), self.server.engine, "completion"))

    def _chat(self):
        self._generate(parse_request(self._read_json(), self.server.engine, "chat"))

    def _generate(self, req: GenerationRequest):
        engine = self.server.engine
        rid, created, model = new_id(req.kind), now(), engine.model_name
        n = req.params.n
        prompt_tokens = sum(len(p) for p in req.prompts)
        if not req.stream:
            texts, reasons, completion_tokens = [], [], 0
            for prompt in req.prompts:
                t, r, c = engine.complete(prompt, req.params)
                texts += t
                reasons += r
                completion_tokens += c
            self._send_json(200, response_body(req, rid, created, model, texts, reasons, prompt_tokens, completion_tokens))
            return
        self._start_stream()
        completion_tokens = 0
        try:
            for p_index, prompt in enumerate(req.prompts):
                run = engine.generate(prompt, req.params)
                if req.kind == "chat":
                    for i in range(n):
                        self._send_event(chunk_body(req, rid, created, model, p_index * n + i, "", None, first=True))
                steps = iter(run)
                try:
                    for updates in steps:
                        for u in updates:
                            self._send_event(chunk_body(req, rid, created, model, p_index * n + u.index,
                                                        u.text, u.finish_reason))
                finally:
                    steps.close()  # a client that went away frees its generation slot at once
                completion_tokens += run.completion_tokens
            if req.include_usage:
                self._send_event(usage_chunk(req, rid, created, model, prompt_tokens, completion_tokens))
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception:  # headers are out: report in-band, then end the stream
            log.exception("error while streaming %s", rid)
            self._send_event(APIError(500, "internal server error; the server log has the details", type="server_error",
                                      code="internal_error").body())
        self._send_event("[DONE]")
        self._end_stream()


def start_in_thread(server: OpenAIServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                              name=f"openllm-ds-server-{server.server_address[1]}")
    thread.start()
    return thread

