"""Stage 6 export: Hugging Face (checked against transformers), PyTorch, bad input, ZeRO shards.

The exported models are random tiny Transformers saved as fake training outputs with the real
8k SentencePiece tokenizer of the session fixtures; the logits comparisons run on real SQuAD
validation passages.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from openllm_ds.checkpoint import load_model
from openllm_ds.cli import main as cli_main
from openllm_ds.config import ExportConfig, ModelConfig
from openllm_ds.errors import ConfigError, UserError
from openllm_ds.export import VerificationError, export
from openllm_ds.model import generate
from openllm_ds.model import Transformer
from openllm_ds.tokenizer import load_tokenizer
from openllm_ds.utils import MANIFEST, read_manifest

from helpers import TINY, VAL_LOSS, make_fake_run

def validation_passages(prepared_data: Path, n: int = 3) -> list[str]:
    lines = (prepared_data / "validation_data.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()][:n]


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("runs") / "tied"
    return out, make_fake_run(out, tokenizer_dir, tie=True)[10]


@pytest.fixture(scope="module")
def untied_run(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("runs") / "untied"
    return out, make_fake_run(out, tokenizer_dir, tie=False, seed=5, n_kv_heads=2)[10]


# --- Hugging Face ------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tied", "untied"])
def test_huggingface_export_matches_transformers_and_loads_back(which, request, tmp_path, prepared_data, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    run_dir, model = request.getfixturevalue(f"{which}_run")
    out = tmp_path / "hf"
    report = export(ExportConfig(model_dir=str(run_dir), format="huggingface", output_dir=str(out)))

    assert report["verification"]["verified"] and report["verification"]["max_abs_diff"] < 1e-4
    assert report["step"] == 10 and report["num_params"] == model.num_params()
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer.model",
                 "tokenizer_config.json", "special_tokens_map.json", "README.md", "openllm_ds.json"):
        assert name in report["files"] and (out / name).is_file()
    for name in ("tokenizer.model", "tokenizer.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (tokenizer_dir / name).read_bytes()
    assert not list(tmp_path.glob(".hf.*")), "temporary dirs left behind"

    # tied: only the embedding is stored; untied: lm_head too
    stored = load_file(str(out / "model.safetensors"))
    assert ("lm_head.weight" in stored) == (which == "untied")
    assert len(stored) == 2 + 9 * TINY["n_layers"] + (which == "untied")

    cfg = json.loads((out / "config.json").read_text())
    tok = load_tokenizer(tokenizer_dir)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["vocab_size"] == tok.vocab_size == 8000
    assert cfg["tie_word_embeddings"] is (which == "tied")
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["intermediate_size"]) == (64, 2, 4, 128)
    assert cfg["num_key_value_heads"] == (4 if which == "tied" else 2)
    assert cfg["max_position_embeddings"] == 128 and cfg["head_dim"] == 16
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 2, 3)  # BOS = </s>: the prompt prefix
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (2, 2, 3)
    info = json.loads((out / "openllm_ds.json").read_text())
    assert info["step"] == 10 and info["run_name"] == "fake-run" and info["val_loss"] == VAL_LOSS
    assert info["source_checkpoint"] == str(run_dir / "checkpoints" / "step_00000010")
    card = (out / "README.md").read_text()
    assert f"{math.exp(VAL_LOSS):.2f}" in card and "| training steps | 10 |" in card and f"{model.num_params():,}" in card

    # independent check with transformers on real validation passages
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    for text in validation_passages(prepared_data):
        ids = tok.encode(text)[:128]
        assert hf_tok(text, add_special_tokens=False, verbose=False)["input_ids"][:128] == ids
        with torch.no_grad():
            diff = (hf(torch.tensor([ids])).logits - model(torch.tensor([ids]))).abs().max().item()
        assert diff < 1e-4

    # our loader reads the export back with identical weights and the step
    loaded = load_model(out)
    assert loaded.kind == "huggingface" and loaded.step == 10
    ref = model.state_dict()
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_fp16_export_loads_in_float16(tied_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    run_dir, model = tied_run
    out = tmp_path / "hf16"
    report = export(ExportConfig(model_dir=str(run_dir), format="huggingface", output_dir=str(out), dtype="fp16"))
    assert report["verification"]["verified"]
    stored = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.float16}
    assert torch.equal(stored["model.embed_tokens.weight"], model.embed_tokens.weight.detach().half())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float16).eval()
    assert hf.dtype == torch.float16
    ids = torch.randint(4, 8000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = hf(ids).logits.float(), model(ids)
    assert (got - want).abs().max().item() < 2e-2 * max(1.0, want.abs().max().item())


def test_verification_is_skipped_without_transformers(tied_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    report = export(ExportConfig(model_dir=str(tied_run[0]), format="huggingface", output_dir=str(tmp_path / "hf")))
    assert report["verification"] == {"skipped": "transformers is not installed"}
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_failed_verification_writes_nothing(tied_run, tmp_path, monkeypatch):
    import openllm_ds.export.huggingface as hf_mod

    def broken(out, src, dtype):
        raise VerificationError("logits differ by 0.5")

    monkeypatch.setattr(hf_mod, "verify_huggingface", broken)
    with pytest.raises(VerificationError, match="nothing was written"):
        export(ExportConfig(model_dir=str(tied_run[0]), format="huggingface", output_dir=str(tmp_path / "hf")))
    assert list(tmp_path.iterdir()) == []


# --- PyTorch -----------------------------------------------------------------------------------------

def test_pytorch_export_loads_with_weights_only(untied_run, tmp_path):
    run_dir, model = untied_run
    out = tmp_path / "pt"
    report = export(ExportConfig(model_dir=str(run_dir), format="pytorch", output_dir=str(out)))
    assert report["verification"] == {"verified": True, "max_abs_diff": 0.0, "num_texts": 3}
    cfg = json.loads((out / "config.json").read_text())
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(type(v) is torch.Tensor for v in state.values())
    reloaded = Transformer(ModelConfig(**cfg)).eval()
    reloaded.load_state_dict(state)  # strict
    assert cfg["n_kv_heads"] == 2 and cfg["tie_embeddings"] is False
    ids = torch.randint(4, 8000, (2, 30))
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model(ids))
    assert (out / "tokenizer.model").is_file() and json.loads((out / "openllm_ds.json").read_text())["step"] == 10


def test_tokenizer_json_is_built_when_the_run_lacks_it(tmp_path, tokenizer_dir):
    pytest.importorskip("transformers")
    run_dir = tmp_path / "run"
    make_fake_run(run_dir, tokenizer_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (run_dir / "tokenizer" / name).unlink()
    report = export(ExportConfig(model_dir=str(run_dir), format="huggingface", output_dir=str(tmp_path / "hf")))
    assert report["verification"]["tokenizer_ids_match"] and "tokenizer.json" in report["files"]
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()


def test_reexport_from_a_huggingface_export_keeps_the_metadata(tied_run, tmp_path):
    run_dir, model = tied_run
    first = tmp_path / "hf"
    export(ExportConfig(model_dir=str(run_dir), format="huggingface", output_dir=str(first), verify=False))
    report = export(ExportConfig(model_dir=str(first), format="pytorch", output_dir=str(tmp_path / "pt")))
    assert report["step"] == 10 and report["source"] == str(first)
    info = json.loads((tmp_path / "pt" / "openllm_ds.json").read_text())
    assert (info["run_name"], info["val_loss"], info["source_kind"]) == ("fake-run", VAL_LOSS, "huggingface")
    state = torch.load(tmp_path / "pt" / "model.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# --- which checkpoint -------------------------------------------------------------------------------

def test_a_checkpoint_with_split_projections_still_loads(tmp_path, tokenizer_dir):
    """Weights saved before q/k/v and gate/up were stacked (HF's names without 'model.') load as they were."""
    from openllm_ds.model.hf_map import to_hf_state_dict

    run_dir = tmp_path / "run"
    model = make_fake_run(run_dir, tokenizer_dir, tie=False, n_kv_heads=2)[10]
    split = {k.removeprefix("model."): v.contiguous() for k, v in to_hf_state_dict(model.state_dict(), model.cfg).items()}
    assert "layers.1.self_attn.k_proj.weight" in split and "layers.1.self_attn.qkv_proj.weight" not in split
    save_file(split, str(run_dir / "checkpoints" / "step_00000010" / "model.safetensors"))
    loaded = load_model(run_dir).model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_export_picks_the_requested_checkpoint(tmp_path, tokenizer_dir):
    run_dir = tmp_path / "run"
    models = make_fake_run(run_dir, tokenizer_dir, steps=(10, 20))
    for step, kwargs in ((20, {}), (10, {"checkpoint": 10})):
        out = tmp_path / f"pt{step}"
        report = export(ExportConfig(model_dir=str(run_dir), format="pytorch", output_dir=str(out), verify=False), **kwargs)
        assert report["step"] == step
        state = torch.load(out / "model.pt", weights_only=True)
        assert torch.equal(state["norm.weight"], models[step].norm.weight.detach())
        assert torch.equal(state["layers.0.mlp.gate_up_proj.weight"], models[step].layers[0].mlp.gate_up_proj.weight.detach())
    # a step dir itself is a valid --model_dir
    report = export(ExportConfig(model_dir=str(run_dir / "checkpoints" / "step_00000010"), format="pytorch",
                                 output_dir=str(tmp_path / "from_step"), verify=False))
    assert report["step"] == 10
    with pytest.raises(UserError, match="no complete checkpoint for step 30"):
        export(ExportConfig(model_dir=str(run_dir), format="pytorch", output_dir=str(tmp_path / "x")), checkpoint=30)


def test_export_from_deepspeed_zero_shards(tmp_path, tokenizer_dir, monkeypatch):
    """A tag dir without model.safetensors is consolidated with DeepSpeed's zero_to_fp32."""
    pytest.importorskip("deepspeed")
    import deepspeed.utils.zero_to_fp32 as z

    run_dir = tmp_path / "run"
    model = make_fake_run(run_dir, tokenizer_dir, tie=False)[10]
    tag = run_dir / "checkpoints" / "step_00000010"
    (tag / "model.safetensors").unlink()
    (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    calls = []

    def fake_zero_to_fp32(checkpoint_dir, tag=None, **kw):
        calls.append((checkpoint_dir, tag))
        return {f"module.{k}": v.clone() for k, v in model.state_dict().items()}

    monkeypatch.setattr(z, "get_fp32_state_dict_from_zero_checkpoint", fake_zero_to_fp32)
    out = tmp_path / "pt"
    report = export(ExportConfig(model_dir=str(run_dir), format="pytorch", output_dir=str(out)))
    assert calls == [(str(run_dir / "checkpoints"), "step_00000010")]
    assert report["step"] == 10 and report["source"] == str(tag)
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    monkeypatch.setattr(z, "get_fp32_state_dict_from_zero_checkpoint",
                        lambda d, tag=None, **kw: {**fake_zero_to_fp32(d, tag), "module.norm.weight": torch.empty(0)})
    with pytest.raises(UserError, match="empty tensors"):
        export(ExportConfig(model_dir=str(tag), format="pytorch", output_dir=str(tmp_path / "pt2")))


# --- bad input ----------------------------------------------------------------------------------------

def test_model_dir_without_checkpoint(tmp_path):
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(UserError, match="holds no checkpoint"):
        export(ExportConfig(model_dir=str(tmp_path / "empty_run"), format="huggingface", output_dir=str(tmp_path / "o")))
    with pytest.raises(UserError, match="does not exist"):
        export(ExportConfig(model_dir=str(tmp_path / "missing"), format="huggingface", output_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_tokenizer_vocab_mismatch_is_refused(tmp_path, tokenizer_dir):
    run_dir = tmp_path / "run"
    make_fake_run(run_dir, tokenizer_dir, vocab_size=8064)
    with pytest.raises(UserError, match=r"has 8000 tokens but the model .* has vocab_size 8064"):
        export(ExportConfig(model_dir=str(run_dir), format="huggingface", output_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_unknown_format_and_dtype(tied_run, tmp_path, capsys):
    with pytest.raises(ConfigError, match="export.format must be huggingface, pytorch, onnx or gguf"):
        ExportConfig(model_dir=str(tied_run[0]), format="tflite")
    code = cli_main(["export", "--model_dir", str(tied_run[0]), "--format", "tflite", "--output_dir", str(tmp_path / "o")])
    assert code == 2 and "export.format must be" in capsys.readouterr().err
    with pytest.raises(UserError, match="ONNX export is fp32"):
        export(ExportConfig(model_dir=str(tied_run[0]), format="onnx", output_dir=str(tmp_path / "o"), dtype="fp16"))
    with pytest.raises(UserError, match="apply to --format onnx only"):
        export(ExportConfig(model_dir=str(tied_run[0]), format="pytorch", output_dir=str(tmp_path / "o"), quantize_int8=True))


def test_overwrite_replaces_an_earlier_export_and_never_a_users_file(tied_run, tmp_path, capsys):
    out = tmp_path / "pt"
    cfg = dict(model_dir=str(tied_run[0]), format="pytorch", output_dir=str(out))
    export(ExportConfig(**cfg))
    manifest = read_manifest(out)
    assert sorted(manifest.files) == sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    assert (manifest.kind, manifest.stage) == ("a pytorch export", "openllm-ds export --format pytorch")
    with pytest.raises(UserError, match=r"holds an earlier export \(.*model\.pt.*\); pass --overwrite to replace it"):
        export(ExportConfig(**cfg))
    export(ExportConfig(**cfg, overwrite=True))
    assert "--overwrite: replacing the export in" in capsys.readouterr().err
    # a file no export wrote: refused with or without --overwrite (which the message does not suggest), kept
    (out / "notes.md").write_text("mine")
    (out / "plots").mkdir()
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"holds notes\.md, plots/, which no export wrote") as e:
            export(ExportConfig(**cfg, overwrite=overwrite))
        assert "--overwrite" not in str(e.value)
    assert (out / "notes.md").read_text() == "mine" and (out / "plots").is_dir() and (out / "model.pt").is_file()
    # the final swap checks again: a user's file that appears during the export stops it, and nothing is lost
    (out / "notes.md").unlink()
    (out / "plots").rmdir()
    from openllm_ds.export.common import export_kind
    from openllm_ds.utils import atomic_dir

    with pytest.raises(UserError, match=r"holds late\.txt, which openllm-ds did not write; nothing was replaced"):
        with atomic_dir(out, export_kind("pytorch")) as tmp:
            (tmp / "model.pt").write_text("new")
            (out / "late.txt").write_text("mine")
    assert (out / "late.txt").read_text() == "mine" and (out / "model.pt").stat().st_size > 3
    assert not list(tmp_path.glob(".pt.*"))
    with pytest.raises(UserError, match="would replace the model being exported"):
        export(ExportConfig(model_dir=str(out), format="pytorch", output_dir=str(out), overwrite=True))


def test_cli_export_prints_report(tied_run, tmp_path, capsys):
    out = tmp_path / "hf"
    code = cli_main(["export", "--model_dir", str(tied_run[0]), "--format", "pytorch", "--output_dir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index("{"):])
    assert report["format"] == "pytorch" and report["output_dir"] == str(out) and report["step"] == 10
    assert report["verification"]["verified"] is True
    code = cli_main(["export", "--model_dir", str(tied_run[0]), "--format", "pytorch", "--output_dir", str(out)])
    assert code == 2 and "pass --overwrite" in capsys.readouterr().err


ZERO3_SCRIPT = """
import os, sys, torch
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
import deepspeed, yaml
from openllm_ds.config import run_config_from_dict
from openllm_ds.model import Transformer
run = sys.argv[1]
cfg = run_config_from_dict(yaml.safe_load(open(os.path.join(run, "run_config.yaml")))).model
torch.manual_seed(0)
model = Transformer(cfg)
ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3},
             "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "weight_decay": 0.0, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
ids = torch.randint(0, cfg.vocab_size, (1, 16))
engine.backward(engine(ids, ids))
engine.step()
engine.save_checkpoint(os.path.join(run, "checkpoints"), tag="step_00000001")
"""


@pytest.mark.slow
def test_export_from_a_real_zero3_checkpoint(tmp_path, tokenizer_dir):
    """DeepSpeed ZeRO-3 on one CPU rank saves shards only; the export consolidates them (lr 0: weights = init)."""
    pytest.importorskip("deepspeed")

    run_dir = tmp_path / "run"
    make_fake_run(run_dir, tokenizer_dir, steps=(1,), tie=True)
    tag = run_dir / "checkpoints" / "step_00000001"
    shutil.rmtree(tag)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT, str(run_dir), port], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tag / "model.safetensors").exists() and list(tag.glob("*model_states.pt"))

    report = export(ExportConfig(model_dir=str(run_dir), format="huggingface", output_dir=str(tmp_path / "hf")))
    assert report["source"] == str(tag) and report["step"] == 1 and report["verification"]["max_abs_diff"] < 1e-4
    loaded = load_model(tmp_path / "hf")
    torch.manual_seed(0)
    want = Transformer(loaded.model_config).state_dict()
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_hf_export_is_readable_by_all_and_generates_with_transformers(trained_export, tokenizer_dir):
    """0644 files (a server running as another user reads them), model_input_names, and generate(**tok(text))
    starting where `openllm-ds generate` does (after </s>), with the same greedy tokens."""
    import stat

    transformers = pytest.importorskip("transformers")
    out, model = trained_export
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == modes["tokenizer.json"] == 0o644, modes
    assert all(m & 0o044 == 0o044 for m in modes.values()) and stat.S_IMODE(out.stat().st_mode) & 0o055 == 0o055
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["model_input_names"] == ["input_ids", "attention_mask"] and cfg["bos_token"] == "</s>"
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = load_tokenizer(tokenizer_dir)
    for text in ("The Normans were", "Super Bowl 50 was"):
        inputs = hf_tok(text, return_tensors="pt")
        assert set(inputs) == {"input_ids", "attention_mask"}
        assert inputs["input_ids"][0].tolist() == tok.encode_prompt(text)
        out_ids = hf.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False)[0, inputs["input_ids"].size(1):]
        with torch.no_grad():
            want = torch.stack(list(generate(model, inputs["input_ids"], 10, temperature=0)), 1)[0]
        assert out_ids.tolist() == want.tolist()
