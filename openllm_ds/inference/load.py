"""Trained weights -> a ``Completer``: the one loader of the generation path (``openllm_ds.load``, the built-in
server, ``openllm-ds generate``).

The torch backend runs on ``utils.select_device()`` (CUDA when visible) in the weights' own dtype, as every reader of
the package does, so the server, the API and ``generate`` agree on a GPU box. The onnx backend runs an ONNX export on
onnxruntime; given anything else it composes an export to ONNX (``export.temporary_export``) with the load, and the
completer removes that temporary export when it closes.
"""

from __future__ import annotations

from pathlib import Path

from openllm_ds.errors import UserError
from openllm_ds.inference.completer import Completer, default_threads
from openllm_ds.paths import check_path
from openllm_ds.utils import select_device

BACKENDS = ("torch", "onnx")


def load_completer(model_dir: str | Path, backend: str = "torch", context_length: int = 512,
                   model_name: str | None = None, max_concurrency: int = 4, num_threads: int | None = None,
                   step: int | None = None) -> Completer:
    """A completer over a training output (``step``: a checkpoint of it, default the latest), a step dir or any
    export (``openllm_ds.checkpoint.load_model``). Its generations run with ``num_threads`` intra-op threads
    (default: the cores shared out among the ``max_concurrency`` generations that will run at once)."""
    from openllm_ds.checkpoint import is_onnx_export, load_model
    from openllm_ds.tokenizer.chat import load_chat_template

    path = check_path(model_dir, "--model_dir", "dir", "export a model first (openllm-ds export --format huggingface)")
    if max_concurrency < 1:
        raise UserError(f"--max_concurrency must be >= 1, got {max_concurrency}")
    if num_threads is not None and num_threads < 1:
        raise UserError(f"--num_threads must be >= 1, got {num_threads}")
    if backend not in BACKENDS:
        raise UserError(f"--backend must be torch or onnx, got {backend!r}")
    threads = num_threads or default_threads(max_concurrency)
    name = model_name or path.resolve().name
    on_close = []
    if backend == "onnx" and not is_onnx_export(path):
        from openllm_ds.export import temporary_export

        path, remove = temporary_export(path, "onnx", checkpoint=step)
        on_close.append(remove)
        step = None  # the export holds that step's weights
    try:
        device = select_device() if backend == "torch" else "cpu"
        loaded = load_model(path, step=step, device=device, backend=backend, num_threads=threads)
        completer = Completer(loaded.model, loaded.tokenizer, name, context_length,
                              load_chat_template(loaded.tokenizer_dir, loaded.tokenizer), backend=backend,
                              num_threads=threads)
    except BaseException:
        for fn in on_close:
            fn()
        raise
    completer.on_close += on_close
    return completer
