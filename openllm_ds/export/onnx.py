"""ONNX export in optimum's layout, with torch.onnx's dynamo exporter (torch.export), run and checked with onnxruntime.

Files: ``model.onnx``, the decoder optimum's ``ORTModelForCausalLM`` loads and our ``--backend onnx`` serves:
inputs ``input_ids`` (batch, sequence), ``attention_mask`` (batch, past + sequence; 0 marks left padding),
``position_ids`` (batch, sequence) and ``past_key_values.{i}.key|value`` (batch, kv_heads, past, head_dim; a past
of length 0 is the prefill step), outputs ``logits`` and ``present.{i}.key|value``. Beside it: ``config.json``
(LlamaForCausalLM, as the Hugging Face export writes it), ``generation_config.json``, the tokenizer files with the
prompt convention, and openllm_ds.json (the graph's inputs and outputs, which files exist).
``--optimize_for_inference`` adds ``model.optimized.onnx``: onnxruntime's extended graph optimisations (fusions,
constant folding) saved offline, portable across CPUs. ``--quantize_int8`` adds ``model.int8.onnx``: dynamic int8
quantisation of the MatMul weights with activations quantised at run time.

Verification (on by default): every written graph is run with onnxruntime on real text against PyTorch's logits
(one text, a left-padded batch of two, a prefill then a step with the past), and greedy KV-cache generation must
reproduce ``openllm_ds.model.generate`` (the torch model) token for token. fp32 graphs must match to
``FP32_TOLERANCE``; int8 graphs are approximations and must stay within ``INT8_RELATIVE_TOLERANCE`` of the largest
|logit|.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from openllm_ds.errors import UserError, VerificationError
from openllm_ds.checkpoint import EXPORT_INFO, LoadedModel
from openllm_ds.checkpoint.layout import ONNX_MODEL, ONNX_VARIANTS, past_names, present_names
from openllm_ds.checkpoint.onnx import OnnxCausalLM
from openllm_ds.export.common import encode_for_verification, export_info, verification_texts
from openllm_ds.export.huggingface import write_hf_files
from openllm_ds.model import generate
from openllm_ds.utils import atomic_write_json

FP32_TOLERANCE = 1e-4
INT8_RELATIVE_TOLERANCE = 0.05  # max |int8 - fp32 logits| <= 5% of max |fp32 logit|
VERIFY_GENERATE_STEPS = 8
EXTERNAL_DATA_BYTES = 1 << 30  # larger graphs keep their weights in a .data file beside them (2 GiB protobuf limit)


class CausalLMGraph(nn.Module):
    """optimum's decoder: (input_ids (B, T), attention_mask (B, P + T), position_ids (B, T), past k, v per layer
    (B, nkv, P, hs)) -> (logits (B, T, V), present k, v per layer (B, nkv, P + T, hs))."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, present = self.model.forward_with_past(input_ids, cache, attention_mask, position_ids)
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
    """Write model.onnx; return the I/O description for openllm_ds.json."""
    from torch.export import Dim

    cfg = model.cfg
    if cfg.max_seq_len < 8:
        raise UserError(f"ONNX export needs model.max_seq_len >= 8, got {cfg.max_seq_len}")
    # Distinct example sizes (B=2, T=3, P=4) so torch.export keeps batch, sequence and past apart; the mask's length
    # (P + T) is left for torch.export to relate to them.
    batch = Dim("batch_size")
    seq = Dim("sequence_length", max=cfg.max_seq_len)
    past_len = Dim("past_sequence_length", max=cfg.max_seq_len - 1)
    ids = torch.randint(0, cfg.vocab_size, (2, 3))
    mask = torch.ones(2, 7, dtype=torch.int64)
    positions = torch.arange(4, 7).expand(2, 3)
    past = tuple(torch.zeros(2, cfg.num_kv_heads, 4, cfg.head_dim) for _ in range(2 * cfg.n_layers))
    external = model.num_params() * 4 > EXTERNAL_DATA_BYTES
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            CausalLMGraph(model).eval(), (ids, mask, positions, *past), str(out / ONNX_MODEL),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names(cfg.n_layers)],
            output_names=["logits", *present_names(cfg.n_layers)],
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: Dim.AUTO}, {0: batch, 1: seq},
                            tuple({0: batch, 2: past_len} for _ in past)),
            dynamo=True, external_data=external, verbose=False,
        )
    import onnx

    opset = next(o.version for o in onnx.load(str(out / ONNX_MODEL), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
    kv_shape = ["batch_size", cfg.num_kv_heads, "past_sequence_length", cfg.head_dim]
    return {
        "opset": opset,
        "external_data": external,
        "model": {
            "inputs": {"input_ids": ["batch_size", "sequence_length"],
                       "attention_mask": ["batch_size", "past_sequence_length + sequence_length"],
                       "position_ids": ["batch_size", "sequence_length"],
                       "past_key_values.{i}.key|value": kv_shape},
            "outputs": {"logits": ["batch_size", "sequence_length", cfg.vocab_size],
                        "present.{i}.key|value": ["batch_size", cfg.num_kv_heads, "past_sequence_length + sequence_length", cfg.head_dim]},
            "note": "past_sequence_length 0 (empty past) is the prefill step; attention_mask 0 marks left padding",
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
        optimize_graph(out / ONNX_VARIANTS["fp32"], out / ONNX_VARIANTS["optimized"])
        variants.append("optimized")
    if quantize_int8:
        quantize_graph(out / ONNX_VARIANTS["fp32"], out / ONNX_VARIANTS["int8"])
        variants.append("int8")
    write_hf_files(src, out, "fp32")  # config.json (Llama), generation_config.json, the tokenizer files
    files = {v: ONNX_VARIANTS[v] for v in variants}
    atomic_write_json(out / EXPORT_INFO, {**export_info(src), "format": "onnx", "dtype": "fp32", "onnx": {**io, "files": files}})
    report = {"dtype": "fp32", "variants": variants, "opset": io["opset"]}
    if verify:
        report["verification"] = {v: verify_onnx(out, src, v) for v in variants}
    else:
        report["verification"] = {"skipped": "--no-verify"}
    return report


def verify_onnx(out: Path, src: LoadedModel, variant: str = "fp32") -> dict:
    """Logits against PyTorch on real text (one text; a left-padded batch of two; a prefill, then the rest with its
    past), then greedy KV-cache generation."""
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
        for ids in encoded:  # one text at a time, empty past
            compare(lm.logits([ids]), model(torch.tensor([ids])))
        short, long = sorted(encoded[:2], key=len)  # a batch of two, the shorter one padded on the left
        pad = len(long) - len(short)
        padded = np.array([[0] * pad + short, long], dtype=np.int64)
        mask = np.array([[0] * pad + [1] * len(short), [1] * len(long)], dtype=np.int64)
        got = lm.logits(padded, mask)
        compare(got[:1, pad:], model(torch.tensor([short])))
        compare(got[1:], model(torch.tensor([long])))
        n = min(len(encoded[0]), len(encoded[1]))  # a prefill, then the rest after its past
        batch = torch.tensor([encoded[0][:n], encoded[1][:n]])
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
    file = out / ONNX_VARIANTS[variant]
    result = {"max_abs_diff": max_diff, "max_abs_logit": max_ref, "argmax_agreement": agree / total,
              "generated_tokens": int(want.numel()), "generation_matches": bool(torch.equal(want, got))}
    if variant == "int8":
        tol = INT8_RELATIVE_TOLERANCE * max_ref
        result["tolerance"] = tol
        if not max_diff <= tol:
            raise VerificationError(f"{file}: int8 logits differ by {max_diff:.3g} "
                                    f"(> {INT8_RELATIVE_TOLERANCE:.0%} of the largest logit, {max_ref:.3g})")
        return {"verified": True, **result}
    result["tolerance"] = FP32_TOLERANCE
    if not max_diff < FP32_TOLERANCE:
        raise VerificationError(f"{file}: onnxruntime logits differ from PyTorch by {max_diff:.3g}")
    if not result["generation_matches"]:
        raise VerificationError(f"{file}: KV-cache generation with onnxruntime gives {got.tolist()}, "
                                f"PyTorch {want.tolist()}")
    return {"verified": True, **result}
