"""``launch(cfg)``: this process (alone or under the deepspeed launcher) or Ray Train workers."""

from __future__ import annotations

import os

from openllm_ds.config import RunConfig
from openllm_ds.errors import ConfigError


def launch(cfg: RunConfig) -> dict:
    """``train.num_workers > 0``: that many DeepSpeed workers under Ray Train; else ``train(cfg)`` here."""
    if cfg.train.num_workers > 0:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"train.num_workers={cfg.train.num_workers} starts Ray Train workers, but this process "
                              "is already one of several ranks (deepspeed launcher); drop --num_workers there")
        from openllm_ds.train.ray_launcher import train_with_ray

        return train_with_ray(cfg)
    from openllm_ds.train.loop import train

    return train(cfg)
