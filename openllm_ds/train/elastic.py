"""Elastic resume: a checkpoint written in one layout (data-parallel ranks, ZeRO stage) loaded in another, through a
conversion of the step made once beside it: DeepSpeed's universal checkpoint format (``universal/``, its
ds_to_universal; a stage-0 step laid out in the same format here) for a ZeRO engine, and a stage-0 checkpoint made
from it (``zero0/``) for an engine without ZeRO. ``checkpointing.load_checkpoint`` decides when to use one.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from openllm_ds.checkpoint import WEIGHTS, load_state_dict, weights_only_loads
from openllm_ds.errors import ConfigError
from openllm_ds.train.distributed import DistEnv, broadcast_object
from openllm_ds.utils import first_line

UNIVERSAL = "universal"  # a step converted to DeepSpeed's universal checkpoint format, inside the step dir
ZERO0 = "zero0"  # a ZeRO step converted for a run without ZeRO, inside the step dir


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
