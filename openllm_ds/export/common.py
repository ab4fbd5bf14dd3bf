"""What every exporter shares: the output dir check, the tokenizer files, the export's metadata card and the texts
that verification compares logits on. The weights come from the read side (``openllm_ds.checkpoint.load_model``);
export only writes."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import torch

from openllm_ds.checkpoint import LoadedModel, is_export_file
from openllm_ds.checkpoint.layout import TOKENIZER_FILES
from openllm_ds.errors import UserError
from openllm_ds.paths import is_within
from openllm_ds.utils import MANIFEST, OutputKind, claim_output_dir, describe_entries

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HF_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# Real sentences for the logits comparisons of --verify; validation passages are added when the
# run's validation file is at hand.
VERIFY_TEXTS = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France.",
    "Super Bowl 50 was an American football game to determine the champion of the National Football League for the 2015 season.",
    "Zürich liegt am Zürichsee; 東京 is Tokyo. Prices rose 12.5% in 1999 — \"quoted\" (parenthesised) text.",
)


def export_info(src: LoadedModel) -> dict:
    """The metadata written to ``openllm_ds.json`` (the loader reads ``step``, ``val_loss`` and ``run_name``)."""
    from openllm_ds import __version__

    val_loss = src.val_loss
    return {
        "step": src.step,
        "source_checkpoint": str(src.path),
        "source_kind": src.kind,
        "run_name": src.run_name,
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss) if val_loss is not None and val_loss < 50 else None,
        "tokens_seen": src.train_state.get("tokens_seen"),
        "num_params": src.model.num_params(),
        "tokenizer_sha256": src.tokenizer.sha256,
        "openllm_ds_version": __version__,
    }


def export_kind(fmt: str) -> OutputKind:
    """An export of one format: ``export --overwrite`` replaces only an export of the same format."""
    return OutputKind(f"a {fmt} export", f"openllm-ds export --format {fmt}", is_export_file)


def check_output_dir(out: Path, model_dir: Path, overwrite: bool, fmt: str) -> None:
    """Refuse a non-empty output dir unless ``overwrite``, and never one holding the source or another stage's output."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a directory; pass a directory")
    if is_within(model_dir, out):  # compared as normal paths: ~, relative paths and symlinks resolved
        raise UserError(f"--output_dir {out} would replace the model being exported ({model_dir}); choose another directory")
    foreign = claim_output_dir(out, export_kind(fmt), "--output_dir")
    if foreign:  # never replaced, with or without --overwrite
        raise UserError(f"--output_dir {out} holds {describe_entries(foreign)}, which no export wrote; move them out "
                        "or choose another --output_dir")
    ours = sorted(p.name for p in out.iterdir() if p.name != MANIFEST) if out.is_dir() else []
    if ours and not overwrite:
        raise UserError(f"--output_dir {out} holds an earlier export ({describe_entries(ours)}); pass --overwrite to "
                        "replace it, or choose another --output_dir")
    if ours:
        print(f"--overwrite: replacing the export in {out} ({describe_entries(ours, 20)})", file=sys.stderr)


def copy_tokenizer_files(src: LoadedModel, out: Path) -> list[str]:
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


def verification_texts(src: LoadedModel, max_passages: int = 2) -> list[str]:
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


def encode_for_verification(src: LoadedModel, text: str, max_tokens: int = 96) -> list[int]:
    return src.tokenizer.encode(text)[: min(max_tokens, src.model_config.max_seq_len)]

