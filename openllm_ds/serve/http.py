"""The built-in OpenAI-compatible HTTP server (standard library only).

Routes: ``GET /health`` (no auth), ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` answers with server-sent
events over chunked HTTP/1.1: ``data: {...}`` ... ``data: [DONE]``). With an API key every route
but /health needs ``Authorization: Bearer KEY`` (compared in constant time). Bodies are bounded
(``max_body_bytes``); errors are OpenAI-style JSON with a 4xx status, and the server keeps serving.

Under load: one thread per connection (``ThreadingHTTPServer``) and a listen backlog of
``request_queue_size``, so hundreds of clients connect at once; the engine's semaphore bounds how
many generate at a time and the others wait their turn (no 503s). A client that goes away mid-answer
ends its handler thread and frees its generation slot.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from openllm_ds.serve.engine import CompletionEngine, model_card
from openllm_ds.serve.protocol import (
    APIError, GenerationRequest, chunk_body, new_id, now, parse_request, response_body, usage_chunk,
)

MAX_BODY_BYTES = 1 << 20
LINGER_SECONDS = 2.0  # at most this long, and at most 2 x max_body_bytes, drained from a client before closing
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
_LONE_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800-\udfff, paired or not
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
log = logging.getLogger("openllm_ds.serve")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


class OpenAIServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never blocks shutdown...
    block_on_close = False  # ...nor server_close(), which would otherwise join every handler thread
    allow_reuse_address = True
    request_queue_size = 1024  # listen backlog (the kernel caps it at net.core.somaxconn)

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

    def shutdown_request(self, request):
        """Close a connection gracefully: send FIN, then read and drop what the client still sends.

        Closing a socket with unread input (a refused 413 body, an over-long header) sends a TCP
        reset, which can destroy the error answer before the client reads it.
        """
        try:
            request.shutdown(socket.SHUT_WR)
            deadline, budget = time.monotonic() + LINGER_SECONDS, 2 * self.max_body_bytes
            while budget > 0 and (left := deadline - time.monotonic()) > 0:
                if not select.select([request], [], [], left)[0]:
                    break
                data = request.recv(65536)
                if not data:
                    break
                budget -= len(data)
        except OSError:
            pass
        self.close_request(request)


class OpenAIHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    server_version = "openllm-ds"
    timeout = 120  # seconds a client may stay silent mid-request
    server: OpenAIServer

    def handle(self):
        try:
            super().handle()
        except CLIENT_GONE:  # the client reset the connection between requests: nothing to answer
            self.close_connection = True

    # --- routing -----------------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch({"/health": self._health, "/v1/models": self._models}, prefix_routes={"/v1/models/": self._model})

    def do_POST(self):
        self._dispatch({"/v1/completions": self._completions, "/v1/chat/completions": self._chat})

    def do_PUT(self):
        self._method_not_allowed()

    do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_PUT

    def _dispatch(self, routes: dict, prefix_routes: dict | None = None):
        path = self.path.split("?", 1)[0]
        self._body_read = False
        self._allow = "GET, POST"
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
                    self._allow = "POST" if self.command == "GET" else "GET"
                    raise APIError(405, f"{self.command} is not allowed on {path}", code="method_not_allowed")
                raise APIError(404, f"no route {self.command} {path}; see /v1/models, /v1/completions, /v1/chat/completions",
                               code="not_found")
            handler(arg) if arg is not None else handler()
        except APIError as e:
            self._reply_error(e)
        except CLIENT_GONE as e:
            if isinstance(e, TimeoutError) and self.command == "POST" and not self._body_read:  # a body that stalled
                self._reply_error(APIError(408, f"the request body did not arrive within {self.timeout} s",
                                           code="request_timeout"))
            self.close_connection = True
        except Exception:  # a bug: answer 500, log it, keep serving
            log.exception("error while answering %s %s", self.command, path)
            self._reply_error(APIError(500, "internal server error; the server log has the details",
                                       type="server_error", code="internal_error"))

    def _reply_error(self, e: APIError, headers: dict | None = None, close: bool = False):
        """Answer an error and, after anything odd, close the connection (never raises: the client may be gone)."""
        if e.status == 401:
            headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
        elif e.status == 405:
            headers = {"Allow": getattr(self, "_allow", "GET, POST"), **(headers or {})}
        try:
            self._send_json(e.status, e.body(), close=close or e.status >= 500 or e.status in (408, 411, 413),
                            headers=headers)
        except (OSError, ValueError):  # ValueError: the socket file is already closed
            self.close_connection = True

    def _method_not_allowed(self):
        self._reply_error(APIError(405, f"{self.command} is not allowed", code="method_not_allowed"))

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, headers too long, an unknown method), in OpenAI's shape."""
        if code == 501:  # http.server's answer to a method it has no do_* for: that is a 405
            code, message = 405, f"{self.command} is not allowed"
        elif code == 505:  # "HTTP/9.9": a malformed request like any other
            code = 400
        if self.request_version == "HTTP/0.9":  # a garbled request line: answer with a status line all the same
            self.request_version = "HTTP/1.0"
        text = message or self.responses.get(code, ("bad request",))[0]
        self._reply_error(APIError(code, text, code="method_not_allowed" if code == 405 else "bad_request"), close=True)

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

    def _has_body(self) -> bool:
        return "Transfer-Encoding" in self.headers or self.headers.get("Content-Length", "0").strip() != "0"

    def _read_json(self):
        """The request body as parsed JSON: bounded, complete, strict (no NaN/Infinity), valid Unicode."""
        if "Transfer-Encoding" in self.headers:
            raise APIError(411, "chunked (Transfer-Encoding) request bodies are not supported; send Content-Length",
                           code="length_required")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise APIError(411, "a JSON body with a Content-Length header is required", code="length_required")
        if len(set(lengths)) > 1 or not lengths[0].strip().isdigit() or not lengths[0].strip().isascii():
            raise APIError(400, f"bad Content-Length header {', '.join(lengths)[:40]!r}", code="bad_request")
        length = int(lengths[0])
        if length > self.server.max_body_bytes:
            raise APIError(413, f"request body of {length} bytes exceeds the limit of {self.server.max_body_bytes}",
                           code="request_too_large")
        raw = self.rfile.read(length)
        if len(raw) < length:  # the client closed the connection mid-body: nobody to answer
            raise ConnectionAbortedError("request body cut short")
        self._body_read = True
        try:
            body = json.loads(raw, parse_constant=_reject_constant)
        except RecursionError:
            raise APIError(400, "the request body is not valid JSON: nested too deeply", code="invalid_json") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
            raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
        if _LONE_SURROGATE_ESCAPE.search(raw):
            try:
                json.dumps(body, ensure_ascii=False).encode()
            except UnicodeEncodeError:
                raise APIError(400, "the request body is not valid JSON: it holds an unpaired UTF-16 surrogate "
                               "(\\ud800-\\udfff)", code="invalid_json") from None
        return body

    # --- responses ---------------------------------------------------------------------------------
    def _send_json(self, status: int, body: dict, close: bool = False, headers: dict | None = None):
        data = json.dumps(body, ensure_ascii=False).encode("utf-8", "backslashreplace")  # a lone surrogate stays JSON
        # a body this request left unread would be taken for the next request: close such connections
        if not getattr(self, "_body_read", False) and getattr(self, "headers", None) is not None and self._has_body():
            close = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
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
        if self.server.log_requests:  # control characters escaped: a request line cannot forge log lines
            line = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", format % args)
            sys.stderr.write(f"{self.address_string()} - {line}\n")

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
        except CLIENT_GONE:
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

