"""The one place that sets up the process group, for every way ``train()`` is started.

- ``deepspeed --num_gpus N --module openllm_ds.train``: the launcher sets RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR and MASTER_PORT; each rank joins with ``deepspeed.init_distributed``.
- Ray Train (TorchTrainer): the worker group has already initialised torch.distributed;
  DeepSpeed wraps that group.
- One plain process (no launcher variables): a world of size 1 on an in-memory store (no port).

gloo on CPU (DeepSpeed's CPU accelerator), nccl on CUDA. Tensor collectives time out after DeepSpeed's
default (10 minutes, ``DEEPSPEED_TIMEOUT`` in minutes changes it). Object collectives (``broadcast_object``,
``all_gather_object``) run on a second, gloo group with ``OBJECT_TIMEOUT``: ranks wait in them while rank 0
alone builds token shards or consolidates a checkpoint, which may take longer than that, and an NCCL
collective left waiting would be aborted by the watchdog, ending the run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from openllm_ds.utils import select_device

OBJECT_TIMEOUT = timedelta(hours=2)  # object collectives: rank-0-only work (shards, checkpoint) may be long


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: str  # "cpu" | "cuda"
    # gloo group for object collectives (None: one rank, or the default group)
    object_group: Any = field(default=None, compare=False, repr=False)

    @property
    def is_rank_zero(self) -> bool:
        """Whether this process logs, writes shared files and prints: decided here only."""
        return self.rank == 0

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.device == "cuda" else torch.device("cpu")


def import_deepspeed(device: str):
    """Import DeepSpeed with the accelerator named explicitly (no auto-detection warning on CPU)."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def init_distributed() -> DistEnv:
    """Join (or create) the process group; idempotent within a process."""
    device = select_device()
    deepspeed = import_deepspeed(device)
    backend = "nccl" if device == "cuda" else "gloo"
    alone = not dist.is_initialized() and "WORLD_SIZE" not in os.environ
    if alone:  # one process, no launcher
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    os.environ.setdefault("LOCAL_RANK", "0")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        # before the process group: NCCL's communicators and every later collective use the current device
        torch.cuda.set_device(local_rank)
    else:
        _skip_shm_comm_build(deepspeed)
    if alone:
        # an in-memory store: no TCP port to pick, so none that another program can take first
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)  # wraps the group when there is one
    world_size = dist.get_world_size()
    env = DistEnv(rank=dist.get_rank(), local_rank=local_rank, world_size=world_size, device=device,
                  object_group=object_group() if world_size > 1 else None)
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # ranks on one machine share its cores; oversubscribing them slows every rank down
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or env.world_size)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_ranks)))
    return env


def _skip_shm_comm_build(deepspeed) -> None:
    """DeepSpeed's TorchBackend JIT-compiles a shared-memory C++ op on CPU (~40 s the first time).

    The op serves only ``inference_all_reduce`` (tensor-parallel inference), which training never
    calls; marking it incompatible makes DeepSpeed use plain gloo collectives without the build.
    """
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def object_group(timeout: timedelta = OBJECT_TIMEOUT):
    """A gloo group of all ranks for object collectives (every rank calls this, in the same order)."""
    return dist.new_group(backend="gloo", timeout=timeout)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(values: list[float], env: DistEnv) -> list[float]:
    """Mean of each value over the ranks (float64, so one rank's value comes back unchanged)."""
    if env.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.torch_device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / env.world_size).tolist()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    if env.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.torch_device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_object(obj: Any, env: DistEnv) -> list[Any]:
    if env.world_size == 1:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj, group=env.object_group)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. an error found by rank 0 alone)."""
    if env.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=env.object_group)
    return box[0]
