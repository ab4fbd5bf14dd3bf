"""The export formats, one table: ``{format: ExportFormat}``. The config's validation (``ExportConfig``), the CLI's
``--format`` help and the pipeline read it, so a new format is one writer plus one row.

A writer is ``write(src: LoadedModel, out_dir: Path, dtype: str, verify: bool, **options) -> dict`` (the report's
format-specific entries), named here by its module and function and imported only when used: this table is read
by the config layer, which imports no stage.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ExportFormat:
    name: str
    writer: str  # "module:function"
    reads: str  # what loads it, for --help
    dtypes: tuple[str, ...] = ("fp32", "fp16", "bf16")
    options: tuple[tuple[str, str], ...] = ()  # (writer keyword, ExportConfig field) of the format's own options
    in_pipeline: bool = False  # `openllm-ds pipeline` writes it

    def load_writer(self) -> Callable[..., dict]:
        module, _, fn = self.writer.partition(":")
        return getattr(importlib.import_module(module), fn)


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("huggingface", "openllm_ds.export.huggingface:export_huggingface", "transformers, vLLM",
                 in_pipeline=True),
    ExportFormat("pytorch", "openllm_ds.export.pytorch:export_pytorch", "torch.load"),
    ExportFormat("onnx", "openllm_ds.export.onnx:export_onnx", "onnxruntime, optimum", dtypes=("fp32",),
                 options=(("optimize", "optimize_for_inference"), ("quantize_int8", "quantize_int8")), in_pipeline=True),
)}


def format_choices(last: str = " | ") -> str:
    """The formats as --help and error messages list them: "huggingface | pytorch | onnx"."""
    names = list(FORMATS)
    return names[0] if len(names) == 1 else (", " if last != " | " else " | ").join(names[:-1]) + last + names[-1]


def option_fields() -> set[str]:
    """The ExportConfig fields that are some format's own option."""
    return {field for f in FORMATS.values() for _, field in f.options}
