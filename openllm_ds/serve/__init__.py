"""Serve a model with an OpenAI-compatible API: vLLM on a GPU, else the built-in server.

``serve(...)`` blocks (the CLI's ``openllm-ds serve``). ``start_server(...)`` runs the built-in
server in a background thread and returns a handle with ``.base_url`` and ``.stop()``, for tests,
benchmarks and notebooks.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from threading import Thread

from openllm_ds.errors import UserError
from openllm_ds.serve.engine import CompletionEngine, SamplingParams, load_engine
from openllm_ds.serve.http import OpenAIServer, start_in_thread
from openllm_ds.serve.vllm import choose_engine, exec_vllm, vllm_command

__all__ = ["serve", "start_server", "RunningServer", "load_engine", "CompletionEngine", "SamplingParams",
           "choose_engine", "vllm_command"]


@dataclass
class RunningServer:
    server: OpenAIServer
    thread: Thread
    owns_engine: bool = False  # stop() then also removes the engine's temporary files

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def base_url(self) -> str:
        """What the OpenAI client takes as base_url."""
        return f"{self.server.url}/v1"

    @property
    def engine(self) -> CompletionEngine:
        return self.server.engine

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
        if self.owns_engine:
            for d in self.engine.cleanup:
                shutil.rmtree(d, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def check_api_key(api_key: str | None) -> None:
    if api_key is not None and not api_key.strip():
        raise UserError("--api_key is empty: pass a key, or leave it out to serve without authentication")


def build_server(engine: CompletionEngine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 log_requests: bool = True, max_body_bytes: int | None = None) -> OpenAIServer:
    check_api_key(api_key)
    if max_body_bytes is not None and max_body_bytes < 1024:
        raise UserError(f"--max_body_bytes must be >= 1024, got {max_body_bytes}")
    kwargs = {"max_body_bytes": max_body_bytes} if max_body_bytes else {}
    try:
        return OpenAIServer((host, port), engine, api_key=api_key, log_requests=log_requests, **kwargs)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None


def start_server(model_path: str | Path | None = None, host: str = "127.0.0.1", port: int = 0, max_length: int = 512,
                 backend: str = "torch", api_key: str | None = None, model_name: str | None = None,
                 engine: CompletionEngine | None = None, log_requests: bool = False,
                 max_concurrency: int = 4, max_body_bytes: int | None = None) -> RunningServer:
    """Start the built-in server in a daemon thread (port 0: a free port). Pass ``engine`` to reuse a loaded model."""
    owns_engine = engine is None
    if engine is None:
        if model_path is None:
            raise UserError("start_server needs model_path or engine")
        engine = load_engine(model_path, backend, max_length, model_name, max_concurrency=max_concurrency)
    server = build_server(engine, host, port, api_key, log_requests=log_requests, max_body_bytes=max_body_bytes)
    return RunningServer(server, start_in_thread(server), owns_engine)


def serve(model_path, host: str = "127.0.0.1", port: int = 8000, max_length: int = 512, engine: str = "auto",
          backend: str = "torch", api_key: str | None = None, model_name: str | None = None,
          max_concurrency: int = 4, max_body_bytes: int | None = None) -> None:
    """Serve ``model_path`` until interrupted: vLLM (``engine`` vllm/auto with a GPU) or the built-in server."""
    path = Path(model_path)
    if not path.exists():
        raise UserError(f"--model_path {path} does not exist; export a model first "
                        "(openllm-ds export --model_dir models/NAME --format huggingface)")
    check_api_key(api_key)
    if choose_engine(engine, backend, path) == "vllm":
        exec_vllm(path, host, port, max_length, api_key=api_key, model_name=model_name)
        return
    if max_concurrency < 1:
        raise UserError(f"--max_concurrency must be >= 1, got {max_concurrency}")
    loaded = load_engine(path, backend, max_length, model_name, max_concurrency=max_concurrency)
    server = build_server(loaded, host, port, api_key, max_body_bytes=max_body_bytes)
    auth = "Bearer token required" if api_key else "no authentication"
    print(f"serving '{loaded.model_name}' ({backend} backend, context {loaded.max_length} tokens, {auth}) "
          f"at {server.url}/v1  (Ctrl-C stops)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {host} without --api_key: anyone who can reach this port can use the model", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        server.server_close()
        for d in loaded.cleanup:
            shutil.rmtree(d, ignore_errors=True)
