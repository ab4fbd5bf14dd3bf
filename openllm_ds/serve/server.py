"""The built-in server's runtime: a listening socket, uvicorn running the app (``app.build_app``) over a
``Completer``, in a thread (``start_server``: tests, benchmarks, notebooks) or in the foreground (``serve``, which
also picks vLLM or Ray Serve's replicas)."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from openllm_ds.errors import UserError
from openllm_ds.inference import Completer, load_completer
from openllm_ds.paths import check_path
from openllm_ds.serve.app import BODY_TIMEOUT_S, MAX_BODY_BYTES, build_app
from openllm_ds.serve.handle import ServerHandle
from openllm_ds.serve.vllm import choose_engine
from openllm_ds.serve.workers import Workers
from openllm_ds.settings import host_setting, is_loopback, normal_api_key


def check_api_key(api_key: str | None) -> str | None:
    """The key in the form the server compares bearer tokens with (``settings.normal_api_key``), or None."""
    return None if api_key is None else normal_api_key(api_key, "--api_key (or OPENLLM_API_KEY)")


def check_limits(max_body_bytes: int | None, max_concurrency: int) -> None:
    if max_body_bytes is not None and max_body_bytes < 1024:
        raise UserError(f"--max_body_bytes must be >= 1024, got {max_body_bytes}")
    if max_concurrency < 1:
        raise UserError(f"--max_concurrency must be >= 1, got {max_concurrency}")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), or a UserError naming the address."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    return sock


def uvicorn_server(app, sock: socket.socket, log_requests: bool = True):
    import uvicorn

    config = uvicorn.Config(app, log_level="info" if log_requests else "warning", access_log=log_requests,
                            timeout_keep_alive=30, backlog=2048, server_header=False, lifespan="off",
                            http=json_error_protocol())
    return uvicorn.Server(config)


def json_error_protocol():
    """uvicorn's h11 protocol, with its answer to a request it cannot parse (a 400 it writes itself, before any
    app sees the request) in OpenAI's JSON error shape instead of plain text.

    h11 rather than httptools: h11 bounds a request's line and headers (16 KiB, then 400), httptools keeps
    whatever a client sends; the parsing costs well under a millisecond a request either way.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol as Protocol

    from openllm_ds.serve.app import dumps
    from openllm_ds.serve.protocol import APIError

    class JSONErrorProtocol(Protocol):
        def send_400_response(self, msg: str) -> None:
            body = dumps(APIError(400, f"malformed HTTP request: {msg}", code="bad_request").body())
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
            self.transport.close()

    return JSONErrorProtocol


@dataclass
class RunningServer(ServerHandle):
    """The built-in server running in a thread of this process."""

    server: object  # uvicorn.Server
    thread: threading.Thread
    sock: socket.socket
    completer: Completer
    workers: Workers
    owns_completer: bool = False  # stop() then also closes the completer and removes its temporary files

    @property
    def host(self) -> str:
        return self.sock.getsockname()[0]

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        self.workers.close()
        if self.owns_completer:
            self.completer.close()


def start_server(model_dir: str | Path | None = None, host: str = "127.0.0.1", port: int = 0, context_length: int = 512,
                 backend: str = "torch", api_key: str | None = None, model_name: str | None = None,
                 completer: Completer | None = None, log_requests: bool = False, max_concurrency: int = 4,
                 max_body_bytes: int | None = None, num_threads: int | None = None,
                 body_timeout: float = BODY_TIMEOUT_S) -> RunningServer:
    """Start the built-in server in a daemon thread (port 0: a free port). Pass ``completer`` to reuse a loaded model."""
    api_key, host = check_api_key(api_key), host_setting(host)
    check_limits(max_body_bytes, max_concurrency)
    owns_completer = completer is None
    if completer is None:
        if model_dir is None:
            raise UserError("start_server needs model_dir or completer")
        completer = load_completer(model_dir, backend, context_length, model_name, max_concurrency=max_concurrency,
                                   num_threads=num_threads)
    workers = Workers(max_concurrency)
    try:
        workers.warm_up(completer)
        sock = listen(host, port)
    except BaseException:
        workers.close()
        if owns_completer:
            completer.close()
        raise
    server = uvicorn_server(build_app(completer, workers, api_key, max_body_bytes or MAX_BODY_BYTES, body_timeout), sock,
                            log_requests)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"openllm-ds-server-{sock.getsockname()[1]}")
    thread.start()
    while not server.started and thread.is_alive():
        threading.Event().wait(0.01)
    return RunningServer(server, thread, sock, completer, workers, owns_completer)


def serve(model_dir, host: str = "127.0.0.1", port: int = 8000, context_length: int = 512, engine: str = "auto",
          backend: str = "torch", api_key: str | None = None, model_name: str | None = None,
          max_concurrency: int = 4, max_body_bytes: int | None = None, num_threads: int | None = None,
          replicas: int | None = None, address: str | None = None, vllm_args: tuple[str, ...] = ()) -> None:
    """Serve ``model_dir`` until interrupted: vLLM or the built-in server; with ``replicas`` (or ``address``)
    that many of them behind one endpoint on Ray Serve (a local Ray instance, or the cluster at ``address``)."""
    path = check_path(model_dir, "--model_dir", "dir", "export a model first "
                      "(openllm-ds export --model_dir models/NAME --format huggingface)")
    api_key, host = check_api_key(api_key), host_setting(host)
    check_limits(max_body_bytes, max_concurrency)
    if replicas is not None and replicas < 1:
        raise UserError(f"--replicas must be >= 1, got {replicas}")
    choice = choose_engine(engine, backend, path)
    if replicas is not None or address is not None:
        from openllm_ds.serve.replicas import serve_replicas

        serve_replicas(path, choice, replicas or 1, host=host, port=port, address=address, context_length=context_length,
                       backend=backend, api_key=api_key, model_name=model_name, max_concurrency=max_concurrency,
                       max_body_bytes=max_body_bytes, num_threads=num_threads, vllm_args=vllm_args)
        return
    if choice == "vllm":
        from openllm_ds.serve.vllm import run_vllm

        run_vllm(path, host, port, context_length, api_key=api_key, model_name=model_name, extra_args=vllm_args)
        return
    loaded = load_completer(path, backend, context_length, model_name, max_concurrency=max_concurrency, num_threads=num_threads)
    workers = Workers(max_concurrency)
    try:
        workers.warm_up(loaded)
        sock = listen(host, port)
        server = uvicorn_server(build_app(loaded, workers, api_key, max_body_bytes or MAX_BODY_BYTES), sock)
        host_shown = f"[{host}]" if ":" in host else host
        auth = "Bearer token required" if api_key else "no authentication"
        print(f"serving '{loaded.model_name}' ({backend} backend, context {loaded.context_length} tokens, {auth}, "
              f"{workers.max_concurrency} generations at once, {loaded.num_threads} thread(s) each) at "
              f"http://{host_shown}:{sock.getsockname()[1]}/v1  (Ctrl-C stops)", flush=True)
        if not is_loopback(host) and not api_key:
            print(f"warning: listening on {host} without --api_key: anyone who can reach this port can use the model",
                  flush=True)
        server.run(sockets=[sock])  # uvicorn: Ctrl-C or SIGTERM ends it gracefully
        print("stopped", flush=True)
    finally:
        workers.close()
        loaded.close()
