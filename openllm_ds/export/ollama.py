"""A minimal Ollama ``Modelfile`` beside ``model.gguf``: ``FROM ./model.gguf``, the chat template in Ollama's Go
template syntax and EOS as the stop string.

Ollama cannot render the Jinja ``chat_template``; the Go template is derived from it by rendering conversations of
marker texts: a template that writes each message as (role prefix, content, role suffix) after a fixed head, and
the generation prompt at the end (ours, and most simple ones), becomes a ``range .Messages`` over those pieces.
The derived template is checked by rendering mixed conversations both ways; a template it cannot express (one that
reorders or inspects messages) leaves the Modelfile without ``TEMPLATE``, which Ollama then guesses from the
GGUF's own ``tokenizer.chat_template``. Ollama puts BOS (``</s>``) before the prompt itself, so a head that
starts with it drops it.

Ollama itself is not run here (see the README); llama-cpp-python, which uses the Jinja template, is.
"""

from __future__ import annotations

from pathlib import Path

from openllm_ds.tokenizer.chat import ChatTemplate
from openllm_ds.tokenizer.tokenizer import Tokenizer
from openllm_ds.utils import atomic_write_text

MODELFILE = "Modelfile"
ROLES = ("system", "user", "assistant")
MARKS = ("\x01A\x01", "\x01B\x01")


def message_pieces(render) -> tuple[str, dict[str, tuple[str, str]], str] | None:
    """(head, {role: (prefix, suffix)}, generation prompt) of a per-message template; None when it is not one.
    ``render(messages, add_generation_prompt)`` renders the Jinja template."""
    pieces, heads = {}, set()
    for role in ROLES:
        one = render([{"role": role, "content": MARKS[0]}], False)
        two = render([{"role": role, "content": MARKS[0]}, {"role": role, "content": MARKS[1]}], False)
        if one.count(MARKS[0]) != 1 or two.count(MARKS[0]) != 1 or two.count(MARKS[1]) != 1:
            return None
        left, suffix = one.split(MARKS[0])
        between = two.split(MARKS[0])[1].split(MARKS[1])[0]
        if not between.startswith(suffix):
            return None
        prefix = between[len(suffix):]
        if not left.endswith(prefix):
            return None
        heads.add(left[: len(left) - len(prefix)])
        pieces[role] = (prefix, suffix)
    if len(heads) != 1:
        return None
    head = heads.pop()
    last = [{"role": "user", "content": MARKS[0]}]
    without, with_prompt = render(last, False), render(last, True)
    if not with_prompt.startswith(without):
        return None
    return head, pieces, with_prompt[len(without):]


def python_render(head: str, pieces: dict[str, tuple[str, str]], prompt: str, messages: list[dict]) -> str:
    """What the Go template renders (with the generation prompt)."""
    return head + "".join(pieces[m["role"]][0] + m["content"] + pieces[m["role"]][1] for m in messages) + prompt


def go_template(render, bos: str) -> str | None:
    """The Ollama TEMPLATE for the Jinja template ``render`` renders; None when none expresses it."""
    found = message_pieces(render)
    if found is None:
        return None
    head, pieces, prompt = found
    checks = ([{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
               {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}],
              [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}])
    if any(render(list(c), True) != python_render(head, pieces, prompt, list(c)) for c in checks):
        return None
    texts = [head, prompt, *[p for pair in pieces.values() for p in pair]]
    if any("{{" in t or "}}" in t or '"""' in t for t in texts):
        return None
    branches = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{pre}{{{{ .Content }}}}{post}'
                       for i, (role, (pre, post)) in enumerate(pieces.items()))
    return f"{head.removeprefix(bos)}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{prompt}"


def write_modelfile(out: Path, chat: ChatTemplate | None, tokenizer: Tokenizer) -> bool:
    """Write ``out/Modelfile``; True when it has a TEMPLATE."""
    eos = tokenizer.sp.id_to_piece(tokenizer.eos_id)
    lines = ["# Ollama: ollama create NAME -f Modelfile (in this directory), then ollama run NAME", "FROM ./model.gguf"]
    template = None
    if chat is not None:
        template = go_template(chat.render, chat.tokens["bos_token"])
        if template is None:
            lines.append("# the model's chat_template has no Go translation here: Ollama reads model.gguf's own")
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    lines.append(f'PARAMETER stop "{eos}"')
    atomic_write_text(out / MODELFILE, "\n".join(lines) + "\n")
    return template is not None
