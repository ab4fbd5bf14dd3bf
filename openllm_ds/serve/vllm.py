"""Engine choice, and serving a Hugging Face export with vLLM's OpenAI-compatible server.

``auto`` picks vLLM when it is installed, a CUDA GPU is visible, the backend is torch and the
model path is a Hugging Face export; otherwise the built-in server. The vLLM server is started
with ``vllm serve PATH --host --port --max-model-len --served-model-name`` (or, without the
``vllm`` script, ``python -m vllm.entrypoints.openai.api_server --model PATH ...``); the API key
travels in the ``VLLM_API_KEY`` environment variable, not on the command line where any local
user could read it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from openllm_ds.checkpoint import is_hf_export
from openllm_ds.errors import UserError

ENGINES = ("auto", "vllm", "builtin")
BACKENDS = ("torch", "onnx")


def vllm_unavailable_reason() -> str | None:
    """None when vLLM can run here, else why not."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'openllm-ds[vllm]' on a machine with a CUDA GPU)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible, and vLLM's server needs one"
    return None


def choose_engine(engine: str, backend: str, model_path: str | Path) -> str:
    """"vllm" or "builtin" for --engine/--backend/--model_path, or a UserError saying what to change."""
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if engine == "builtin":
        return "builtin"
    why = vllm_unavailable_reason()
    if engine == "vllm":
        if why:
            raise UserError(f"--engine vllm: {why}; use --engine builtin (or auto)")
        if backend != "torch":
            raise UserError("--backend onnx runs on the built-in server; use --engine builtin or drop --backend onnx")
        if not is_hf_export(Path(model_path)):
            raise UserError(f"--engine vllm serves a Hugging Face export and {model_path} is not one; run "
                            "`openllm-ds export --format huggingface --output_dir exports/huggingface` and pass that dir")
        return "vllm"
    return "vllm" if why is None and backend == "torch" and is_hf_export(Path(model_path)) else "builtin"


def vllm_command(model_path: str | Path, host: str, port: int, max_length: int, model_name: str | None = None) -> list[str]:
    """The command line that starts vLLM's OpenAI-compatible server on a Hugging Face export."""
    path = Path(model_path)
    context = json.loads((path / "config.json").read_text()).get("max_position_embeddings", max_length)
    exe = shutil.which("vllm", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    base = [exe, "serve", str(path)] if exe else [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path)]
    return base + [
        "--host", host, "--port", str(port),
        "--max-model-len", str(min(max_length, context)),
        "--served-model-name", model_name or path.resolve().name,
    ]


def exec_vllm(model_path: str | Path, host: str, port: int, max_length: int, api_key: str | None = None,
              model_name: str | None = None) -> None:
    """Replace this process with vLLM's server (never returns)."""
    cmd = vllm_command(model_path, host, port, max_length, model_name)
    env = dict(os.environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    print("starting vLLM:", " ".join(cmd), flush=True)
    os.execvpe(cmd[0], cmd, env)
