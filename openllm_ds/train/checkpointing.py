"""Save and resume training checkpoints in the layout openllm_ds/checkpoint/layout.py names.

A save, in order (a crash at any point leaves ``latest`` on the previous complete checkpoint):
1. every rank: ``engine.save_checkpoint(<output>/checkpoints, tag=step_XXXXXXXX, save_latest=False)``
   (model, optimizer, scheduler, loss scaler; our client state: train state, data position and the
   RNG states of every rank);
2. rank 0: ``model.safetensors`` (consolidated fp32 weights under our parameter names; for ZeRO
   stages 1-3 DeepSpeed's zero_to_fp32 reads them back from the files just written),
   ``train_state.json`` and ``run_config.yaml`` into the tag dir;
3. rank 0: ``checkpoints/latest`` replaced atomically, then checkpoints beyond ``keep_last`` deleted.

A resume in another layout (world size, ZeRO stage) loads through a conversion of the step (``elastic.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from openllm_ds.checkpoint import (CHECKPOINTS, LATEST, RUN_OUTPUTS, STEP_DIR, TRAIN_STATE, WEIGHTS, list_checkpoints,
                                   read_latest, step_tag, weights_only_loads)
from openllm_ds.config import RunConfig
from openllm_ds.errors import CheckpointWriteError, ConfigError, UserError
from openllm_ds.paths import check_path
from openllm_ds.train.distributed import DistEnv, all_gather_object, barrier, broadcast_object
from openllm_ds.train.elastic import (UNIVERSAL, ZERO0, convert_to_stage0, convert_to_universal, damaged_conversion,
                                      repair_zero3_universal_load)
from openllm_ds.utils import (OutputKind, _umask, atomic_write_json, atomic_write_text, claim_output_dir,
                              describe_entries, first_line, read_yaml, write_manifest)



@dataclass
class TrainState:
    """Runtime state of a run (never in the config): saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    data: list = dataclasses.field(default_factory=list)  # data position: per source [epoch, index, taken]
    source_tokens: list = dataclasses.field(default_factory=list)  # tokens trained on, per source
    data_sha256: str | None = None  # what the run trains on (its sources' documents and weights)
    tokenizer_sha256: str | None = None  # the tokenizer.model it trains with
    last_eval_loss: float | None = None  # the sources' validation losses, weighted as they are sampled
    source_eval_losses: list = dataclasses.field(default_factory=list)
    nonfinite_skipped: int = 0  # steps whose update was dropped for non-finite gradients
    loss_avg: float | None = None  # running average of the training loss (spike detection)
    loss_var: float | None = None  # its running variance (spike detection)
    rollbacks: int = 0  # rollbacks to an earlier checkpoint after a loss spike
    world_size: int | None = None  # the layout the checkpoint was written in (a resume in another one converts it)
    zero_stage: int | None = None
    global_batch: int | None = None  # windows per optimizer step: micro x accumulation x world size

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        d = dict(d)
        if "epoch" in d or "index" in d:  # one source, written before mixtures
            d["data"] = [[d.pop("epoch", 0), d.pop("index", 0), 0]]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, cfg: RunConfig, state: TrainState, env: DistEnv, zero_stage: int) -> Path:
    """Write checkpoint ``step_tag(state.step)``; all ranks call this. Returns the tag dir."""
    ckpt_dir = Path(cfg.output_dir) / CHECKPOINTS
    tag = step_tag(state.step)
    tag_dir = ckpt_dir / tag
    client_state = {"train_state": dataclasses.asdict(state), "rng": all_gather_object(rng_state(), env)}
    refusal = None
    if env.is_rank_zero and tag_dir.exists():
        refusal = not_a_checkpoint(tag_dir)
        if refusal is None:
            shutil.rmtree(tag_dir)  # an interrupted save of this step (``latest`` never named it)
    refusal = broadcast_object(refusal, env)
    if refusal is not None:
        raise UserError(refusal)
    barrier()
    error = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as e:  # full disk, lost permissions (torch.save reports them as RuntimeError):
        error = f"{type(e).__name__}: {e}"  # every rank must learn of it, not wait at a barrier
    error = next((e for e in all_gather_object(error, env) if e), None)
    if env.is_rank_zero and error is None:
        try:
            weights = consolidated_state_dict(engine, ckpt_dir, tag, zero_stage, cfg)
            write_safetensors(weights, tag_dir / WEIGHTS)
            atomic_write_json(tag_dir / TRAIN_STATE, dataclasses.asdict(state))
            cfg.save(tag_dir / "run_config.yaml")
            write_manifest(tag_dir, CHECKPOINT, (e.name for e in tag_dir.iterdir()))
            atomic_write_text(ckpt_dir / LATEST, tag + "\n")
        except (OSError, RuntimeError) as e:
            error = f"{type(e).__name__}: {e}"
    error = broadcast_object(error, env)  # rank 0 knows of every failure now
    if error is not None:
        if env.is_rank_zero:
            shutil.rmtree(tag_dir, ignore_errors=True)  # the partial files of this step (latest never named them)
        previous = read_latest(ckpt_dir) or "none (no checkpoint yet)"
        raise CheckpointWriteError(f"could not write checkpoint {tag_dir} ({error}); the previous checkpoint "
                                   f"{previous} is intact: free disk space or fix the permissions of {ckpt_dir}, "
                                   "then rerun with --resume auto")
    if env.is_rank_zero:
        prune_checkpoints(Path(cfg.output_dir), cfg.train.keep_last, state.step)
    barrier()
    return tag_dir


