"""Stages 3-4: train the transformer with DeepSpeed (one process, the deepspeed launcher, or Ray Train).

``train(cfg)`` is the one loop every launcher runs; ``launch(cfg)`` is what ``openllm-ds train``
calls; ``build_ds_config`` turns a base ds_configs/*.json into the engine's config.
"""

from openllm_ds.train.ds_config import build_ds_config
from openllm_ds.train.launch import launch
from openllm_ds.train.loop import TrainingError, train

__all__ = ["train", "launch", "build_ds_config", "TrainingError"]
