"""Throughput, MFU and memory numbers, and the run's log: console (tqdm), TensorBoard, train_log.jsonl.

Only rank 0 writes anything; ``RunLog`` is where that is decided. TensorBoard gets the project's scalars only
(``SCALARS``: groups ``train/``, ``perf/``, ``eval/``, each tag with its unit in its name or its description), written
by our own ``SummaryWriter`` into ``<output>/tensorboard/``; DeepSpeed's monitor stays off (its ``Train/Samples``
group repeated our loss and lr; ``train/ds_config.py``), and what is constant for a run (parameters, precision,
batch, peak FLOP/s, ...) goes once into the text plugin (``run/config``), with the scalars' descriptions
(``run/scalars``). Every logged step is also appended to ``<output>/train_log.jsonl`` at full float precision, under
the same tags.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from openllm_ds.config import ModelConfig
from openllm_ds.train.distributed import DistEnv

LOG_FILE = "train_log.jsonl"
TENSORBOARD_DIR = "tensorboard"

# The project's scalars: tag -> what it is, with its unit (TensorBoard's text plugin shows this table as run/scalars).
# Tags outside it: data/share/<source> (a mixture's token shares), eval/<source>/loss, harness/<task>/<metric>,
# train/rollbacks, train/rollback_to_step.
SCALARS = {
    "train/loss": "training loss: mean cross-entropy per token, nats",
    "train/perplexity": "exp(train/loss)",
    "train/lr": "learning rate of the step (warmup, then cosine decay)",
    "train/grad_norm": "global L2 norm of the gradients, before clipping",
    "train/loss_scale": "fp16 dynamic loss scale (fp16 runs only)",
    "perf/tokens_per_s": "training tokens per second, all ranks together",
    "perf/mfu": "model FLOPs utilisation: achieved / peak FLOP/s of all ranks, a fraction (0.4 = 40%)",
    "perf/memory_gb": "peak CUDA memory allocated on a GPU, resident memory of the process on a CPU; GiB (2^30 bytes)",
    "eval/loss": "validation loss: mean cross-entropy per token, nats",
    "eval/perplexity": "exp(eval/loss)",
}


def flops_per_token(cfg: ModelConfig, num_params: int) -> float:
    """Training FLOPs per token: 6 N for the weight matmuls (forward + backward; the tied head is a
    real matmul, the embedding lookup is not, so N with the embedding counted once is right) plus
    12 L d T for attention scores and values (PaLM's formula). Activation recomputation is not counted."""
    return 6.0 * num_params + 12.0 * cfg.n_layers * cfg.d_model * cfg.max_seq_len


# Dense (no sparsity) tensor-core peak of fp16/bf16 matmuls with fp32 accumulation, TFLOP/s, from NVIDIA's
# datasheets (their "with sparsity" figures halved; the H20 has none, its figure is the one NVIDIA gave its
# customers and the press reported), matched against torch.cuda.get_device_name() in order:
# the more specific names first. None: no bf16 tensor cores. GeForce cards accumulate fp32 at half rate, and
# PyTorch accumulates fp16/bf16 matmuls in fp32, so theirs are the fp32-accumulate figures.
GPU_PEAK_TFLOPS: tuple[tuple[str, float, float | None], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756.0, 756.0),
    (r"\bH[12]00\b.*\bNVL\b", 835.5, 835.5),
    (r"\bH800\b.*\bPCIe\b", 756.0, 756.0),
    (r"\b(H100|H200|GH200|H800)\b", 989.4, 989.4),  # SXM ("NVIDIA H100 80GB HBM3"), H200, Grace Hopper
    (r"\bH20\b", 148.0, 148.0),
    (r"\bB200\b", 2250.0, 2250.0),
    (r"\bB100\b", 1750.0, 1750.0),
    (r"\b(A100|A800)\b", 312.0, 312.0),
    (r"\bA30\b", 165.0, 165.0),
    (r"\bA40\b", 149.7, 149.7),
    (r"\bA10\b", 125.0, 125.0),
    (r"\bL40S\b", 362.05, 362.05),
    (r"\bL40\b", 181.05, 181.05),
    (r"\bL4\b", 121.0, 121.0),
    (r"\bRTX A6000\b", 154.8, 154.8),
    (r"\bRTX 4090\b", 165.2, 165.2),
    (r"\bRTX 3090\b", 71.0, 71.0),
    (r"\bV100S\b", 130.0, None),
    (r"\bV100\b.*\bPCIE\b", 112.0, None),
    (r"\bV100\b", 125.0, None),
    (r"\bT4\b", 65.0, None),
)

