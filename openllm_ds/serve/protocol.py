"""The OpenAI API's /v1/completions and /v1/chat/completions requests as pydantic models, and their answers.

A request body is validated by ``CompletionRequest`` / ``ChatCompletionRequest`` (strict types: ``"2"``
is not 2, ``true`` is not 1; unknown parameters refused as OpenAI refuses them), then checked against
the model (name, vocabulary, context length) by ``generation_request``: the sampling parameters through
``openllm_ds.inference.sampling.SamplingParams`` (the ranges ``openllm-ds generate`` and the Python API take too;
``top_k`` and ``repetition_penalty`` as vLLM's server takes them), every text through
``openllm_ds.text.check_text``. Every problem becomes an ``APIError``: an HTTP 4xx with OpenAI's
``{"error": {message, type, param, code}}`` body naming the parameter, before any generation starts.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from openllm_ds.errors import UserError
from openllm_ds.inference.sampling import SamplingError, SamplingParams
from openllm_ds.tokenizer.chat import ROLES
from openllm_ds.inference import Completer
from openllm_ds.text import check_text

MAX_PROMPTS = 16
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
CHAT_ROLES = ROLES  # the chat template's roles, OpenAI's names mapped to them
# Parameters this server does not implement: accepted only at their neutral value (of that exact type).
NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (False,), "top_logprobs": (0,),
           "echo": (False,), "best_of": (1,), "logit_bias": ({},), "suffix": ("",), "tools": ([],), "functions": ([],),
           "tool_choice": ("none", "auto"), "function_call": ("none", "auto"), "modalities": (["text"],)}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# --- request models ------------------------------------------------------------------------------

def _neutral(name: str, v):
    if v is not None and not any(v == n and type(v) is type(n) for n in NEUTRAL[name]):
        raise ValueError(f"'{name}' is not supported by this server (leave it unset)")
    return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Request(BaseModel):
    """The parameters both endpoints take."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    # the sampling parameters' types here; their ranges in openllm_ds.inference.sampling (one check for every caller)
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # vLLM's extension: 0 keeps every token
    repetition_penalty: float = 1.0  # vLLM's extension: 1 is none
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Any = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    logprobs: Any = None
    # accepted and ignored: they do not change the answer
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    @field_validator("temperature", "top_p", "top_k", "repetition_penalty", "n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, v, info: ValidationInfo):
        return cls.model_fields[info.field_name].default if v is None else v

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias", "logprobs")
    @classmethod
    def _only_neutral(cls, v, info: ValidationInfo):
        return _neutral(info.field_name, v)

    @field_validator("stream_options", mode="before")
    @classmethod
    def _options(cls, v):
        if v is not None and (not isinstance(v, dict) or not isinstance(v.get("include_usage", False), bool)):
            raise ValueError("'stream_options' must be an object like {\"include_usage\": true}")
        return v

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Request):
    """POST /v1/completions. ``prompt``: a string, a list of strings, token ids, or a list of token-id lists."""

    prompt: Any = Field(None, validate_default=True)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("echo", "best_of", "suffix")
    @classmethod
    def _only_neutral_here(cls, v, info: ValidationInfo):
        return _neutral(info.field_name, v)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v, info: ValidationInfo):
        vocab = (info.context or {}).get("vocab_size", 1 << 62)
        if v is None:
            raise ValueError("you must provide a prompt")

        def ids_ok(x) -> bool:
            return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab
                                               for i in x)

        if isinstance(v, str) or ids_ok(v) and v:
            return v
        if isinstance(v, list) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
        if isinstance(v, list) and v and (all(isinstance(p, str) for p in v) or all(ids_ok(p) for p in v)):
            return v
        raise ValueError(f"'prompt' must be a string, a list of strings, or token ids in [0, {vocab})")

    def prompt_list(self) -> list:
        """Strings and id lists, one per prompt."""
        p = self.prompt
        return [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: str

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, m):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in CHAT_ROLES:
            raise ValueError("{param} needs a role of " + ", ".join(CHAT_ROLES))
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ContentError("only text content parts are supported")
            m = {**m, "content": "".join(p["text"] for p in content)}
        elif not isinstance(content, str):
            raise ContentError("{param} must be a string")
        return {"role": CHAT_ROLES[m["role"]], "content": m["content"]}


class ContentError(ValueError):
    """A message's content is wrong: the error's param is messages[i].content."""


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] | None = None
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | None = None
    functions: list | None = None
    function_call: str | None = None
    modalities: list | None = None

    @field_validator("top_logprobs", "tools", "tool_choice", "functions", "function_call", "modalities")
    @classmethod
    def _only_neutral_here(cls, v, info: ValidationInfo):
        return _neutral(info.field_name, v)

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, v):
        if not isinstance(v, list) or not v:
            raise ValueError("'messages' must be a non-empty list of {role, content} objects")
        return v

    @field_validator("response_format")
    @classmethod
    def _format(cls, v):
        if v is not None and v != {"type": "text"}:
            raise ValueError("only response_format {'type': 'text'} is supported")
        return v


