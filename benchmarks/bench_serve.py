"""The built-in OpenAI-compatible server under load, on loopback; prints a markdown table.

    PYTHONPATH=. python benchmarks/bench_serve.py [--model_dir models/tiny] [--requests 32]
        [--concurrency 1,4,16] [--max_tokens 32] [--backends torch,onnx] [--max_concurrency 4]

The server runs in its own process (``start_server`` with ``--max_concurrency`` generation slots),
one per backend; the load comes from this process through the official ``openai`` client, with
1, 4 and 16 concurrent clients sending ``--requests`` completions in all (different prompts,
greedy, ``--max_tokens`` each). Reported: completions/s and generated tokens/s over the wall time,
and p50/p90/p99 request latency. Without ``--model_dir`` the model is a random one of the tiny
preset's shape (see bench_export.py).
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export import ROOT, random_run  # noqa: E402

from openllm_ds.config import ExportConfig  # noqa: E402
from openllm_ds.export import export  # noqa: E402

SERVER = """
import sys, threading
from openllm_ds.serve import start_server
srv = start_server(sys.argv[1], port=int(sys.argv[2]), backend=sys.argv[3], max_concurrency=int(sys.argv[4]),
                   model_name="bench", max_length=int(sys.argv[5]))
print("ready", flush=True)
threading.Event().wait()
"""
PROMPTS = [
    "The Normans were", "Super Bowl 50 was", "The University of Chicago", "Oxygen is a chemical element",
    "In 1066 the", "The Amazon rainforest", "Warsaw is the capital", "A computer program is",
    "The French Revolution", "Nikola Tesla was", "The Rhine flows", "Photosynthesis is",
    "Genghis Khan", "The Victoria and Albert Museum", "Steam engines", "Southern California",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_path: Path, backend: str, max_concurrency: int, max_length: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(model_path), str(port), backend, str(max_concurrency),
                             str(max_length)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # an onnx backend exports first and says so
        if line.strip() == "ready":
            break
    else:
        raise RuntimeError(f"the {backend} server did not start (exit code {proc.wait()})")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    return proc, port


def load(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        r = client.completions.create(model="bench", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, temperature=0)
        return time.perf_counter() - start, r.usage.completion_tokens

    one(0)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    lat = np.array([r[0] for r in results]) * 1e3
    return {"rps": requests / wall, "tps": sum(r[1] for r in results) / wall,
            "p50": np.percentile(lat, 50), "p90": np.percentile(lat, 90), "p99": np.percentile(lat, 99)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", default=None)
    p.add_argument("--tokenizer_dir", default="data/tokenizer")
    p.add_argument("--squad_dir", default=str(ROOT.parent / "shared" / "data" / "squad"))
    p.add_argument("--requests", type=int, default=32, help="completions per concurrency level")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--backends", default="torch,onnx")
    p.add_argument("--max_concurrency", type=int, default=4, help="generation slots of the server")
    p.add_argument("--max_length", type=int, default=256)
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = Path(args.model_dir) if args.model_dir else random_run(args, tmp)
        hf = export(ExportConfig(model_dir=str(model_dir), format="huggingface", output_dir=str(tmp / "hf"), verify=False))
        rows = []
        for backend in args.backends.split(","):
            proc, port = start(tmp / "hf", backend, args.max_concurrency, args.max_length)
            try:
                for c in (int(x) for x in args.concurrency.split(",")):
                    r = load(port, c, max(args.requests, c), args.max_tokens)
                    rows.append(f"| {backend} | {c} | {r['rps']:.2f} | {r['tps']:.0f} | {r['p50']:.0f} | {r['p90']:.0f} | {r['p99']:.0f} |")
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    print(f"\n## Built-in server on loopback ({hf['num_params']:,} parameters, {args.max_tokens} tokens per completion, "
          f"{args.requests} completions per row, {args.max_concurrency} generation slots)\n")
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}\n")
    print("| backend | concurrent clients | completions/s | tokens/s | p50 ms | p90 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
