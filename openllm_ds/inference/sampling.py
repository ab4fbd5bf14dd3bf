"""Sampling parameters: one set of ranges and one check, which the built-in server's requests, ``openllm-ds
generate``, ``openllm_ds.load(...).generate`` and the harness tasks all go through (``SamplingParams``).

=====================  ==========================================  ==================================
parameter              range                                       as in
=====================  ==========================================  ==================================
max_tokens             an integer >= 1 (the server also: fits       OpenAI (``max_tokens``)
                       the context; generate and the API stop at
                       the context's end)
temperature            a number in [0, 2]; 0 is greedy              OpenAI
top_p                  a number in (0, 1]                           OpenAI
top_k                  an integer >= 0; 0 keeps every token         vLLM, transformers
repetition_penalty     a finite number > 0; 1 is none               vLLM, transformers
n                      an integer in [1, 16]                        OpenAI (at most 16 here)
stop                   up to 4 non-empty strings of <= 256           OpenAI
                       characters (one string: one stop)
seed                   an integer in [-2^63, 2^64 - 1], or none     vLLM, torch.Generator.manual_seed
=====================  ==========================================  ==================================

Every value in these ranges generates: ``openllm_ds.model.sample_next`` keeps the logits finite whatever the
temperature and penalty (so no NaN reaches the sampler). A value outside them is a ``SamplingError`` naming the
parameter as the caller spells it (``--max_new_tokens`` in the CLI, ``max_new_tokens`` in the API, ``max_tokens``
over HTTP, where it is a 400).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from openllm_ds.errors import UserError
from openllm_ds.text import check_text, type_name

MAX_N = 16
MAX_STOP = 4
MAX_STOP_CHARS = 256  # a stop string is matched against the text at every token: keep that cheap
MAX_TEMPERATURE = 2.0
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes


class SamplingError(UserError):
    """A sampling parameter outside its range: ``param`` is its name in ``SamplingParams``."""

    def __init__(self, param: str, message: str, name: str | None = None):
        super().__init__(f"{name or param}{'' if message.startswith('[') else ' '}{message}")
        self.param, self.message = param, message  # message: "must be ...", or "[1] must be ..." for an item

    def named(self, names: Mapping[str, str]) -> SamplingError:
        """The same error naming the parameter as a caller spells it (``{"max_tokens": "--max_length"}``)."""
        return SamplingError(self.param, self.message, names.get(self.param))


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else type_name(value)


def _integer(name: str, value: Any, low: int, high: int | None, rule: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        raise SamplingError(name, f"must be {rule}, got {_shown(value)}")
    return value


def _number(name: str, value: Any, ok, rule: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not ok(value):
        raise SamplingError(name, f"must be {rule}, got {_shown(value)}")
    return float(value)


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)):
        raise SamplingError("stop", f"must be a string or a list of strings, got {type_name(value)}")
    if len(stops) > MAX_STOP:
        raise SamplingError("stop", f"takes at most {MAX_STOP} strings, got {len(stops)}")
    for i, s in enumerate(stops):
        try:
            check_text(s, "")
        except UserError as e:
            raise SamplingError("stop", f"[{i}]{e}") from None
        if not s or len(s) > MAX_STOP_CHARS:
            raise SamplingError("stop", f"[{i}] must be a non-empty string of at most {MAX_STOP_CHARS} characters, "
                                        f"got {len(s)} characters")
    return tuple(stops)


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a prompt. Built only through its checks: a value outside the ranges above is a
    SamplingError; ``stop`` becomes a tuple, the numbers floats."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        put = object.__setattr__
        _integer("max_tokens", self.max_tokens, 1, None, "an integer >= 1")
        put(self, "temperature", _number("temperature", self.temperature, lambda t: 0 <= t <= MAX_TEMPERATURE,
                                         f"a number in [0, {MAX_TEMPERATURE:g}] (0: greedy)"))
        put(self, "top_p", _number("top_p", self.top_p, lambda p: 0 < p <= 1, "a number in (0, 1]"))
        _integer("top_k", self.top_k, 0, None, "an integer >= 0 (0: every token)")
        put(self, "repetition_penalty", _number("repetition_penalty", self.repetition_penalty, lambda r: r > 0,
                                                "a finite number > 0 (1: no penalty)"))
        _integer("n", self.n, 1, MAX_N, f"an integer in [1, {MAX_N}]")
        put(self, "stop", _stops(self.stop))
        if self.seed is not None:
            _integer("seed", self.seed, *SEED_RANGE, "an integer in [-2^63, 2^64 - 1] (unset: a random seed)")

    @classmethod
    def build(cls, names: Mapping[str, str] | None = None, **values) -> SamplingParams:
        """``SamplingParams(**values)``, its errors naming each parameter as ``names`` maps it (a CLI flag)."""
        try:
            return cls(**values)
        except SamplingError as e:
            raise e.named(names or {}) from None

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)
