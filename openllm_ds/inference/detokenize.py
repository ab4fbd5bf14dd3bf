"""Detokenisation: the text a completion adds after its prompt, token by token (``Choice``), with stop strings.

``Choice`` is what every generation of the package hands out text through (the server, ``openllm_ds.load``,
``openllm-ds generate``): the completion's first space survives (the prompt's last tokens are decoded ahead of it),
a character split over byte pieces is held back until it is whole, and so is the start of a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from openllm_ds.tokenizer import Tokenizer

PROMPT_CONTEXT_TOKENS = 8  # prompt tokens decoded ahead of the completion, so its first space survives


class PieceTexts:
    """The text each normal piece adds after another normal piece, decoded once per id (``Choice``'s fast path).

    SentencePiece decodes a normal piece alike wherever it follows another piece; byte pieces (which join
    their neighbours into characters), control and unknown pieces have no entry (None).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._anchor = next(i for i in range(tokenizer.vocab_size) if self._normal(i))
        self._anchor_text = tokenizer.decode([self._anchor])
        self._texts: dict[int, str | None] = {}

    def _normal(self, token: int) -> bool:
        sp = self.tokenizer.sp
        return not (sp.is_control(token) or sp.is_unknown(token) or sp.is_byte(token) or sp.is_unused(token))

    def get(self, token: int) -> str | None:
        if token not in self._texts:
            self._texts[token] = (self.tokenizer.decode([self._anchor, token])[len(self._anchor_text):]
                                  if self._normal(token) else None)
        return self._texts[token]


@dataclass
class Choice:
    """One completion of one prompt, assembled token by token.

    Its text is what decoding the prompt's last tokens and all its ids at once gives, less the prompt's own
    text (which keeps the completion's first space). The text up to a normal piece is final, so a step decodes
    only the ids from the last normal piece on, and a normal piece right after another is one lookup.
    """

    index: int
    tokenizer: Tokenizer
    prompt_ids: list[int]
    stop: tuple[str, ...]
    pieces: PieceTexts | None = None  # shared by the completer's generations; one of its own if None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already handed out
    finish_reason: str | None = None
    num_tokens: int = 0

    def __post_init__(self):
        self.pieces = self.pieces or PieceTexts(self.tokenizer)
        self._context = self.prompt_ids[-PROMPT_CONTEXT_TOKENS:]
        self._context_text = self.tokenizer.decode(self._context)
        self._last: int | None = None  # index in ids of the last normal piece; the text up to it is final
        self._final = ""  # that text

    def add(self, token: int, eos_id: int) -> str:
        """Append a generated token; return the text that is now safe to hand out."""
        self.num_tokens += 1
        if token == eos_id:
            return self.finish("stop")
        self.ids.append(token)
        piece = self.pieces.get(token)
        if piece is not None and self._last == len(self.ids) - 2:
            self.text = self._final + piece
        else:
            self.text = self._decode()
        if piece is not None:
            self._last, self._final = len(self.ids) - 1, self.text
        if self.stop:
            hits = [k for k in (self.text.find(s) for s in self.stop) if k >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self.finish("stop")
        safe = len(self.text) - self._holdback()
        if safe <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:safe], safe
        return delta

    def _decode(self) -> str:
        """The text from SentencePiece: the ids from the last normal piece on (less that piece's own text) after the
        final text, else the context and all ids less the context's text."""
        decode = self.tokenizer.decode
        if self._last is not None:
            tail = self.ids[self._last:]
            return self._final + decode(tail)[len(decode(tail[:1])):]
        full = decode(self._context + self.ids)
        return full[len(self._context_text):] if full.startswith(self._context_text) else decode(self.ids)

    def _holdback(self) -> int:
        """Trailing characters that may still change: an incomplete UTF-8 sequence, a partial stop string."""
        text = self.text
        hold = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold

    def finish(self, reason: str) -> str:
        if self.finish_reason is None:
            self.finish_reason = reason
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


@dataclass
class StepUpdate:
    index: int
    text: str
    finish_reason: str | None


def continuation_text(tokenizer: Tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add after the whole prompt, with the space a word piece starts with (decoding the new
    ids alone would drop it): the harness tasks' measure of a continuation."""
    base = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(list(prompt_ids) + list(new_ids))
    return full[len(base):] if full.startswith(base) else tokenizer.decode(new_ids)
