"""Run an ONNX export with onnxruntime: full-sequence logits and KV-cache generation.

The export holds two graphs (see export/onnx.py):

- ``model.onnx``: ``input_ids`` (batch, sequence) -> ``logits`` (batch, sequence, vocab)
- ``decoder_with_past.onnx``: ``input_ids`` (batch, sequence) and ``past_key_values.{i}.key|value``
  (batch, kv_heads, past_sequence, head_dim) -> ``logits`` and ``present.{i}.key|value``
  (batch, kv_heads, past_sequence + sequence, head_dim). A past of length 0 is the prefill step.

``OnnxCausalLM`` is called like our ``Transformer`` (``lm(idx)``, ``lm.decode_step(idx, cache)``), so
generation runs ``openllm_ds.model.generate``, the torch backend's own loop and sampling code, on onnxruntime's logits.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from openllm_ds.checkpoint.layout import ONNX_DECODER, ONNX_VARIANTS, is_onnx_export, past_names, present_names
from openllm_ds.config import ModelConfig
from openllm_ds.errors import UserError
from openllm_ds.utils import read_json


def session_options(num_threads: int | None = None, spinning: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if num_threads:
        so.intra_op_num_threads = num_threads
    # Busy-waiting worker threads steal the CPU from concurrent requests and from PyTorch.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


class PastCache:
    """decoder_with_past's key/value inputs, flat per layer, replaced by its outputs at each step."""

    def __init__(self, past: list[np.ndarray]):
        self.past = past


class OnnxCausalLM:
    """An ONNX export on onnxruntime with the calling convention of ``Transformer``."""

    training = False

    def __init__(self, export_dir: str | Path, variant: str = "auto", num_threads: int | None = None,
                 spinning: bool = False):
        import onnxruntime as ort

        self.dir = Path(export_dir)
        if not is_onnx_export(self.dir):
            raise UserError(f"{self.dir} is not an ONNX export (needs {ONNX_DECODER} and config.json); "
                            "run `openllm-ds export --format onnx` first")
        if variant == "auto":
            variant = "optimized" if (self.dir / ONNX_VARIANTS["optimized"][1]).is_file() else "fp32"
        if variant not in ONNX_VARIANTS:
            raise UserError(f"ONNX variant must be auto, {', '.join(ONNX_VARIANTS)}; got {variant!r}")
        missing = [f for f in ONNX_VARIANTS[variant] if not (self.dir / f).is_file()]
        if missing:
            raise UserError(f"{self.dir} has no {missing[0]}; export with --optimize_for_inference / --quantize_int8")
        self.variant = variant
        self.cfg = ModelConfig(**read_json(self.dir / "config.json", "re-export the model (--format onnx)",
                                           expect=dict))
        self.num_threads = num_threads  # intra-op threads of every session (None: onnxruntime's default)
        self._options = session_options(num_threads, spinning)
        self._ort = ort
        self._sessions: dict[str, object] = {}
        self._lock = threading.Lock()
        self._past_names = past_names(self.cfg.n_layers)
        self._present_names = present_names(self.cfg.n_layers)

    def _session(self, which: str):
        with self._lock:  # created once, on first use; InferenceSession.run itself is thread-safe
            if which not in self._sessions:
                file = self.dir / ONNX_VARIANTS[self.variant][0 if which == "model" else 1]
                self._sessions[which] = self._ort.InferenceSession(str(file), self._options,
                                                                   providers=["CPUExecutionProvider"])
            return self._sessions[which]

    def logits(self, input_ids) -> np.ndarray:
        """(B, T) ids -> (B, T, V) logits from model.onnx."""
        ids = np.asarray(input_ids, dtype=np.int64)
        return self._session("model").run(["logits"], {"input_ids": ids})[0]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.cfg.num_kv_heads, 0, self.cfg.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in self._past_names]

    def decode(self, input_ids, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder_with_past call: (logits (B, T, V), present key/values, flat per layer)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        feeds = {"input_ids": ids, **dict(zip(self._past_names, past))}
        out = self._session("decoder").run(["logits", *self._present_names], feeds)
        return out[0], out[1:]

    # --- the Transformer's calling convention: forward, and the decode step of openllm_ds.model.generate ----
    def __call__(self, idx: torch.Tensor, targets=None):
        if targets is not None:
            raise ValueError("OnnxCausalLM computes no loss")
        return torch.from_numpy(self.logits(idx.numpy()))

    def new_kv_cache(self, batch: int, device) -> PastCache:
        return PastCache(self.empty_past(batch))

    def decode_step(self, idx: torch.Tensor, cache: PastCache) -> torch.Tensor:
        """The logits (B, 1, V) of the position after ``idx``; decoder_with_past's present becomes the past."""
        logits, cache.past = self.decode(idx.numpy(), cache.past)
        return torch.from_numpy(logits[:, -1:])

    def eval(self):
        return self

    def train(self, mode: bool = True):
        if mode:
            raise ValueError("an ONNX model cannot be trained")
        return self
