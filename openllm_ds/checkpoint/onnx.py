"""Run an ONNX export with onnxruntime: full-sequence logits and KV-cache generation.

The export holds one graph in optimum's layout (see export/onnx.py), ``model.onnx``: ``input_ids`` (batch,
sequence), ``attention_mask`` (batch, past + sequence), ``position_ids`` (batch, sequence) and
``past_key_values.{i}.key|value`` (batch, kv_heads, past, head_dim) -> ``logits`` and ``present.{i}.key|value``
(batch, kv_heads, past + sequence, head_dim). A past of length 0 is the prefill step; our own callers pad nothing,
so their mask is all ones and their positions follow the past.

``OnnxCausalLM`` is called like our ``Transformer`` (``lm(idx)``, ``lm.decode_step(idx, cache)``), so
generation runs ``openllm_ds.model.generate``, the torch backend's own loop and sampling code, on onnxruntime's logits.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from openllm_ds.checkpoint.layout import ONNX_MODEL, ONNX_VARIANTS, is_onnx_export, past_names, present_names
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
    """The graph's key/value inputs, flat per layer, replaced by its outputs at each step."""

    def __init__(self, past: list[np.ndarray]):
        self.past = past


class OnnxCausalLM:
    """An ONNX export on onnxruntime with the calling convention of ``Transformer``."""

    training = False

    def __init__(self, export_dir: str | Path, variant: str = "auto", num_threads: int | None = None,
                 spinning: bool = False):
        import onnxruntime as ort

        from openllm_ds.model.hf_map import from_hf_config

        self.dir = Path(export_dir)
        if not is_onnx_export(self.dir):
            raise UserError(f"{self.dir} is not an ONNX export (needs {ONNX_MODEL} and config.json); "
                            "run `openllm-ds export --format onnx` first")
        if variant == "auto":
            variant = "optimized" if (self.dir / ONNX_VARIANTS["optimized"]).is_file() else "fp32"
        if variant not in ONNX_VARIANTS:
            raise UserError(f"ONNX variant must be auto, {', '.join(ONNX_VARIANTS)}; got {variant!r}")
        if not (self.dir / ONNX_VARIANTS[variant]).is_file():
            raise UserError(f"{self.dir} has no {ONNX_VARIANTS[variant]}; export with --optimize_for_inference / "
                            "--quantize_int8")
        self.variant = variant
        config = self.dir / "config.json"
        self.cfg = from_hf_config(read_json(config, "re-export the model (--format onnx)", expect=dict), str(config))
        self.num_threads = num_threads  # intra-op threads of the session (None: onnxruntime's default)
        self._options = session_options(num_threads, spinning)
        self._ort = ort
        self._session_obj = None
        self._lock = threading.Lock()
        self._past_names = past_names(self.cfg.n_layers)
        self._present_names = present_names(self.cfg.n_layers)

    def _session(self):
        with self._lock:  # created once, on first use; InferenceSession.run itself is thread-safe
            if self._session_obj is None:
                self._session_obj = self._ort.InferenceSession(str(self.dir / ONNX_VARIANTS[self.variant]),
                                                               self._options, providers=["CPUExecutionProvider"])
            return self._session_obj

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.cfg.num_kv_heads, 0, self.cfg.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in self._past_names]

    def decode(self, input_ids, past: list[np.ndarray], attention_mask=None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call of the graph: (logits (B, T, V), present key/values, flat per layer). Without ``attention_mask``
        nothing is padding; positions follow each row's unpadded tokens."""
        ids = np.asarray(input_ids, dtype=np.int64)
        B, T = ids.shape
        P = past[0].shape[2]
        mask = np.ones((B, P + T), dtype=np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, P:]  # all ones: P, P + 1, ...
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.ascontiguousarray(positions),
                 **dict(zip(self._past_names, past))}
        out = self._session().run(["logits", *self._present_names], feeds)
        return out[0], out[1:]

    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """(B, T) ids (``attention_mask``: 0 marks left padding) -> (B, T, V) logits, from an empty past."""
        ids = np.asarray(input_ids, dtype=np.int64)
        return self.decode(ids, self.empty_past(ids.shape[0]), attention_mask)[0]

    # --- the Transformer's calling convention: forward, and the decode step of openllm_ds.model.generate ----
    def __call__(self, idx: torch.Tensor, targets=None):
        if targets is not None:
            raise ValueError("OnnxCausalLM computes no loss")
        return torch.from_numpy(self.logits(idx.numpy()))

    def new_kv_cache(self, batch: int, device) -> PastCache:
        return PastCache(self.empty_past(batch))

    def decode_step(self, idx: torch.Tensor, cache: PastCache) -> torch.Tensor:
        """The logits (B, 1, V) of the position after ``idx``; the graph's present becomes the past."""
        logits, cache.past = self.decode(idx.numpy(), cache.past)
        return torch.from_numpy(logits[:, -1:])

    def eval(self):
        return self

    def train(self, mode: bool = True):
        if mode:
            raise ValueError("an ONNX model cannot be trained")
        return self
