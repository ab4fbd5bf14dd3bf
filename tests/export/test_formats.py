"""The export formats are one table (export/formats.py): the config's validation, the CLI's --format help, the
export run and the pipeline read it, so a new format is one writer plus one row."""

from __future__ import annotations

import json

import pytest

from openllm_ds.cli import build_parser
from openllm_ds.config import ExportConfig
from openllm_ds.errors import ConfigError
from openllm_ds.export import FORMATS, ExportFormat, export

from helpers import make_fake_run


def write_npz(src, out, dtype, verify, **options):
    """A format of one row: the weights as a NumPy archive."""
    import numpy as np

    np.savez(out / "weights.npz", **{k: v.float().numpy() for k, v in src.model.state_dict().items()})
    (out / "config.json").write_text(json.dumps({"format": "npz", "options": options}))
    return {"verified": verify}


def format_help() -> str:
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices["export"].format_help()


def test_the_table_is_what_the_config_and_the_cli_offer():
    assert list(FORMATS) == ["huggingface", "pytorch", "onnx"]
    assert "huggingface | pytorch | onnx" in format_help()
    with pytest.raises(ConfigError, match=r"export\.format must be huggingface, pytorch or onnx \(--format\)"):
        ExportConfig(format="gguf")
    assert [f.name for f in FORMATS.values() if f.in_pipeline] == ["huggingface", "onnx"]


def test_a_new_format_is_one_writer_plus_one_row(monkeypatch, tmp_path, tokenizer_dir):
    monkeypatch.setitem(FORMATS, "npz", ExportFormat("npz", f"{__name__}:write_npz", "numpy.load", dtypes=("fp32",)))
    assert "huggingface | pytorch | onnx | npz" in format_help()
    make_fake_run(tmp_path / "run", tokenizer_dir)
    report = export(ExportConfig(model_dir=str(tmp_path / "run"), format="npz", output_dir=str(tmp_path / "out")))
    assert report["format"] == "npz" and report["verified"] is True and "weights.npz" in report["files"]
    with pytest.raises(Exception, match=r"--dtype fp16 applies to huggingface and pytorch exports"):
        export(ExportConfig(model_dir=str(tmp_path / "run"), format="npz", dtype="fp16", output_dir=str(tmp_path / "o2")))
