"""Stage 6, export: Hugging Face (transformers, vLLM), PyTorch and ONNX (onnxruntime) writers.

``export(ExportConfig(...))`` loads the weights through the read side (``openllm_ds.checkpoint.load_model``: a
training output, a step dir, a DeepSpeed tag of ZeRO shards or another export), writes the chosen format into a
temporary sibling of the output dir, verifies it there, and only then moves it into place: a failed export leaves
no directory a later stage would take for complete.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from openllm_ds.checkpoint import LoadedModel, load_model
from openllm_ds.config import ExportConfig
from openllm_ds.errors import UserError, VerificationError
from openllm_ds.export.common import check_output_dir, export_kind
from openllm_ds.export.huggingface import export_huggingface
from openllm_ds.output_lock import OutputLock
from openllm_ds.utils import _umask, atomic_dir

FORMATS = ("huggingface", "pytorch", "onnx")

__all__ = ["export", "load_source", "FORMATS", "VerificationError"]


def export(cfg: ExportConfig, checkpoint: int | None = None) -> dict:
    """Export ``cfg.model_dir`` (step ``checkpoint``, default latest) to ``cfg.format``; return a report."""
    if cfg.format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if not cfg.model_dir:
        raise UserError("--model_dir is required: a training output (models/NAME) or an export dir")
    if cfg.format != "onnx" and (cfg.optimize_for_inference or cfg.quantize_int8):
        raise UserError("--optimize_for_inference and --quantize_int8 apply to --format onnx only")
    if cfg.format == "onnx" and cfg.dtype != "fp32":
        raise UserError(f"--dtype {cfg.dtype} applies to huggingface and pytorch exports; ONNX export is fp32 "
                        "(add --quantize_int8 for a smaller model)")
    out = Path(cfg.output_dir or f"exports/{cfg.format}")
    with OutputLock(out, "export"):  # one writer at a time in the output dir
        check_output_dir(out, Path(cfg.model_dir), cfg.overwrite, cfg.format)
        return _export(cfg, checkpoint, out, Path(cfg.model_dir))


def _export(cfg: ExportConfig, checkpoint: int | None, out: Path, model_dir: Path) -> dict:
    start = time.perf_counter()
    stages = ["load", "write + verify" if cfg.verify else "write", "move into place"]
    with tqdm(total=len(stages), desc=f"export {cfg.format}", unit="stage") as bar:
        bar.set_postfix_str(stages[0])
        src = load_source(model_dir, checkpoint)
        bar.update()
        bar.set_postfix_str(stages[1])
        try:
            with atomic_dir(out, export_kind(cfg.format)) as tmp:
                report = _write(cfg, src, tmp)
                readable_by_all(tmp)
                files = sorted(p.name for p in tmp.iterdir() if p.is_file())
                sizes = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
                bar.update()
                bar.set_postfix_str(stages[2])
        except VerificationError as e:
            raise VerificationError(f"{e}; nothing was written to {out}") from None
        bar.update()
    return {
        "format": cfg.format,
        "output_dir": str(out),
        "files": files,
        "bytes": sum(sizes.values()),
        "num_params": src.model.num_params(),
        "step": src.step,
        "source": str(src.path),
        **report,
        "seconds": round(time.perf_counter() - start, 2),
    }


def load_source(model_dir: str | Path, checkpoint: int | None = None) -> LoadedModel:
    """The weights to export, in fp32 on the CPU, with their tokenizer (its vocabulary checked)."""
    src = load_model(model_dir, checkpoint, dtype=torch.float32)
    src.tokenizer  # noqa: B018 - a tokenizer that does not fit the weights stops the export before any work
    return src


def readable_by_all(root: Path) -> None:
    """Files get the usual mode (0644 under umask 022), whatever wrote them: safetensors and the ONNX writers
    create 0600 files, which a server running as another user could not read."""
    umask = _umask()
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _write(cfg: ExportConfig, src: LoadedModel, tmp: Path) -> dict:
    if cfg.format == "huggingface":
        return export_huggingface(src, tmp, cfg.dtype, cfg.verify)
    if cfg.format == "pytorch":
        from openllm_ds.export.pytorch import export_pytorch

        return export_pytorch(src, tmp, cfg.dtype, cfg.verify)
    from openllm_ds.export.onnx import export_onnx

    return export_onnx(src, tmp, cfg.dtype, cfg.verify, optimize=cfg.optimize_for_inference,
                       quantize_int8=cfg.quantize_int8)
