"""Find and load trained weights without DeepSpeed: training outputs and Hugging Face exports.

A training output directory looks like::

    models/NAME/
      run_config.yaml            the resolved run config
      tokenizer/                 a copy of the tokenizer files
      tensorboard/
      checkpoints/
        latest                   the tag of the newest complete checkpoint (moved into place last)
        step_00000100/           one DeepSpeed checkpoint tag, plus:
          model.safetensors      consolidated fp32 weights under our parameter names
          train_state.json       step, tokens seen, data position, last eval loss
          run_config.yaml

A Hugging Face export holds ``config.json`` (LlamaForCausalLM), ``model.safetensors`` and the
tokenizer files; a PyTorch export ``config.json`` (our ModelConfig), ``model.pt`` and the tokenizer files.
``--model_dir`` accepts any of them; ONNX exports run on onnxruntime (export/onnx_runtime.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from openllm_ds.config import ModelConfig, RunConfig, run_config_from_dict
from openllm_ds.errors import UserError
from openllm_ds.utils import read_json, read_yaml

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
PYTORCH_WEIGHTS = "model.pt"  # a PyTorch export's state dict
HF_INDEX = "model.safetensors.index.json"  # a Hugging Face checkpoint in several safetensors shards
TRAIN_STATE = "train_state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")  # checkpoints/step_00000100
ANY_STEP_DIR = re.compile(r"^(?:step_|global_step)(\d+)$")  # ours, or a DeepSpeed tag of its default name


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class WeightsSource:
    """Where trained weights are and what they fit, read without loading them."""

    model_config: ModelConfig
    tokenizer_dir: Path
    step: int | None  # training step of the weights, when known
    kind: str  # "train", "huggingface" or "pytorch"
    path: Path  # the checkpoint step dir or the export dir
    run_config: RunConfig | None = None


@dataclass
class LoadedModel(WeightsSource):
    """A WeightsSource with its weights loaded into our Transformer."""

    model: torch.nn.Module | None = None


def is_hf_export(path: Path) -> bool:
    """An HF Llama dir: ours (one model.safetensors) or any Llama checkpoint (possibly in shards)."""
    return (path / "config.json").is_file() and ((path / WEIGHTS).is_file() or (path / HF_INDEX).is_file())


def load_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an HF dir: model.safetensors, or every shard its index names."""
    if (path / WEIGHTS).is_file():
        return load_state_dict(path / WEIGHTS)
    index = read_json(path / HF_INDEX, "download the checkpoint again")
    shards = sorted(set(index.get("weight_map", {}).values())) if isinstance(index, dict) else []
    if not shards:
        raise UserError(f"{path / HF_INDEX} names no weight files (no \"weight_map\"); download the checkpoint again")
    sd = {}
    for shard in shards:
        if not (path / shard).is_file():
            raise UserError(f"{path / shard}, a shard {HF_INDEX} names, is missing; download the checkpoint again")
        sd.update(load_state_dict(path / shard))
    return sd


def is_pytorch_export(path: Path) -> bool:
    return (path / PYTORCH_WEIGHTS).is_file() and (path / "config.json").is_file() and not is_hf_export(path)


def list_checkpoints(model_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a training output, oldest first."""
    ckpt = Path(model_dir) / CHECKPOINTS
    out = []
    if ckpt.is_dir():
        for d in ckpt.iterdir():
            m = STEP_DIR.match(d.name)
            if m and (d / WEIGHTS).is_file() and (d / TRAIN_STATE).is_file():
                out.append((int(m.group(1)), d))
    return sorted(out)


def read_train_state(path: Path) -> dict:
    """A checkpoint dir's train_state.json, with a valid "step" (a clear error when it is missing or corrupt)."""
    others = ", ".join(str(s) for s, d in list_checkpoints(path.parent.parent) if d != path) or "none"
    fix = f"that checkpoint is damaged: use another one (--checkpoint STEP or --resume PATH; complete steps: {others})"
    state = read_json(path / TRAIN_STATE, fix)
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UserError(f"{path / TRAIN_STATE} has no valid \"step\" (got {step!r}); {fix}")
    return state


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint dir's train_state.json records."""
    return read_train_state(path)["step"]


def resolve_checkpoint(model_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint dir for ``step`` (default: the one named by ``latest``)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise UserError(f"--model_dir {root} does not exist; pass a training output (models/NAME) or an export dir")
    ckpt = root / CHECKPOINTS
    if step is not None:
        d = ckpt / step_tag(step)
        if not (d / WEIGHTS).is_file():
            have = ", ".join(str(s) for s, _ in list_checkpoints(root)) or "none"
            raise UserError(f"--model_dir {root} has no complete checkpoint for step {step} (have: {have})")
        return d
    latest = ckpt / LATEST
    if latest.is_file():
        d = ckpt / latest.read_text().strip()
        if (d / WEIGHTS).is_file():
            return d
    found = list_checkpoints(root)
    if not found:
        raise UserError(
            f"--model_dir {root} holds no checkpoint (no {CHECKPOINTS}/{LATEST}, no {CHECKPOINTS}/step_*/{WEIGHTS}) "
            "and is not a Hugging Face export (config.json + model.safetensors); train first or point at an export"
        )
    return found[-1][1]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); the checkpoint is corrupt or "
                        "truncated: copy it again, or pass another --model_dir / --checkpoint") from None
    empty = [k for k, v in sd.items() if v.numel() == 0]
    if empty:
        raise UserError(f"{path} holds empty tensors ({', '.join(empty[:3])}...); the checkpoint is incomplete")
    return sd


