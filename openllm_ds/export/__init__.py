"""Stage 6, export: Hugging Face (transformers, vLLM), PyTorch and ONNX (onnxruntime) writers, one row each in the
format table (``formats.FORMATS``).

``export(ExportConfig(...))`` (``run.py``) loads the weights through the read side, writes the chosen format into a
temporary sibling of the output dir, verifies it there, and only then moves it into place. The package's face
imports only the table; the stage itself loads on first use.
"""

from __future__ import annotations

from openllm_ds.export.formats import FORMATS, ExportFormat

__all__ = ["export", "load_source", "temporary_export", "FORMATS", "ExportFormat", "VerificationError"]


def __getattr__(name: str):
    if name in ("export", "load_source", "temporary_export", "readable_by_all"):
        from openllm_ds.export import run

        return getattr(run, name)
    if name == "VerificationError":
        from openllm_ds.errors import VerificationError

        return VerificationError
    raise AttributeError(f"module 'openllm_ds.export' has no attribute {name!r}")
