"""The export formats, one table: ``{format: ExportFormat}``. The config's validation (``ExportConfig``), the CLI's
``--format`` help and the pipeline read it, so a new format is one writer plus one row.

A writer is ``write(src: LoadedModel, out_dir: Path, dtype: str, verify: bool, **options) -> dict`` (the report's
format-specific entries), named here by its module and function and imported only when used: this table is read
by the config layer, which imports no stage.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable

GGUF_TYPES = ("f32", "f16", "q8_0")  # --gguf_type: llama.cpp's file types that export/gguf.py writes


@dataclass(frozen=True)
class ExportFormat:
    name: str
    writer: str  # "module:function"
    reads: str  # what loads it, for --help
    dtypes: tuple[str, ...] = ("fp32", "fp16", "bf16")
    options: tuple[tuple[str, str], ...] = ()  # (writer keyword, ExportConfig field) of the format's own options
    dtype_hint: str = ""  # what --dtype's error adds when the format has its own precision option
    in_pipeline: bool = False  # `openllm-ds pipeline` writes it

    def load_writer(self) -> Callable[..., dict]:
        module, _, fn = self.writer.partition(":")
        return getattr(importlib.import_module(module), fn)


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("huggingface", "openllm_ds.export.huggingface:export_huggingface", "transformers, vLLM",
                 in_pipeline=True),
    ExportFormat("pytorch", "openllm_ds.export.pytorch:export_pytorch", "torch.load"),
    ExportFormat("onnx", "openllm_ds.export.onnx:export_onnx", "onnxruntime, optimum", dtypes=("fp32",),
                 options=(("optimize", "optimize_for_inference"), ("quantize_int8", "quantize_int8")), in_pipeline=True,
                 dtype_hint="add --quantize_int8 for a smaller model"),
    ExportFormat("gguf", "openllm_ds.export.gguf:export_gguf", "llama.cpp, llama-cpp-python, Ollama", dtypes=("fp32",),
                 options=(("gguf_type", "gguf_type"),), dtype_hint="--gguf_type f32, f16 or q8_0 sets its precision"),
)}


def format_choices(last: str = " | ") -> str:
    """The formats as --help and error messages list them: "huggingface | pytorch | onnx"."""
    names = list(FORMATS)
    return names[0] if len(names) == 1 else (", " if last != " | " else " | ").join(names[:-1]) + last + names[-1]


def option_fields() -> set[str]:
    """The ExportConfig fields that are some format's own option."""
    return {field for f in FORMATS.values() for _, field in f.options}


def pipeline_formats() -> tuple[str, ...]:
    """The formats `openllm-ds pipeline` writes unless its config's export.formats says otherwise."""
    return tuple(name for name, f in FORMATS.items() if f.in_pipeline)


def config_for_format(cfg, fmt: str, **changes):
    """The export section ``cfg`` (an ExportConfig) for one of its formats: ``format`` set, the other formats' own
    options back at their defaults (the pipeline's one section serves every format it exports)."""
    own = {field for _, field in FORMATS[fmt].options}
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.name in option_fields() - own}
    return dataclasses.replace(cfg, format=fmt, **defaults, **changes)
