"""``launch(cfg)``: this process (alone or under the deepspeed launcher) or Ray Train workers; ``printed_summary``
reads back what such a run printed."""

from __future__ import annotations

import json

from openllm_ds.config import RunConfig
from openllm_ds.errors import ConfigError
from openllm_ds.settings import env_int


def check_launcher(cfg: RunConfig) -> None:
    """Ray Train's workers are not started from one of several ranks of the deepspeed launcher."""
    if cfg.train.num_workers > 0 and env_int("WORLD_SIZE", 1) > 1:
        raise ConfigError(f"train.num_workers={cfg.train.num_workers} starts Ray Train workers, but this process "
                          "is already one of several ranks (deepspeed launcher); drop --num_workers there")


def launch(cfg: RunConfig) -> dict:
    """``train.num_workers > 0``: that many DeepSpeed workers under Ray Train; else ``train(cfg)`` here."""
    check_launcher(cfg)
    if cfg.train.num_workers > 0:
        from openllm_ds.train.ray_launcher import train_with_ray

        return train_with_ray(cfg)
    from openllm_ds.train.loop import train

    return train(cfg)


def printed_summary(stdout: str) -> dict:
    """The JSON object ``openllm-ds`` printed last (train's summary, export's report: ``cli.main`` prints it indented,
    its opening brace alone on a line), from a stdout that may hold other lines before and after it: the deepspeed
    launcher logs ``Process N exits successfully.`` after rank 0's summary. ValueError when there is none."""
    starts, offset = [], 0
    for line in stdout.splitlines(keepends=True):
        if line.rstrip() == "{" or line.startswith('{"'):
            starts.append(offset)
        offset += len(line)
    for start in reversed(starts):
        try:
            value, _ = json.JSONDecoder().raw_decode(stdout, start)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    raise ValueError(f"no JSON object in the output ({len(stdout)} characters, ends {stdout[-200:]!r})")
