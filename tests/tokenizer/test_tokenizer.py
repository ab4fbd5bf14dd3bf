"""Stage 2 tokenizer: SentencePiece training, HF files, and id parity with transformers' AutoTokenizer."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from openllm_ds.config import TokenizerConfig
from openllm_ds.errors import DataError, UserError
from openllm_ds.tokenizer import load_tokenizer, train_tokenizer
from openllm_ds.utils import MANIFEST, read_manifest

# Text the tokenizer never saw, chosen for the places SentencePiece and HF tokenizers tend to differ.
EDGE_CASES = [
    "",
    " ",
    "   ",
    "Hello",
    " Hello",
    "Hello ",
    "  two  leading, two  inner and two trailing  ",
    "emoji 😀🎉 and a flag 🇫🇷 and ZWJ 👩‍👩‍👧",
    "日本語のテキストと中文文本，한국어 텍스트",
    "café naïve Ångström Zürich São Paulo Kraków Ελληνικά Русский",
    "digits 0 7 42 2024 1234567890 3.14159 1,000,000 -273.15",
    "line one\nline two\n\nline four\n",
    "\ttab first\tand\tinside",
    "windows\r\nline end",
    "no-break\u00a0space and ideographic\u3000space",
    "combining e\u0301 vs precomposed é",
    "symbols: #$%&*+/<=>@[\\]^_`{|}~ “quotes” ‘single’ — – …",
    "a" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


def hf_tokenizer(tokenizer_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


def read_passages(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    """A few hundred distinct words: enough for a 300-piece vocabulary, far too small for 8k."""
    words = [f"{a}{b}{c}" for a in "bcdfg" for b in "aeiou" for c in "lmnrst"]
    path = tmp_path_factory.mktemp("tiny") / "corpus.txt"
    path.write_text("\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12)) + "\n", encoding="utf-8")
    return path


# --- training and files ---------------------------------------------------------------------------


def test_trained_files_and_report(tokenizer_dir, prepared_data):
    names = {"tokenizer.model", "tokenizer.vocab", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"}
    assert {p.name for p in tokenizer_dir.iterdir()} == names | {MANIFEST}
    manifest = read_manifest(tokenizer_dir)  # what a rerun may replace, and which stage wrote it
    assert (manifest.files, manifest.kind, manifest.stage) == (names, "a tokenizer", "openllm-ds train-tokenizer")

    tok = load_tokenizer(tokenizer_dir)
    assert tok.vocab_size == 8000
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert [tok.sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tok.sha256 == hashlib.sha256((tokenizer_dir / "tokenizer.model").read_bytes()).hexdigest()

    vocab_lines = (tokenizer_dir / "tokenizer.vocab").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(vocab_lines) == 8000
    assert [line.split("\t")[0] for line in vocab_lines[:5]] == ["<unk>", "<s>", "</s>", "<pad>", "<0x00>"]
    assert vocab_lines[1000].split("\t")[0] == tok.sp.id_to_piece(1000)

    # Byte fallback: <0xNN> is id 4 + NN, so a character absent from training is its UTF-8 bytes.
    assert [tok.sp.id_to_piece(4 + b) for b in (0, 10, 255)] == ["<0x00>", "<0x0A>", "<0xFF>"]
    assert tok.encode("🦜") == [tok.sp.piece_to_id("▁")] + [4 + b for b in "🦜".encode("utf-8")]

    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    # the prompt convention: transformers' BOS is </s> (a document starts after one), as GPT-2's is <|endoftext|>
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"], cfg["pad_token"]) == ("</s>", "</s>", "<unk>", "<pad>")
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False
    assert cfg["model_input_names"] == ["input_ids", "attention_mask"]
    specials = json.loads((tokenizer_dir / "special_tokens_map.json").read_text())
    assert specials == {"unk_token": "<unk>", "bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>"}


def test_report_values(prepared_data, tmp_path, capsys):
    val = prepared_data / "validation_data.txt"
    report = train_tokenizer(
        TokenizerConfig(input=str(prepared_data / "training_data.txt"), output_dir=str(tmp_path / "tok"), vocab_size=2000),
        validation_file=str(val),
    )
    printed = capsys.readouterr().out
    assert report["vocab_size"] == 2000 and "vocab 2,000" in printed
    tok = load_tokenizer(tmp_path / "tok")
    lines = read_passages(val)
    expected = sum(len(tok.encode(line)) for line in lines) / sum(len(line.split()) for line in lines)
    assert report["tokens_per_word"] == pytest.approx(expected, abs=1e-4)
    assert 1.0 < report["tokens_per_word"] < 3.0
    assert report["tokens_per_word_file"] == str(val)
    common, rare = report["examples"]["common"], report["examples"]["rare"]
    assert common["count"] == len(re.findall(rf"(?<!\w){common['word']}(?!\w)", val.read_text(encoding="utf-8")))
    assert rare["count"] == 1 and common["count"] > 100
    assert common["pieces"] == tok.pieces(common["word"]) and rare["pieces"] == tok.pieces(rare["word"])
    assert len(common["pieces"]) < len(rare["pieces"])
    assert f"{common['word']!r}" in printed


def test_training_is_deterministic(prepared_data, tmp_path):
    cfg = dict(input=str(prepared_data / "training_data.txt"), vocab_size=1000)
    for name in ("a", "b"):
        train_tokenizer(TokenizerConfig(output_dir=str(tmp_path / name), **cfg))
    for name in ("tokenizer.model", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# --- parity with transformers ---------------------------------------------------------------------


def test_autotokenizer_matches_sentencepiece_on_validation(tokenizer_dir, prepared_data):
    passages = read_passages(prepared_data / "validation_data.txt")
    assert len(passages) > 2000
    sp = load_tokenizer(tokenizer_dir)
    hf = hf_tokenizer(tokenizer_dir)
    want = sp.encode_batch(passages)
    assert hf(passages, add_special_tokens=False).input_ids == want
    assert hf(passages).input_ids == [sp.encode_prompt(p) for p in passages] == [[2] + ids for ids in want]
    assert all(8 < len(ids) for ids in want)

    from tokenizers import Tokenizer  # the runtime dependency alone gives the same ids

    plain = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert [e.ids for e in plain.encode_batch(passages, add_special_tokens=False)] == want


def test_autotokenizer_matches_sentencepiece_on_unseen_text(tokenizer_dir, wikitext_test):
    lines = wikitext_test.read_text(encoding="utf-8").split("\n")
    assert len(lines) > 4000 and sum(line.startswith(" ") for line in lines) > 2000  # WikiText's leading spaces
    texts = lines + EDGE_CASES
    sp = load_tokenizer(tokenizer_dir)
    hf = hf_tokenizer(tokenizer_dir)
    want = sp.encode_batch(texts)
    got = hf(texts, add_special_tokens=False).input_ids
    mismatches = [t for t, a, b in zip(texts, want, got) if a != b]
    assert mismatches == []
    # The known transformers 5 trap (a tokenizer that yields no ids) is not hit.
    assert all(ids for t, ids in zip(texts, got) if t)
    assert got[EDGE_CASES.index("") - len(EDGE_CASES)] == []


def test_whitespace_digits_and_decoding(tokenizer_dir):
    sp = load_tokenizer(tokenizer_dir)
    hf = hf_tokenizer(tokenizer_dir)
    # Spaces are kept, not collapsed: every extra space is one more "▁".
    assert sp.pieces(" Hello") == ["▁"] + sp.pieces("Hello")
    assert sp.encode("a  b") != sp.encode("a b")
    # split_digits: no piece holds two digits.
    assert all(sum(c.isdigit() for c in p) <= 1 for p in sp.pieces("2024 1234567890 3.14159 1,000,000"))
    for text in EDGE_CASES:
        ids = sp.encode(text)
        assert sp.decode(ids) == text
        assert hf.decode(ids) == text
    # Special ids are recognised by both sides, and the pad id pads.
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (2, 2, 3, 0)
    batch = hf(["one", "one two three"], padding=True).input_ids
    assert batch[0][0] == 3 and batch[1][0] != 3  # left padding for generation


def test_special_token_text_and_chat_template(tokenizer_dir):
    sp = load_tokenizer(tokenizer_dir)
    hf = hf_tokenizer(tokenizer_dir)
    # Documented difference: "</s>" written as text is the EOS id for transformers, characters for SentencePiece.
    assert hf("end</s>", add_special_tokens=False).input_ids == sp.encode("end") + [2]
    assert 2 not in sp.encode("end</s>")
    prompt = hf.apply_chat_template([{"role": "user", "content": "Who wrote Hamlet?"}], tokenize=False,
                                    add_generation_prompt=True)
    assert prompt == "</s>User: Who wrote Hamlet?\nAssistant:"  # the conversation starts after </s>
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    ids = hf.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == 2
    eos = ids.index(2, 1)
    assert ids[1:eos] == sp.encode("User: Hi\nAssistant: Hello")
    assert ids[eos + 1:] == sp.encode("User: Bye\nAssistant:")


# --- errors ---------------------------------------------------------------------------------------


def test_vocab_too_large_names_the_largest_that_works(tiny_corpus, tmp_path):
    out = tmp_path / "tok"
    with pytest.raises(UserError, match=r"--vocab_size 8000 is too large") as err:
        train_tokenizer(TokenizerConfig(input=str(tiny_corpus), output_dir=str(out), vocab_size=8000))
    largest = int(re.search(r"pass --vocab_size (\d+) or less", str(err.value)).group(1))
    assert 260 < largest < 8000
    assert not out.exists()  # nothing half-written
    assert train_tokenizer(TokenizerConfig(input=str(tiny_corpus), output_dir=str(out), vocab_size=largest))["vocab_size"] == largest
    before = (out / "tokenizer.model").read_bytes()
    with pytest.raises(UserError, match=rf"--vocab_size {largest + 1} is too large.* pass --vocab_size {largest} or less"):
        train_tokenizer(TokenizerConfig(input=str(tiny_corpus), output_dir=str(out), vocab_size=largest + 1))
    assert (out / "tokenizer.model").read_bytes() == before  # a failed run leaves the old tokenizer whole


def test_vocab_too_small_for_the_characters(tmp_path):
    corpus = tmp_path / "cjk.txt"
    chars = [chr(0x4E00 + i) for i in range(400)]
    corpus.write_text("\n".join("".join(chars[i:i + 20]) for i in range(0, 400, 20)) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"--vocab_size 300 is too small .* --vocab_size (\d+) or more.*--character_coverage"):
        train_tokenizer(TokenizerConfig(input=str(corpus), output_dir=str(tmp_path / "tok"), vocab_size=300, character_coverage=1.0))


def test_bad_inputs_and_outputs(tiny_corpus, tmp_path):
    with pytest.raises(DataError, match="--input .*missing.txt does not exist"):
        train_tokenizer(TokenizerConfig(input=str(tmp_path / "missing.txt"), output_dir=str(tmp_path / "t1")))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.txt is empty"):
        train_tokenizer(TokenizerConfig(input=str(empty), output_dir=str(tmp_path / "t2")))
    with pytest.raises(DataError, match="validation file"):
        train_tokenizer(TokenizerConfig(input=str(tiny_corpus), output_dir=str(tmp_path / "t3")), str(tmp_path / "nope.txt"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"a_file is a file, not a directory\); choose another --output_dir"):
        train_tokenizer(TokenizerConfig(input=str(tiny_corpus), output_dir=str(blocker / "sub" / "tok"), vocab_size=300))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds other files"):
        train_tokenizer(TokenizerConfig(input=str(tiny_corpus), output_dir=str(busy), vocab_size=300))
    assert (busy / "notes.txt").read_text() == "keep me"


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path)
