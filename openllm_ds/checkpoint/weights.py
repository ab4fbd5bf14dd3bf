"""Reading tensors from files someone else may have written: safetensors, ``torch.load`` and DeepSpeed's ZeRO
shards, each with one policy: nothing is unpickled but tensors and DeepSpeed's own plain state (no code runs), and a
truncated or corrupt file is named with its fix."""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path

import torch

from openllm_ds.checkpoint.layout import HF_INDEX, PYTORCH_WEIGHTS, WEIGHTS
from openllm_ds.errors import UserError
from openllm_ds.utils import first_line, read_json


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


def load_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an HF dir: model.safetensors, or every shard its index names."""
    if (path / WEIGHTS).is_file():
        return load_state_dict(path / WEIGHTS)
    index = read_json(path / HF_INDEX, "download the checkpoint again", expect=dict)
    weight_map = index.get("weight_map")
    shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) and all(
        isinstance(v, str) for v in weight_map.values()) else []
    if not shards:
        raise UserError(f"{path / HF_INDEX} names no weight files (no \"weight_map\"); download the checkpoint again")
    sd = {}
    for shard in shards:
        if not (path / shard).is_file():
            raise UserError(f"{path / shard}, a shard {HF_INDEX} names, is missing; download the checkpoint again")
        sd.update(load_state_dict(path / shard))
    return sd


def load_pytorch_weights(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch export's model.pt, refusing any pickled object that is not a tensor."""
    with refusing_pickled_code(f"refusing to load {path}: its {PYTORCH_WEIGHTS} holds pickled objects other "
                               "than tensors"):
        return torch.load(path / PYTORCH_WEIGHTS, weights_only=True, map_location="cpu")


def load_zero_shards(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights gathered from one DeepSpeed tag's ZeRO shards by DeepSpeed's zero_to_fp32."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise UserError(f"{tag_dir} holds DeepSpeed ZeRO shards only; consolidating them needs deepspeed "
                        "(pip install deepspeed) or a checkpoint with model.safetensors") from None
    try:
        with weights_only_loads(f"refusing to load {tag_dir}"):
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except UserError:
        raise
    except Exception as e:  # a truncated, missing or foreign file among the shards
        raise UserError(f"{tag_dir} is not a complete DeepSpeed ZeRO checkpoint (zero_to_fp32 said: "
                        f"{type(e).__name__}: {first_line(e)}); copy it again, or "
                        "pass another checkpoint (--checkpoint STEP)") from None
    state = {k.removeprefix("module."): v for k, v in state.items()}
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise UserError(f"{tag_dir}: DeepSpeed returned empty tensors ({', '.join(empty[:3])}); the checkpoint is "
                        "incomplete")
    return state


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
