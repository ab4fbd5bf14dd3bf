"""The DeepSpeed JSON of a run: a base ``ds_configs/*.json`` with its "auto" values filled from the run config.

The run config is the one source of truth. A base JSON says *how* to train (ZeRO stage, offload,
loss-scaler settings); every value written "auto" is taken from the run config, as with Hugging Face
Trainer's DeepSpeed integration. A value the base JSON hardcodes must agree with the run config
(batch sizes, precision); a disagreement is a ConfigError naming the key, never a silent override.

The batch triplet is derived and checked here and nowhere else:
    train_batch_size = train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from openllm_ds.config import RunConfig
from openllm_ds.errors import ConfigError
from openllm_ds.paths import kind_of, missing_reason
from openllm_ds.utils import read_json

AUTO = "auto"
ADAM_EPS = 1e-8
STEPS_PER_PRINT = 2**31 - 1  # the trainer logs progress itself; DeepSpeed's own step print stays off


def resolve_precision(precision: str, device: str) -> str:
    """auto -> fp16 on CUDA (dynamic loss scaling), fp32 on CPU; explicit choices are checked."""
    if precision == "auto":
        return "fp16" if device == "cuda" else "fp32"
    if device == "cpu" and precision == "fp16":
        raise ConfigError("train.precision=fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16); "
                          "use train.precision=auto or fp32 on CPU")
    if device == "cuda" and precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision=bf16 needs a GPU with bf16 (compute capability 8.0 or newer; this "
                          f"{torch.cuda.get_device_name()} has none); use train.precision=fp16 (or auto)")
    return precision


def read_base_ds_config(path: str | Path) -> dict:
    from openllm_ds.presets import ds_config_file, shipped_dir

    p = ds_config_file(path)
    have = ", ".join(sorted(q.stem for q in shipped_dir("ds_configs").glob("*.json")))
    fix = ("pass a DeepSpeed JSON such as ds_configs/zero2.json (--ds_config or train.ds_config=PATH, relative to the "
           "current directory)" + (f" or a shipped one by name ({have})" if have else ""))
    if kind_of(p) is None:
        raise ConfigError(f"train.ds_config {p} {missing_reason(p)}; {fix}")
    return read_json(p, "fix the file or pick one of ds_configs/*.json", "train.ds_config", dict, ConfigError)


def batch_triplet(cfg: RunConfig, world_size: int, base: dict, source: str) -> dict[str, int]:
    """train_batch_size = micro x grad_accum x world size; hardcoded values in ``base`` must agree."""
    micro, accum = cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps
    derived = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
    }
    run_key = {"train_micro_batch_size_per_gpu": "train.micro_batch_size (--batch_size)",
               "gradient_accumulation_steps": "train.gradient_accumulation_steps"}
    total = base.get("train_batch_size", AUTO)
    if total != AUTO:
        if not isinstance(total, int) or total < 1:
            raise ConfigError(f"{source}: train_batch_size must be a positive integer or \"auto\", got {total!r}")
        if total % (micro * world_size):
            raise ConfigError(
                f"{source}: train_batch_size={total} is impossible with train.micro_batch_size={micro} on "
                f"{world_size} rank(s): it must be a multiple of micro batch x world size = {micro * world_size}; "
                "set it to \"auto\" (the trainer derives micro x grad_accum x world size)")
    for key, value in derived.items():
        given = base.get(key, AUTO)
        if given != AUTO and given != value:
            where = run_key.get(key, "train.micro_batch_size x train.gradient_accumulation_steps x world size")
            raise ConfigError(
                f"{source}: {key}={given!r} disagrees with the run config ({where} gives {value} on "
                f"{world_size} rank(s)); set it to \"auto\" or change the run config")
    return derived


def build_ds_config(cfg: RunConfig, world_size: int, device: str) -> dict:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` data-parallel ranks of ``device`` (cpu|cuda)."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    source = f"train.ds_config {cfg.train.ds_config}"
    base = read_base_ds_config(cfg.train.ds_config)
    ds = copy.deepcopy(base)
    t = cfg.train
    precision = resolve_precision(t.precision, device)

    ds.update(batch_triplet(cfg, world_size, base, source))
    _resolve(ds, "gradient_clipping", t.grad_clip)
    ds.setdefault("steps_per_print", STEPS_PER_PRINT)

    for name, wanted in (("fp16", precision == "fp16"), ("bf16", precision == "bf16")):
        section = ds.setdefault(name, {})
        enabled = section.get("enabled", AUTO)
        if enabled == AUTO:
            section["enabled"] = wanted
        elif bool(enabled) != wanted:
            raise ConfigError(f"{source}: {name}.enabled={enabled} contradicts train.precision={t.precision} "
                              f"(resolved to {precision} on {device}); set {name}.enabled to \"auto\"")
    if precision == "fp16":
        ds["fp16"].setdefault("loss_scale", 0)  # 0 = dynamic loss scaling

    zero = ds.setdefault("zero_optimization", {"stage": 0})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    d = cfg.model.d_model
    _fill(zero, "reduce_bucket_size", d * d)
    _fill(zero, "stage3_prefetch_bucket_size", int(0.9 * d * d))
    _fill(zero, "stage3_param_persistence_threshold", 10 * d)
    # gradients copied into one buffer as they come: against fragmentation of GPU memory; on a CPU
    # it is a copy of every gradient for nothing (~2% of a tiny ZeRO-2 step)
    _fill(zero, "contiguous_gradients", device != "cpu")
    offload = any(zero.get(k, {}).get("device", "none") not in ("none", None)
                  for k in ("offload_optimizer", "offload_param"))

    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    for key, value in (("lr", t.learning_rate), ("betas", [t.beta1, t.beta2]), ("eps", ADAM_EPS),
                       ("weight_decay", t.weight_decay)):
        _resolve(params, key, value)
    if opt.get("type", "").lower() in ("adam", "adamw") and not offload:
        # DeepSpeed's FusedAdam is an op JIT-compiled on first use: ~2 min on 2 CPU cores, and on a GPU it
        # needs nvcc of the CUDA version torch was built with, which a pip-installed torch does not bring.
        # torch.optim.AdamW gives the same update with no build; on a GPU its fused kernel (one launch for
        # all parameters). Offload keeps DeepSpeedCPUAdam; "torch_adam": false in the base JSON, FusedAdam.
        params.setdefault("torch_adam", True)
        if device == "cuda" and params["torch_adam"] is True:
            params.setdefault("fused", True)

    if "scheduler" in ds:
        sched = ds["scheduler"].setdefault("params", {})
        for key, value in (("warmup_num_steps", t.warmup_steps), ("total_num_steps", t.max_steps),
                           ("warmup_max_lr", t.learning_rate), ("warmup_min_lr", 0.0),
                           ("cos_min_ratio", t.min_lr_ratio), ("warmup_min_ratio", 0.0),
                           ("warmup_type", "linear")):
            _fill(sched, key, value)

    # The run's TensorBoard is written by the trainer (train/metrics.py: the project's scalars, grouped, with units).
    # DeepSpeed's own monitor, when a JSON turns it on, writes its "Train/Samples" group (the same loss and lr again)
    # beside them as a run of its own, deepspeed/, listed after the trainer's.
    tb = ds.get("tensorboard")
    if tb is not None:
        _resolve(tb, "enabled", False)
        _resolve(tb, "output_path", str(Path(cfg.output_dir).resolve() / "tensorboard"))
        _resolve(tb, "job_name", "deepspeed")

    left = _auto_keys(ds)
    if left:
        raise ConfigError(f"{source}: no run-config value fills {', '.join(left)} (\"auto\"); "
                          "write a concrete value there")
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _fill(section: dict, key: str, value: Any) -> None:
    """Replace an "auto" value; an absent key stays absent (DeepSpeed's default applies)."""
    if section.get(key) == AUTO:
        section[key] = value


def _resolve(section: dict, key: str, value: Any) -> None:
    """Replace an "auto" or absent value."""
    if section.get(key, AUTO) == AUTO:
        section[key] = value


def _auto_keys(obj: Any, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    if isinstance(obj, list):
        return [k for i, v in enumerate(obj) for k in _auto_keys(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if obj == AUTO else []
