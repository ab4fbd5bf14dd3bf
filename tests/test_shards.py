"""Stage 2 token shards: corpus -> binary shards across Ray workers, and the memmap reader."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from openllm_ds.errors import DataError, UserError
from openllm_ds.tokenizer import TokenShards, load_tokenizer, shards_dir_for, tokenize_file
from openllm_ds.tokenizer.shards import ShardWriter, token_dtype


def split_documents(ids: np.ndarray, eos_id: int) -> list[np.ndarray]:
    """Documents of a token stream, each without its closing EOS; the stream must end with EOS."""
    assert ids[-1] == eos_id
    ends = np.flatnonzero(ids == eos_id)
    return np.split(ids, ends + 1)[:-1]


def test_validation_shards_give_back_the_corpus(token_shards, prepared_data, tokenizer_dir):
    text_file = prepared_data / "validation_data.txt"
    assert token_shards["val"] == shards_dir_for(text_file) == prepared_data / "validation_data.tokens"
    lines = text_file.read_text(encoding="utf-8").split("\n")[:-1]
    tok = load_tokenizer(tokenizer_dir)
    shards = TokenShards(token_shards["val"])

    docs = split_documents(shards[:], tok.eos_id)
    assert len(docs) == len(lines) == shards.num_documents > 2000
    assert [tok.decode(d[:-1]) for d in docs] == lines
    assert all(d[-1] == tok.eos_id and tok.eos_id not in d[:-1] for d in docs)

    meta = json.loads((token_shards["val"] / "meta.json").read_text())
    assert meta == shards.meta
    assert meta["num_tokens"] == len(shards) == sum(len(tok.encode(line)) + 1 for line in lines)
    assert (meta["vocab_size"], meta["eos_id"], meta["dtype"]) == (8000, 2, "uint16")
    assert meta["tokenizer_sha256"] == hashlib.sha256((tokenizer_dir / "tokenizer.model").read_bytes()).hexdigest()
    assert meta["source_sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest()
    assert meta["source_file"] == str(text_file)
    files = sorted(token_shards["val"].glob("shard_*.bin"))
    assert [f.name for f in files] == [s["file"] for s in meta["shards"]] == ["shard_00000.bin"]
    assert files[0].stat().st_size == 2 * meta["num_tokens"]
    raw = np.fromfile(files[0], dtype="<u2")
    assert raw.max() < 8000 and np.array_equal(raw.astype(np.int64), shards[:])


def test_train_shards_counts(token_shards, prepared_data):
    lines = (prepared_data / "training_data.txt").read_text(encoding="utf-8").split("\n")[:-1]
    shards = TokenShards(token_shards["train"])
    assert shards.num_documents == len(lines)
    assert int((shards[:] == shards.eos_id).sum()) == len(lines)
    assert shards.vocab_size == 8000 and shards[:].dtype == np.int64


def test_one_and_two_workers_write_identical_shards(token_shards, prepared_data, tokenizer_dir, tmp_path):
    text_file = prepared_data / "validation_data.txt"
    metas = {
        n: tokenize_file(text_file, tokenizer_dir, output_dir=tmp_path / f"w{n}", num_workers=n, tokens_per_shard=150_000)
        for n in (1, 2)
    }
    assert metas[1]["shards"] == metas[2]["shards"]
    assert len(metas[1]["shards"]) == -(-metas[1]["num_tokens"] // 150_000) >= 3
    assert all(s["num_tokens"] == 150_000 for s in metas[1]["shards"][:-1])
    for shard in metas[1]["shards"]:
        assert (tmp_path / "w1" / shard["file"]).read_bytes() == (tmp_path / "w2" / shard["file"]).read_bytes()
    # The same stream as the single-shard fixture, whatever the shard size.
    assert np.array_equal(TokenShards(tmp_path / "w1")[:], TokenShards(token_shards["val"])[:])


def test_reader_slices_across_shard_boundaries(tmp_path):
    stream = np.arange(1, 251, dtype=np.int64) % 97
    writer = ShardWriter(tmp_path, np.dtype("<u4"), tokens_per_shard=100)
    for chunk in np.split(stream, [7, 130, 131]):
        writer.write(chunk)
    shards = writer.close()
    assert [s["num_tokens"] for s in shards] == [100, 100, 50]
    meta = {"vocab_size": 70000, "dtype": "uint32", "num_tokens": 250, "num_documents": 1, "eos_id": 2,
            "tokenizer_sha256": "-", "source_file": "-", "source_sha256": "-", "shards": shards}
    (tmp_path / "meta.json").write_text(json.dumps(meta))

    reader = TokenShards(tmp_path)
    assert len(reader) == 250 and reader.vocab_size == 70000 and reader.eos_id == 2
    assert reader[95:105].dtype == np.int64
    for sl in (slice(95, 105), slice(0, 250), slice(199, 201), slice(-3, None), slice(10, 240, 7), slice(240, 10, -9),
               slice(120, 120), slice(300, 400)):
        assert np.array_equal(reader[sl], stream[sl]), sl
    assert reader[100] == stream[100] and reader[-1] == stream[-1]
    with pytest.raises(IndexError):
        reader[250]


def test_token_dtype_switches_at_65536():
    assert token_dtype(8000) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_up_to_date_shards_are_reused_and_changed_text_is_redone(tokenizer_dir, prepared_data, tmp_path, capsys):
    text_file = tmp_path / "docs.txt"
    lines = (prepared_data / "validation_data.txt").read_text(encoding="utf-8").split("\n")[:50]
    text_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    first = tokenize_file(text_file, tokenizer_dir, num_workers=1)
    assert first["shards_dir"] == str(tmp_path / "docs.tokens") and first["num_documents"] == 50
    shard = tmp_path / "docs.tokens" / "shard_00000.bin"
    inode = shard.stat().st_ino
    capsys.readouterr()

    again = tokenize_file(text_file, tokenizer_dir, num_workers=2)
    assert again == first and shard.stat().st_ino == inode
    assert "up to date" in capsys.readouterr().out

    # Blank lines are not documents; a changed source is tokenized again.
    text_file.write_text("\n".join(lines[:10]) + "\n\n   \n" + "\n".join(lines[10:]) + "\nOne more line.\n", encoding="utf-8")
    redone = tokenize_file(text_file, tokenizer_dir, num_workers=1)
    assert redone["num_documents"] == 51
    tok = load_tokenizer(tokenizer_dir)
    assert redone["num_tokens"] == first["num_tokens"] + len(tok.encode("One more line.")) + 1
    docs = split_documents(TokenShards(tmp_path / "docs.tokens")[:], tok.eos_id)
    assert tok.decode(docs[-1][:-1]) == "One more line."


def test_shards_errors(tokenizer_dir, tmp_path):
    with pytest.raises(DataError, match="meta.json is missing"):
        TokenShards(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        tokenize_file(tmp_path / "missing.txt", tokenizer_dir)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="is empty"):
        tokenize_file(empty, tokenizer_dir)
    text_file = tmp_path / "docs.txt"
    text_file.write_text("Some text here.\n")
    with pytest.raises(UserError, match="no tokenizer.model"):
        tokenize_file(text_file, tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files"):
        tokenize_file(text_file, tokenizer_dir, output_dir=busy)

    # A truncated shard (or a meta.json without the counts) is reported, never read as complete.
    bad = tmp_path / "bad.tokens"
    tokenize_file(text_file, tokenizer_dir, output_dir=bad, num_workers=1)
    TokenShards(bad)
    shard = bad / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="shard_00000.bin has .* bytes, meta.json says"):
        TokenShards(bad)
    meta = json.loads((bad / "meta.json").read_text())
    del meta["num_tokens"]
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="lacks num_tokens"):
        TokenShards(bad)


def test_reader_pickles_by_path(token_shards):
    import pickle

    shards = TokenShards(token_shards["val"])
    data = pickle.dumps(shards)
    assert len(data) < 1000  # the path, not the tokens
    again = pickle.loads(data)
    assert len(again) == len(shards) and np.array_equal(again[1000:3000], shards[1000:3000])
