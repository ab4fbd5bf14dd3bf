"""Text at the boundary: every string a user hands in (the Python API's arguments, CLI arguments and environment
values, HTTP request fields, lines of text files) is checked by ``check_text`` before anything encodes it.

Text is a ``str`` that UTF-8 can encode and that holds no NUL character. Anything else stops with one line naming
the argument and what is wrong (a UserError; a 400 over HTTP), never a tokenizer's or encoder's traceback:

- not a string (None, a number, bytes, a list where one string is expected);
- a lone surrogate (U+D800-U+DFFF): from a JSON ``"\\ud800"`` escape, or from bytes that are not UTF-8, which
  Python hands over as U+DC80-U+DCFF (``surrogateescape``: command-line arguments, environment values, file
  names); the latter is named by its byte;
- a NUL character: what binary data holds, and what C strings (SentencePiece's among them) end at.
"""

from __future__ import annotations

import re
from typing import Any

from openllm_ds.errors import UserError

_SURROGATE = re.compile("[\ud800-\udfff]")


def type_name(value: Any) -> str:
    """How a value's type reads in a message: "None", "an int", "bytes", "a list"."""
    if value is None:
        return "None"
    name = type(value).__name__
    return name if name in ("bytes", "bytearray") else ("an " if name[0] in "aeiou" else "a ") + name


def _where(text: str, k: int) -> str:
    line = text.count("\n", 0, k)
    if not line:
        return f"at character {k}"
    return f"on line {line + 1}, character {k - text.rfind(chr(10), 0, k) - 1}"


def text_problem(text: str) -> str | None:
    """What makes the string ``text`` unusable as text, in words that follow its name; None when it is fine."""
    if text.isascii():
        k = text.find("\x00")
        return None if k < 0 else f"holds a NUL character {_where(text, k)}: text cannot hold NUL"
    m = _SURROGATE.search(text)
    if m:
        code = ord(m.group())
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: one byte that was not UTF-8
            return f"is not UTF-8 (byte 0x{code - 0xDC00:02x} {_where(text, m.start())}); pass UTF-8 text"
        return (f"holds an unpaired UTF-16 surrogate (U+{code:04X}) {_where(text, m.start())}, which is no "
                "character; pass valid Unicode text")
    k = text.find("\x00")
    return None if k < 0 else f"holds a NUL character {_where(text, k)}: text cannot hold NUL"


def check_text(value: Any, name: str) -> str:
    """``value`` when it is usable text; else a UserError "``name`` <what is wrong>". ``name`` is the argument,
    flag or field the value came from (``prompt``, ``--prompt``, ``texts[2]``)."""
    if not isinstance(value, str):
        hint = ": decode it first (bytes.decode('utf-8'))" if isinstance(value, (bytes, bytearray)) else ""
        raise UserError(f"{name} must be a string, got {type_name(value)}{hint}")
    problem = text_problem(value)
    if problem:
        raise UserError(f"{name} {problem}")
    return value


def check_texts(values: Any, name: str) -> list[str]:
    """A list (or tuple) of texts, each checked as ``name[i]``."""
    if not isinstance(values, (list, tuple)):
        raise UserError(f"{name} must be a list of strings, got {type_name(values)}")
    return [check_text(v, f"{name}[{i}]") for i, v in enumerate(values)]
