"""OpenAI API request validation and response bodies for /v1/completions and /v1/chat/completions.

Every bad field becomes an ``APIError`` (HTTP 4xx, OpenAI's ``{"error": {...}}`` body) that names
the parameter, before any generation starts. Unknown parameters are refused as OpenAI refuses them.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from openllm_ds.serve.engine import CompletionEngine, SamplingParams

MAX_N = 16
MAX_STOP = 4
MAX_STOP_CHARS = 256  # a stop string is matched against the text at every token: keep that cheap
MAX_PROMPTS = 16
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Accepted only at their neutral value: this server does not implement them.
NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (False,), "top_logprobs": (0,),
           "echo": (False,), "best_of": (1,), "logit_bias": ({},), "suffix": ("",), "tools": ([],), "functions": ([],),
           "tool_choice": ("none", "auto"), "function_call": ("none", "auto"), "modalities": (["text"],)}
# Accepted and ignored (they do not change the answer), if of the right type.
IGNORED = {"user": str, "metadata": dict, "store": bool, "service_tier": str, "parallel_tool_calls": bool,
           "safety_identifier": str, "prompt_cache_key": str}
COMMON_KEYS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
               "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", *IGNORED}
KNOWN_KEYS = {
    "completion": COMMON_KEYS | {"prompt", "suffix", "echo", "best_of"},
    "chat": COMMON_KEYS | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
                           "functions", "function_call", "modalities"},
}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class GenerationRequest:
    kind: str  # "completion" or "chat"
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(key, f"'{key}' must be a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise bad(key, f"'{key}' must be a finite number, got {v}")
    if v > hi or v < lo or (lo_open and v == lo):
        raise bad(key, f"'{key}' must be {'>' if lo_open else '>='} {lo:g} and <= {hi:g}, got {v}")
    return float(v)


def _integer(body: dict, key: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(key, f"'{key}' must be an integer, got {type(v).__name__}")
    if lo is not None and v < lo:
        raise bad(key, f"'{key}' must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise bad(key, f"'{key}' must be <= {hi}, got {v}")
    return v


def _check_model(body: dict, engine: CompletionEngine) -> None:
    model = body.get("model")
    if model is None:
        raise bad("model", "you must provide a model parameter")
    if not isinstance(model, str):
        raise bad("model", f"'model' must be a string, got {type(model).__name__}")
    if model != engine.model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{engine.model_name}'",
                       param="model", code="model_not_found")


def _check_keys(body: dict, kind: str) -> None:
    unknown = [k for k in body if k not in KNOWN_KEYS[kind]]
    if unknown:
        raise bad(unknown[0], f"Unrecognized request argument supplied: {unknown[0]}", code="unknown_parameter")
    for key, typ in IGNORED.items():
        v = body.get(key)
        if v is not None and (not isinstance(v, typ) or (typ is not bool and isinstance(v, bool))):
            raise bad(key, f"'{key}' must be a {typ.__name__}, got {type(v).__name__}")


def _check_unsupported(body: dict) -> None:
    for key, neutral in NEUTRAL.items():
        v = body.get(key)
        if v is not None and not any(v == n and type(v) is type(n) for n in neutral):
            raise bad(key, f"'{key}' is not supported by this server (leave it unset)")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad("response_format", "only response_format {'type': 'text'} is supported")


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "'stop' must be a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise bad("stop", f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}")
    if any(s == "" for s in stops):
        raise bad("stop", "'stop' strings must not be empty")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad("stop", f"'stop' strings may be at most {MAX_STOP_CHARS} characters long")
    return tuple(stops)


def _prompts(body: dict, engine: CompletionEngine) -> list[list[int]]:
    v = body.get("prompt")
    if v is None:
        raise bad("prompt", "you must provide a prompt")
    vocab = engine.lm.cfg.vocab_size

    def ids_ok(x) -> bool:
        return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in x)

    if isinstance(v, list) and len(v) > MAX_PROMPTS and not ids_ok(v):
        raise bad("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
    if isinstance(v, str):
        prompts = [engine.encode(v)]
    elif isinstance(v, list) and v and all(isinstance(p, str) for p in v):
        prompts = [engine.encode(p) for p in v]
    elif ids_ok(v) and v:
        prompts = [list(v)]
    elif isinstance(v, list) and v and all(ids_ok(p) for p in v):
        prompts = [list(p) for p in v]
    else:
        raise bad("prompt", f"'prompt' must be a string, a list of strings, or token ids in [0, {vocab})")
    if len(prompts) > MAX_PROMPTS:
        raise bad("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
    return prompts


def _messages(body: dict) -> list[dict]:
    v = body.get("messages")
    if not isinstance(v, list) or not v:
        raise bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in CHAT_ROLES:
            raise bad(f"messages[{i}]", f"messages[{i}] needs a role of {', '.join(CHAT_ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise bad(f"messages[{i}].content", "only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string")
        out.append({"role": CHAT_ROLES[m["role"]], "content": content})
    return out


def parse_request(body, engine: CompletionEngine, kind: str) -> GenerationRequest:
    """Validate a completions ("completion") or chat completions ("chat") request body."""
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    _check_model(body, engine)
    _check_keys(body, kind)
    _check_unsupported(body)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream", "'stream' must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad("stream_options", "'stream_options' must be an object like {\"include_usage\": true}")
    if kind == "chat":
        from openllm_ds.errors import UserError

        messages = _messages(body)
        try:
            prompt_text = engine.render_chat(messages)
        except UserError as e:
            raise bad("messages", str(e)) from None
        except Exception as e:  # a template's raise_exception(), or a jinja error on these messages
            raise bad("messages", f"the chat template cannot render these messages: {e}") from None
        prompts = [engine.encode(prompt_text)]
        max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        _integer(body, "max_tokens", None, lo=1)  # checked even when max_completion_tokens wins
    else:
        prompts = _prompts(body, engine)
        max_key = "max_tokens"
    max_tokens = _integer(body, max_key, None, lo=1)
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise bad("prompt", "the prompt is empty: it must hold at least one token")
    room = engine.max_length - longest
    if room < 1:
        raise bad("messages" if kind == "chat" else "prompt",
                  f"This model's maximum context length is {engine.max_length} tokens; the prompt has {longest} tokens "
                  "and leaves no room for a completion. Shorten the prompt.", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = room if kind == "chat" else min(DEFAULT_COMPLETION_TOKENS, room)
    elif max_tokens > room:
        raise bad(max_key, f"This model's maximum context length is {engine.max_length} tokens. However, you requested "
                           f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} in the completion). "
                           "Reduce the prompt or the completion length.", code="context_length_exceeded")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        n=_integer(body, "n", 1, lo=1, hi=MAX_N),
        stop=_stop(body),
        seed=_integer(body, "seed", None, *SEED_RANGE),
    )
    return GenerationRequest(kind, prompts, params, stream, bool(options.get("include_usage", False)) and stream)


# --- responses ------------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_body(req: GenerationRequest, rid: str, created: int, model: str, texts: list[str],
                  reasons: list[str], prompt_tokens: int, completion_tokens: int) -> dict:
    if req.kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(req: GenerationRequest, rid: str, created: int, model: str, index: int, text: str | None,
               finish_reason: str | None, first: bool = False) -> dict:
    if req.kind == "chat":
        delta = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def usage_chunk(req: GenerationRequest, rid: str, created: int, model: str, prompt_tokens: int,
                completion_tokens: int) -> dict:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def now() -> int:
    return int(time.time())
