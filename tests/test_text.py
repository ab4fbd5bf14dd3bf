"""Text can be anything: every string a user hands in goes through one check (``openllm_ds.text.check_text``) before
anything encodes it; what is not text (not a string, a lone surrogate, bytes that are not UTF-8, NUL) is one
UserError naming the argument, and everything that is text works. The CLI's and the server's cases are in
test_bad_input.py and test_serve_faults.py."""

from __future__ import annotations

import os

import pytest

import openllm_ds
from openllm_ds.errors import UserError
from openllm_ds.settings import env_setting
from openllm_ds.text import check_text, check_texts

NOT_TEXT = [  # (value, what the message says after the name)
    (None, r"must be a string, got None"),
    (5, r"must be a string, got an int"),
    (b"river", r"must be a string, got bytes: decode it first"),
    (["river"], r"must be a string, got a list"),
    ("\ud800", r"holds an unpaired UTF-16 surrogate \(U\+D800\) at character 0"),
    ("ok \udfff", r"holds an unpaired UTF-16 surrogate \(U\+DFFF\) at character 3"),
    ("caf" + os.fsdecode(b"\xe9"), r"is not UTF-8 \(byte 0xe9 at character 3\); pass UTF-8 text"),
    ("a\x00b", r"holds a NUL character at character 1: text cannot hold NUL"),
    ("first line\nsecond\x00", r"holds a NUL character on line 2, character 6"),
    ("é\x00", r"holds a NUL character at character 1"),
]
TEXT = ["", " ", "river", "Ünïcödé, 中文, العربية, emoji 🚀", "tabs\tand\r\nnewlines\n", "\x01\x7f control",
        "</s><s><unk>", "\U0010ffff", "a" * 5000]


@pytest.mark.parametrize("value,message", NOT_TEXT, ids=[repr(v)[:20] for v, _ in NOT_TEXT])
def test_check_text_names_the_argument_and_the_problem(value, message):
    with pytest.raises(UserError, match=rf"^prompt {message}"):
        check_text(value, "prompt")


@pytest.mark.parametrize("value", TEXT, ids=[repr(v)[:20] for v in TEXT])
def test_text_is_anything_that_is_text(value):
    assert check_text(value, "prompt") is value


def test_lists_of_texts():
    assert check_texts(("a", "b"), "texts") == ["a", "b"]
    with pytest.raises(UserError, match=r"^texts\[1\] must be a string, got None"):
        check_texts(["a", None], "texts")
    with pytest.raises(UserError, match=r"^texts must be a list of strings, got an int"):
        check_texts(3, "texts")


@pytest.fixture(scope="module")
def lm(small_run):
    with openllm_ds.load(small_run, context_length=32) as lm:
        yield lm


@pytest.mark.parametrize("value,message", NOT_TEXT, ids=[repr(v)[:20] for v, _ in NOT_TEXT])
def test_the_python_api_names_what_is_not_text(lm, value, message):
    with pytest.raises(UserError, match=rf"^prompt {message}"):
        lm.generate(value, max_new_tokens=2)
    with pytest.raises(UserError, match=rf"^texts\[1\] {message}"):
        lm.perplexity(["river castle", value])
    if not isinstance(value, (list, bytes, type(None), int)):
        with pytest.raises(UserError, match=rf"^texts {message}"):
            lm.perplexity(value)
        with pytest.raises(UserError, match=rf"^stop\[0\] {message}"):
            lm.generate("river", max_new_tokens=2, stop=[value])
        with pytest.raises(UserError, match=rf"^text {message}"):
            lm.tokenizer.encode(value)


@pytest.mark.parametrize("value", TEXT[1:], ids=[repr(v)[:20] for v in TEXT[1:]])
def test_the_python_api_takes_any_text(lm, value):
    value = value[:6]  # within the context of 32 tokens (byte pieces: up to 4 a character)
    assert isinstance(lm.generate(value, max_new_tokens=2), str)
    assert lm.perplexity(["river " + value]) > 0


def test_environment_values_are_text(monkeypatch):
    monkeypatch.setenv("OPENLLM_PROBE", os.fsdecode(b"x\xff"))
    with pytest.raises(UserError, match=r"^environment variable OPENLLM_PROBE is not UTF-8 \(byte 0xff at character 1\)"):
        env_setting("OPENLLM_PROBE")


@pytest.mark.parametrize("path,got", [(None, "None"), (5, "an int"), ("model\x00dir", "a NUL character")])
def test_a_path_that_is_not_one_is_named(path, got):
    with pytest.raises(UserError, match=rf"^--model_dir must be a path, got {got}"):
        openllm_ds.load(path)
