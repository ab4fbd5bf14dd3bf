"""ONNX export with torch.onnx's dynamo exporter (torch.export), run and checked with onnxruntime.

Files: model.onnx (input_ids -> logits, dynamic batch and sequence), decoder_with_past.onnx (the
same plus past/present key-values per layer, dynamic past length, 0 included: one graph serves
prefill and decoding), config.json (ModelConfig fields), the tokenizer files and openllm_ds.json
(graph inputs/outputs and which files exist). ``--optimize_for_inference`` adds
``*.optimized.onnx``: onnxruntime's extended graph optimisations (fusions, constant folding) saved
offline, portable across CPUs. ``--quantize_int8`` adds ``*.int8.onnx``: dynamic int8 quantisation
of the MatMul weights with activations quantised at run time.

Verification (on by default): every written graph is run with onnxruntime on real text against
PyTorch's logits, and greedy KV-cache generation with decoder_with_past must reproduce
``openllm_ds.model.generate`` (the torch model) token for token. fp32 graphs must match to ``FP32_TOLERANCE``; int8 graphs
are approximations and must stay within ``INT8_RELATIVE_TOLERANCE`` of the largest |logit|.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from openllm_ds.errors import UserError, VerificationError
from openllm_ds.checkpoint import EXPORT_INFO, LoadedModel
from openllm_ds.checkpoint.layout import ONNX_DECODER, ONNX_MODEL, ONNX_VARIANTS, past_names, present_names
from openllm_ds.checkpoint.onnx import OnnxCausalLM
from openllm_ds.export.common import copy_tokenizer_files, encode_for_verification, export_info, verification_texts
from openllm_ds.model import generate
from openllm_ds.utils import atomic_write_json

FP32_TOLERANCE = 1e-4
INT8_RELATIVE_TOLERANCE = 0.05  # max |int8 - fp32 logits| <= 5% of max |fp32 logit|
VERIFY_GENERATE_STEPS = 8
EXTERNAL_DATA_BYTES = 1 << 30  # larger graphs keep their weights in a .data file beside them (2 GiB protobuf limit)


class LogitsGraph(nn.Module):
    """input_ids (B, T) -> logits (B, T, V)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids)


class DecoderWithPastGraph(nn.Module):
    """(input_ids (B, T), past k, v per layer (B, nkv, P, hs)) -> (logits, present k, v per layer)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, *past):
        cache = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        # With a cache the model takes its explicit causal-mask path, which is also right for P = 0.
        logits, present = self.model.forward_with_past(input_ids, cache)
        return (logits, *[t for kv in present for t in kv])


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx logs every phase and warns about optional torchvision ops; keep the console readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def export_graphs(model: nn.Module, out: Path) -> dict:
    """Write model.onnx and decoder_with_past.onnx; return the I/O description for openllm_ds.json."""
    from torch.export import Dim

    cfg = model.cfg
    if cfg.max_seq_len < 8:
        raise UserError(f"ONNX export needs model.max_seq_len >= 8, got {cfg.max_seq_len}")
    # Distinct example sizes (B=2, T=3, P=4) so torch.export keeps batch, sequence and past apart.
    batch = Dim("batch_size")
    seq = Dim("sequence_length", max=cfg.max_seq_len)
    past_len = Dim("past_sequence_length", max=cfg.max_seq_len - 1)
    ids = torch.randint(0, cfg.vocab_size, (2, 3))
    past = tuple(torch.zeros(2, cfg.num_kv_heads, 4, cfg.head_dim) for _ in range(2 * cfg.n_layers))
    external = model.num_params() * 4 > EXTERNAL_DATA_BYTES
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            LogitsGraph(model).eval(), (ids,), str(out / ONNX_MODEL), input_names=["input_ids"], output_names=["logits"],
            dynamic_shapes=({0: batch, 1: seq},), dynamo=True, external_data=external, verbose=False,
        )
        torch.onnx.export(
            DecoderWithPastGraph(model).eval(), (ids, *past), str(out / ONNX_DECODER),
            input_names=["input_ids", *past_names(cfg.n_layers)],
            output_names=["logits", *present_names(cfg.n_layers)],
            dynamic_shapes=({0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in past)),
            dynamo=True, external_data=external, verbose=False,
        )
    import onnx

    opset = next(o.version for o in onnx.load(str(out / ONNX_MODEL), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
    return {
        "opset": opset,
        "external_data": external,
        "model": {"inputs": {"input_ids": ["batch_size", "sequence_length"]},
                  "outputs": {"logits": ["batch_size", "sequence_length", cfg.vocab_size]}},
        "decoder_with_past": {
            "inputs": {"input_ids": ["batch_size", "sequence_length"],
                       "past_key_values.{i}.key|value": ["batch_size", cfg.num_kv_heads, "past_sequence_length", cfg.head_dim]},
            "outputs": {"logits": ["batch_size", "sequence_length", cfg.vocab_size],
                        "present.{i}.key|value": ["batch_size", cfg.num_kv_heads, "past_sequence_length + sequence_length", cfg.head_dim]},
            "note": "past_sequence_length 0 (empty past) is the prefill step; positions start at past_sequence_length",
        },
    }


def optimize_graph(src: Path, dst: Path) -> None:
    """onnxruntime's extended optimisations, saved offline. ORT_ENABLE_ALL would add layout
    transforms tied to this CPU; onnxruntime applies them at load time anyway."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(dst)
    if (src.parent / f"{src.name}.data").is_file():
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{dst.name}.data")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])


