"""Save and resume training checkpoints in the layout openllm_ds/checkpoint/layout.py names.

A save, in order (a crash at any point leaves ``latest`` on the previous complete checkpoint):
1. every rank: ``engine.save_checkpoint(<output>/checkpoints, tag=step_XXXXXXXX, save_latest=False)``
   (model, optimizer, scheduler, loss scaler; our client state: train state, data position and the
   RNG states of every rank);
2. rank 0: ``model.safetensors`` (consolidated fp32 weights under our parameter names; for ZeRO
   stages 1-3 DeepSpeed's zero_to_fp32 reads them back from the files just written),
   ``train_state.json`` and ``run_config.yaml`` into the tag dir;
3. rank 0: ``checkpoints/latest`` replaced atomically, then checkpoints beyond ``keep_last`` deleted.
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

from openllm_ds.checkpoint import (CHECKPOINTS, LATEST, STEP_DIR, TRAIN_STATE, WEIGHTS, list_checkpoints,
                                   load_state_dict, read_latest, step_tag, weights_only_loads)
from openllm_ds.config import RunConfig
from openllm_ds.errors import CheckpointWriteError, ConfigError, UserError
from openllm_ds.paths import check_path
from openllm_ds.train.distributed import DistEnv, all_gather_object, barrier, broadcast_object
from openllm_ds.utils import (OutputKind, _umask, atomic_write_json, atomic_write_text, claim_output_dir,
                              describe_entries, first_line, read_yaml, write_manifest)

UNIVERSAL = "universal"  # a step converted to DeepSpeed's universal checkpoint format, inside the step dir
ZERO0 = "zero0"  # a ZeRO step converted for a run without ZeRO, inside the step dir


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


@dataclass(frozen=True)
class Layout:
    """How a checkpoint's optimizer state is laid out: the data-parallel ranks and the ZeRO stage it was written by."""

    world_size: int | None  # None: not recorded and not needed (stage 0 keeps the whole state in one file)
    zero_stage: int

    def describe(self) -> str:
        ranks = f"{self.world_size} rank(s)" if self.world_size else "any number of ranks"
        return f"ZeRO-{self.zero_stage} on {ranks}"


