"""Throughput, MFU and memory numbers, and the run's log: console (tqdm), TensorBoard, train_log.jsonl.

Only rank 0 writes anything; ``RunLog`` is where that is decided. TensorBoard scalars go through
DeepSpeed's monitor (``engine.monitor.write_events``), configured by the "tensorboard" block of the
generated DeepSpeed config to write into ``<output>/tensorboard/``. Every logged step is also
appended to ``<output>/train_log.jsonl`` at full float precision.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from openllm_ds.config import ModelConfig
from openllm_ds.train.distributed import DistEnv

LOG_FILE = "train_log.jsonl"


def flops_per_token(cfg: ModelConfig, num_params: int) -> float:
    """Training FLOPs per token: 6 N for the weight matmuls (forward + backward; the tied head is a
    real matmul, the embedding lookup is not, so N with the embedding counted once is right) plus
    12 L d T for attention scores and values (PaLM's formula). Activation recomputation is not counted."""
    return 6.0 * num_params + 12.0 * cfg.n_layers * cfg.d_model * cfg.max_seq_len


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
                        repeats: int = 3) -> float:
    """FLOP/s of a square ``torch.mm`` on this device: the peak MFU is measured against.

    Its random operands come from a private generator: the training RNG streams stay untouched."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    torch.mm(a, b)  # warm-up
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or this process's resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def perplexity(loss: float) -> float:
    return math.exp(loss) if math.isfinite(loss) and loss < 700 else math.inf


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RunLog:
    """The run's console and log files; a no-op on every rank but 0."""

    def __init__(self, env: DistEnv, output_dir: Path):
        self.enabled = env.is_rank_zero
        self.output_dir = output_dir
        self.monitor = None
        self.bar = None
        # DeepSpeed's INFO lines (config dumps, per-op notices) and torch's deprecation notices about
        # the collectives DeepSpeed calls would bury the progress bar
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def start(self, engine, first_step: int, max_steps: int, log_every: int) -> None:
        """A progress bar on a terminal; elsewhere (Ray workers, CI logs) one line every ``log_every`` steps."""
        self.monitor = engine.monitor
        self.first_step, self.max_steps, self.log_every = first_step, max_steps, log_every
        if self.enabled:
            drop_partial_last_line(self.output_dir / LOG_FILE)
        self.started = time.perf_counter()
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_steps, initial=first_step, desc="train", unit="step", dynamic_ncols=True)

    def step(self, step: int, loss: float, tokens_per_sec: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
        elif self.enabled and (step % self.log_every == 0 or step == self.max_steps):
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(1, step - self.first_step) * (self.max_steps - step)
            print(f"step {step}/{self.max_steps}  loss {loss:.4f}  {tokens_per_sec:,.0f} tok/s  "
                  f"eta {eta // 60:.0f}m{eta % 60:02.0f}s", flush=True)

    def rewind(self, step: int) -> None:
        """The run went back to ``step`` (a rollback): the progress bar follows."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """TensorBoard scalars and one JSON line; ``values`` keys are TensorBoard tags."""
        if not self.enabled:
            return
        if self.monitor is not None:
            self.monitor.write_events([(tag, float(v), step) for tag, v in values.items()])
        with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **{k: _json_float(v) for k, v in values.items()}}) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        tb = getattr(self.monitor, "tb_monitor", None)
        writer = getattr(tb, "summary_writer", None)
        if writer is not None:
            writer.flush()
            writer.close()
            tb.summary_writer = None


def drop_partial_last_line(path: Path) -> None:
    """A process killed while appending leaves half a line; the run that resumes cuts it off."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _json_float(v: float):
    v = float(v)
    return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf literals