def consolidated_state_dict(engine, ckpt_dir: Path, tag: str, zero_stage: int, cfg: RunConfig) -> dict:
    """fp32 weights under the model's own names (a tied head is stored once, as the embedding)."""
    if zero_stage == 0:
        sd = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress prints
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    expected = set(engine.module.state_dict())
    if cfg.model.tie_embeddings:
        sd.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    if set(sd) != expected:
        raise RuntimeError(f"consolidated weights of {tag} do not match the model: missing "
                           f"{sorted(expected - set(sd))[:3]}, unexpected {sorted(set(sd) - expected)[:3]}")
    empty = [k for k, v in sd.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(f"consolidated weights of {tag} hold empty tensors: {empty[:3]}")
    return {k: v.float().contiguous() for k, v in sd.items()}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prune_checkpoints(output_dir: Path, keep_last: int, current_step: int) -> list[Path]:
    """Keep the newest ``keep_last`` complete checkpoints up to ``current_step``; delete older step dirs.

    Step dirs beyond ``current_step`` (left by a run resumed from an earlier checkpoint) are kept
    until this run reaches and rewrites them.
    """
    complete = [(s, d) for s, d in list_checkpoints(output_dir) if s <= current_step]
    keep = {d.name for _, d in complete[-keep_last:]}
    removed = []
    for d in (output_dir / CHECKPOINTS).iterdir():
        m = STEP_DIR.match(d.name)
        if m and d.is_dir() and int(m.group(1)) <= current_step and d.name not in keep:
            if (refusal := not_a_checkpoint(d)) is not None:
                print(f"warning: not deleting {d}: {refusal}", file=sys.stderr)
                continue
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def is_checkpoint_entry(name: str) -> bool:
    """What a step dir holds: DeepSpeed's ``*.pt`` states, our weights, train state and config, the conversions."""
    return name.endswith(".pt") or name.startswith(".") or name in (WEIGHTS, TRAIN_STATE, "run_config.yaml", UNIVERSAL,
                                                                   ZERO0, "latest_universal")


CHECKPOINT = OutputKind("a checkpoint", "openllm-ds train", is_checkpoint_entry)
# What `train` and `finetune` write into --output_dir; its manifest names this kind, so that no other stage writes
# there, and neither stage writes into another stage's output (claim_output_dir, in preflight.check_output_dir).
TRAINING_RUN = OutputKind("a training run", "openllm-ds train (or finetune)", RUN_OUTPUTS.__contains__)


def not_a_checkpoint(tag_dir: Path) -> str | None:
    """Why the step dir ``tag_dir`` may not be deleted (another stage's output, or a user's files there), else None."""
    try:
        foreign = claim_output_dir(tag_dir, CHECKPOINT, "checkpoint dir")
    except UserError as e:
        return str(e)
    if foreign:
        return (f"checkpoint dir {tag_dir} holds {describe_entries(foreign)}, which openllm-ds did not write; move them "
                "out of it or choose another --output_dir")
    return None


def find_resume_checkpoint(cfg: RunConfig) -> Path | None:
    """The tag dir ``train.resume`` names: ``auto`` = the one ``<output>/checkpoints/latest`` names
    (none yet: start fresh), ``none``, or an explicit ``checkpoints/step_*`` dir."""
    resume = cfg.train.resume
    if resume == "none":
        return None
    if resume == "auto":
        latest = Path(cfg.output_dir) / CHECKPOINTS / LATEST
        tag = read_latest(latest.parent)
        if tag is not None:
            tag_dir = latest.parent / tag
            what = f"{latest} names {tag_dir.name}, but"
        else:  # a crash between train_state.json and latest: the newest complete checkpoint
            found = list_checkpoints(cfg.output_dir)
            if not found:
                return None
            tag_dir, what = found[-1][1], "resume:"
    else:
        tag_dir = check_path(resume, "train.resume (--resume)", "dir", "pass a checkpoints/step_* dir, --resume auto "
                             "(the latest checkpoint of --output_dir) or --resume none (start over)", ConfigError)
        what = f"train.resume {tag_dir}:"
    if not (tag_dir / TRAIN_STATE).is_file() or not (tag_dir / WEIGHTS).is_file():
        raise ConfigError(f"{what} {tag_dir} is not a complete checkpoint (no {TRAIN_STATE} / {WEIGHTS}); "
                          "pass a checkpoints/step_* dir, --resume auto, or --resume none to start over")
    saved = tag_dir / "run_config.yaml"
    if saved.is_file():
        saved_cfg = read_yaml(saved, "that checkpoint is damaged: pass another with --resume PATH, or --resume none",
                              expect=dict)
        model = saved_cfg.get("model") if isinstance(saved_cfg.get("model"), dict) else {}
        mine = dataclasses.asdict(cfg.model)
        diff = sorted(k for k in mine if k in model and model[k] != mine[k])
        if diff:
            raise ConfigError(f"checkpoint {tag_dir} was trained with a different model ("
                              + ", ".join(f"model.{k}: {model[k]} vs {mine[k]}" for k in diff)
                              + "); resume with the same model config or pass --resume none and a new --output_dir")
    return tag_dir


def load_checkpoint(engine, tag_dir: Path, env: DistEnv, universal: bool = False, model_cfg=None) -> TrainState:
    """Restore engine state (model, optimizer, scheduler, scaler), RNG and the train state; ``universal``: the step
    was written in another layout and loads through its conversion (``model_cfg``, the model's config, names the
    parameters): DeepSpeed's universal checkpoint for a ZeRO engine (its ``checkpoint.load_universal`` switched on
    for this load), a stage-0 checkpoint made from it for an engine without ZeRO."""
    error, path, client_state, load_dir = None, None, None, tag_dir
    try:
        tag = None
        if universal and engine.zero_optimization_stage() == 0:
            load_dir, tag, universal = convert_to_stage0(tag_dir, env, model_cfg), ZERO0, False
        elif universal:
            load_dir, tag = convert_to_universal(tag_dir, env, model_cfg), UNIVERSAL
        engine._config.load_universal_checkpoint = universal  # the engine reads its checkpoint.load_universal here
        with weights_only_loads(f"refusing to resume from {tag_dir}", ConfigError):  # no code runs from the files
            path, client_state = engine.load_checkpoint(str(load_dir.parent), tag=tag or tag_dir.name,
                                                        load_optimizer_states=True, load_lr_scheduler_states=True)
            if universal and engine.zero_optimization_stage() == 3:
                repair_zero3_universal_load(engine.optimizer.optimizer, load_dir / "zero" / "optimizer_state.pt")
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated, missing or foreign file: torch, pickle and DeepSpeed errors
        error = first_line(e)
    if error is None and (path is None or not client_state or "train_state" not in client_state):
        error = "no engine state or train state in it"
    error = next((e for e in all_gather_object(error, env) if e), None)  # every rank stops, none waits
    if error is not None and load_dir != tag_dir:  # the conversion failed to load, not the step itself
        raise ConfigError(damaged_conversion(tag_dir, load_dir, error))
    if error is not None:
        others = [d.name for _, d in list_checkpoints(tag_dir.parent.parent) if d != tag_dir]
        fix = (f"resume from an earlier complete checkpoint with --resume {tag_dir.parent / others[-1]}" if others
               else "no other checkpoint is left: start over with --resume none")
        raise ConfigError(f"could not load the DeepSpeed checkpoint {tag_dir} ({error}); its files are damaged or "
                          f"were written by another setup (ZeRO stage, number of ranks); {fix}")
    rngs = client_state.get("rng") or []
    if len(rngs) == env.world_size:
        set_rng_state(rngs[env.rank])
    return TrainState.from_dict(client_state["train_state"])


def check_fresh_output_dir(cfg: RunConfig) -> None:
    """A fresh run (resume none) must not interleave its checkpoints with another run's."""
    found = list_checkpoints(cfg.output_dir)
    if cfg.train.resume == "none" and found:
        raise ConfigError(f"output dir {cfg.output_dir} already holds checkpoints (up to step {found[-1][0]}); "
                          "pass --resume auto to continue that run, or choose another --output_dir")