def quantize_graph(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # reduce_range: 7-bit weights. onnxruntime's u8 x s8 kernels on x86 CPUs without VNNI (AVX2 only)
    # saturate their 16-bit intermediate sums with full 8-bit weights: logits off by 40% on such a CPU
    with _quiet_exporter():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         use_external_data_format=(src.parent / f"{src.name}.data").is_file())


def export_onnx(src: LoadedModel, out: Path, dtype: str = "fp32", verify: bool = True,
                optimize: bool = False, quantize_int8: bool = False) -> dict:
    if dtype != "fp32":
        raise UserError(f"--dtype {dtype} applies to huggingface and pytorch exports; ONNX export is fp32 "
                        "(add --quantize_int8 for a smaller model)")
    io = export_graphs(src.model, out)
    variants = ["fp32"]
    if optimize:
        for a, b in zip(ONNX_VARIANTS["fp32"], ONNX_VARIANTS["optimized"]):
            optimize_graph(out / a, out / b)
        variants.append("optimized")
    if quantize_int8:
        for a, b in zip(ONNX_VARIANTS["fp32"], ONNX_VARIANTS["int8"]):
            quantize_graph(out / a, out / b)
        variants.append("int8")
    atomic_write_json(out / "config.json", dataclasses.asdict(src.model_config))
    copy_tokenizer_files(src, out)
    files = {v: dict(zip(("model", "decoder_with_past"), ONNX_VARIANTS[v])) for v in variants}
    atomic_write_json(out / EXPORT_INFO, {**export_info(src), "format": "onnx", "dtype": "fp32", "onnx": {**io, "files": files}})
    report = {"dtype": "fp32", "variants": variants, "opset": io["opset"]}
    if verify:
        report["verification"] = {v: verify_onnx(out, src, v) for v in variants}
    else:
        report["verification"] = {"skipped": "--no-verify"}
    return report


def verify_onnx(out: Path, src: LoadedModel, variant: str = "fp32") -> dict:
    """Logits of both graphs against PyTorch on real text, then greedy KV-cache generation."""
    lm = OnnxCausalLM(out, variant=variant)
    model = src.model
    texts = verification_texts(src)
    encoded = [encode_for_verification(src, t) for t in texts]
    max_diff, max_ref = 0.0, 0.0
    agree, total = 0, 0

    def compare(got: np.ndarray, ref: torch.Tensor):
        nonlocal max_diff, max_ref, agree, total
        ref_np = ref.float().numpy()
        max_diff = max(max_diff, float(np.abs(got - ref_np).max()))
        max_ref = max(max_ref, float(np.abs(ref_np).max()))
        agree += int((got.argmax(-1) == ref_np.argmax(-1)).sum())
        total += got.shape[0] * got.shape[1]

    with torch.no_grad():
        for ids in encoded:  # model.onnx, one text at a time
            compare(lm.logits([ids]), model(torch.tensor([ids])))
        n = min(len(encoded[0]), len(encoded[1]))  # a batch of two, and decoder_with_past step by step
        batch = torch.tensor([encoded[0][:n], encoded[1][:n]])
        compare(lm.logits(batch.numpy()), model(batch))
        split = max(1, n // 2)
        ref_logits, ref_cache = model.forward_with_past(batch[:, :split], [])
        got_logits, present = lm.decode(batch[:, :split].numpy(), lm.empty_past(2))
        compare(got_logits, ref_logits)
        ref_logits, _ = model.forward_with_past(batch[:, split:], ref_cache)
        got_logits, present = lm.decode(batch[:, split:].numpy(), present)
        compare(got_logits, ref_logits)
        prompt = batch[:, : max(1, min(n, model.cfg.max_seq_len - VERIFY_GENERATE_STEPS))]
        want = torch.stack(list(generate(model, prompt, VERIFY_GENERATE_STEPS, temperature=0)), 1)
        got = torch.stack(list(generate(lm, prompt, VERIFY_GENERATE_STEPS, temperature=0)), 1)
    result = {"max_abs_diff": max_diff, "max_abs_logit": max_ref, "argmax_agreement": agree / total,
              "generated_tokens": int(want.numel()), "generation_matches": bool(torch.equal(want, got))}
    if variant == "int8":
        tol = INT8_RELATIVE_TOLERANCE * max_ref
        result["tolerance"] = tol
        if not max_diff <= tol:
            raise VerificationError(f"{out / ONNX_VARIANTS[variant][0]}: int8 logits differ by {max_diff:.3g} "
                                    f"(> {INT8_RELATIVE_TOLERANCE:.0%} of the largest logit, {max_ref:.3g})")
        return {"verified": True, **result}
    result["tolerance"] = FP32_TOLERANCE
    if not max_diff < FP32_TOLERANCE:
        raise VerificationError(f"{out / ONNX_VARIANTS[variant][0]}: onnxruntime logits differ from PyTorch by {max_diff:.3g}")
    if not result["generation_matches"]:
        raise VerificationError(f"{out / ONNX_DECODER}: KV-cache generation with onnxruntime gives {got.tolist()}, "
                                f"PyTorch {want.tolist()}")
    return {"verified": True, **result}