# SMs of the whole GPU, for the MIG-capable ones in the table above: a MIG slice ("NVIDIA H100 80GB HBM3 MIG 1g.10gb")
# has the datasheet's peak times its share of these SMs.
FULL_GPU_SMS: tuple[tuple[str, int], ...] = (
    (r"\bH100\b.*\bPCIe\b", 114),
    (r"\bH20\b", 78),
    (r"\b(H100|H200|GH200|H800)\b", 132),
    (r"\bB200\b", 148),
    (r"\b(A100|A800)\b", 108),
    (r"\bA30\b", 56),
)

# Dense fp16 tensor-core FLOPs per clock per SM (fp32 accumulation) by compute capability, for GPUs not in the
# table: peak = SMs x max SM clock x this. Datasheet checks: A100 108 x 1410 MHz x 2048 = 312 TFLOP/s,
# H100 SXM 132 x 1830 MHz x 4096 = 989 TFLOP/s, L4 58 x 2040 MHz x 1024 = 121 TFLOP/s. bf16 from sm_80 on.
TENSOR_FLOPS_PER_CLOCK_PER_SM: dict[tuple[int, int], int] = {
    (7, 0): 1024, (7, 5): 1024, (8, 0): 2048, (8, 6): 1024, (8, 9): 1024, (9, 0): 4096, (10, 0): 8192,
}


class PeakFlops(NamedTuple):
    flops: float  # FLOP/s
    source: str  # where the figure comes from, for reports


def spec_peak_flops(name: str, capability: tuple[int, int], sm_count: int, max_sm_clock_mhz: float | None,
                    dtype: torch.dtype) -> PeakFlops | None:
    """The dense fp16/bf16 peak of one GPU from its name (datasheet table), else estimated from its compute
    capability, SM count and maximum SM clock; None when neither knows it (or the GPU lacks the dtype)."""
    kind = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)
    if kind is None:
        return None
    mig = re.search(r"\bMIG\b", name) is not None
    for pattern, fp16, bf16 in GPU_PEAK_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            tflops = fp16 if kind == "fp16" else bf16
            if tflops is None:
                return None
            if not mig:
                return PeakFlops(tflops * 1e12, f"datasheet, {name}: {tflops:g} TFLOP/s dense {kind}")
            full = next((n for p, n in FULL_GPU_SMS if re.search(p, name, flags=re.IGNORECASE)), None)
            if full is None:  # a slice of a GPU whose SM count we do not know: the caller measures instead
                return None
            share = min(1.0, sm_count / full)
            return PeakFlops(tflops * 1e12 * share, f"datasheet x MIG slice, {name}: {tflops:g} TFLOP/s dense {kind} "
                                                    f"x {sm_count}/{full} SMs = {tflops * share:.1f} TFLOP/s")
    per_clock = TENSOR_FLOPS_PER_CLOCK_PER_SM.get(tuple(capability))
    if per_clock is None or not max_sm_clock_mhz or (kind == "bf16" and tuple(capability) < (8, 0)):
        return None
    flops = sm_count * max_sm_clock_mhz * 1e6 * per_clock
    return PeakFlops(flops, f"estimate, {name}: {sm_count} SMs x {max_sm_clock_mhz:g} MHz x {per_clock} FLOP/clock "
                            f"(sm_{capability[0]}{capability[1]}) = {flops / 1e12:.1f} TFLOP/s {kind}")


