"""The chat template, rendered on the tokenizer side (tokenizer/chat.py): one renderer for serving, the Python API
and training on conversations."""

from __future__ import annotations

import pytest

from openllm_ds.errors import UserError
from openllm_ds.tokenizer import load_tokenizer
from openllm_ds.tokenizer.chat import ChatTemplate, check_messages, load_chat_template, render_conversation
from openllm_ds.tokenizer.hf_files import CHAT_TEMPLATE

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who were the Normans?"},
            {"role": "assistant", "content": "A people of Normandy."}, {"role": "user", "content": "When?"}]


def test_render_conversation_is_the_tokenizer_stage_template():
    assert render_conversation(MESSAGES, add_generation_prompt=True) == (
        "<s>Answer briefly.\n\nUser: Who were the Normans?\nAssistant: A people of Normandy.</s>User: When?\n"
        "Assistant:")
    assert render_conversation(MESSAGES[:3], add_generation_prompt=False) == (
        "<s>Answer briefly.\n\nUser: Who were the Normans?\nAssistant: A people of Normandy.</s>")


def test_a_models_template_renders_as_render_conversation(small_run):
    """tokenizer_config.json's template (what an export and the server use) with the model's own tokens."""
    tok = load_tokenizer(small_run / "tokenizer")
    template = load_chat_template(small_run / "tokenizer", tok)
    assert template.source == CHAT_TEMPLATE
    bos = tok.sp.id_to_piece(tok.bos_id)  # the prompt prefix: EOS, as in training (hf_files.apply_prompt_convention)
    for gen in (True, False):
        want = render_conversation(MESSAGES, gen, ChatTemplate(CHAT_TEMPLATE, bos_token=template.tokens["bos_token"]))
        assert template.render(MESSAGES, gen) == want == render_conversation(MESSAGES, gen, template)
    assert bos and template.render(MESSAGES[:1]).startswith(template.tokens["bos_token"])


@pytest.mark.parametrize("messages,error", [
    ([], r"messages must be a non-empty list"),
    ("hi", r"messages must be a non-empty list"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\] needs a role of system, developer, user, assistant"),
    ([{"role": "user", "content": 3}], r"messages\[0\]\.content must be a string"),
    ([{"role": "user", "content": "a\x00b"}], r"messages\[0\]\.content .*NUL"),
])
def test_check_messages_names_the_bad_one(messages, error):
    with pytest.raises(UserError, match=error):
        check_messages(messages)


def test_check_messages_maps_openai_roles():
    assert check_messages([{"role": "developer", "content": "x"}, {"role": "user", "content": "y"}]) == [
        {"role": "system", "content": "x"}, {"role": "user", "content": "y"}]