def saved_layout(tag_dir: Path, state: dict) -> Layout:
    """The layout train_state.json records; for checkpoints written before it did, read from DeepSpeed's file
    names (one ``zero_pp_rank_R_*_optim_states.pt`` per rank under ZeRO; ZeRO-3 also partitions the model states)."""
    optim = list(tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    stage = state.get("zero_stage")
    if not isinstance(stage, int):
        stage = 3 if any(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")) else 2 if optim else 0
    world = state.get("world_size") if isinstance(state.get("world_size"), int) else len(optim) or None
    return Layout(world, stage)


def needs_universal(saved: Layout, world_size: int, zero_stage: int) -> bool:
    """A ZeRO checkpoint resumes in another world size or ZeRO stage only through DeepSpeed's universal format."""
    if saved.zero_stage == 0 and zero_stage == 0:  # the whole optimizer state in one file: any number of ranks
        return False
    return (saved.world_size, saved.zero_stage) != (world_size, zero_stage)


def convert_to_universal(tag_dir: Path, env: DistEnv, model_cfg) -> Path:
    """``<step>/universal``: the step in DeepSpeed's universal checkpoint format (its ds_to_universal), converted
    once. A step written without ZeRO (stage 0, fp32: a plain AdamW state) is laid out in the same format here."""

    def build(partial: Path) -> None:
        import argparse

        from deepspeed.checkpoint import ds_to_universal

        args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(partial), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)  # checkpoints written before the model declared it
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if any(tag_dir.glob("zero_pp_rank_*_optim_states.pt")):
                ds_to_universal.main(args)
            else:
                universal_from_stage0(tag_dir, partial, model_cfg)
            readable_by_every_stage(partial, tag_dir / WEIGHTS)
        (tag_dir / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer to its output

    return convert_once(tag_dir, UNIVERSAL, env, build, lambda why: (
        f"could not convert {tag_dir} to DeepSpeed's universal checkpoint format ({why}); resume it with its own "
        f"number of ranks and ZeRO stage, or start a new run from its weights with --init_from {tag_dir}"))


def convert_once(tag_dir: Path, name: str, env: DistEnv, build, failure) -> Path:
    """``<step>/<name>``, a conversion of the step that rank 0 writes once with ``build(partial dir)`` under
    weights-only loading, then renames into place (a later resume reuses it). All ranks call this, and all raise
    the same ConfigError when it fails: pickled code in the step's files, or ``failure(what went wrong)``."""
    out, error = tag_dir / name, None
    if env.is_rank_zero and not out.is_dir():
        partial = tag_dir / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # an interrupted conversion of ours
        try:
            with weights_only_loads(f"refusing to convert {tag_dir}", ConfigError):
                build(partial)
            os.replace(partial, out)
        except ConfigError as e:  # pickled code in its files
            shutil.rmtree(partial, ignore_errors=True)
            error = str(e)
        except Exception as e:  # noqa: BLE001 - damaged or foreign files: DeepSpeed's asserts, torch and OS errors
            shutil.rmtree(partial, ignore_errors=True)
            error = failure(first_line(e))
    error = broadcast_object(error, env)
    if error:
        raise ConfigError(error)
    return out


def optimizer_order(model_cfg) -> tuple[list[str], list[int]]:
    """The parameter names in the optimizer's order (train/optim.param_groups on the model), and the size of each
    group: how a plain AdamW state dict numbers them."""
    from openllm_ds.model import Transformer
    from openllm_ds.train.optim import param_groups

    with torch.device("meta"):
        model = Transformer(model_cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.0)
    return [names[id(p)] for g in groups for p in g["params"]], [len(g["params"]) for g in groups]


def universal_from_stage0(tag_dir: Path, out: Path, model_cfg) -> None:
    """A stage-0 step (the module and a plain AdamW state in mp_rank_00_model_states.pt) as a universal checkpoint:
    per parameter its fp32 weight, exp_avg, exp_avg_sq and step; the groups' settings in zero/optimizer_state.pt."""
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    optimizer = states.get("optimizer")
    if not (isinstance(optimizer, dict) and "state" in optimizer and "param_groups" in optimizer):
        raise ConfigError(f"{tag_dir} keeps no plain AdamW state (a run without ZeRO in fp16 or bf16 keeps "
                          "DeepSpeed's own): resume it without ZeRO (--ds_config ds_configs/zero0.json)")
    order, _ = optimizer_order(model_cfg)
    for i, name in enumerate(order):
        d = out / "zero" / name
        d.mkdir(parents=True)
        torch.save({"param": states["module"][name].float(), "cat_dim": 0}, d / "fp32.pt")
        state = optimizer["state"].get(i)
        if state:
            for key in ("exp_avg", "exp_avg_sq"):
                torch.save({"param": state[key].float(), "cat_dim": 0}, d / f"{key}.pt")
            torch.save(state["step"], d / "step.pt")
    # the rest of optimizer_state.pt (the step where ZeRO-3 reads it, version, clipping): readable_by_every_stage
    torch.save({"param_groups": optimizer["param_groups"]}, out / "zero" / "optimizer_state.pt")
    shutil.copy2(tag_dir / "mp_rank_00_model_states.pt", out / "mp_rank_00_model_states.pt")


def stage0_from_universal(tag_dir: Path, universal: Path, out: Path, model_cfg) -> None:
    """The step as a stage-0 checkpoint (``out/mp_rank_00_model_states.pt``): the consolidated fp32 weights as the
    module, and a plain AdamW state dict built from the universal checkpoint's per-parameter states."""
    states = torch.load(universal / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    module = load_state_dict(tag_dir / WEIGHTS)
    if model_cfg.tie_embeddings:
        module["lm_head.weight"] = module["embed_tokens.weight"]
    order, sizes = optimizer_order(model_cfg)
    state = {}
    for i, name in enumerate(order):
        d = universal / "zero" / name
        if (d / "exp_avg.pt").is_file():
            state[i] = {"step": torch.load(d / "step.pt", weights_only=True),
                        **{key: torch.load(d / f"{key}.pt", weights_only=True)["param"].float()
                           for key in ("exp_avg", "exp_avg_sq")}}
    saved = torch.load(universal / "zero" / "optimizer_state.pt", weights_only=True)["param_groups"]
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    groups = [{**own, "params": list(range(start, start + n))} for own, start, n in zip(saved, starts, sizes)]
    out.mkdir()
    torch.save({**states, "module": module, "optimizer": {"state": state, "param_groups": groups}},
               out / "mp_rank_00_model_states.pt")


def convert_to_stage0(tag_dir: Path, env: DistEnv, model_cfg) -> Path:
    """``<step>/zero0``: a ZeRO step for a run without ZeRO (through its universal conversion), converted once."""
    universal = convert_to_universal(tag_dir, env, model_cfg)
    return convert_once(tag_dir, ZERO0, env,
                        lambda partial: stage0_from_universal(tag_dir, universal, partial, model_cfg),
                        lambda why: (f"could not convert {tag_dir} for a run without ZeRO ({why}); resume it under "
                                     f"ZeRO, or start a new run from its weights with --init_from {tag_dir}"))


def readable_by_every_stage(universal: Path, weights: Path) -> None:
    """Give a universal checkpoint the files of both of DeepSpeed's loaders, so that one written under ZeRO-1/2
    resumes under ZeRO-3 and back. ds_to_universal writes each layout in its own dialect: the model states file
    is ``mp_rank_00_model_states.pt`` (ZeRO-1/2) or ``zero_pp_rank_0_mp_rank_00_model_states.pt`` (ZeRO-3); a
    parameter's ``fp32``/``exp_avg``/``exp_avg_sq`` are ``{"param": tensor}`` in its own shape with a ``step.pt``
    beside them (1/2) or flat tensors (3); ``zero/optimizer_state.pt`` holds the step in its
    ``optimizer_state_dict`` (3) or the DeepSpeed version and clipping (1/2)."""
    import deepspeed
    from safetensors import safe_open

    stage12, stage3 = universal / "mp_rank_00_model_states.pt", universal / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if not stage12.is_file():
        shutil.copy2(stage3, stage12)
    elif not stage3.is_file():
        shutil.copy2(stage12, stage3)
    zero = universal / "zero"
    optim = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=True)
    steps = [torch.load(d / "step.pt", weights_only=True) for d in zero.iterdir() if (d / "step.pt").is_file()]
    step = steps[0] if steps else optim["optimizer_state_dict"]["state"][0]["step"]
    optim.setdefault("optimizer_state_dict", {"state": {0: {"step": step}}, "param_groups": optim["param_groups"]})
    optim.setdefault("ds_version", deepspeed.__version__)
    model_states = torch.load(stage12, map_location="cpu", weights_only=True)
    optim.setdefault("clip_grad", float(model_states.get("ds_config", {}).get("gradient_clipping", 0.0)))
    torch.save(optim, zero / "optimizer_state.pt")
    with safe_open(str(weights), "pt") as f:
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    for d in zero.iterdir():
        if not d.is_dir() or d.name not in shapes:
            continue
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            if (d / f"{key}.pt").is_file():
                t = torch.load(d / f"{key}.pt", map_location="cpu", weights_only=True)
                if torch.is_tensor(t):
                    torch.save({"param": t.view(shapes[d.name]), "cat_dim": 0}, d / f"{key}.pt")
        if not (d / "step.pt").is_file() and (d / "exp_avg.pt").is_file():
            torch.save(step.clone() if torch.is_tensor(step) else step, d / "step.pt")


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


def damaged_conversion(tag_dir: Path, load_dir: Path, error: str) -> str:
    """What works when a step's conversion (``universal/``, ``zero0/``) does not load: the step itself is intact,
    so it resumes in the layout it was written in, or after the conversion is made again."""
    try:
        from openllm_ds.checkpoint import read_train_state

        layout = saved_layout(tag_dir, read_train_state(tag_dir))
        ranks = f" on {layout.world_size} rank(s) (deepspeed --num_gpus {layout.world_size}, or --num_workers " \
                f"{layout.world_size})" if layout.world_size else ""
        own = f"resume it as it was written, with --ds_config ds_configs/zero{layout.zero_stage}.json{ranks}, where " \
              "it loads without a conversion"
    except Exception:  # noqa: BLE001 - its train state is damaged too: name only what needs no reading
        own = "resume it with the ZeRO stage and number of ranks it was written with"
    return (f"could not load {load_dir}, the conversion of {tag_dir} to this run's layout ({error}); the step itself "
            f"is intact and openllm-ds made that conversion: delete {load_dir} to have it converted again on the "
            f"next resume, or {own}")


def repair_zero3_universal_load(optimizer, saved: Path) -> None:
    """Two slips of DeepSpeed's ZeRO-3 universal loader, undone: it gives every param group the settings of the
    first one (weight decay 0.01 to the norm weights, whose group has none), and one ``step`` tensor to all of them,
    which AdamW then advances once per group and step (a wrong bias correction from the first step on)."""
    groups = torch.load(saved, map_location="cpu", weights_only=True)["optimizer_state_dict"]["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise RuntimeError(f"{saved} holds {len(groups)} parameter groups, the optimizer {len(optimizer.param_groups)}")
    for group, own in zip(optimizer.param_groups, groups):
        group.update({k: v for k, v in own.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def check_fresh_output_dir(cfg: RunConfig) -> None:
    """A fresh run (resume none) must not interleave its checkpoints with another run's."""
    found = list_checkpoints(cfg.output_dir)
    if cfg.train.resume == "none" and found:
        raise ConfigError(f"output dir {cfg.output_dir} already holds checkpoints (up to step {found[-1][0]}); "
                          "pass --resume auto to continue that run, or choose another --output_dir")
