"""``openllm-ds serve --replicas N [--address RAY_ADDRESS]``: N replicas behind one OpenAI endpoint on Ray Serve.

Each replica is a Ray Serve deployment replica whose ingress is a FastAPI app:

- built-in engine: the same app as ``openllm-ds serve`` (app.py) on its own ``Completer``;
- vLLM: the replica starts vLLM's OpenAI server as a child process on a free loopback port (with a
  random key of its own) and its ingress app forwards every request to it, streams included.

Ray Serve's proxy listens on ``--host``/``--port`` and spreads requests over the replicas. Without
``--address`` (and ``RAY_ADDRESS``) Ray starts a local instance; with it, the replicas run on the
cluster's nodes, where the model path must be on storage every node mounts at the same path and
openllm-ds must be installed (the same virtual environment path, or shipped with ``py_modules``).
Every response carries the answering replica in an ``x-openllm-replica`` header.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from openllm_ds.errors import UserError
from openllm_ds.serve.handle import ServerHandle
from openllm_ds.settings import host_setting, ray_address
from openllm_ds.utils import start_local_ray

APP_NAME = "openllm-ds"


def _replica_id() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 -- outside a replica
        return f"pid-{os.getpid()}"


def _tag_replica(app, replica: str):
    """ASGI middleware: the answering replica in a response header."""

    async def tagged(scope, receive, send):
        async def send_(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-openllm-replica", replica.encode())]}
            await send(message)

        await app(scope, receive, send_)

    return tagged


def _builtin_replica_class():
    from ray import serve

    @serve.ingress()
    class BuiltinReplica:
        def __init__(self, model_dir: str, backend: str, context_length: int, model_name: str, max_concurrency: int,
                     num_threads: int | None, api_key: str | None, max_body_bytes: int):
            from openllm_ds.inference import load_completer
            from openllm_ds.serve.app import build_app
            from openllm_ds.serve.workers import Workers

            self.completer = load_completer(model_dir, backend, context_length, model_name,
                                            max_concurrency=max_concurrency, num_threads=num_threads)
            self.workers = Workers(max_concurrency)
            self.workers.warm_up(self.completer)
            self.ingress_app = _tag_replica(build_app(self.completer, self.workers, api_key, max_body_bytes),
                                            _replica_id())

        def __serve_build_asgi_app__(self):
            return self.ingress_app

        def __del__(self):
            for part in (getattr(self, "workers", None), getattr(self, "completer", None)):
                if part is not None:
                    part.close()

    return BuiltinReplica


def _vllm_replica_class():
    from ray import serve

    @serve.ingress()
    class VLLMReplica:
        def __init__(self, model_dir: str, context_length: int, model_name: str, api_key: str | None,
                     max_body_bytes: int, extra_args: tuple[str, ...]):
            from openllm_ds.serve.vllm import VLLMServer

            self.upstream_key = secrets.token_hex(16)  # the child listens on loopback: only this replica may use it
            self.server = VLLMServer(model_dir, "127.0.0.1", 0, context_length, self.upstream_key, model_name,
                                     tuple(extra_args)).start()
            self.server.wait_ready()
            self.ingress_app = _tag_replica(build_proxy_app(self.server.url, self.upstream_key, api_key, max_body_bytes),
                                    _replica_id())

        def __serve_build_asgi_app__(self):
            return self.ingress_app

        def __del__(self):
            server = getattr(self, "server", None)
            if server is not None:
                server.stop()

    return VLLMReplica


def build_proxy_app(upstream: str, upstream_key: str, api_key: str | None, max_body_bytes: int):
    """A FastAPI app that forwards every request to the vLLM server at ``upstream``, behind the same RequestGuard
    (API key, body limits) as the built-in app."""
    import aiohttp
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    from openllm_ds.serve.app import RequestGuard

    app = FastAPI(title="openllm-ds (vLLM replica)", docs_url=None, redoc_url=None, openapi_url=None)
    session: dict = {}
    hop_by_hop = {"host", "content-length", "transfer-encoding", "connection", "authorization", "keep-alive"}

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    async def forward(path: str, request: Request):
        if "client" not in session:
            session["client"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=30))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop_by_hop}
        headers["Authorization"] = f"Bearer {upstream_key}"
        url = f"{upstream}/{path}" + (f"?{request.url.query}" if request.url.query else "")
        resp = await session["client"].request(request.method, url, data=await request.body(), headers=headers)
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in hop_by_hop}

        async def body():
            try:
                async for chunk in resp.content.iter_any():
                    yield chunk
            finally:
                resp.release()  # the client went away: vLLM sees the disconnect and aborts the request

        return StreamingResponse(body(), status_code=resp.status, headers=out_headers)

    return RequestGuard(app, api_key, max_body_bytes)


class RunningReplicas(ServerHandle):
    """Ray Serve running the application; ``stop()`` deletes it (and shuts down what this process started)."""

    def __init__(self, host: str, port: int, started_ray: bool, local: bool, num_replicas: int):
        self.host, self.port, self.started_ray, self.local, self.num_replicas = host, port, started_ray, local, num_replicas

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            if self.local:
                serve.shutdown()
            else:  # a shared cluster: remove this application only
                serve.delete(APP_NAME)
        finally:
            if self.started_ray:
                ray.shutdown()



def start_replicas(model_dir: str | Path, engine: str, num_replicas: int, host: str = "127.0.0.1", port: int = 8000,
                   address: str | None = None, context_length: int = 512, backend: str = "torch",
                   api_key: str | None = None, model_name: str | None = None, max_concurrency: int = 4,
                   max_body_bytes: int | None = None, num_threads: int | None = None,
                   vllm_args: tuple[str, ...] = ()) -> RunningReplicas:
    """Deploy ``num_replicas`` replicas of ``engine`` ("builtin" or "vllm") and return once all answer."""
    import ray
    from ray import serve

    from openllm_ds.serve.app import MAX_BODY_BYTES

    path = str(Path(model_dir).resolve())
    name = model_name or Path(path).name
    host = host_setting(host)
    address = ray_address(address)
    started_ray = not ray.is_initialized()
    if started_ray:
        try:
            if address:
                ray.init(address=address, namespace=APP_NAME, log_to_driver=False)
            else:  # a private instance listening on loopback only, as prepare/tokenize/train start
                start_local_ray(namespace=APP_NAME, log_to_driver=False, include_dashboard=False)
        except ConnectionError as e:
            raise UserError(f"--address {address}: cannot connect to the Ray cluster ({e}); start it with "
                            "`ray start --head` or fix the address") from None
    local = address is None
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    body_limit = max_body_bytes or MAX_BODY_BYTES
    if engine == "vllm":
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        deployment = serve.deployment(_vllm_replica_class(), name="vllm", num_replicas=num_replicas,
                                      ray_actor_options=resources, max_ongoing_requests=256,
                                      health_check_timeout_s=600, graceful_shutdown_timeout_s=30)
        app = deployment.bind(path, context_length, name, api_key, body_limit, tuple(vllm_args))
    else:
        threads = num_threads or 1
        deployment = serve.deployment(_builtin_replica_class(), name="builtin", num_replicas=num_replicas,
                                      ray_actor_options={"num_cpus": threads}, max_ongoing_requests=256)
        app = deployment.bind(path, backend, context_length, name, max_concurrency, threads, api_key, body_limit)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except Exception:
        RunningReplicas(host, port, started_ray, local, num_replicas).stop()
        raise
    return RunningReplicas(host, port, started_ray, local, num_replicas)


def serve_replicas(model_dir, engine: str, num_replicas: int, host: str = "127.0.0.1", port: int = 8000,
                   address: str | None = None, **kw) -> None:
    """``openllm-ds serve --replicas N``: deploy, print where, serve until Ctrl-C or SIGTERM, then tear down."""
    import signal

    def terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    running = None
    try:
        running = start_replicas(model_dir, engine, num_replicas, host, port, address, **kw)
        auth = "Bearer token required" if kw.get("api_key") else "no authentication"
        where = f"the Ray cluster at {ray_address(address)}" if not running.local else "a local Ray instance"
        print(f"serving '{kw.get('model_name') or Path(model_dir).resolve().name}' with {num_replicas} "
              f"{'vLLM' if engine == 'vllm' else 'built-in'} replica(s) on Ray Serve ({where}, {auth}) at "
              f"{running.base_url}  (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        if running is not None:
            running.stop()
        signal.signal(signal.SIGTERM, previous)
