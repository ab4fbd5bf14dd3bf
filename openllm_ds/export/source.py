"""What every exporter starts from: trained weights, their config, the tokenizer and the run's metadata.

``--model_dir`` may be a training output (``models/NAME``, latest or ``--checkpoint`` step), one
checkpoint step dir of it (``models/NAME/checkpoints/step_00000100``), a Hugging Face export, or a
DeepSpeed checkpoint tag dir without consolidated ``model.safetensors`` (a ZeRO-2/3 save): its
shards are gathered into fp32 weights by DeepSpeed's ``zero_to_fp32``.
"""

from __future__ import annotations

import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from openllm_ds.checkpoint import (ANY_STEP_DIR, CHECKPOINTS, LATEST, TRAIN_STATE, WEIGHTS, is_hf_export, load_model,
                                   step_tag, weights_only_loads)
from openllm_ds.config import ModelConfig, RunConfig, run_config_from_dict
from openllm_ds.errors import UserError
from openllm_ds.model import Transformer
from openllm_ds.tokenizer import Tokenizer, load_tokenizer
from openllm_ds.utils import MANIFEST, describe_entries, foreign_entries, read_json, read_yaml

EXPORT_INFO = "openllm_ds.json"  # step, source checkpoint, run name: written into every export
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.vocab", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
)
EXPORT_FILES = (*TOKENIZER_FILES, EXPORT_INFO, "config.json", "generation_config.json", "model.safetensors", "README.md",
                "model.pt")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HF_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_DEEPSPEED_STATES = "*model_states.pt"

# Real sentences for the logits comparisons of --verify; validation passages are added when the
# run's validation file is at hand.
VERIFY_TEXTS = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France.",
    "Super Bowl 50 was an American football game to determine the champion of the National Football League for the 2015 season.",
    "Zürich liegt am Zürichsee; 東京 is Tokyo. Prices rose 12.5% in 1999 — \"quoted\" (parenthesised) text.",
)


@dataclass
class ExportSource:
    model: Transformer  # fp32, eval mode, on the CPU
    model_config: ModelConfig
    tokenizer: Tokenizer
    tokenizer_dir: Path
    path: Path  # the checkpoint step dir, DeepSpeed tag dir or export dir the weights came from
    kind: str  # train | deepspeed | huggingface
    step: int | None = None
    run_name: str | None = None
    run_config: RunConfig | None = None
    train_state: dict = field(default_factory=dict)

    @property
    def val_loss(self) -> float | None:
        for key in ("val_loss", "eval_loss", "last_eval_loss"):
            v = self.train_state.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                return float(v)
        return None

    def info(self) -> dict:
        """The metadata written to ``openllm_ds.json`` (``checkpoint.load_model`` reads ``step``)."""
        from openllm_ds import __version__

        val_loss = self.val_loss
        return {
            "step": self.step,
            "source_checkpoint": str(self.path),
            "source_kind": self.kind,
            "run_name": self.run_name,
            "val_loss": val_loss,
            "val_perplexity": math.exp(val_loss) if val_loss is not None and val_loss < 50 else None,
            "tokens_seen": self.train_state.get("tokens_seen"),
            "num_params": self.model.num_params(),
            "tokenizer_sha256": self.tokenizer.sha256,
            "openllm_ds_version": __version__,
        }


def load_export_source(model_dir: str | Path, step: int | None = None) -> ExportSource:
    """Load the weights to export, check the tokenizer fits them, and gather the run's metadata."""
    root = Path(model_dir)
    if not root.is_dir():
        raise UserError(f"--model_dir {root} does not exist; pass a training output (models/NAME) or an export dir")
    tag_dir = deepspeed_tag_dir(root, step)
    if tag_dir is not None:
        src = _load_deepspeed(tag_dir)
    else:
        src = _load_consolidated(root, step)
    check_vocab(src)
    return src


def deepspeed_tag_dir(root: Path, step: int | None) -> Path | None:
    """The DeepSpeed tag dir to consolidate, when the weights exist only as ZeRO shards."""
    candidates = [root]
    ckpt = root / CHECKPOINTS
    if step is not None:
        candidates.append(ckpt / step_tag(step))
    elif (ckpt / LATEST).is_file():
        candidates.append(ckpt / (ckpt / LATEST).read_text().strip())
    for d in candidates:
        if d.is_dir() and not (d / WEIGHTS).is_file() and any(d.glob(_DEEPSPEED_STATES)):
            return d
    return None


def _read_train_state(d: Path) -> dict:
    f = d / TRAIN_STATE
    return read_json(f, "pass another --checkpoint") if f.is_file() else {}


def _load_consolidated(root: Path, step: int | None) -> ExportSource:
    m = ANY_STEP_DIR.match(root.name)
    if m and root.parent.name == CHECKPOINTS and not is_hf_export(root):  # one step dir of a run
        if step is not None and step != int(m.group(1)):
            raise UserError(f"--model_dir {root} is the checkpoint of step {int(m.group(1))} but --checkpoint is {step}")
        root, step = root.parent.parent, int(m.group(1))
    loaded = load_model(root, step)
    if loaded.kind == "huggingface":
        info_file = root / EXPORT_INFO
        info = read_json(info_file, "re-export the model") if info_file.is_file() else {}
        train_state = {k: info[k] for k in ("val_loss", "tokens_seen") if info.get(k) is not None}
        run_name = info.get("run_name")
    else:
        train_state = _read_train_state(loaded.path)
        run_name = loaded.run_config.name if loaded.run_config else None
    return ExportSource(
        model=loaded.model.float().eval(), model_config=loaded.model_config,
        tokenizer=load_tokenizer(loaded.tokenizer_dir), tokenizer_dir=loaded.tokenizer_dir,
        path=loaded.path, kind=loaded.kind, step=loaded.step, run_name=run_name,
        run_config=loaded.run_config, train_state=train_state,
    )


