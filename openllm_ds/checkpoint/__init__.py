"""The read side: every on-disk layout of trained weights (layout.py), reading their tensors safely (weights.py),
and one loader for all of them (loader.py; ONNX exports run on onnxruntime through onnx.py).

    from openllm_ds.checkpoint import load_model
    loaded = load_model("models/tiny")  # a training output, a step dir, a ZeRO tag, an HF/PyTorch/ONNX export
    loaded.model, loaded.tokenizer, loaded.model_config, loaded.step, loaded.kind, loaded.path

Training writes checkpoints (train/checkpointing.py) and export writes exports (export/); both name their files
with layout.py's names.
"""

from openllm_ds.checkpoint.layout import (ANY_STEP_DIR, CHECKPOINTS, EXPORT_INFO, HF_INDEX, LATEST, PYTORCH_WEIGHTS,
                                          RUN_OUTPUTS, STEP_DIR, TRAIN_STATE, WEIGHTS, checkpoint_step, is_export_file,
                                          is_hf_export, is_onnx_export, is_pytorch_export, list_checkpoints,
                                          read_latest, read_train_state, resolve_checkpoint, step_tag)
from openllm_ds.checkpoint.loader import LoadedModel, WeightsSource, load_model, weights_source
from openllm_ds.checkpoint.weights import load_hf_weights, load_state_dict, refusing_pickled_code, weights_only_loads

__all__ = [
    "ANY_STEP_DIR", "CHECKPOINTS", "EXPORT_INFO", "HF_INDEX", "LATEST", "PYTORCH_WEIGHTS", "RUN_OUTPUTS", "STEP_DIR",
    "TRAIN_STATE", "WEIGHTS", "checkpoint_step", "is_export_file", "is_hf_export", "is_onnx_export", "is_pytorch_export",
    "list_checkpoints", "read_latest", "read_train_state", "resolve_checkpoint", "step_tag", "LoadedModel", "WeightsSource",
    "load_model", "weights_source", "load_hf_weights", "load_state_dict", "refusing_pickled_code",
    "weights_only_loads",
]
