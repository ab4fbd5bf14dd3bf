"""Load trained weights from any layout (see layout.py) into one object: the model, its tokenizer, its config, its
step and where it came from. Evaluation, export, serving and the Python API all load through ``load_model``."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from openllm_ds.checkpoint.layout import (ANY_STEP_DIR, CHECKPOINTS, EXPORT_INFO, ONNX_OLD_DECODER, TRAIN_STATE, WEIGHTS,
                                          checkpoint_step, is_hf_export, is_onnx_export, is_pytorch_export,
                                          is_zero_tag, read_train_state, resolve_checkpoint)
from openllm_ds.checkpoint.weights import load_hf_weights, load_pytorch_weights, load_state_dict, load_zero_shards
from openllm_ds.config import ModelConfig, RunConfig, run_config_from_dict
from openllm_ds.errors import UserError
from openllm_ds.paths import check_path
from openllm_ds.utils import read_json, read_yaml

KINDS = ("train", "deepspeed", "huggingface", "pytorch", "onnx")


@dataclass
class WeightsSource:
    """Where trained weights are and what they fit, read without loading them."""

    model_config: ModelConfig
    tokenizer_dir: Path
    step: int | None  # training step of the weights, when known
    kind: str  # one of KINDS: a checkpoint step (train), a ZeRO-only DeepSpeed tag, or an export
    path: Path  # the checkpoint step dir, DeepSpeed tag dir or export dir
    run_config: RunConfig | None = None
    train_state: dict = field(default_factory=dict)  # a checkpoint's train_state.json; an export's figures
    run_name: str | None = None

    @property
    def val_loss(self) -> float | None:
        for key in ("val_loss", "eval_loss", "last_eval_loss"):
            v = self.train_state.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                return float(v)
        return None

    @functools.cached_property
    def tokenizer(self):
        """The tokenizer the weights were trained with (its vocabulary checked against the model's)."""
        from openllm_ds.tokenizer import load_tokenizer

        tok = load_tokenizer(self.tokenizer_dir)
        if tok.vocab_size != self.model_config.vocab_size:
            raise UserError(
                f"tokenizer {self.tokenizer_dir / 'tokenizer.model'} has {tok.vocab_size} tokens but the model in "
                f"{self.path} has vocab_size {self.model_config.vocab_size}; use the tokenizer the model was trained "
                "with (the run's tokenizer/ dir, or an export made by `openllm-ds export`)"
            )
        return tok


@dataclass
class LoadedModel(WeightsSource):
    """A WeightsSource with its weights loaded: our ``Transformer`` in eval mode, or an ``OnnxCausalLM``."""

    model: torch.nn.Module | None = None


def weights_source(model_dir: str | Path, step: int | None = None) -> WeightsSource:
    """What ``model_dir`` holds: a training output (its ``latest`` or ``step``), one of its ``checkpoints/step_*``
    dirs, a DeepSpeed tag dir of ZeRO shards, or a Hugging Face, PyTorch or ONNX export."""
    root = check_path(model_dir, "--model_dir", "dir", "pass a training output (models/NAME) or an export dir")
    if is_hf_export(root) or is_pytorch_export(root) or is_onnx_export(root):
        return _export_source(root)
    m = ANY_STEP_DIR.match(root.name)
    if (m or (root / TRAIN_STATE).is_file()) and root.parent.name == CHECKPOINTS or is_zero_tag(root):  # one tag
        tag_step = checkpoint_step(root) if (root / TRAIN_STATE).is_file() else int(m.group(1)) if m else None
        if step is not None and tag_step is not None and step != tag_step:
            raise UserError(f"--model_dir {root} is the checkpoint of step {tag_step} but --checkpoint is {step}")
        path = root
        run_dir = root.parent.parent if root.parent.name == CHECKPOINTS else root.parent
    else:
        path, run_dir = resolve_checkpoint(root, step), root
    cfg_file = next((f for f in (path / "run_config.yaml", run_dir / "run_config.yaml") if f.is_file()), None)
    if cfg_file is None:
        raise UserError(f"{path} has no run_config.yaml (nor {run_dir / 'run_config.yaml'}): the model shape is "
                        "unknown; pass the run's own output dir as --model_dir")
    run_cfg = run_config_from_dict(read_yaml(cfg_file, f"restore it from {path / 'run_config.yaml'} or the "
                                                       "run's other checkpoints", expect=dict), str(cfg_file))
    tok_dir = run_dir / "tokenizer"
    if not tok_dir.is_dir():
        tok_dir = Path(run_cfg.train.tokenizer_dir)
    if is_zero_tag(path):
        state = read_json(path / TRAIN_STATE, "pass another --checkpoint", expect=dict) if (path / TRAIN_STATE).is_file() else {}
        m = ANY_STEP_DIR.match(path.name)
        return WeightsSource(run_cfg.model, tok_dir, state.get("step", int(m.group(1)) if m else None), "deepspeed",
                             path, run_cfg, state, run_cfg.name)
    state = read_train_state(path)
    return WeightsSource(run_cfg.model, tok_dir, state["step"], "train", path, run_cfg, state, run_cfg.name)


def _export_source(root: Path) -> WeightsSource:
    card = read_json(root / EXPORT_INFO, "re-export the model", expect=dict) if (root / EXPORT_INFO).is_file() else {}
    figures = {k: card[k] for k in ("val_loss", "tokens_seen") if card.get(k) is not None}
    if is_hf_export(root) or is_onnx_export(root):  # a Llama config.json (ONNX: optimum's layout)
        from openllm_ds.model.hf_map import from_hf_config

        kind = "huggingface" if is_hf_export(root) else "onnx"
        hf = read_json(root / "config.json", f"re-export the model (--format {kind})", expect=dict)
        if kind == "onnx" and "model_type" not in hf:
            raise UserError(f"{root} is an ONNX export of an older layout ({ONNX_OLD_DECODER}, no Llama config.json); "
                            f"re-export it from its training output: openllm-ds export --model_dir models/NAME --format onnx "
                            f"--output_dir {root} --overwrite")
        cfg = from_hf_config(hf, str(root / "config.json"))
    else:  # PyTorch exports store our ModelConfig's fields
        kind = "pytorch"
        fields = read_json(root / "config.json", f"re-export the model (--format {kind})", expect=dict)
        try:
            cfg = ModelConfig(**fields)
        except TypeError as e:
            raise UserError(f"{root / 'config.json'} is not a model config of this version ({e}); re-export the "
                            f"model (--format {kind})") from None
    return WeightsSource(cfg, root, card.get("step"), kind, root, None, figures, card.get("run_name"))


def load_model(model_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, backend: str = "torch", num_threads: int | None = None) -> LoadedModel:
    """Load the weights of ``model_dir`` (see ``weights_source``) in eval mode.

    backend torch: our Transformer on ``device`` (a PyTorch export computes in the dtype it was stored in unless
    ``dtype`` is given). backend onnx: an ONNX export on onnxruntime with ``num_threads`` intra-op threads.
    """
    src = weights_source(model_dir, step)
    fields = {f.name: getattr(src, f.name) for f in dataclasses.fields(src)}
    if backend == "onnx":
        if not is_onnx_export(src.path):
            raise UserError(f"{model_dir} is not an ONNX export; export it first (openllm-ds export --format onnx)")
        from openllm_ds.checkpoint.onnx import OnnxCausalLM

        return LoadedModel(**fields, model=OnnxCausalLM(src.path, num_threads=num_threads))
    if backend != "torch":
        raise UserError(f"--backend must be torch or onnx, got {backend!r}")
    if src.kind == "onnx":
        raise UserError(f"{model_dir} is an ONNX export; serve it with --backend onnx (onnxruntime runs it, PyTorch "
                        "cannot: evaluate or export from the training output or its Hugging Face export)")
    from openllm_ds.model import Transformer

    cfg, path = src.model_config, src.path
    model = Transformer(cfg)
    if src.kind == "huggingface":
        from openllm_ds.model.hf_map import from_hf_state_dict

        sd = from_hf_state_dict(load_hf_weights(path), cfg, str(path))
    elif src.kind == "pytorch":
        sd = load_pytorch_weights(path)
        model.to(sd["embed_tokens.weight"].dtype)
    elif src.kind == "deepspeed":
        sd = load_zero_shards(path)
    else:
        sd = _stack_split_projections(load_state_dict(path / WEIGHTS), cfg, str(path / WEIGHTS))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise UserError(f"weights in {path} do not fit the model config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.to(device=device, dtype=dtype).eval()
    return LoadedModel(**fields, model=model)


def _stack_split_projections(sd: dict, cfg: ModelConfig, source: str) -> dict:
    """Weights saved before q/k/v and gate/up were stacked into one tensor each carry HF's per-projection
    names (without its ``model.`` prefix): stack them as the model now holds them."""
    if not any(k.endswith("self_attn.q_proj.weight") for k in sd):
        return sd
    from openllm_ds.model.hf_map import from_hf_state_dict

    return from_hf_state_dict({k if k == "lm_head.weight" else f"model.{k}": v for k, v in sd.items()}, cfg, source)
