"""ONNX export: both graphs against PyTorch with plain onnxruntime, KV-cache generation, optimised and int8 files."""

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
    for name in ("model.onnx", "decoder_with_past.onnx", "model.optimized.onnx", "decoder_with_past.optimized.onnx",
                 "model.int8.onnx", "decoder_with_past.int8.onnx", "config.json", "tokenizer.model", "openllm_ds.json"):
        assert (out / name).is_file(), name
    ver = report["verification"]
    for v in ("fp32", "optimized"):
        assert ver[v]["verified"] and ver[v]["max_abs_diff"] < 1e-4 and ver[v]["generation_matches"]
    assert ver["int8"]["max_abs_diff"] <= 0.05 * ver["int8"]["max_abs_logit"]
    info = json.loads((out / "openllm_ds.json").read_text())
    assert info["step"] == 10 and info["onnx"]["files"]["int8"]["decoder_with_past"] == "decoder_with_past.int8.onnx"
    # int8 weights: the files shrink (the fp32 embedding stays)
    assert (out / "model.int8.onnx").stat().st_size < 0.6 * (out / "model.onnx").stat().st_size
    # the optimised graph is smaller (fused nodes)
    nodes = {f: len(onnx.load(str(out / f)).graph.node) for f in ("model.onnx", "model.optimized.onnx")}
    assert nodes["model.optimized.onnx"] < nodes["model.onnx"]


def test_model_onnx_dynamic_batch_and_sequence(onnx_export):
    out, model, _ = onnx_export
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == "input_ids" and inp.shape == ["batch_size", "sequence_length"]
    assert outp.name == "logits" and outp.shape == ["batch_size", "sequence_length", 8000]
    g = torch.Generator().manual_seed(1)
    for shape in ((3, 17), (1, 128), (2, 1)):
        ids = torch.randint(4, 8000, shape, generator=g)
        got = sess.run(None, {"input_ids": ids.numpy()})[0]
        with torch.no_grad():
            want = model(ids).numpy()
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("variant", ["fp32", "optimized"])
def test_decoder_with_past_greedy_matches_generate(onnx_export, tokenizer_dir, variant):
    out, model, _ = onnx_export
    from openllm_ds.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    file = "decoder_with_past.onnx" if variant == "fp32" else "decoder_with_past.optimized.onnx"
    sess = ort.InferenceSession(str(out / file), providers=["CPUExecutionProvider"])
    past_names = [i.name for i in sess.get_inputs()][1:]
    assert past_names == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    prompts = [tok.encode("The Normans gave their name to Normandy"), tok.encode("Super Bowl 50 was played in")]
    n = min(map(len, prompts))
    ids = np.array([p[:n] for p in prompts], dtype=np.int64)
    past = [np.zeros((2, 2, 0, 16), np.float32) for _ in past_names]  # empty past: the prefill step
    tokens = []
    for step in range(12):
        outs = sess.run(None, {"input_ids": ids, **dict(zip(past_names, past))})
        logits, past = outs[0], outs[1:]
        assert past[0].shape == (2, 2, n + step, 16)
        ids = logits[:, -1].argmax(-1)[:, None]
        tokens.append(ids[:, 0])
    want = torch.stack(list(generate(model, torch.tensor([p[:n] for p in prompts]), 12, temperature=0)), 1)
    assert np.array_equal(np.stack(tokens, 1), want.numpy())


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
    prefill, present = lm.decode(ids.numpy(), lm.empty_past(2))
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
