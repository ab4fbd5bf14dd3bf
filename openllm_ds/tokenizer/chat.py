"""Chat messages -> text, with the chat_template of the model's tokenizer_config.json: one renderer for serving,
``openllm_ds.load(...).chat`` and training on conversations, so a served model sees the prompt it was trained on.

Text -> ids: ``SpecialTokens.encode`` is the one rule (special-token text such as "</s>" is its id, as transformers
and vLLM map it; the rest SentencePiece's ids), used by the server's prompts and by ``encode_conversation``, which
gives a conversation's ids with its training labels: the loss covers every assistant turn's content and the EOS that
closes it, nothing else.

The template is rendered with jinja2's sandbox as transformers' ``apply_chat_template`` does
(jinja2 comes with PyTorch). Without jinja2 our own template (the tokenizer stage's CHAT_TEMPLATE)
is rendered by a small Python equivalent; any other template then needs jinja2.
"""

from __future__ import annotations

import re
from pathlib import Path

from openllm_ds.errors import UserError
from openllm_ds.tokenizer.hf_files import CHAT_TEMPLATE
from openllm_ds.text import check_text
from openllm_ds.tokenizer.tokenizer import Tokenizer
from openllm_ds.utils import read_json, read_text

IGNORE_INDEX = -100  # a label the loss skips (the model's cross-entropy ignores it)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # OpenAI's -> ours


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "<s>", eos_token: str = "</s>", pad_token: str = "<pad>",
                 unk_token: str = "<unk>"):
        self.source = source
        self.tokens = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
        self._template = _compile(source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            return _render_builtin(messages, add_generation_prompt, self.tokens["bos_token"], self.tokens["eos_token"])
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens)


def _compile(source: str):
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        if source != CHAT_TEMPLATE:
            raise UserError("the model's chat_template needs jinja2 to render (pip install jinja2)") from None
        return None

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise UserError(f"the chat_template in tokenizer_config.json does not compile: {e}") from None


def _render_builtin(messages: list[dict], add_generation_prompt: bool, bos: str, eos: str) -> str:
    """The tokenizer stage's CHAT_TEMPLATE, rendered without jinja2."""
    parts = [bos]
    for m in messages:
        if m["role"] == "system":
            parts.append(f"{m['content']}\n\n")
        elif m["role"] == "user":
            parts.append(f"User: {m['content']}\n")
        elif m["role"] == "assistant":
            parts.append(f"Assistant: {m['content']}{eos}")
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


def check_messages(messages, name: str = "messages") -> list[dict]:
    """A conversation as the renderer takes it: a non-empty list of {role, content} (roles of ``ROLES``, content
    text), each a UserError naming ``name[i]`` otherwise."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError(f"{name} must be a non-empty list of {{role, content}} dicts, got {messages!r:.60}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise UserError(f"{name}[{i}] needs a role of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise UserError(f"{name}[{i}].content must be a string")
        out.append({"role": ROLES[m["role"]], "content": check_text(m["content"], f"{name}[{i}].content")})
    return out


def render_conversation(messages: list[dict], add_generation_prompt: bool = True,
                        template: ChatTemplate | None = None) -> str:
    """The text of a conversation (``[{"role": "user", "content": ...}, ...]``) by ``template``, or by the tokenizer
    stage's CHAT_TEMPLATE (what every tokenizer of ours writes into tokenizer_config.json) with its default tokens;
    with ``add_generation_prompt`` it ends where the assistant's answer starts."""
    return (template or ChatTemplate(CHAT_TEMPLATE)).render(messages, add_generation_prompt)


