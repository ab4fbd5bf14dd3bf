"""The machine of a GPU acceptance run (benchmarks/gpu_acceptance.py): its GPUs as CUDA numbers them, nvidia-smi's
view of the same GPUs (matched by UUID, never by index), and the peak FLOP/s that MFU is taken against.

Everything that touches CUDA runs in a child process (``probe``: ``python gpu_acceptance_machine.py --probe``), so
that the orchestrator never holds a CUDA context of its own: under the exclusive-process compute mode such a context
would lock every training child out of the GPU, and elsewhere it would count in nvidia-smi's memory figures.

nvidia-smi's index is not CUDA's ordinal: under ``CUDA_VISIBLE_DEVICES=2,3`` CUDA's device 0 is nvidia-smi's GPU 2,
and CUDA orders by speed unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``. A MIG slice has its own UUID (``MIG-...``) under a
parent GPU (``nvidia-smi -L``); nvidia-smi's per-GPU figures (memory used, clocks) are the parent's, whole.
Fields it cannot give read ``[N/A]`` or ``[Not Supported]``: they become None here, never an exception.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def nvidia_smi(query: str, *extra: str) -> list[list[str]]:
    """Rows of ``nvidia-smi --query-QUERY --format=csv,noheader,nounits``; [] when it is absent or fails."""
    out = _run(["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits", *extra])
    return [[c.strip() for c in ln.split(",")] for ln in out.splitlines() if ln.strip()]


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout if out.returncode == 0 else ""


def smi_number(value: str | None) -> float | None:
    """A number nvidia-smi printed, or None for ``[N/A]``, ``[Not Supported]``, ``N/A`` and the like."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def mig_parents() -> dict[str, str]:
    """MIG slice UUID -> its GPU's UUID, from ``nvidia-smi -L``."""
    parents, gpu = {}, None
    for line in _run(["nvidia-smi", "-L"]).splitlines():
        m = re.search(r"\(UUID: ((GPU|MIG)-[^)\s]+)\)", line)
        if not m:
            continue
        if m.group(2) == "GPU":
            gpu = m.group(1)
        elif gpu:
            parents[m.group(1)] = gpu
    return parents


SMI_FIELDS = ("uuid", "index", "driver_version", "clocks.max.sm", "power.limit", "mig.mode.current")


def smi_gpus() -> dict[str, dict]:
    """nvidia-smi's GPUs by UUID: {uuid: {index, driver, max_sm_clock_mhz, power_limit_w, mig_mode}}."""
    out = {}
    for row in nvidia_smi("gpu=" + ",".join(SMI_FIELDS)):
        row = (row + [""] * len(SMI_FIELDS))[:len(SMI_FIELDS)]
        out[row[0]] = {"smi_index": row[1], "driver": row[2], "max_sm_clock_mhz": smi_number(row[3]),
                       "power_limit_w": smi_number(row[4]), "mig_mode": row[5]}
    return out


def describe_gpus(gpus: list[dict]) -> list[dict]:
    """The probe's GPUs (CUDA ordinal, uuid, name, ...) with nvidia-smi's fields of the same GPU (or its MIG parent)."""
    smi, parents = smi_gpus(), None
    out = []
    for g in gpus:
        uuid = g["uuid"]
        if uuid.startswith("MIG-"):
            parents = parents if parents is not None else mig_parents()
            row = {**smi.get(parents.get(uuid, ""), {}), "mig_parent": parents.get(uuid)}
        else:
            row = smi.get(uuid, {})
        out.append({**g, "driver": row.get("driver", "?"), "smi_index": row.get("smi_index"),
                    "max_sm_clock_mhz": row.get("max_sm_clock_mhz"), "power_limit_w": row.get("power_limit_w"),
                    **({"mig_parent": row["mig_parent"]} if "mig_parent" in row else {})})
    return out


class GpuMemory:
    """The most memory the given GPUs (by UUID) held at once during a command, over what they held before it:
    nvidia-smi's memory.used, every 0.5 s. ``peak_mib`` is None, with ``why``, when nvidia-smi cannot say: no
    nvidia-smi, ``[N/A]``, or a MIG slice (whose parent's figure counts every slice)."""

    def __init__(self, uuids: list[str]):
        self.uuids = [u for u in uuids if u.startswith("GPU-")]
        self.why = "MIG slice: nvidia-smi reports the whole GPU" if len(self.uuids) < len(uuids) else None
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = None

    def used(self) -> float | None:
        rows = {r[0]: smi_number(r[1]) for r in nvidia_smi("gpu=uuid,memory.used") if len(r) > 1}
        values = [rows.get(u) for u in self.uuids]
        return None if not values or any(v is None for v in values) else sum(values)

    def __enter__(self):
        if self.uuids and self.why is None:
            self.before = self.used()
            if self.before is None:
                self.why = "nvidia-smi gave no memory.used for these GPUs"
            else:
                self.peak_mib = 0.0
                self._thread = threading.Thread(target=self._poll, daemon=True)
                self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.5):
            now = self.used()
            if now is not None:
                self.peak_mib = max(self.peak_mib, now - self.before)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def probe(dtypes: list[str], cpu: bool, timeout: float = 300) -> dict:
    """Run ``--probe`` in a child process: {"torch": ..., "gpus": [...], "peaks": {...}, "bf16": bool} or
    {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", ",".join(dtypes), *(["--cpu"] if cpu else [])]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"the probe ({' '.join(cmd)}) took over {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        tail = " | ".join(ln for ln in p.stderr.strip().splitlines()[-4:])
        return {"error": f"the probe exited with code {p.returncode}: {tail or 'no output'}"}
    return json.loads(lines[-1])


def _probe_here(dtypes: list[str], cpu: bool) -> dict:
    """In the child: CUDA's view of the visible GPUs, and per precision the peak MFU is taken against beside a
    timed torch.mm."""
    import torch

    from openllm_ds.train.metrics import measure_matmul_peak, peak_flops

    out = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda, "gpus": [], "peaks": {}, "bf16": True}
    cuda = not cpu and torch.cuda.is_available()
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            mig = re.search(r"\bMIG\b", p.name) is not None
            out["gpus"].append({"cuda_index": i, "uuid": f"{'MIG' if mig else 'GPU'}-{p.uuid}", "name": p.name,
                                "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                                "sms": p.multi_processor_count, "mig": mig})
        out["bf16"] = torch.cuda.is_bf16_supported()
        out["cudnn"] = torch.backends.cudnn.version()
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None
    elif not cpu:
        out["error"] = (f"no CUDA GPU is visible to torch {torch.__version__} (torch.version.cuda "
                        f"{torch.version.cuda}); run on a GPU machine with a CUDA build of torch, or pass --dry_run")
        return out
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for name in dtypes:
        dt = names[name]
        if cuda and dt == torch.bfloat16 and not out["bf16"]:
            continue
        peak = peak_flops(device, dt)
        measured = peak.flops if peak.source.startswith("measured") else measure_matmul_peak(device, dt)
        out["peaks"][name] = {"flops": peak.flops, "source": peak.source, "measured_mm_flops": measured}
    return out


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--probe":
        sys.path.insert(0, str(ROOT))
        print(json.dumps(_probe_here(sys.argv[2].split(","), "--cpu" in sys.argv[3:])), flush=True)
    else:
        sys.exit(f"usage: {sys.argv[0]} --probe fp16,bf16 [--cpu]  (a child process of gpu_acceptance.py)")
