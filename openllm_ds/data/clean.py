"""Passage cleaning: one pure function applied to every SQuAD context (inside Ray Data workers).

``clean_passage(text)`` does three things, in this order:

1. Remove invisible characters, chosen by Unicode general category rather than by a hand list:
   ``Cc`` (control characters such as BEL or DEL) and ``Cf`` (format characters: zero-width space
   U+200B, zero-width non-joiner/joiner U+200C/U+200D, left-to-right/right-to-left marks
   U+200E/U+200F, byte-order mark U+FEFF, soft hyphen U+00AD, word joiner U+2060, ...), and ``Cs``
   (lone surrogates, which UTF-8 cannot encode). Characters that are whitespace (tab, newline,
   U+0085, ...) are kept for step 3. Format characters render as nothing, so removing them keeps the
   visible text; the joiners only change ligatures in some scripts (Persian, Devanagari), and in
   SQuAD they appear as artifacts around dashes, so they go too.
2. Unicode NFKC normalisation: compatibility forms become their plain equivalents (no-break and
   ideographic spaces become spaces, the ligature "ﬁ" becomes "fi", full-width letters become
   ASCII) and accents are composed ("e" + U+0301 becomes "é").
3. Collapse every run of whitespace (anything ``str.isspace``: spaces, tabs, newlines, carriage
   returns, line/paragraph separators) to one space and strip both ends.

The result holds no line break of any kind (``str.splitlines`` returns one line) and cleaning is
idempotent: ``clean_passage(clean_passage(t)) == clean_passage(t)``.
A passage's word count is the number of whitespace-separated tokens: ``len(text.split())``.
"""

from __future__ import annotations

import functools
import sys
import unicodedata

import numpy as np

INVISIBLE_CATEGORIES = ("Cc", "Cf", "Cs")


@functools.cache
def invisible_char_table() -> dict[int, None]:
    """``str.translate`` table deleting every non-whitespace character of INVISIBLE_CATEGORIES."""
    table = {}
    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        if unicodedata.category(ch) in INVISIBLE_CATEGORIES and not ch.isspace():
            table[cp] = None
    return table


def clean_passage(text: str) -> str:
    text = text.translate(invisible_char_table())
    text = unicodedata.normalize("NFKC", text)
    return " ".join(text.split())


def count_words(text: str) -> int:
    return len(text.split())


def clean_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: column ``context`` in, column ``text`` out.

    The ``file`` and ``index`` columns pass through so the driver can put every passage back in
    its place whatever order the batches come back in.
    """
    texts = [clean_passage(str(t)) for t in batch["context"]]
    return {
        "file": batch["file"],
        "index": batch["index"],
        "text": np.array(texts, dtype=object),
    }