def load_chat_template(tokenizer_dir: str | Path, tokenizer: Tokenizer) -> ChatTemplate | None:
    """The chat template of tokenizer_config.json (or chat_template.jinja); None when there is none."""
    d = Path(tokenizer_dir)
    cfg_file = d / "tokenizer_config.json"
    cfg = read_json(cfg_file, "re-export the model, or fix its chat_template", expect=dict) if cfg_file.is_file() else {}
    source = cfg.get("chat_template")
    if isinstance(source, list):  # the named-templates form: [{"name": "default", "template": ...}]
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if not source and (d / "chat_template.jinja").is_file():
        source = read_text(d / "chat_template.jinja", "re-export the model, or fix its chat template")
    if not source:
        return None
    if not isinstance(source, str):
        raise UserError(f"{cfg_file}: chat_template must be a string (a Jinja template), not {type(source).__name__}; "
                        "re-export the model, or fix its chat_template")
    sp = tokenizer.sp
    return ChatTemplate(
        source,
        bos_token=_token(cfg, "bos_token", sp.id_to_piece(tokenizer.bos_id)),
        eos_token=_token(cfg, "eos_token", sp.id_to_piece(tokenizer.eos_id)),
        pad_token=_token(cfg, "pad_token", sp.id_to_piece(tokenizer.pad_id) if tokenizer.pad_id >= 0 else "<pad>"),
        unk_token=_token(cfg, "unk_token", sp.id_to_piece(tokenizer.unk_id)),
    )


def _token(cfg: dict, key: str, default: str) -> str:
    v = cfg.get(key, default)
    return v.get("content", default) if isinstance(v, dict) else str(v)


class SpecialTokens:
    """The tokenizer's special tokens by their text ("<s>" -> 1, "</s>" -> 2, ...), and ``encode``: text -> ids with
    those texts as their ids."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        ids = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id)
        self.ids = {tokenizer.sp.id_to_piece(i): i for i in ids if i >= 0}
        # longest first, so that one special token that starts another never wins over it
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.ids, key=len, reverse=True)) + ")")

    def encode(self, text: str) -> list[int]:
        """One pass over the text (a prompt of 250,000 "</s>" is as cheap as any other megabyte)."""
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:  # the split's captured separators: special tokens
                ids.append(self.ids[part])
            elif part:
                ids += self.tokenizer.encode(part)
        return ids

    def encode_with_starts(self, text: str) -> tuple[list[int], list[int]]:
        """``encode``'s ids, and where each token starts in ``text`` (a character offset)."""
        ids: list[int] = []
        starts: list[int] = []
        pos = 0
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self.ids[part])
                starts.append(pos)
            elif part:
                raw = part.encode("utf-8")
                proto = self.tokenizer.sp.encode(check_text(part, "text"), return_type="proto")
                for piece in proto.pieces:
                    ids.append(piece.id)
                    starts.append(pos + len(raw[:piece.begin].decode("utf-8", "ignore")))
            pos += len(part)
        return ids, starts


def encode_conversation(messages: list[dict], template: ChatTemplate, special: SpecialTokens
                        ) -> tuple[list[int], list[int]]:
    """(ids, labels) of a whole conversation as ``template`` renders it (no generation prompt): the ids are those
    of the rendered text, as the server and transformers tokenise it; ``labels[i]`` is ``ids[i]`` where token ``i``
    belongs to an assistant turn's answer (its content and the EOS that closes it), else IGNORE_INDEX (the BOS, the
    system and user turns, the "Assistant:" prefixes). A label is the target at its own position: shift by one
    for next-token prediction. A template whose earlier turns are not a prefix of the whole is a UserError."""
    text = template.render(messages, add_generation_prompt=False)
    spans = []  # (start, end) of each answer in ``text``
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True) if i else None
        upto = template.render(messages[:i + 1], add_generation_prompt=False)
        if before is None or not upto.startswith(before) or not text.startswith(upto):
            raise UserError("the chat template does not render a conversation turn by turn (each turn's text a prefix "
                            "of the next), so its answers cannot be told apart for training; use the tokenizer "
                            "stage's template (tokenizer_config.json's chat_template)")
        spans.append((len(before), len(upto)))
    ids, starts = special.encode_with_starts(text)
    labels = [IGNORE_INDEX] * len(ids)
    k = 0
    for j, s in enumerate(starts):
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        if k < len(spans) and spans[k][0] <= s:
            labels[j] = ids[j]
    return ids, labels
