"""optimum's ORTModelForCausalLM loads `openllm-ds export --format onnx` and generates as `openllm-ds generate
--temperature 0` does: 4 prompts one by one, and 2 prompts of different lengths in one left-padded batch.

optimum-onnx lives in .venv-optimum (scripts/setup.sh --optimum; CI installs it, so there this test runs), driven in
a subprocess by tests/export/optimum_run.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from openllm_ds.config import ExportConfig
from openllm_ds.export import export
from openllm_ds.model import generate
from openllm_ds.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
OPTIMUM_PYTHON = ROOT / ".venv-optimum" / "bin" / "python"
PROMPTS = ["The Normans were", "Super Bowl 50 was", "The university", "In 1905, the"]
MAX_NEW_TOKENS = 16


def until_eos(ids: list[int], eos: int) -> list[int]:
    """The tokens up to the first EOS, included (after it optimum pads, `generate` stops)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def test_optimum_generates_what_we_generate(trained_export, tmp_path, tokenizer_dir):
    if not OPTIMUM_PYTHON.is_file():
        pytest.skip("optimum is not installed: scripts/setup.sh --optimum installs it into .venv-optimum")
    hf, model = trained_export
    out = tmp_path / "onnx"
    export(ExportConfig(model_dir=str(hf), format="onnx", output_dir=str(out)))
    batch = [PROMPTS[0], "In the 19th century, Paris"]
    proc = subprocess.run([str(OPTIMUM_PYTHON), str(Path(__file__).with_name("optimum_run.py"))],
                          input=json.dumps({"model": str(out), "prompts": PROMPTS, "batch": batch,
                                            "max_new_tokens": MAX_NEW_TOKENS}),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    assert got["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    tok = load_tokenizer(tokenizer_dir)

    def ours(prompt: str) -> list[int]:
        with torch.no_grad():
            ids = torch.tensor([tok.encode_prompt(prompt)])
            return [t.item() for t in generate(model, ids, MAX_NEW_TOKENS, temperature=0, eos_id=tok.eos_id)]

    for prompt, prompt_ids, new in zip(PROMPTS, got["prompt_ids"], got["single"]):
        assert prompt_ids == tok.encode_prompt(prompt)
        assert until_eos(new, tok.eos_id) == ours(prompt), prompt
    lengths = [len(tok.encode_prompt(p)) for p in batch]
    assert lengths[0] != lengths[1]
    assert [sum(m) for m in got["batch_attention_mask"]] == lengths and got["batch_attention_mask"][0][0] == 0
    for prompt, new in zip(batch, got["batch"]):
        assert until_eos(new, tok.eos_id) == ours(prompt), prompt
