"""Serve a model with an OpenAI-compatible API: vLLM where it is installed, else the built-in server;
``--replicas N`` puts N of either behind one endpoint on Ray Serve.

``serve(...)`` blocks (the CLI's ``openllm-ds serve``). ``start_server(...)`` runs the built-in
server (uvicorn) in a background thread and returns a handle with ``.base_url`` and ``.stop()``, for
tests, benchmarks and notebooks; ``VLLMServer`` and ``start_replicas`` do the same for vLLM and Ray Serve
(every handle is a ``ServerHandle``). Generation itself is ``openllm_ds.inference``'s.
"""

from openllm_ds.serve.app import build_app
from openllm_ds.serve.handle import ServerHandle
from openllm_ds.serve.server import RunningServer, check_api_key, serve, start_server
from openllm_ds.serve.vllm import VLLMServer, choose_engine, vllm_command

__all__ = ["serve", "start_server", "RunningServer", "ServerHandle", "build_app", "choose_engine", "vllm_command",
           "VLLMServer", "check_api_key"]
