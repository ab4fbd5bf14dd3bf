"""The built-in OpenAI-compatible API as a FastAPI app: run by uvicorn (``openllm-ds serve``), or the ingress of
Ray Serve replicas (``--replicas N``, see replicas.py).

Routes: ``GET /health`` (no auth), ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` answers with server-sent events: ``data: {...}`` ...
``data: [DONE]``). Request bodies are the pydantic models of protocol.py; OpenAPI docs at ``/docs``.

``RequestGuard``, an ASGI middleware in front of the app, does what must happen before a body is
read: the API key (every route but /health; ``Authorization: Bearer KEY``, compared in constant
time), and the body's framing: a Content-Length is required (411 for chunked bodies or none), at most
``max_body_bytes`` (413, answered before the body is read), and the whole body within
``body_timeout`` seconds (408). Every error is OpenAI's ``{"error": {...}}`` JSON with a 4xx status;
after one whose body was not read the connection is closed.

Generation runs on the completer's worker threads; the event loop only parses, streams and waits. A
client that goes away stops its generation within one decode step, streaming or not.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from contextlib import suppress

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from openllm_ds.inference import Completer
from openllm_ds.serve.workers import Workers
from openllm_ds.serve.protocol import (
    APIError, ChatCompletionRequest, CompletionRequest, GenerationRequest, chunk_body, new_id, now, parse_request,
    response_body, usage_chunk,
)
from openllm_ds.utils import parse_json as parse_json_text

MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 120.0  # a client may take this long to send its request body, else 408
LINGER_S = 2.0  # at most this long, and at most 2 x max_body_bytes, drained from a client before a 413
log = logging.getLogger("openllm_ds.serve")


def dumps(body) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "backslashreplace")  # a lone surrogate stays JSON


def json_response(status: int, body: dict, headers: dict | None = None) -> Response:
    return Response(dumps(body), status_code=status, headers=headers, media_type="application/json")


def error_response(e: APIError, headers: dict | None = None) -> Response:
    if e.status == 401:
        headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
    return json_response(e.status, e.body(), headers)


def parse_json(raw: bytes):
    """A request body as JSON, by the project's one JSON parser (``utils.parse_json``): UTF-8, strict (no NaN or
    Infinity), bounded nesting, no unpaired surrogate."""
    try:
        return parse_json_text(raw.decode("utf-8"), constants=False)
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: it is not UTF-8 (byte 0x{raw[e.start]:02x} at "
                       f"offset {e.start})", code="invalid_json") from None
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


class RequestGuard:
    """ASGI middleware: API key, then the body's framing, size and arrival time, before the app sees the request."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int = MAX_BODY_BYTES,
                 body_timeout: float = BODY_TIMEOUT_S):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[bytes, list[bytes]] = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.lower(), []).append(v)
        lengths = headers.get(b"content-length", [])
        has_body = bool(headers.get(b"transfer-encoding")) or any(v.strip() != b"0" for v in lengths)
        try:
            if scope["path"] != "/health":
                self._authorize(headers)
            if not has_body and scope["method"] != "POST":
                return await self.app(scope, receive, send)
            body = await self._read_body(headers, receive)
        except APIError as e:
            # a body left unread would be taken for the next request: close the connection
            close = {"Connection": "close"} if has_body else None
            return await error_response(e, close)(scope, receive, send)
        except _ClientGone:
            return

        if scope["method"] == "POST":
            send_ = send
        else:  # a body on a GET (say) is read and dropped, and the connection closed after the answer

            async def send_(message):
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
                await send(message)

        replayed = False

        async def receive_():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then http.disconnect, when the client goes away

        await self.app(scope, receive_, send_)

    def _authorize(self, headers: dict) -> None:
        if self.api_key is None:
            return
        header = (headers.get(b"authorization") or [b""])[0].decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), self.api_key):
            raise APIError(401, "Incorrect API key provided: pass 'Authorization: Bearer <key>'", code="invalid_api_key")

    async def _read_body(self, headers: dict, receive) -> bytes:
        if headers.get(b"transfer-encoding"):
            raise APIError(411, "chunked (Transfer-Encoding) request bodies are not supported; send Content-Length",
                           code="length_required")
        lengths = headers.get(b"content-length", [])
        if not lengths:
            raise APIError(411, "a JSON body with a Content-Length header is required", code="length_required")
        if len(set(lengths)) > 1 or not lengths[0].strip().isdigit():
            raise APIError(400, f"bad Content-Length header {b', '.join(lengths)[:40].decode('latin-1')!r}",
                           code="bad_request")
        length = int(lengths[0])
        if length > self.max_body_bytes:
            if length <= 2 * self.max_body_bytes:  # read and drop it for a while: a close with unread input resets
                with suppress(Exception):  # the connection, which can destroy the answer before the client reads it
                    await asyncio.wait_for(self._drain(receive), LINGER_S)
            raise APIError(413, f"request body of {length} bytes exceeds the limit of {self.max_body_bytes}",
                           code="request_too_large")

        async def read() -> bytes:
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_body_bytes:
                    raise APIError(413, f"request body exceeds the limit of {self.max_body_bytes} bytes",
                                   code="request_too_large")
                if not message.get("more_body", False):
                    return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s",
                           code="request_timeout") from None


    @staticmethod
    async def _drain(receive) -> None:
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return


