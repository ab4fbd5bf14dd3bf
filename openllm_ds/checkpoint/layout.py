"""Every on-disk layout of trained weights, by name: a training output and the three exports.

A training output::

    models/NAME/
      run_config.yaml            the resolved run config
      tokenizer/                 a copy of the tokenizer files
      tensorboard/
      checkpoints/
        latest                   the tag of the newest complete checkpoint (moved into place last)
        step_00000100/           one DeepSpeed checkpoint tag, plus:
          model.safetensors      consolidated fp32 weights under our parameter names
          train_state.json       step, tokens seen, data position, last eval loss, layout (ranks, ZeRO stage)
          run_config.yaml

A DeepSpeed tag dir without ``model.safetensors`` (a ZeRO save of another tool) holds only its shards.

The exports (``openllm-ds export``) each hold the tokenizer files and ``openllm_ds.json`` (step, source,
validation loss) beside their weights:

- Hugging Face: ``config.json`` (LlamaForCausalLM) and ``model.safetensors``; any Llama checkpoint as
  transformers saves one reads the same way, also in shards named by ``model.safetensors.index.json``;
- PyTorch: ``config.json`` (our ModelConfig fields) and ``model.pt``;
- ONNX, in optimum's layout: ``config.json`` (LlamaForCausalLM), ``generation_config.json`` and ``model.onnx``
  (input_ids, attention_mask, position_ids and the past keys/values -> logits and the present ones; and its
  optimised and int8 variants). An export of the older layout (``decoder_with_past.onnx``, our ModelConfig fields
  in config.json) is refused with the command that rewrites it.
"""

from __future__ import annotations

import re
from pathlib import Path

from openllm_ds.errors import UserError
from openllm_ds.paths import check_path
from openllm_ds.utils import read_json, read_text

CHECKPOINTS = "checkpoints"
RUN_OUTPUTS = (CHECKPOINTS, "run_config.yaml", "tokenizer", "tensorboard", "train_log.jsonl", "eval")  # what train and
# finetune write into their --output_dir (pipeline --force replaces these, and only these)
LATEST = "latest"
WEIGHTS = "model.safetensors"  # a checkpoint's consolidated weights; an HF export's weights
TRAIN_STATE = "train_state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")  # checkpoints/step_00000100
ANY_STEP_DIR = re.compile(r"^(?:step_|global_step)(\d+)$")  # ours, or a DeepSpeed tag of its default name
ZERO_STATES = "*model_states.pt"  # DeepSpeed's per-rank model states of one tag

EXPORT_INFO = "openllm_ds.json"  # step, source checkpoint, run name: written into every export
PYTORCH_WEIGHTS = "model.pt"  # a PyTorch export's state dict
HF_INDEX = "model.safetensors.index.json"  # a Hugging Face checkpoint in several safetensors shards
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.vocab", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
)
EXPORT_FILES = (*TOKENIZER_FILES, EXPORT_INFO, "config.json", "generation_config.json", WEIGHTS, "README.md",
                PYTORCH_WEIGHTS)

ONNX_MODEL = "model.onnx"  # optimum's decoder: input_ids, attention_mask, position_ids, past -> logits, present
ONNX_OLD_DECODER = "decoder_with_past.onnx"  # the layout before optimum's (refused, with the command to re-export)
ONNX_VARIANTS = {  # variant -> its graph file
    "fp32": ONNX_MODEL,
    "optimized": "model.optimized.onnx",
    "int8": "model.int8.onnx",
}


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def past_names(n_layers: int) -> list[str]:
    """The ONNX decoder's key/value inputs, flat per layer."""
    return [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def present_names(n_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def is_hf_export(path: Path) -> bool:
    """An HF Llama dir: ours (one model.safetensors) or any Llama checkpoint (possibly in shards)."""
    return (path / "config.json").is_file() and ((path / WEIGHTS).is_file() or (path / HF_INDEX).is_file())


def is_pytorch_export(path: Path) -> bool:
    return (path / PYTORCH_WEIGHTS).is_file() and (path / "config.json").is_file() and not is_hf_export(path)


def is_onnx_export(path: Path) -> bool:
    return (Path(path) / ONNX_MODEL).is_file() and (Path(path) / "config.json").is_file()


def is_export_file(name: str) -> bool:
    """A file one of the exporters writes (for an export dir written before manifests)."""
    return name in EXPORT_FILES or name.endswith((".onnx", ".onnx.data"))


def is_zero_tag(path: Path) -> bool:
    """A DeepSpeed tag dir whose weights exist only as ZeRO shards (no consolidated model.safetensors)."""
    return path.is_dir() and not (path / WEIGHTS).is_file() and any(path.glob(ZERO_STATES))


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


def read_latest(ckpt_dir: Path) -> str | None:
    """The tag ``<ckpt_dir>/latest`` names (a dir name of ``ckpt_dir``), or None when there is no ``latest``; a
    damaged one (not UTF-8, NUL bytes, empty, a path) stops naming it and what to do."""
    latest = Path(ckpt_dir) / LATEST
    if not latest.exists() and not latest.is_symlink():
        return None
    fix = f"delete {latest} (a resume then takes the newest complete checkpoint) or pass --checkpoint STEP"
    tag = read_text(latest, fix).strip()
    if not tag or "/" in tag or "\\" in tag or tag in (".", "..") or "\n" in tag:
        raise UserError(f"{latest} names {tag!r}, which is not a checkpoint tag (the name of a step_* dir beside it); "
                        f"{fix}")
    return tag


def read_train_state(path: Path) -> dict:
    """A checkpoint dir's train_state.json, with a valid "step" (a clear error when it is missing or corrupt)."""
    others = ", ".join(str(s) for s, d in list_checkpoints(path.parent.parent) if d != path) or "none"
    fix = f"that checkpoint is damaged: use another one (--checkpoint STEP or --resume PATH; complete steps: {others})"
    state = read_json(path / TRAIN_STATE, fix, expect=dict)
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UserError(f"{path / TRAIN_STATE} has no valid \"step\" (got {step!r}); {fix}")
    return state


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint dir's train_state.json records."""
    return read_train_state(path)["step"]


def resolve_checkpoint(model_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint dir for ``step`` (default: the one named by ``latest``): a complete step, or a tag holding
    only DeepSpeed's ZeRO shards."""
    root = check_path(model_dir, "--model_dir", "dir", "pass a training output (models/NAME) or an export dir")
    ckpt = root / CHECKPOINTS
    if step is not None:
        d = ckpt / step_tag(step)
        if not (d / WEIGHTS).is_file() and not is_zero_tag(d):
            have = ", ".join(str(s) for s, _ in list_checkpoints(root)) or "none"
            raise UserError(f"--model_dir {root} has no complete checkpoint for step {step} (have: {have})")
        return d
    tag = read_latest(ckpt)
    if tag is not None:
        d = ckpt / tag
        if (d / WEIGHTS).is_file() or is_zero_tag(d):
            return d
    found = list_checkpoints(root)
    if not found:
        raise UserError(
            f"--model_dir {root} holds no checkpoint (no {CHECKPOINTS}/{LATEST}, no {CHECKPOINTS}/step_*/{WEIGHTS}) "
            "and is not an export (config.json + model.safetensors, model.pt or model.onnx); train first "
            "or point at an export"
        )
    return found[-1][1]
