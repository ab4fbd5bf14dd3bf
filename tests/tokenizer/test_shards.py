"""Stage 2 token shards: a text file -> binary shards across Ray workers, and the memmap reader."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from openllm_ds.errors import DataError, UserError
from openllm_ds.tokenizer import TokenShards, load_tokenizer, shards_dir_for, tokenize_corpus
from openllm_ds.tokenizer.shards import token_dtype

from helpers import file_bytes, write_shards


def split_documents(ids: np.ndarray, eos_id: int) -> list[np.ndarray]:
    """Documents of a token stream, each with its closing EOS; the stream must end with EOS."""
    assert ids[-1] == eos_id
    ends = np.flatnonzero(ids == eos_id)
    return np.split(ids, ends + 1)[:-1]


def test_validation_shards_give_back_the_corpus(token_shards, prepared_data, tokenizer_dir):
    text_file = prepared_data / "validation_data.txt"
    assert token_shards["val"] == shards_dir_for(str(text_file)) == prepared_data / "validation_data.tokens"
    lines = text_file.read_text(encoding="utf-8").split("\n")[:-1]
    tok = load_tokenizer(tokenizer_dir)
    shards = TokenShards(token_shards["val"])

    docs = split_documents(shards[:], tok.eos_id)
    assert len(docs) == len(lines) == shards.num_documents > 2000
    assert [tok.decode(d[:-1]) for d in docs] == lines == shards.documents(tok)
    assert all(d[-1] == tok.eos_id and tok.eos_id not in d[:-1] for d in docs)

    meta = json.loads((token_shards["val"] / "meta.json").read_text())
    assert meta == shards.meta
    assert meta["num_tokens"] == len(shards) == sum(len(tok.encode(line)) + 1 for line in lines)
    assert (meta["vocab_size"], meta["eos_id"], meta["dtype"], meta["format"]) == (8000, 2, "uint16", 2)
    assert meta["tokenizer_sha256"] == hashlib.sha256((tokenizer_dir / "tokenizer.model").read_bytes()).hexdigest()
    assert meta["source"]["files"][0]["path"] == str(text_file.resolve())
    assert meta["source"]["files"][0]["bytes"] == text_file.stat().st_size
    assert meta["counts"] == {"duplicates": 0, "empty": 0, "bad_records": 0, "documents_read": len(lines),
                              "bad_examples": []}
    # the digest of the documents read: BLAKE2b-128 of each, in order (one unit here)
    digest = hashlib.sha256(b"".join(hashlib.blake2b(x.encode(), digest_size=16).digest() for x in lines)).hexdigest()
    assert meta["source_sha256"] == hashlib.sha256(digest.encode()).hexdigest()
    files = sorted(token_shards["val"].glob("*.bin"))
    assert [f.name for f in files] == [s["file"] for s in meta["shards"]] == ["shard_00000.bin"]
    assert files[0].stat().st_size == 2 * meta["num_tokens"]
    raw = np.fromfile(files[0], dtype="<u2")
    assert raw.max() == meta["shards"][0]["max_id"] < 8000 and np.array_equal(raw.astype(np.int64), shards[:])
    assert "heldout" not in meta


def test_train_shards_counts(token_shards, prepared_data):
    lines = (prepared_data / "training_data.txt").read_text(encoding="utf-8").split("\n")[:-1]
    shards = TokenShards(token_shards["train"])
    assert shards.num_documents == len(lines)
    assert int((shards[:] == shards.eos_id).sum()) == len(lines)
    assert shards.vocab_size == 8000 and shards[:].dtype == np.int64


def test_one_two_and_no_ray_workers_write_identical_shards(token_shards, prepared_data, tokenizer_dir, tmp_path):
    """Small units (200 kB) give several shard files; they are the same bytes whoever writes them."""
    text_file = prepared_data / "validation_data.txt"
    metas = {n: tokenize_corpus(text_file, tokenizer_dir, tmp_path / f"w{n}", num_workers=n, unit_bytes=200_000)
             for n in (0, 1, 2)}
    assert len(metas[1]["shards"]) == -(-text_file.stat().st_size // 200_000) >= 7
    assert file_bytes(tmp_path / "w0") == file_bytes(tmp_path / "w1") == file_bytes(tmp_path / "w2")
    # The same stream as the one-shard fixture, whatever the unit size: documents never straddle units.
    assert np.array_equal(TokenShards(tmp_path / "w1")[:], TokenShards(token_shards["val"])[:])
    assert [s["unit"] for s in metas[2]["shards"]] == list(range(len(metas[2]["shards"])))


def test_reader_slices_across_shard_boundaries(tmp_path):
    stream = np.arange(1, 251, dtype=np.int64) % 97
    write_shards(tmp_path, stream, [100, 200], 70000)
    reader = TokenShards(tmp_path)
    assert len(reader) == 250 and reader.vocab_size == 70000 and reader.eos_id == 2 and reader.dtype == np.uint32
    assert reader[95:105].dtype == np.int64
    for sl in (slice(95, 105), slice(0, 250), slice(199, 201), slice(-3, None), slice(10, 240, 7), slice(240, 10, -9),
               slice(120, 120), slice(300, 400)):
        assert np.array_equal(reader[sl], stream[sl]), sl
    assert reader[100] == stream[100] and reader[-1] == stream[-1]
    assert reader.shard_of(100).name == "shard_00001.bin"
    with pytest.raises(IndexError):
        reader[250]


def test_token_dtype_switches_at_65536():
    assert token_dtype(8000) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_up_to_date_shards_are_reused_and_changed_text_is_redone(tokenizer_dir, prepared_data, tmp_path, capsys):
    text_file = tmp_path / "docs.txt"
    lines = (prepared_data / "validation_data.txt").read_text(encoding="utf-8").split("\n")[:50]
    text_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    first = tokenize_corpus(text_file, tokenizer_dir, num_workers=0)
    assert first["shards_dir"] == str(tmp_path / "docs.tokens") and first["num_documents"] == 50
    shard = tmp_path / "docs.tokens" / "shard_00000.bin"
    inode = shard.stat().st_ino
    capsys.readouterr()

    again = tokenize_corpus(text_file, tokenizer_dir, num_workers=1)
    assert {k: v for k, v in again.items() if k not in ("seconds", "nodes")} == \
        {k: v for k, v in first.items() if k not in ("seconds", "nodes")}
    assert shard.stat().st_ino == inode
    assert "up to date" in capsys.readouterr().out

    # Blank lines are not documents; a changed source is tokenized again.
    text_file.write_text("\n".join(lines[:10]) + "\n\n   \n" + "\n".join(lines[10:]) + "\nOne more line.\n", encoding="utf-8")
    redone = tokenize_corpus(text_file, tokenizer_dir, num_workers=0)
    assert redone["num_documents"] == 51
    tok = load_tokenizer(tokenizer_dir)
    assert redone["num_tokens"] == first["num_tokens"] + len(tok.encode("One more line.")) + 1
    docs = split_documents(TokenShards(tmp_path / "docs.tokens")[:], tok.eos_id)
    assert tok.decode(docs[-1][:-1]) == "One more line."
    # Other options are other shards too.
    assert tokenize_corpus(text_file, tokenizer_dir, num_workers=0, holdout=0.2)["heldout"]["num_documents"] > 0


def test_shards_errors(tokenizer_dir, tmp_path):
    with pytest.raises(DataError, match="meta.json is missing"):
        TokenShards(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        tokenize_corpus(tmp_path / "missing.txt", tokenizer_dir)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"no document left to train on \(0 documents read"):
        tokenize_corpus(empty, tokenizer_dir, num_workers=0)
    assert not (tmp_path / "empty.tokens").exists()
    text_file = tmp_path / "docs.txt"
    text_file.write_text("Some text here.\n")
    with pytest.raises(UserError, match="no tokenizer.model"):
        tokenize_corpus(text_file, tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files"):
        tokenize_corpus(text_file, tokenizer_dir, output_dir=busy)
    assert (busy / "keep.txt").read_text() == "mine"

    # A truncated shard, ids past the vocabulary, a meta.json without the counts or of another format:
    # each is reported, never read as complete.
    bad = tmp_path / "bad.tokens"
    tokenize_corpus(text_file, tokenizer_dir, output_dir=bad, num_workers=0)
    TokenShards(bad)
    shard = bad / "shard_00000.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-2])
    with pytest.raises(DataError, match="shard_00000.bin has .* bytes, meta.json says"):
        TokenShards(bad)
    shard.write_bytes(good)
    meta = json.loads((bad / "meta.json").read_text())
    (bad / "meta.json").write_text(json.dumps({**meta, "shards": [{**meta["shards"][0], "max_id": 9000}]}))
    with pytest.raises(DataError, match=r"holds id 9000 >= vocab_size 8000"):
        TokenShards(bad)
    (bad / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(DataError, match="has format 1, this version reads 2"):
        TokenShards(bad)
    del meta["num_tokens"]
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="lacks num_tokens"):
        TokenShards(bad)
    with pytest.raises(DataError, match="holds no heldout documents"):
        tokenize_corpus(text_file, tokenizer_dir, output_dir=tmp_path / "ok.tokens", num_workers=0)
        TokenShards(tmp_path / "ok.tokens", "heldout")


def test_reader_pickles_by_path(token_shards):
    import pickle

    shards = TokenShards(token_shards["val"])
    data = pickle.dumps(shards)
    assert len(data) < 1000  # the path, not the tokens
    again = pickle.loads(data)
    assert len(again) == len(shards) and np.array_equal(again[1000:3000], shards[1000:3000])


def tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_no_stage_replaces_or_deletes_another_stages_output(tokenizer_dir, prepared_data, tmp_path):
    """Every writer (tokenize, train-tokenizer, export of each format, prepare, a checkpoint save) goes through
    utils.claim_output_dir: pointed at a directory another stage wrote -- named by its manifest's kind, or, in a
    manifest of an older version without one, by its files -- it stops with one line naming the directory and the
    command that wrote it, before any work, and every file there stays as it was."""
    import shutil

    from openllm_ds.config import DataConfig, ExportConfig, TokenizerConfig
    from openllm_ds.data import prepare
    from openllm_ds.export import export
    from openllm_ds.export.common import export_kind
    from openllm_ds.tokenizer import train_tokenizer
    from openllm_ds.train.checkpointing import not_a_checkpoint
    from openllm_ds.utils import MANIFEST, write_manifest

    text = tmp_path / "docs.txt"
    text.write_text("One document.\nAnother one.\n", encoding="utf-8")
    outputs = {"token shards": tmp_path / "docs.tokens", "a tokenizer": tmp_path / "tokenizer",
               "cleaned data": tmp_path / "clean", "a huggingface export": tmp_path / "hf",
               "an export of an older version": tmp_path / "old-export"}
    tokenize_corpus(text, tokenizer_dir, num_workers=0)
    shutil.copytree(tokenizer_dir, outputs["a tokenizer"])
    shutil.copytree(prepared_data, outputs["cleaned data"], ignore=shutil.ignore_patterns("*.tokens"))
    for name in ("hf", "old-export"):
        (tmp_path / name).mkdir()
        for f in ("config.json", "model.safetensors", "tokenizer.model"):
            (tmp_path / name / f).write_text(f"{name} {f}")
    write_manifest(outputs["a huggingface export"], export_kind("huggingface"), ["config.json", "model.safetensors",
                                                                                  "tokenizer.model"])
    (outputs["an export of an older version"] / MANIFEST).write_text("config.json\nmodel.safetensors\ntokenizer.model\n")
    before = {k: tree(d) for k, d in outputs.items()}
    (tmp_path / "no-squad").mkdir()  # prepare checks its --squad_dir is a folder first, then the output it would write

    writers = {
        "token shards": lambda out: tokenize_corpus(text, tokenizer_dir, out, num_workers=0),
        "a tokenizer": lambda out: train_tokenizer(TokenizerConfig(input=str(text), output_dir=str(out), vocab_size=300)),
        "cleaned data": lambda out: prepare(DataConfig(source="dir", squad_dir=str(tmp_path / "no-squad"),
                                                       output_dir=str(out))),
        "a pytorch export": lambda out: export(ExportConfig(model_dir=str(tmp_path / "no-model"), format="pytorch",
                                                            output_dir=str(out), overwrite=True)),
        "a checkpoint": lambda out: (_ for _ in ()).throw(UserError(not_a_checkpoint(out))),
    }
    for writer, write in writers.items():
        for kind, out in outputs.items():
            if kind == writer:
                continue
            if kind == "an export of an older version":
                if writer == "a pytorch export":
                    continue  # export files: an older version's export, which a new export may replace
                match = (rf"{out} holds config\.json, [a-z.,\s]*, written by another openllm-ds stage "
                         rf"\(listed in its \{MANIFEST}\); `openllm-ds .*` writes {writer} and replaces only its own")
            else:
                match = rf"{out} is the output of `openllm-ds [a-z -]+` \({kind}\); `openllm-ds .*` writes {writer} "
            with pytest.raises(UserError, match=match):
                write(out)
            assert tree(out) == before[kind], (writer, kind)
    # the example: token shards into an export dir, from the command line
    from openllm_ds.cli import main

    assert main(["tokenize", "--input", str(text), "--tokenizer_dir", str(tokenizer_dir), "--output_dir",
                 str(outputs["a huggingface export"]), "--num_workers", "0"]) == 2
    assert tree(outputs["a huggingface export"]) == before["a huggingface export"]


@pytest.mark.parametrize("raw,why", [
    (b'{"format": 1, \xe9}', r"is not UTF-8 text \(byte 0xe9 at offset 14\)"),
    (b'{"format"\x00: 1}', r"holds a NUL byte at offset 9"),
    (b'{"format": 1, "num_tokens"', r"is not valid JSON \(.*; truncated\?\)"),
    (b"[" * 100_000 + b"]" * 100_000, r"is not valid JSON \(nested too deeply to read\)"),
    (b'["format"]', r"must hold an object, not a list"),
])
def test_a_damaged_meta_json_is_one_line_naming_it(tmp_path, raw, why):
    """meta.json is read by the one reader policy (utils.read_json): one DataError naming the file and the fix."""
    from openllm_ds.errors import DataError
    from openllm_ds.tokenizer.shards import read_meta

    d = tmp_path / "c.tokens"
    d.mkdir()
    (d / "meta.json").write_bytes(raw)
    with pytest.raises(DataError, match=rf"c\.tokens/meta\.json {why}.*delete .*c\.tokens and tokenize again"):
        read_meta(d)