def _read_json(path: Path) -> dict:
    return read_json(path, "re-export the model")


def weights_source(model_dir: str | Path, step: int | None = None) -> WeightsSource:
    """A training output (its ``latest`` or ``step``), one of its ``checkpoints/step_*`` dirs, or an HF or PyTorch
    export."""
    root = Path(model_dir)
    if is_hf_export(root) or is_pytorch_export(root):
        card = root / "openllm_ds.json"
        step_ = read_json(card, "re-export the model").get("step") if card.is_file() else None
        if is_pytorch_export(root):
            fields = read_json(root / "config.json", "re-export the model (--format pytorch)")
            return WeightsSource(ModelConfig(**fields), root, step_, "pytorch", root)
        from openllm_ds.model.hf_map import from_hf_config

        cfg = from_hf_config(_read_json(root / "config.json"), str(root / "config.json"))
        return WeightsSource(cfg, root, step_, "huggingface", root)
    if step is None and (root / TRAIN_STATE).is_file() and root.parent.name == CHECKPOINTS:  # a step dir
        root, step = root.parent.parent, checkpoint_step(root)
    path = resolve_checkpoint(root, step)
    cfg_file = next((f for f in (path / "run_config.yaml", root / "run_config.yaml") if f.is_file()), None)
    if cfg_file is None:
        raise UserError(f"{path} has no run_config.yaml (nor {root / 'run_config.yaml'}): the model shape is "
                        "unknown; pass the run's own output dir as --model_dir")
    run_cfg = run_config_from_dict(read_yaml(cfg_file, f"restore it from {path / 'run_config.yaml'} or the "
                                                       "run's other checkpoints") or {}, str(cfg_file))
    tok_dir = root / "tokenizer"
    if not tok_dir.is_dir():
        tok_dir = Path(run_cfg.train.tokenizer_dir)
    return WeightsSource(run_cfg.model, tok_dir, checkpoint_step(path), "train", path, run_cfg)


def load_model(model_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> LoadedModel:
    """Load our Transformer from a training output (or one of its step dirs), an HF or a PyTorch export, in eval
    mode (a PyTorch export computes in the dtype it was stored in unless ``dtype`` is given)."""
    from openllm_ds.model import Transformer

    src = weights_source(model_dir, step)
    cfg, path = src.model_config, src.path
    model = Transformer(cfg)
    if src.kind == "huggingface":
        from openllm_ds.model.hf_map import from_hf_state_dict

        sd = from_hf_state_dict(load_hf_weights(path), cfg, str(path))
    elif src.kind == "pytorch":
        with refusing_pickled_code(f"refusing to load {path}: its {PYTORCH_WEIGHTS} holds pickled objects other "
                                   "than tensors"):
            sd = torch.load(path / PYTORCH_WEIGHTS, weights_only=True, map_location="cpu")
        model.to(sd["embed_tokens.weight"].dtype)
    else:
        sd = _stack_split_projections(load_state_dict(path / WEIGHTS), cfg, str(path / WEIGHTS))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise UserError(f"weights in {path} do not fit the model config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.to(device=device, dtype=dtype).eval()
    return LoadedModel(**{f.name: getattr(src, f.name) for f in dataclasses.fields(src)}, model=model)


def _stack_split_projections(sd: dict, cfg: ModelConfig, source: str) -> dict:
    """Weights saved before q/k/v and gate/up were stacked into one tensor each carry HF's per-projection
    names (without its ``model.`` prefix): stack them as the model now holds them."""
    if not any(k.endswith("self_attn.q_proj.weight") for k in sd):
        return sd
    from openllm_ds.model.hf_map import from_hf_state_dict

    return from_hf_state_dict({k if k == "lm_head.weight" else f"model.{k}": v for k, v in sd.items()}, cfg, source)


@contextlib.contextmanager
def refusing_pickled_code(what: str, error: type[UserError] = UserError):
    """Turn torch.load(weights_only=True)'s refusal into ``error``: ``what`` names the file and says it
    holds pickled objects; the message adds that loading them could run code, and torch's reason."""
    try:
        yield
    except pickle.UnpicklingError as e:
        raise error(f"{what}, and loading them could run code (torch.load weights_only=True said: "
                    f"{str(e).splitlines()[0]})") from None


@contextlib.contextmanager
def weights_only_loads(refusal: str, error: type[UserError] = UserError):
    """Make DeepSpeed unpickle with weights_only=True (its zero_to_fp32 and engine.load_checkpoint pass
    weights_only=False).

    Allowed besides tensors: what a DeepSpeed checkpoint holds as plain data (numpy arrays of the RNG
    state, DeepSpeed's ZeroStageEnum, loss scaler and fragment_address), so a checkpoint from
    elsewhere cannot run code: any other pickled object raises ``error`` starting with ``refusal``.
    TORCH_FORCE_WEIGHTS_ONLY_LOAD is torch's switch for this.
    """
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    np_core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")] if hasattr(np, "dtypes") else []
    allowed = [np_core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes, ZeroStageEnum, LossScaler,
               DynamicLossScaler, fragment_address]
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with refusing_pickled_code(f"{refusal}: its DeepSpeed files hold pickled objects other than tensors and "
                                   "DeepSpeed's own state", error), torch.serialization.safe_globals(allowed):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before