class _ClientGone(Exception):
    pass


def model_card(completer: Completer) -> dict:
    """/v1/models' entry for the served model (vLLM's fields)."""
    return {"id": completer.model_name, "object": "model", "owned_by": "openllm-ds",
            "max_model_len": completer.context_length, "backend": completer.backend}


def build_app(completer: Completer, workers: Workers, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
              body_timeout: float = BODY_TIMEOUT_S) -> FastAPI:
    """The OpenAI-compatible API of ``completer``, its generations on ``workers``: a FastAPI app wrapped in
    ``RequestGuard``."""
    app = FastAPI(title="openllm-ds", summary="OpenAI-compatible completions and chat completions",
                  redoc_url=None)
    created = now()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return error_response(APIError(404, f"no route {request.method} {request.url.path}; see /v1/models, "
                                                "/v1/completions, /v1/chat/completions", code="not_found"))
        if e.status_code == 405:
            return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}",
                                           code="method_not_allowed"), headers=e.headers)
        return error_response(APIError(e.status_code, str(e.detail), code="bad_request"), headers=e.headers)

    @app.get("/health")
    async def health():
        return json_response(200, {"status": "ok", "model": completer.model_name})

    @app.get("/v1/models")
    async def models():
        return json_response(200, {"object": "list", "data": [{**model_card(completer), "created": created}]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != completer.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return json_response(200, {**model_card(completer), "created": created})

    def schema(model) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}

    @app.post("/v1/completions", openapi_extra=schema(CompletionRequest))
    async def completions(request: Request):
        return await _answer(request, "completion")

    @app.post("/v1/chat/completions", openapi_extra=schema(ChatCompletionRequest))
    async def chat_completions(request: Request):
        return await _answer(request, "chat")

    async def _answer(request: Request, kind: str):
        try:
            return await _generate(request, parse_request(parse_json(await request.body()), completer, kind))
        except APIError as e:
            return error_response(e)
        except Exception:  # a bug: answer 500, log it, keep serving (the connection stays usable)
            log.exception("error while answering %s %s", request.method, request.url.path)
            return error_response(APIError(500, "internal server error; the server log has the details",
                                           type="server_error", code="internal_error"))

    async def _generate(request: Request, req: GenerationRequest):
        rid, model_name = new_id(req.kind), completer.model_name
        if req.stream:
            return StreamingResponse(_events(completer, workers, req, rid, now()), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        cancel = threading.Event()
        future = workers.submit(_complete_all, completer, req, cancel)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, cancel))
        try:
            texts, reasons, completion_tokens = await asyncio.wrap_future(future)
        finally:
            cancel.set()  # the client went away (this task was cancelled), or the answer is complete
            watcher.cancel()
        prompt_tokens = sum(len(p) for p in req.prompts)
        return json_response(200, response_body(req, rid, now(), model_name, texts, reasons, prompt_tokens,
                                                completion_tokens))

    return RequestGuard(app, api_key, max_body_bytes, body_timeout)


def _complete_all(completer: Completer, req: GenerationRequest, cancel: threading.Event):
    texts, reasons, tokens = [], [], 0
    for prompt in req.prompts:
        t, r, c = completer.complete(prompt, req.params, cancel)
        texts, reasons, tokens = texts + t, reasons + r, tokens + c
    return texts, reasons, tokens


async def _cancel_on_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client disconnects (the body has been read: the next message is the disconnect)."""
    with suppress(Exception):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        cancel.set()


async def _events(completer: Completer, workers: Workers, req: GenerationRequest, rid: str, created: int):
    """Server-sent events of a streamed answer; the generation runs on a worker and hands its steps over a queue."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    model, n = completer.model_name, req.params.n

    def put(item) -> None:
        with suppress(RuntimeError):  # the event loop is gone: the server is shutting down
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def produce() -> None:
        try:
            tokens = 0
            for p_index, prompt in enumerate(req.prompts):
                put(("start", p_index))
                run = completer.generate(prompt, req.params, cancel)
                for updates in run:
                    put(("step", p_index, updates))
                tokens += run.completion_tokens
            put(("done", tokens))
        except BaseException as e:  # noqa: BLE001 -- reported in-band below
            put(("error", e))

    def event(payload) -> bytes:
        return b"data: " + (payload if isinstance(payload, bytes) else dumps(payload)) + b"\n\n"

    workers.submit(produce)
    try:
        while True:
            item = await queue.get()
            if item[0] == "start" and req.kind == "chat":
                for i in range(n):
                    yield event(chunk_body(req, rid, created, model, item[1] * n + i, "", None, first=True))
            elif item[0] == "step":
                for u in item[2]:
                    yield event(chunk_body(req, rid, created, model, item[1] * n + u.index, u.text, u.finish_reason))
            elif item[0] == "done":
                if req.include_usage:
                    yield event(usage_chunk(req, rid, created, model, sum(len(p) for p in req.prompts), item[1]))
                break
            elif item[0] == "error":  # headers are out: report in-band, then end the stream
                log.error("error while streaming %s", rid, exc_info=item[1])
                yield event(APIError(500, "internal server error; the server log has the details",
                                     type="server_error", code="internal_error").body())
                break
        yield event(b"[DONE]")
    finally:
        cancel.set()  # a client that went away stops its generation at the next decode step
