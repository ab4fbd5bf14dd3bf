"""GGUF export, run in a real llama.cpp: llama-cpp-python 0.3.36 in .venv-gguf (scripts/setup.sh --gguf; CI installs
it, so there these tests run), driven in a subprocess by tests/export/llama_cpp_run.py. The file's own checks
(metadata, vocabulary, Modelfile, bad input) need only the gguf package.

f32 and f16 must give `openllm-ds generate --temperature 0`'s tokens and SentencePiece's tokenization; q8_0 must
stay within 2% of f32's perplexity, both computed from llama.cpp's own logits.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from openllm_ds.cli import main as cli_main
from openllm_ds.config import ExportConfig
from openllm_ds.errors import UserError
from openllm_ds.export import export
from openllm_ds.model import generate
from openllm_ds.tokenizer import load_tokenizer

from helpers import make_fake_run

gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[2]
GGUF_PYTHON = ROOT / ".venv-gguf" / "bin" / "python"
PROMPTS = ("The Normans were", "Super Bowl 50 was", "The university", "In 1905, the")
MAX_TOKENS = 32


def llama_cpp(request: dict) -> dict:
    """One llama_cpp_run.py request, answered by llama.cpp in .venv-gguf."""
    if not GGUF_PYTHON.is_file():
        pytest.skip("llama-cpp-python is not installed: scripts/setup.sh --gguf installs it into .venv-gguf")
    proc = subprocess.run([str(GGUF_PYTHON), str(Path(__file__).with_name("llama_cpp_run.py"))],
                          input=json.dumps(request), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def gguf_exports(trained_export, tmp_path_factory) -> dict[str, Path]:
    """The trained tiny model (tied embeddings, a chat template) as GGUF f32, f16 and q8_0."""
    hf, _ = trained_export
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for gguf_type in ("f32", "f16", "q8_0"):
        out[gguf_type] = root / gguf_type
        report = export(ExportConfig(model_dir=str(hf), format="gguf", gguf_type=gguf_type, output_dir=str(out[gguf_type])))
        assert report["verification"]["verified"] and report["gguf_type"] == gguf_type
    return out


def field(reader, key: str):
    return reader.fields[key].contents()


def test_gguf_metadata_vocabulary_and_modelfile(gguf_exports, trained_export, tokenizer_dir):
    hf, model = trained_export
    out = gguf_exports["f32"]
    assert sorted(p.name for p in out.iterdir()) == [".openllm-ds-files", "Modelfile", "model.gguf", "openllm_ds.json"]
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    cfg, tok = model.cfg, load_tokenizer(tokenizer_dir)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.context_length") == cfg.max_seq_len == 128
    assert (field(reader, "llama.block_count"), field(reader, "llama.attention.head_count"),
            field(reader, "llama.attention.head_count_kv"),
            field(reader, "llama.embedding_length")) == (2, 2, 2, 64)
    assert field(reader, "llama.rope.freq_base") == cfg.rope_theta
    assert math.isclose(field(reader, "llama.attention.layer_norm_rms_epsilon"), cfg.norm_eps, rel_tol=1e-6)
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id"),
            field(reader, "tokenizer.ggml.padding_token_id"), field(reader, "tokenizer.ggml.unknown_token_id")) == (2, 2, 3, 0)
    assert field(reader, "tokenizer.ggml.add_bos_token") and not field(reader, "tokenizer.ggml.add_eos_token")
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    scores = field(reader, "tokenizer.ggml.scores")
    assert len(tokens) == len(types) == len(scores) == tok.vocab_size == 8000
    assert tokens[:5] == ["<unk>", "<s>", "</s>", "<pad>", "<0x00>"] and types[:5] == [2, 3, 3, 3, 6]
    assert types.count(6) == 256 and types.count(1) == 8000 - 256 - 4
    assert scores[1000] == tok.sp.get_score(1000) and tokens[1000] == tok.sp.id_to_piece(1000)
    template = json.loads((hf / "tokenizer_config.json").read_text())["chat_template"]
    assert field(reader, "tokenizer.chat_template") == template
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in names and names["token_embd.weight"] == "F32"  # tied: token_embd alone
    assert len(names) == 1 + 2 * 9 + 1
    q8 = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(gguf_exports["q8_0"] / "model.gguf")).tensors}
    assert q8["blk.0.attn_q.weight"] == q8["token_embd.weight"] == "Q8_0" and q8["blk.0.attn_norm.weight"] == "F32"
    sizes = {t: (gguf_exports[t] / "model.gguf").stat().st_size for t in gguf_exports}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model.gguf\n" in modelfile and 'PARAMETER stop "</s>"' in modelfile
    assert ('TEMPLATE """{{ range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n\n'
            '{{ else if eq .Role "user" }}User: {{ .Content }}\n'
            '{{ else if eq .Role "assistant" }}Assistant: {{ .Content }}</s>{{ end }}{{ end }}Assistant:"""') in modelfile
    card = json.loads((out / "openllm_ds.json").read_text())
    assert card["format"] == "gguf" and card["gguf_type"] == "f32" and card["step"] == 150


@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
def test_llama_cpp_generates_and_tokenizes_as_we_do(gguf_exports, trained_export, tokenizer_dir, wikitext_test,
                                                    gguf_type):
    """4 prompts x 32 greedy tokens as `openllm-ds generate --temperature 0`, 200 WikiText-2 lines tokenized as
    SentencePiece does, and (f32) the chat template through llama-cpp-python's chat handler."""
    import openllm_ds

    hf, model = trained_export
    tok = load_tokenizer(tokenizer_dir)
    lines = [ln for ln in wikitext_test.read_text(encoding="utf-8").split("\n") if ln.strip()][:200]
    chat = [{"role": "user", "content": "Where is Normandy?"}]
    got = llama_cpp({"model": str(gguf_exports[gguf_type] / "model.gguf"), "n_ctx": 128, "tokenize": lines,
                     "prompts": list(PROMPTS), "max_tokens": MAX_TOKENS, "chat": chat if gguf_type == "f32" else None})
    assert (got["n_vocab"], got["bos"], got["eos"]) == (8000, 2, 2)
    mismatched = [ln for ln, ids in zip(lines, got["tokens"]) if ids != tok.encode(ln)]
    assert not mismatched, mismatched[:3]
    for prompt, prompt_ids, generated in zip(PROMPTS, got["prompt_ids"], got["generated"]):
        assert prompt_ids == tok.encode_prompt(prompt)
        with torch.no_grad():
            want = torch.stack(list(generate(model, torch.tensor([prompt_ids]), MAX_TOKENS, temperature=0)), 1)[0]
        assert generated == want.tolist(), prompt
    if gguf_type == "f32":
        assert got["chat_format"] == "chat_template.default"  # the file's template, not a guessed one
        want_text = openllm_ds.load(str(hf)).chat(chat, max_new_tokens=MAX_TOKENS)
        assert got["chat_text"].strip() == want_text.strip() and want_text.strip()


def test_llama_cpp_runs_an_untied_gqa_model(tmp_path, tokenizer_dir):
    """q/k permuted per KV head (4 query heads, 2 KV heads), and an output matrix of its own."""
    model = make_fake_run(tmp_path / "run", tokenizer_dir, tie=False, seed=5, n_kv_heads=2)[10]
    export(ExportConfig(model_dir=str(tmp_path / "run"), format="gguf", gguf_type="f32", output_dir=str(tmp_path / "g")))
    tok = load_tokenizer(tokenizer_dir)
    got = llama_cpp({"model": str(tmp_path / "g" / "model.gguf"), "n_ctx": 128, "prompts": list(PROMPTS[:2]),
                     "max_tokens": 16})
    for prompt_ids, generated in zip(got["prompt_ids"], got["generated"]):
        with torch.no_grad():
            want = torch.stack(list(generate(model, torch.tensor([prompt_ids]), 16, temperature=0)), 1)[0]
        assert generated == want.tolist()


def test_q8_0_perplexity_within_2_percent_of_f32(gguf_exports, trained_export, prepared_data, tokenizer_dir):
    """Validation perplexity from llama.cpp's own logits: q8_0 within 2% of f32, and f32 our model's."""
    _, model = trained_export
    tok = load_tokenizer(tokenizer_dir)
    ids = []
    for line in (prepared_data / "validation_data.txt").read_text(encoding="utf-8").splitlines()[:40]:
        ids += [tok.eos_id] + tok.encode(line)
    windows = [ids[i:i + 128] for i in range(0, min(len(ids), 20 * 128) - 127, 128)]
    assert len(windows) == 20
    ppl = {}
    for gguf_type in ("f32", "q8_0"):
        got = llama_cpp({"model": str(gguf_exports[gguf_type] / "model.gguf"), "n_ctx": 128, "windows": windows})
        assert got["predicted"] == 20 * 127
        ppl[gguf_type] = math.exp(got["nll"] / got["predicted"])
    with torch.no_grad():
        batch = torch.tensor(windows)
        ours = math.exp(torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()))
    assert abs(ppl["f32"] / ours - 1) < 1e-3, (ppl, ours)
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.02, ppl


def test_gguf_bad_input(trained_export, tmp_path, tokenizer_dir, capsys):
    hf, _ = trained_export
    assert cli_main(["export", "--model_dir", str(hf), "--format", "gguf", "--gguf_type", "q4_k",
                     "--output_dir", str(tmp_path / "a")]) == 2
    assert "--gguf_type" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert cli_main(["export", "--model_dir", str(hf), "--format", "onnx", "--gguf_type", "f16",
                     "--output_dir", str(tmp_path / "b")]) == 2
    assert "--gguf_type apply to --format gguf only" in capsys.readouterr().err
    # a shape GGUF's q8_0 blocks cannot hold: refused by name, nothing written
    make_fake_run(tmp_path / "run", tokenizer_dir, d_model=48, n_heads=2, d_ff=80)
    with pytest.raises(UserError, match=r"blocks of 32: model.d_model = 48, model.d_ff = 80 \(not a multiple"):
        export(ExportConfig(model_dir=str(tmp_path / "run"), format="gguf", gguf_type="q8_0", output_dir=str(tmp_path / "c")))
    assert not (tmp_path / "c").exists()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="which no export wrote"):
        export(ExportConfig(model_dir=str(hf), format="gguf", output_dir=str(tmp_path / "d")))
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"
