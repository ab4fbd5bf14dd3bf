"""ONNX export in optimum's layout: the graph against PyTorch with plain onnxruntime (padding, past, KV-cache
generation), optimised and int8 files. optimum itself loads it in tests/export/test_optimum.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from openllm_ds.config import ExportConfig
from openllm_ds.export import export
from openllm_ds.checkpoint.onnx import OnnxCausalLM
from openllm_ds.model import generate

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory, tokenizer_dir):
    from helpers import make_fake_run

    root = tmp_path_factory.mktemp("onnx")
    model = make_fake_run(root / "run", tokenizer_dir, tie=False, seed=3, n_kv_heads=2)[10]
    out = root / "onnx"
    report = export(ExportConfig(model_dir=str(root / "run"), format="onnx", output_dir=str(out),
                                 optimize_for_inference=True, quantize_int8=True))
    return out, model, report


def test_report_and_files(onnx_export):
    out, model, report = onnx_export
    assert report["variants"] == ["fp32", "optimized", "int8"]
    for name in ("model.onnx", "model.optimized.onnx", "model.int8.onnx", "config.json", "generation_config.json",
                 "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "openllm_ds.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("decoder_with_past*"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2 and config["use_cache"]
    assert json.loads((out / "generation_config.json").read_text())["bos_token_id"] == 2
    ver = report["verification"]
    for v in ("fp32", "optimized"):
        assert ver[v]["verified"] and ver[v]["max_abs_diff"] < 1e-4 and ver[v]["generation_matches"]
    assert ver["int8"]["max_abs_diff"] <= 0.05 * ver["int8"]["max_abs_logit"]
    info = json.loads((out / "openllm_ds.json").read_text())
    assert info["step"] == 10 and info["onnx"]["files"]["int8"] == "model.int8.onnx"
    # int8 weights: the files shrink (the fp32 embedding stays)
    assert (out / "model.int8.onnx").stat().st_size < 0.6 * (out / "model.onnx").stat().st_size
    # the optimised graph is smaller (fused nodes)
    nodes = {f: len(onnx.load(str(out / f)).graph.node) for f in ("model.onnx", "model.optimized.onnx")}
    assert nodes["model.optimized.onnx"] < nodes["model.onnx"]


def test_graph_inputs_outputs_and_dynamic_shapes(onnx_export):
    """optimum's names and shapes; any batch and length, a past of length 0."""
    out, model, _ = onnx_export
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in sess.get_inputs()}
    kv = [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids", *kv]
    assert inputs["input_ids"] == inputs["position_ids"] == ["batch_size", "sequence_length"]
    assert inputs[kv[0]] == ["batch_size", 2, "past_sequence_length", 16]
    outputs = [o.name for o in sess.get_outputs()]
    assert outputs == ["logits", *[n.replace("past_key_values", "present") for n in kv]]
    g = torch.Generator().manual_seed(1)
    for b, t in ((3, 17), (1, 128), (2, 1)):
        ids = torch.randint(4, 8000, (b, t), generator=g)
        feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((b, t), np.int64),
                 "position_ids": np.arange(t, dtype=np.int64)[None].repeat(b, 0),
                 **{n: np.zeros((b, 2, 0, 16), np.float32) for n in kv}}
        logits, *present = sess.run(None, feeds)
        with torch.no_grad():
            want = model(ids).numpy()
        assert logits.shape == want.shape and np.abs(logits - want).max() < 1e-4 and present[0].shape == (b, 2, t, 16)


@pytest.mark.parametrize("variant", ["fp32", "optimized"])
def test_left_padded_batch_then_greedy_steps_match_generate(onnx_export, tokenizer_dir, variant):
    """Two prompts of different lengths, the shorter padded on the left: the mask really masks (each row's greedy
    tokens are those of the prompt alone), step by step through the past, as optimum drives the graph."""
    out, model, _ = onnx_export
    from openllm_ds.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    lm = OnnxCausalLM(out, variant=variant)
    prompts = [tok.encode_prompt("The Normans gave their name to Normandy"), tok.encode_prompt("Super Bowl 50 was")]
    width = max(map(len, prompts))
    ids = np.array([[3] * (width - len(p)) + p for p in prompts], dtype=np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
    past, tokens = lm.empty_past(2), []
    for step in range(12):
        logits, past = lm.decode(ids, past, mask)
        assert past[0].shape == (2, 2, width + step, 16)
        ids = logits[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        tokens.append(ids[:, 0])
    got = np.stack(tokens, 1)
    for row, p in enumerate(prompts):
        want = torch.stack(list(generate(model, torch.tensor([p]), 12, temperature=0)), 1)[0]
        assert got[row].tolist() == want.tolist()


def test_onnx_sampling_matches_torch_with_the_same_seed(onnx_export):
    out, model, _ = onnx_export
    lm = OnnxCausalLM(out, variant="fp32")
    prompt = torch.randint(4, 8000, (3, 9), generator=torch.Generator().manual_seed(2))
    kw = dict(temperature=0.8, top_p=0.9, eos_id=2)
    got = [t.tolist() for t in generate(lm, prompt, 20, generator=torch.Generator().manual_seed(7), **kw)]
    want = [t.tolist() for t in generate(model, prompt, 20, generator=torch.Generator().manual_seed(7), **kw)]
    assert got == want and len(got) == 20


def test_int8_graphs_stay_close(onnx_export):
    out, model, _ = onnx_export
    lm = OnnxCausalLM(out, variant="int8")
    ids = torch.randint(4, 8000, (2, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids).numpy()
    got = lm.logits(ids.numpy())
    assert 0 < np.abs(got - want).max() <= 0.05 * np.abs(want).max()  # quantised: close, not equal
    prefill, present = lm.decode(ids.numpy(), lm.empty_past(2))  # the prefill step: an empty past
    assert np.abs(prefill - want).max() <= 0.05 * np.abs(want).max() and present[0].shape == (2, 2, 64, 16)


def test_builtin_server_engine_on_an_onnx_export(onnx_export, tokenizer_dir):
    from openllm_ds.inference import SamplingParams, load_completer
    from openllm_ds.tokenizer import load_tokenizer

    out, model, _ = onnx_export
    completer = load_completer(out, "onnx", context_length=64)
    assert completer.lm.variant == "optimized" and completer.context_length == 64 and completer.model_name == "onnx"
    ids = load_tokenizer(tokenizer_dir).encode("The Normans were")
    texts, reasons, num_tokens = completer.complete(ids, SamplingParams(max_tokens=10, temperature=0))
    want = [t.item() for t in generate(model, torch.tensor([ids]), 10, temperature=0, eos_id=2)]
    assert num_tokens == len(want) and reasons == ["stop" if want[-1] == 2 else "length"]
    tok = load_tokenizer(tokenizer_dir)
    assert tok.decode(ids) + texts[0] == tok.decode(ids + [t for t in want if t != 2])