def _load_deepspeed(tag_dir: Path) -> ExportSource:
    """Gather ZeRO shards of one tag into fp32 weights with DeepSpeed's zero_to_fp32."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise UserError(f"{tag_dir} holds DeepSpeed ZeRO shards only; consolidating them needs deepspeed "
                        "(pip install deepspeed) or a checkpoint with model.safetensors") from None
    run_dir = tag_dir.parent.parent if tag_dir.parent.name == CHECKPOINTS else tag_dir.parent
    cfg_file = next((f for f in (tag_dir / "run_config.yaml", run_dir / "run_config.yaml") if f.is_file()), None)
    if cfg_file is None:
        raise UserError(f"{tag_dir} has no run_config.yaml (nor {run_dir / 'run_config.yaml'}); "
                        "the model shape is unknown, export from the run's output dir")
    run_cfg = run_config_from_dict(read_yaml(cfg_file, "restore the run's run_config.yaml") or {}, str(cfg_file))
    with weights_only_loads(f"refusing to load {tag_dir}"):
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise UserError(f"{tag_dir}: DeepSpeed returned empty tensors ({', '.join(empty[:3])}); the checkpoint is incomplete")
    model = Transformer(run_cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and run_cfg.model.tie_embeddings)]
    if missing or unexpected:
        raise UserError(f"weights in {tag_dir} do not fit its run config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    train_state = _read_train_state(tag_dir)
    m = ANY_STEP_DIR.match(tag_dir.name)
    step = train_state.get("step", int(m.group(1)) if m else None)
    tok_dir = run_dir / "tokenizer" if (run_dir / "tokenizer").is_dir() else Path(run_cfg.train.tokenizer_dir)
    return ExportSource(
        model=model.float().eval(), model_config=run_cfg.model, tokenizer=load_tokenizer(tok_dir), tokenizer_dir=tok_dir,
        path=tag_dir, kind="deepspeed", step=step, run_name=run_cfg.name, run_config=run_cfg, train_state=train_state,
    )


def check_vocab(src: ExportSource) -> None:
    have, want = src.tokenizer.vocab_size, src.model_config.vocab_size
    if have != want:
        raise UserError(
            f"tokenizer {src.tokenizer_dir / 'tokenizer.model'} has {have} tokens but the model in {src.path} has "
            f"vocab_size {want}; export with the tokenizer the model was trained with (the run's tokenizer/ dir)"
        )


def check_output_dir(out: Path, model_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty output dir unless ``overwrite``, and never one holding the source."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file; pass a directory")
    src, dst = model_dir.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise UserError(f"--output_dir {out} would replace the model being exported ({model_dir}); choose another directory")
    foreign = foreign_entries(out, is_export_file)
    if foreign:  # never replaced, with or without --overwrite
        raise UserError(f"--output_dir {out} holds {describe_entries(foreign)}, which no export wrote; move them out "
                        "or choose another --output_dir")
    ours = sorted(p.name for p in out.iterdir() if p.name != MANIFEST) if out.is_dir() else []
    if ours and not overwrite:
        raise UserError(f"--output_dir {out} holds an earlier export ({describe_entries(ours)}); pass --overwrite to "
                        "replace it, or choose another --output_dir")
    if ours:
        print(f"--overwrite: replacing the export in {out} ({describe_entries(ours, 20)})", file=sys.stderr)


def is_export_file(name: str) -> bool:
    """A file one of the exporters writes (for an export dir written before manifests)."""
    return name in EXPORT_FILES or name.endswith((".onnx", ".onnx.data"))


def copy_tokenizer_files(src: ExportSource, out: Path) -> list[str]:
    """Copy the tokenizer files; a tokenizer dir without tokenizer.json gets the Hugging Face files built."""
    copied = []
    for name in TOKENIZER_FILES:
        f = src.tokenizer_dir / name
        if f.is_file():
            shutil.copy2(f, out / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        from openllm_ds.tokenizer.hf_files import write_hf_files

        model_type = src.run_config.tokenizer.model_type if src.run_config else "bpe"
        try:
            write_hf_files(out / "tokenizer.model", out, model_type)
        except ValueError as e:
            raise UserError(f"{src.tokenizer_dir} has no tokenizer.json and one cannot be built: {e}") from None
        copied += ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    return sorted(set(copied))


def verification_texts(src: ExportSource, max_passages: int = 2) -> list[str]:
    """Fixed sentences plus the first validation passages of the run, when the file is found."""
    texts = list(VERIFY_TEXTS)
    if src.run_config is not None and src.run_config.eval_data:
        val = Path(src.run_config.eval_data)
        if val.is_file():
            with open(val, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        texts.append(line.strip())
                    if len(texts) >= len(VERIFY_TEXTS) + max_passages:
                        break
    return texts


def encode_for_verification(src: ExportSource, text: str, max_tokens: int = 96) -> list[int]:
    return src.tokenizer.encode(text)[: min(max_tokens, src.model_config.max_seq_len)]