# --- pydantic's errors -> OpenAI's -------------------------------------------------------------------

_TYPE_WORDS = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
               "string_type": "a string", "bool_type": "true or false", "dict_type": "an object",
               "list_type": "a list", "model_type": "an object", "model_attributes_type": "an object"}
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
           "less_than": ("<", "lt")}


def _param(loc: tuple) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def api_error(e: ValidationError) -> APIError:
    """The first validation error as OpenAI words it."""
    err = e.errors(include_url=False)[0]
    kind, loc, value = err["type"], tuple(err["loc"]), err.get("input")
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, ContentError):
        loc = (*loc, "content")
    param = _param(loc)
    if kind == "extra_forbidden":
        return bad(param, f"Unrecognized request argument supplied: {param}", code="unknown_parameter")
    if kind == "missing":
        return bad(param, f"you must provide a {param} parameter")
    if kind in _TYPE_WORDS:
        return bad(param, f"'{param}' must be {_TYPE_WORDS[kind]}, got {type(value).__name__}")
    if kind == "finite_number":
        return bad(param, f"'{param}' must be a finite number, got {value}")
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        bound = err["ctx"][key]
        return bad(param, f"'{param}' must be {op} {f'{bound:g}' if isinstance(bound, float) else bound}, got {value}")
    if kind == "value_error" and cause is not None:
        return bad(param, str(cause).replace("{param}", str(param)))
    return bad(param, f"'{param}': {err['msg']}")


# --- a validated request, checked against the model ----------------------------------------------------

@dataclass
class GenerationRequest:
    kind: str  # "completion" or "chat"
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_request(body, completer: Completer, kind: str) -> GenerationRequest:
    """Validate a completions ("completion") or chat completions ("chat") body for ``completer``."""
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    model = CompletionRequest if kind == "completion" else ChatCompletionRequest
    try:
        req = model.model_validate(body, context={"vocab_size": completer.vocab_size})
    except ValidationError as e:
        raise api_error(e) from None
    return generation_request(req, completer)


def generation_request(req: CompletionRequest | ChatCompletionRequest, completer: Completer) -> GenerationRequest:
    if req.model != completer.model_name:
        raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{completer.model_name}'",
                       param="model", code="model_not_found")
    chat = isinstance(req, ChatCompletionRequest)
    max_key = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if max_key == "max_completion_tokens" else req.max_tokens
    # checked before any prompt is encoded (an unset max_tokens is set once the prompt's length is known)
    params = sampling_params(req, max_key, 1 if max_tokens is None else max_tokens)
    if chat:
        kind, prompt_param = "chat", "messages"
        if req.messages is None:
            raise bad("messages", "you must provide a messages parameter")
        for i, m in enumerate(req.messages):
            checked(m.content, f"messages[{i}].content")
        try:
            text = completer.render_chat([m.model_dump() for m in req.messages])
        except UserError as e:
            raise bad("messages", str(e)) from None
        except Exception as e:  # a template's raise_exception(), or a jinja error on these messages
            raise bad("messages", f"the chat template cannot render these messages: {e}") from None
        prompts = [completer.encode(text, add_prefix=False)]  # the template starts with the prefix itself
    else:
        kind, prompt_param = "completion", "prompt"
        named = (lambda i: f"prompt[{i}]") if isinstance(req.prompt, list) else (lambda i: "prompt")
        prompts = [completer.encode(checked(p, named(i), "prompt")) if isinstance(p, str) else list(p)
                   for i, p in enumerate(req.prompt_list())]
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise bad("prompt", "the prompt is empty: it must hold at least one token")
    room = completer.context_length - longest
    if room < 1:
        raise bad(prompt_param, f"This model's maximum context length is {completer.context_length} tokens; the prompt has "
                  f"{longest} tokens and leaves no room for a completion. Shorten the prompt.",
                  code="context_length_exceeded")
    if max_tokens is None:
        params = params.replace(max_tokens=room if kind == "chat" else min(DEFAULT_COMPLETION_TOKENS, room))
    elif max_tokens > room:
        raise bad(max_key, f"This model's maximum context length is {completer.context_length} tokens. However, you requested "
                           f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} in the completion). "
                           "Reduce the prompt or the completion length.", code="context_length_exceeded")
    return GenerationRequest(kind, prompts, params, req.stream, req.include_usage)


def sampling_params(req: CompletionRequest | ChatCompletionRequest, max_key: str, max_tokens: int) -> SamplingParams:
    """The request's sampling parameters through ``SamplingParams``' checks; a value out of range is a 400 naming it."""
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              repetition_penalty=req.repetition_penalty, n=req.n, stop=req.stop, seed=req.seed)
    except SamplingError as e:
        param = max_key if e.param == "max_tokens" else e.param
        raise bad(param, str(e.named({"max_tokens": max_key}))) from None


def checked(text: str, name: str, param: str | None = None) -> str:
    """A text of the request (``check_text``), or a 400 naming its field."""
    try:
        return check_text(text, name)
    except UserError as e:
        raise bad(param or name, str(e)) from None


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