def peak_flops(device: torch.device, dtype: torch.dtype) -> PeakFlops:
    """The FLOP/s MFU is measured against: on a GPU its own dense fp16/bf16 peak (``spec_peak_flops``); on a
    CPU, and for fp32 or a GPU neither table knows, a timed ``torch.mm`` (``measure_matmul_peak``)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        capability = (props.major, props.minor)
        known = spec_peak_flops(props.name, capability, props.multi_processor_count, None, dtype)
        if known is None and dtype in (torch.float16, torch.bfloat16):
            known = spec_peak_flops(props.name, capability, props.multi_processor_count,
                                    max_sm_clock_mhz(props), dtype)
        if known is not None:
            return known
    flops = measure_matmul_peak(device, dtype)
    return PeakFlops(flops, f"measured, torch.mm {str(dtype).removeprefix('torch.')} on {device.type}: "
                            f"{flops / 1e12:.3g} TFLOP/s")


def max_sm_clock_mhz(props) -> float | None:
    """The GPU's maximum SM clock from nvidia-smi (PyTorch does not report clocks), or None."""
    uuid = str(getattr(props, "uuid", "") or "")
    if not uuid:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits",
                              "-i", uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"],
                             capture_output=True, text=True, timeout=30)
        return float(out.stdout.strip().splitlines()[0]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                        repeats: int = 3) -> float:
    """FLOP/s of a square ``torch.mm`` on this device (n = 2048 on a CPU, 8192 on a GPU, where a smaller
    product is too short to time or to fill the GPU; ten products between synchronisations there).

    Its random operands come from a private generator: the training RNG streams stay untouched. On a GPU
    the peak-memory statistics are reset afterwards, so that a run's peak memory is its own."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 2048)
    per_timing = 10 if cuda else 1
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    torch.mm(a, b)  # warm-up
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(per_timing):
            torch.mm(a, b)
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / per_timing)
    if cuda:
        del a, b
        torch.cuda.reset_peak_memory_stats(device)
    return 2.0 * n**3 / best


def memory_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or this process's resident memory on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30


def exp_loss(loss: float) -> float:
    """Perplexity from a mean loss in nats (inf past float range)."""
    return math.exp(loss) if math.isfinite(loss) and loss < 700 else math.inf


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RunLog:
    """The run's console and log files; a no-op on every rank but 0."""

    def __init__(self, env: DistEnv, output_dir: Path):
        self.enabled = env.is_rank_zero
        self.output_dir = output_dir
        self.writer = None  # TensorBoard's SummaryWriter, from start() on
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

    def start(self, first_step: int, max_steps: int, log_every: int, run_info: dict[str, object]) -> None:
        """A progress bar on a terminal; elsewhere (Ray workers, CI logs) one line every ``log_every`` steps.
        ``run_info``: what is constant for this run (name -> value), written once into TensorBoard's text plugin."""
        self.first_step, self.max_steps, self.log_every = first_step, max_steps, log_every
        if self.enabled:
            drop_partial_last_line(self.output_dir / LOG_FILE)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / TENSORBOARD_DIR))
            self.writer.add_text("run/config", markdown_table(("", "value"), run_info.items()), first_step)
            self.writer.add_text("run/scalars", markdown_table(("tag", "what it is, unit"), SCALARS.items()), first_step)
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
        if self.writer is not None:
            for tag, v in values.items():
                self.writer.add_scalar(tag, float(v), step)
            self.writer.flush()  # a killed run keeps what it logged
        with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **{k: _json_float(v) for k, v in values.items()}}) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def markdown_table(header: tuple[str, str], rows) -> str:
    """Two columns, as TensorBoard's text plugin renders Markdown."""
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return "\n".join(lines + [f"| {k} | {v} |" for k, v in rows])


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
