"""Ray Train launcher: ``train.num_workers`` DeepSpeed workers started by a TorchTrainer.

Each worker runs the same ``train(cfg)`` as the other launchers; the TorchTrainer has already set up
torch.distributed (gloo on CPU, nccl with GPUs) and RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR, and
DeepSpeed joins that group. Before any worker starts, the driver checks the config and builds the
token shards, so a bad config fails in the first seconds and no worker competes with tokenization
for CPUs.

Paths: every path in the config is made absolute on the driver. Workers on one machine (the local
Ray instance) see the same files. On a multi-node cluster the data, tokenizer and output dir must
be on storage every node mounts at the same path (NFS, a shared volume); Ray Train's own run
records go to ``<output>/ray``.

Failures: when a worker fails (its process killed, out of memory, its node lost), Ray Train stops the
whole worker group and starts a new one, up to ``train.max_failures`` times (``FailureConfig``). Each
new worker runs ``train(cfg)`` again, which resumes from ``<output>/checkpoints/latest`` (only ever a
complete checkpoint), so the steps since that checkpoint are repeated with the same losses and the
finished run equals an undisturbed one; a run started with ``--resume none`` or a checkpoint dir goes
on from its own latest checkpoint once it has saved one. An error of our own (a ``UserError``: a loss
that keeps spiking, a full disk, a bad input) is raised on every rank alike and would only recur: the
workers report it instead of raising it, so the job stops at once with its message, not retried.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from openllm_ds.checkpoint import CHECKPOINTS, LATEST
from openllm_ds.config import RunConfig
from openllm_ds.errors import UserError
from openllm_ds.output_lock import OutputLock
from openllm_ds.paths import normal_path
from openllm_ds.utils import start_local_ray


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """The same run with its file paths in their normal form (``paths.normal_path``: absolute, ``~`` and symlinks
    resolved): what Ray Train's workers get (they may run in another directory), and the form in which the
    pipeline compares a run's saved settings with its current ones."""
    from openllm_ds.data.units import is_hub_source
    from openllm_ds.presets import ds_config_file

    def path(p) -> str:
        return str(normal_path(p))

    def source(spec: str) -> str:
        return spec if is_hub_source(spec) else path(spec)

    t = cfg.train
    absolute = {"tokenizer_dir": path(t.tokenizer_dir), "ds_config": path(ds_config_file(t.ds_config)),
                "output_dir": path(cfg.output_dir), "data_file": source(t.data_file),
                "data_files": tuple(source(f) for f in t.data_files)}
    if t.eval_data:
        absolute["eval_data"] = source(t.eval_data)
    if t.resume not in ("auto", "none"):
        absolute["resume"] = path(t.resume)
    if t.init_from:
        absolute["init_from"] = path(t.init_from)
    tokenizer = dataclasses.replace(cfg.tokenizer, shards_root=path(cfg.tokenizer.shards_root))
    ft = cfg.finetune
    if ft.model_dir:  # a fine-tune (finetune/run.py): its base weights and conversations
        ft = dataclasses.replace(ft, model_dir=path(ft.model_dir), data=source(ft.data),
                                 eval_data=source(ft.eval_data) if ft.eval_data else None)
    return dataclasses.replace(cfg, train=dataclasses.replace(t, **absolute), tokenizer=tokenizer, finetune=ft)


def train_with_ray(cfg: RunConfig) -> dict:
    """Check the run here (the driver), hold its output dir's lock, and train on ``train.num_workers`` workers."""
    cfg = absolute_paths(cfg)
    with OutputLock(cfg.output_dir, "train", "--output_dir (train.output_dir)"):  # the workers hold none
        return _train_with_ray(cfg)


def _train_with_ray(cfg: RunConfig) -> dict:
    import torch

    from openllm_ds.train.data import load_sources
    from openllm_ds.train.distributed import DistEnv
    from openllm_ds.train.preflight import check_lengths, check_run_inputs

    n = cfg.train.num_workers
    use_gpu = torch.cuda.is_available()
    device = "cuda" if use_gpu else "cpu"
    checked, inputs = check_run_inputs(cfg, DistEnv(rank=0, local_rank=0, world_size=n, device=device))
    driver = DistEnv(rank=0, local_rank=0, world_size=1, device=device)
    check_lengths(checked, load_sources(cfg, inputs.tokenizer.sha256, driver), n)  # tokenized here, before the workers

    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start_ray(n)
    trainer = TorchTrainer(
        train_loop_per_worker=_train_worker,
        train_loop_config={"run_config": cfg, "latest_at_start": latest_checkpoint_id(cfg)},
        scaling_config=ScalingConfig(num_workers=n, use_gpu=use_gpu),
        run_config=RayRunConfig(name=cfg.name, storage_path=str(Path(cfg.output_dir) / "ray"),
                                failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the worker's exception; a user error keeps its one-line message
        raise _user_error_in(e) or e
    if result.error is not None:
        raise _user_error_in(result.error) or result.error
    if not result.metrics:
        raise RuntimeError("Ray Train finished without the training summary of rank 0")
    if "user_error" in result.metrics:
        raise _error_class(result.metrics["user_error_type"])(result.metrics["user_error"])
    return dict(result.metrics)


def start_ray(num_workers: int) -> None:
    """Connect to ``RAY_ADDRESS`` or start a local instance listening on loopback only, with the workers'
    output shown here.

    A local instance gets a CPU slot per worker even on a smaller machine (they share the cores).
    """
    import ray

    from openllm_ds.settings import ray_address

    if ray.is_initialized():
        return
    address = ray_address()
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        start_local_ray(num_cpus=max(num_workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=True)


def latest_checkpoint_id(cfg: RunConfig) -> tuple[int, int] | None:
    """Identity of ``<output>/checkpoints/latest``: every save replaces the file (a new inode), so a
    changed id means this job saved a checkpoint."""
    try:
        st = (Path(cfg.output_dir) / CHECKPOINTS / LATEST).stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _train_worker(config: dict) -> None:
    """Every worker trains; rank 0 reports the summary (Ray Train keeps metrics that come with a checkpoint)."""
    import tempfile

    import ray.train

    from openllm_ds.train.loop import train

    cfg = config["run_config"]
    if cfg.train.resume != "auto" and latest_checkpoint_id(cfg) != config["latest_at_start"]:
        # a worker group restarted after a failure: go on from this job's latest checkpoint, not from
        # where the job began (every rank sees the same file: the failed group is gone)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="auto"))
    try:
        summary = train(cfg, hold_lock=False)  # the driver holds the output dir's lock
    except UserError as e:  # the same on every rank, and a retry would meet it again: report, don't raise
        summary = {"user_error": str(e), "user_error_type": type(e).__name__}
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report({})
        return
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "summary.json").write_text(json.dumps(summary, default=str), encoding="utf-8")
        ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _error_class(name: str) -> type[UserError]:
    """The UserError subclass called ``name`` (a worker's error crosses to the driver as text)."""
    from openllm_ds import errors

    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, UserError) else UserError


def _user_error_in(exc: BaseException) -> UserError | None:
    """The UserError a worker raised: Ray Train's WorkerGroupError keeps each rank's exception."""
    failures = getattr(exc, "worker_failures", None) or {}
    for rank in sorted(failures):
        if isinstance(failures[rank], UserError):
            return failures[rank]
    return exc if isinstance(exc, UserError) else None
