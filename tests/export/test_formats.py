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
    assert list(FORMATS) == ["huggingface", "pytorch", "onnx", "gguf"]
    assert "huggingface | pytorch | onnx | gguf" in format_help()
    with pytest.raises(ConfigError, match=r"export\.format must be huggingface, pytorch, onnx or gguf \(--format\)"):
        ExportConfig(format="safetensors")
    assert [f.name for f in FORMATS.values() if f.in_pipeline] == ["huggingface", "onnx"]


def test_the_pipelines_export_formats(tmp_path):
    """export.formats (default: the table's pipeline formats) is checked against the table; each format gets the
    section with the other formats' options back at their defaults."""
    from openllm_ds.config import load_run_config
    from openllm_ds.export.formats import config_for_format

    assert ExportConfig().formats == ("huggingface", "onnx")
    with pytest.raises(ConfigError, match=r"export\.formats must list formats of huggingface, pytorch, onnx, gguf, "
                                          r"got \['gguf', 'ggml'\]"):
        ExportConfig(formats=("gguf", "ggml"))
    with pytest.raises(ConfigError, match=r"export\.gguf_type must be f32, f16, q8_0 \(--gguf_type\), got 'q4_0'"):
        ExportConfig(gguf_type="q4_0")
    (tmp_path / "run.yaml").write_text("export:\n  formats: [huggingface, gguf]\n  gguf_type: q8_0\n"
                                       "  quantize_int8: true\n")
    section = load_run_config(str(tmp_path / "run.yaml")).export
    assert section.formats == ("huggingface", "gguf")
    gguf = config_for_format(section, "gguf", output_dir="exports/gguf")
    assert (gguf.format, gguf.gguf_type, gguf.quantize_int8, gguf.output_dir) == ("gguf", "q8_0", False, "exports/gguf")
    onnx = config_for_format(section, "onnx")
    assert (onnx.gguf_type, onnx.quantize_int8) == (None, True)


def test_a_new_format_is_one_writer_plus_one_row(monkeypatch, tmp_path, tokenizer_dir):
    monkeypatch.setitem(FORMATS, "npz", ExportFormat("npz", f"{__name__}:write_npz", "numpy.load", dtypes=("fp32",)))
    assert "huggingface | pytorch | onnx | gguf | npz" in format_help()
    make_fake_run(tmp_path / "run", tokenizer_dir)
    report = export(ExportConfig(model_dir=str(tmp_path / "run"), format="npz", output_dir=str(tmp_path / "out")))
    assert report["format"] == "npz" and report["verified"] is True and "weights.npz" in report["files"]
    with pytest.raises(Exception, match=r"--dtype fp16 applies to huggingface and pytorch exports"):
        export(ExportConfig(model_dir=str(tmp_path / "run"), format="npz", dtype="fp16", output_dir=str(tmp_path / "o2")))
