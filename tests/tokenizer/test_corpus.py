"""A user's own corpus: every source type to token shards and back, deduplication, the held-out share,
bad records, and the same shards from any number of Ray workers on one node or two.

Documents are real SQuAD passages (``prepared_data``) written out in each format by the test.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from openllm_ds.data.documents import read_unit
from openllm_ds.data.units import ReadOptions, plan_units, resolve_sources
from openllm_ds.errors import DataError, UserError
from openllm_ds.tokenizer import TokenShards, load_tokenizer, shards_dir_for, tokenize_corpus

from helpers import FIXTURES, file_bytes


FIXTURE = FIXTURES / "corpus"  # small files with every separator, encoding and whitespace case
FIXTURE_CASES = {  # name -> how it is tokenized; the unit sizes are in expected_shards.json's keys
    "lines_and_records": dict(inputs=["lines.txt", "records.jsonl"], holdout=0.25),
    "paragraphs": dict(inputs=["paragraphs.txt"], options=ReadOptions(doc_separator="blank_line")),
    "no_dedup": dict(inputs=["lines.txt", "records.jsonl"], dedup=False),
}


@pytest.fixture(scope="module")
def passages(prepared_data) -> list[str]:
    lines = (prepared_data / "validation_data.txt").read_text(encoding="utf-8").split("\n")[:-1]
    return lines[:240]


def decoded(shards_dir, tokenizer_dir, split="train") -> list[str]:
    return TokenShards(shards_dir, split).documents(load_tokenizer(tokenizer_dir))


def jsonl(docs, field="text") -> str:
    return "".join(json.dumps({"id": i, field: d}, ensure_ascii=False) + "\n" for i, d in enumerate(docs))


@pytest.fixture(scope="module")
def corpus(passages, tmp_path_factory):
    """One folder holding each source type; each type's expected documents (before deduplication)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root = tmp_path_factory.mktemp("corpus")
    p = passages
    want = {}
    (root / "a_lines.txt").write_text("\n".join(p[:40]) + "\n", encoding="utf-8")
    want["a_lines.txt"] = p[:40]
    paragraphs = ["\n".join(p[i:i + 3]) for i in range(40, 70, 3)]
    (root / "b_paragraphs.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    want["b_paragraphs.txt"] = paragraphs
    (root / "c.jsonl").write_text(jsonl(p[70:100]), encoding="utf-8")
    want["c.jsonl"] = p[70:100]
    with gzip.open(root / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(jsonl(p[100:120]))
    want["d.jsonl.gz"] = p[100:120]
    (root / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(p[120:140]).encode()))
    want["e.jsonl.zst"] = p[120:140]
    (root / "f_array.json").write_text(json.dumps([{"text": d} for d in p[140:160]]), encoding="utf-8")
    want["f_array.json"] = p[140:160]
    pq.write_table(pa.table({"text": p[160:200], "n": list(range(40))}), root / "g.parquet", row_group_size=7)
    want["g.parquet"] = p[160:200]
    datasets.Dataset.from_dict({"text": p[200:240]}).save_to_disk(str(root / "h_saved"), num_shards=2)
    want["h_saved"] = p[200:240]
    return root, want


def read_all(source, unit_bytes, **options) -> list[str]:
    opts = ReadOptions(**options)
    return [d for u in plan_units(resolve_sources([str(source)], opts), unit_bytes) for d in read_unit(u, opts)]


@pytest.mark.parametrize("name", ["a_lines.txt", "b_paragraphs.txt", "c.jsonl", "d.jsonl.gz", "e.jsonl.zst",
                                  "f_array.json", "g.parquet", "h_saved"])
def test_every_source_type_is_read_whole_whatever_the_unit_size(corpus, name):
    root, want = corpus
    options = {"doc_separator": "blank_line"} if name.startswith("b_") else {}
    for unit_bytes in (1, 97, 4096, 10**9):  # 1 byte: every byte a unit of its own
        assert read_all(root / name, unit_bytes, **options) == want[name], unit_bytes


def test_a_folder_of_every_type_tokenizes_to_its_documents(corpus, tokenizer_dir, tmp_path):
    """A folder mixes the types (the paragraphs file read a line a document); the shards decode to every
    document in folder order, and Ray's 1 and 2 workers write the bytes written in-process."""
    root, want = corpus
    expected = [d for name in sorted(want) for d in (want[name] if not name.startswith("b_") else
                                                        [x for x in "\n\n".join(want[name]).split("\n") if x])]
    meta = tokenize_corpus(root, tokenizer_dir, tmp_path / "w0", num_workers=0, unit_bytes=3000)
    assert decoded(tmp_path / "w0", tokenizer_dir) == expected
    assert meta["counts"]["duplicates"] == 0 and meta["num_documents"] == len(expected)
    assert len(meta["files"]) == 7 + len(list((root / "h_saved").glob("*.arrow")))
    assert len(meta["shards"]) > 10
    for n in (1, 2):
        tokenize_corpus(root, tokenizer_dir, tmp_path / f"w{n}", num_workers=n, unit_bytes=3000)
        assert file_bytes(tmp_path / f"w{n}") == file_bytes(tmp_path / "w0")
    # a glob picks files out of the folder, in name order
    glob_meta = tokenize_corpus(str(root / "*.jsonl*"), tokenizer_dir, tmp_path / "glob", num_workers=0)
    assert decoded(tmp_path / "glob", tokenizer_dir) == want["c.jsonl"] + want["d.jsonl.gz"] + want["e.jsonl.zst"]
    assert glob_meta["num_documents"] == 70


def test_text_field_and_blank_line_documents(passages, tokenizer_dir, tmp_path):
    src = tmp_path / "content.jsonl"
    src.write_text(jsonl(passages[:20], field="content"), encoding="utf-8")
    with pytest.raises(DataError, match=r"content\.jsonl line 1 has no field 'text' \(its fields: id, content\); "
                                        r"pass --text_field"):
        tokenize_corpus(src, tokenizer_dir, tmp_path / "x", num_workers=0)
    tokenize_corpus(src, tokenizer_dir, tmp_path / "ok", num_workers=0, options=ReadOptions(text_field="content"))
    assert decoded(tmp_path / "ok", tokenizer_dir) == passages[:20]
    assert shards_dir_for(str(src)) == tmp_path / "content.jsonl.tokens"
    assert shards_dir_for("hf:Salesforce/wikitext/wikitext-2-raw-v1:test").parent.as_posix() == "data/tokens"


def test_exact_duplicates_are_removed_across_sources_first_copy_kept(passages, tokenizer_dir, tmp_path):
    a, b = passages[:30], passages[20:50]  # 10 shared; and one passage twice within a
    (tmp_path / "a.txt").write_text("\n".join(a + [a[3]]) + "\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(jsonl(b), encoding="utf-8")
    inputs = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    meta = tokenize_corpus(inputs, tokenizer_dir, tmp_path / "dedup", num_workers=2, unit_bytes=2000)
    assert decoded(tmp_path / "dedup", tokenizer_dir) == a + b[10:]
    assert meta["counts"]["duplicates"] == 11 and meta["counts"]["documents_read"] == 61
    assert [(f["documents"], f["duplicates"]) for f in meta["files"]] == [(31, 1), (30, 10)]
    kept = tokenize_corpus(inputs, tokenizer_dir, tmp_path / "all", num_workers=0, dedup=False)
    assert decoded(tmp_path / "all", tokenizer_dir) == a + [a[3]] + b and kept["counts"]["duplicates"] == 0


def test_held_out_share_is_chosen_by_hash(passages, tokenizer_dir, tmp_path):
    src = tmp_path / "docs.txt"
    src.write_text("\n".join(passages + passages[:30]) + "\n", encoding="utf-8")  # 30 repeats
    meta = tokenize_corpus(src, tokenizer_dir, tmp_path / "h", num_workers=0, holdout=0.25, dedup=False,
                           unit_bytes=5000)
    train, held = decoded(tmp_path / "h", tokenizer_dir), decoded(tmp_path / "h", tokenizer_dir, "heldout")
    assert 30 < len(held) < 120 and len(train) + len(held) == len(passages) + 30
    assert not set(train) & set(held)  # every copy of a text on the same side
    assert sorted(train + held) == sorted(passages + passages[:30])
    assert meta["heldout"]["num_documents"] == len(held)
    assert meta["heldout"]["num_bytes"] == sum(len(d.encode()) + 1 for d in held)
    assert meta["heldout"]["num_words"] == sum(len(d.split()) for d in held)
    again = tokenize_corpus(src, tokenizer_dir, tmp_path / "h2", num_workers=2, holdout=0.25, dedup=False)
    assert decoded(tmp_path / "h2", tokenizer_dir, "heldout") == held and again["heldout"] == {
        **meta["heldout"], "shards": again["heldout"]["shards"]}


def test_bad_records(passages, tokenizer_dir, tmp_path):
    src = tmp_path / "docs.jsonl"
    lines = jsonl(passages[:10]).splitlines()
    lines[3] = '{"text": "cut off'
    lines[6] = '{"text": 42}'
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"docs\.jsonl line 4 is not valid JSON: Unterminated string .*\(column 10\); "
                                        r"fix the record, or pass --on_bad_record skip"):
        tokenize_corpus(src, tokenizer_dir, tmp_path / "x", num_workers=0, unit_bytes=50)
    meta = tokenize_corpus(src, tokenizer_dir, tmp_path / "skip", num_workers=0, unit_bytes=50,
                           options=ReadOptions(on_bad_record="skip"))
    assert decoded(tmp_path / "skip", tokenizer_dir) == [d for i, d in enumerate(passages[:10]) if i not in (3, 6)]
    assert meta["counts"]["bad_records"] == 2
    assert meta["counts"]["bad_examples"] == [f"{src.resolve()} line 4 is not valid JSON: Unterminated string "
                                              "starting at (column 10)",
                                              f"{src.resolve()} line 7 field 'text' is int, not a string"]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("case", ["latin1", "binary", "truncated_gz", "empty_after_filtering", "nested", "unknown_in_dir",
                                  "not_array", "parquet_column", "hf_offline"])
def test_bad_sources_are_one_clear_error(case, tokenizer_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    src, match = tmp_path / "src", None
    if case == "latin1":
        src = tmp_path / "latin1.txt"
        src.write_bytes("Caf\u00e9 cr\u00e8me\nna\u00efve\n".encode("latin-1"))
        match = r"latin1\.txt line 1 is not UTF-8 \(byte 0xe9 at column 4\); convert .* iconv -f latin1"
    elif case == "binary":
        src = tmp_path / "model.txt"
        src.write_bytes(b"GGUF\x00\x01\x02binary\n")
        match = r"model\.txt line 1 holds a NUL byte: .* looks binary"
    elif case == "truncated_gz":
        src = tmp_path / "cut.jsonl.gz"
        src.write_bytes(gzip.compress(jsonl(["a document"] * 200).encode())[:-30])
        match = r"cut\.jsonl\.gz is a truncated or corrupt \.gz file"
    elif case == "empty_after_filtering":
        src = tmp_path / "blank.jsonl"
        src.write_text('{"text": "   "}\n{"text": ""}\n', encoding="utf-8")
        match = r"no document left to train on \(2 documents read|no document left to train on \(0 documents read, 0 " \
                r"duplicates, 2 empty"
    elif case == "nested":
        src = tmp_path / "deep.jsonl"
        src.write_text("[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
        match = r"deep\.jsonl line 1 is JSON nested too deeply to read"
    elif case == "unknown_in_dir":
        src.mkdir()
        (src / "a.txt").write_text("one document\n")
        (src / "notes.docx").write_bytes(b"PK\x03\x04")
        match = r"notes\.docx \(in .*src\) is not a corpus file this reads .*; move it out of the folder, or pass a glob"
    elif case == "not_array":
        src = tmp_path / "squad.json"
        src.write_text(json.dumps({"data": [{"paragraphs": []}]}) + "\n")
        match = r"squad\.json line 1 is a JSON dict, not an object with a 'text' field|squad\.json line 1 has no field 'text'"
    elif case == "parquet_column":
        import pyarrow as pa
        import pyarrow.parquet as pq

        src = tmp_path / "t.parquet"
        pq.write_table(pa.table({"body": ["x"]}), src)
        match = r"t\.parquet has no column 'text' \(columns: body\); pass --text_field"
    elif case == "hf_offline":
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        src = "hf:nobody-here/no-such-corpus:train"
        match = r"cannot load hf:nobody-here/no-such-corpus:train: offline \(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set\) " \
                r"and it is not in the local cache .*save_to_disk\(DIR\) and pass DIR instead"
    with pytest.raises(UserError, match=match):
        tokenize_corpus(str(src), tokenizer_dir, out, num_workers=0)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # nothing that looks complete, no temp dir


def test_a_two_node_cluster_writes_one_output_dir(passages, tokenizer_dir, tmp_path):
    """Two Ray nodes (1 CPU each): the actors run on both, each writes its units' shards into the one
    output directory, and the result is byte-equal to an in-process run."""
    import ray
    from ray.cluster_utils import Cluster

    src = tmp_path / "docs.txt"
    src.write_text("\n".join(passages) + "\n", encoding="utf-8")
    tokenize_corpus(src, tokenizer_dir, tmp_path / "local", num_workers=0, unit_bytes=4000)
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        meta = tokenize_corpus(src, tokenizer_dir, tmp_path / "cluster", num_workers=2, unit_bytes=4000)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert len(meta["nodes"]) == 2  # workers on both nodes encoded units
    assert len(meta["shards"]) >= 10
    assert file_bytes(tmp_path / "cluster") == file_bytes(tmp_path / "local")
    shutil.rmtree(tmp_path / "cluster")


def sha256s(shards_dir) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(shards_dir.glob("*.bin"))}


@pytest.mark.parametrize("key", sorted(json.loads((FIXTURE / "expected_shards.json").read_text(encoding="utf-8"))))
def test_the_fixture_corpus_gives_the_recorded_shards(key, tmp_path, monkeypatch):
    """tests/fixtures/corpus tokenized with its own tiny tokenizer: the shard files' sha256s, counts and the
    source digest recorded in expected_shards.json by the two-pass version (hash, then encode) this one
    replaced, whoever does the work (this process on 1 or 5 threads, Ray) and in whatever pieces."""
    from openllm_ds.tokenizer import runners

    want = json.loads((FIXTURE / "expected_shards.json").read_text(encoding="utf-8"))[key]
    name, unit_bytes = key.rsplit("-", 1)
    case = FIXTURE_CASES[name]
    kwargs = {k: v for k, v in case.items() if k != "inputs"}
    # Ray's 2 workers for the case with units, duplicates and a held-out share; pieces of 7 or 41 bytes (a unit read
    # in many calls) write the same files as pieces of the unit's size
    for workers, piece_bytes, threads in [(0, 10**9, 5), (0, 7, 1), (0, 7, 5)] + ([(2, 41, 0)] if key == "lines_and_records-200" else []):
        monkeypatch.setattr(runners, "local_threads", lambda: threads)
        out = tmp_path / f"w{workers}-{piece_bytes}-{threads}"
        meta = tokenize_corpus([str(FIXTURE / i) for i in case["inputs"]], FIXTURE / "tokenizer", out,
                               num_workers=workers, unit_bytes=int(unit_bytes), piece_bytes=piece_bytes, **kwargs)
        assert sha256s(out) == want["files"], (workers, piece_bytes, threads)
        got = {"num_tokens": meta["num_tokens"], "num_documents": meta["num_documents"], "counts": meta["counts"],
               "heldout_documents": meta.get("heldout", {}).get("num_documents", 0),
               "source_sha256": meta["source_sha256"]}
        assert got == {k: want[k] for k in got}, (workers, piece_bytes, threads)


@pytest.mark.parametrize("name, separator", [("lines.txt", "newline"), ("lines.txt", "blank_line"),
                                             ("paragraphs.txt", "newline"), ("paragraphs.txt", "blank_line"),
                                             ("records.jsonl", "newline")])
def test_a_unit_edge_on_every_byte_reads_what_one_unit_reads(name, separator):
    """The fixture files hold a byte-order mark, CRLF and lone CR, lines of spaces, tabs, a form feed and Unicode
    spaces (no-break, ideographic, em), multi-byte characters, a JSONL record of blank text, no final newline. For
    unit_bytes = 1 .. the file's size, a unit edge falls on every byte: the documents read unit by unit are those of
    one unit, in order, none lost or doubled."""
    from openllm_ds.data import documents

    path = FIXTURE / name
    options = {"doc_separator": separator}
    whole = read_all(path, 10**9, **options)
    assert len(whole) >= 3
    for unit_bytes in range(1, path.stat().st_size + 1):
        assert read_all(path, unit_bytes, **options) == whole, unit_bytes
    # blank_line: whether the line before a unit's first one is blank, read backwards in blocks of any size
    data = path.read_bytes()
    with open(path, "rb") as fh:
        for begin in [i + 1 for i, b in enumerate(data) if b == 0x0A]:
            want = documents.is_blank(data[data.rfind(b"\n", 0, begin - 1) + 1:begin - 1].decode().removeprefix("\ufeff"))
            assert [documents._line_before_is_blank(fh, begin, block) for block in (1, 2, 3, 5, 1 << 16)] == [want] * 5


def test_blank_is_one_rule_for_every_format(tmp_path):
    """A line or record of Unicode whitespace only is no document in text, JSON Lines and Parquet alike (counted as
    empty in records); with blank_line documents it separates them, and a first line of only a byte-order mark
    is blank."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    spaces = "\u00a0\u3000\u2003\x0c\r"
    (tmp_path / "t.txt").write_bytes(f"\ufeffa\n{spaces}\nb\n".encode())
    assert read_all(tmp_path / "t.txt", 3) == read_all(tmp_path / "t.txt", 100) == ["a", "b"]
    (tmp_path / "p.txt").write_bytes(f"\ufeff\na\nb\n{spaces}\nc\n".encode())
    assert read_all(tmp_path / "p.txt", 2, doc_separator="blank_line") == ["a\nb", "c"]
    (tmp_path / "r.jsonl").write_bytes(f'\ufeff\r\n{spaces}\n{json.dumps({"text": spaces})}\n{{"text": "x"}}\n'.encode())
    assert read_all(tmp_path / "r.jsonl", 5) == ["x"]
    pq.write_table(pa.table({"text": [spaces, "y"]}), tmp_path / "t.parquet")
    assert read_all(tmp_path / "t.parquet", 10**9) == ["y"]


def write_lines(path, docs) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(d + "\n" for d in docs), encoding="utf-8")
    return str(path)


def test_the_output_dir_is_never_read_as_input(passages, tokenizer_dir, tmp_path, capsys):
    """`tokenize --output_dir` inside its own input folder: the rerun finds its shards up to date (it does not read
    them as input, nor refuse them as unknown files), and a glob over the folder leaves them out too."""
    from openllm_ds.cli import main

    corpus = tmp_path / "corpus"
    write_lines(corpus / "a.txt", passages[:20])
    argv = ["tokenize", "--input", str(corpus), "--tokenizer_dir", str(tokenizer_dir), "--output_dir",
            str(corpus / "out"), "--num_workers", "0"]
    assert main(argv) == 0
    meta = json.loads((corpus / "out" / "meta.json").read_text())
    assert [f["path"] for f in meta["files"]] == [str((corpus / "a.txt").resolve())]
    capsys.readouterr()
    assert main(argv) == 0 and "up to date" in capsys.readouterr().out
    assert main([*argv[:2], str(corpus / "**" / "*"), *argv[3:]]) == 0  # another spelling: rebuilt, from a.txt only
    assert [f["path"] for f in json.loads((corpus / "out" / "meta.json").read_text())["files"]] == \
        [str((corpus / "a.txt").resolve())]


def test_a_file_two_sources_reach_is_refused(passages, tokenizer_dir, tmp_path):
    """The same file listed twice (any spelling), or a folder and a file in it: refused before any work, naming
    the file and both sources; for --input, --output_dir and --data_files alike."""
    from openllm_ds.cli import main
    from openllm_ds.train.data import shards_dirs

    a = write_lines(tmp_path / "docs" / "a.txt", passages[:10])
    write_lines(tmp_path / "docs" / "b.txt", passages[10:20])
    for inputs in ([a, a], [a, str(tmp_path / "docs" / ".." / "docs" / "a.txt")], [str(tmp_path / "docs"), a]):
        with pytest.raises(UserError, match=rf"--input .* and .* both reach the file {tmp_path / 'docs' / 'a.txt'}; "
                                            r"list each file once"):
            tokenize_corpus(inputs, tokenizer_dir, tmp_path / "out", num_workers=0)
        for extra in ([], ["--output_dir", str(tmp_path / "out")]):
            assert main(["tokenize", "--input", *inputs, "--tokenizer_dir", str(tokenizer_dir), *extra]) == 2
    assert not list(tmp_path.glob("**/*.tokens")) and not (tmp_path / "out").exists()
    cfg = run_config(tokenizer_dir, **{"train.data_files": f"{a},{tmp_path}/docs/./a.txt"})
    with pytest.raises(UserError, match=r"train\.data_files lists .*a\.txt twice \(as .* and .*\); list each source once"):
        shards_dirs(cfg)
    cfg = run_config(tokenizer_dir, **{"train.data_files": f"{tmp_path / 'docs'},{a}"})
    with pytest.raises(UserError, match=r"train\.data_files .*docs and .*a\.txt both reach the file"):
        shards_dirs(cfg)


def run_config(tokenizer_dir, **values):
    from openllm_ds.config import load_run_config

    return load_run_config(None, {"train.tokenizer_dir": str(tokenizer_dir), "tokenizer.num_workers": 0, **values})


def test_two_sources_never_share_a_derived_shards_dir(passages, tokenizer_dir, tmp_path):
    """`X.txt` and a folder `X` both derive `X.tokens`: in one command that is refused naming both; across commands
    the dir records what it was built from (meta.json source.built_from), so the second source is refused rather
    than written over the first's shards, and no stage reads them as its own."""
    from openllm_ds.tokenizer.corpus import built_shards_dir, derived_shards_dirs
    from openllm_ds.train.data import shards_dirs

    x_txt = write_lines(tmp_path / "X.txt", passages[:10])
    x_dir = str(Path(write_lines(tmp_path / "X" / "part.txt", passages[10:20])).parent)
    with pytest.raises(UserError, match=rf"--input {x_txt} and {x_dir} would both have their token shards in "
                                        rf"{tmp_path / 'X.tokens'}; rename one of them, or tokenize one with"):
        derived_shards_dirs([x_txt, x_dir])
    with pytest.raises(UserError, match=r"train\.data_files .* would both have their token shards in"):
        shards_dirs(run_config(tokenizer_dir, **{"train.data_files": f"{x_txt},{x_dir}"}))

    meta = tokenize_corpus(x_txt, tokenizer_dir, num_workers=0)
    assert meta["shards_dir"] == str(tmp_path / "X.tokens")
    assert meta["source"]["built_from"] == ["X.txt"]  # beside the dir: a moved or copied project still matches
    before = file_bytes(tmp_path / "X.tokens")
    with pytest.raises(UserError, match=rf"{tmp_path / 'X.tokens'} holds the token shards of X\.txt, and {x_dir} "
                                        r"would get the same default dir"):
        tokenize_corpus(x_dir, tokenizer_dir, num_workers=0)
    assert file_bytes(tmp_path / "X.tokens") == before
    assert built_shards_dir(x_txt) == tmp_path / "X.tokens"
    with pytest.raises(UserError, match=rf"holds the token shards of X\.txt, not of {x_dir}"):
        built_shards_dir(x_dir)
    # another spelling of the same source is the same source: up to date, not rebuilt
    again = tokenize_corpus(str(tmp_path / "." / "X.txt"), tokenizer_dir, num_workers=0)
    assert "seconds" not in again and file_bytes(tmp_path / "X.tokens") == before
    # a copied project: the same source beside its dir, rebuilt (the files' paths changed), not refused
    import shutil as sh

    sh.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-copy", ignore=sh.ignore_patterns("X"))
    copy = tokenize_corpus(str(tmp_path.parent / f"{tmp_path.name}-copy" / "X.txt"), tokenizer_dir, num_workers=0)
    assert copy["num_documents"] == 10 and "seconds" in copy
    # the user names the dir: its shards are replaced by the folder's
    tokenize_corpus(x_dir, tokenizer_dir, tmp_path / "X.tokens", num_workers=0)
    assert decoded(tmp_path / "X.tokens", tokenizer_dir) == passages[10:20]


def test_several_inputs_are_deduplicated_across_all_of_them(passages, tokenizer_dir, tmp_path):
    """`tokenize --input a b` without --output_dir: each input gets its own shards dir, and a document of b that a
    already holds is removed from b (the first copy kept, in input order), as the README says; in one run."""
    from openllm_ds.cli import main

    a = write_lines(tmp_path / "a.txt", passages[:30])
    b = tmp_path / "b.jsonl"
    b.write_text(jsonl(passages[20:40]), encoding="utf-8")
    argv = ["tokenize", "--input", a, str(b), "--tokenizer_dir", str(tokenizer_dir), "--num_workers", "0"]
    assert main(argv) == 0
    assert decoded(tmp_path / "a.tokens", tokenizer_dir) == passages[:30]
    assert decoded(tmp_path / "b.jsonl.tokens", tokenizer_dir) == passages[30:40]
    meta_b = json.loads((tmp_path / "b.jsonl.tokens" / "meta.json").read_text())
    assert meta_b["counts"]["duplicates"] == 10 and meta_b["counts"]["documents_read"] == 20
    assert meta_b["source"]["deduplicated_after"][0]["built_from"] == ["a.txt"]
    # b alone (train --data_file b) is another corpus: rebuilt with its own documents
    alone = tokenize_corpus(str(b), tokenizer_dir, num_workers=0)
    assert alone["num_documents"] == 20 and "deduplicated_after" not in alone["source"]


def test_finishing_a_unit_again_gives_the_same_files(tmp_path):
    """A unit read as three pieces: joined, less a duplicate in its second piece, into the same shard file as one
    piece gives; a worker killed while it finishes the unit (its temporary file left behind) and the call run again:
    the same files and entries, whether the pieces are joined or one piece is renamed whole."""
    import numpy as np

    from openllm_ds.tokenizer.encode import encode_piece, finish_unit, pieces_of

    src = tmp_path / "docs.txt"
    src.write_text("one\ntwo\nthree\ntwo\nfour five six\nseven\n", encoding="utf-8")
    options = ReadOptions()
    (unit,) = plan_units(resolve_sources([str(src)], options), 10**9)
    tok = load_tokenizer(FIXTURE / "tokenizer")
    out = {}
    for name, pieces, drops in (("whole", [unit], [[]]), ("cut", pieces_of(unit, 10), [[], [0], [], []])):
        d = tmp_path / name
        d.mkdir()
        counts = [6] if name == "whole" else [3, 2, 0, 1]  # 10-byte pieces: one two three | two four.. | - | seven
        assert [len(list(read_unit(p, options))) for p in pieces] == counts
        for part, piece in enumerate(pieces):
            result, hashes = encode_piece(piece, 0, part, d, options, tok.sp, np.dtype("<u2"), 0.0)
            assert result["documents"] == len(hashes) == counts[part]
        (d / "shard_00000.bin.part-99999").write_bytes(b"\x01")  # what a killed finish leaves
        drops = [np.array(x, int) for x in drops]
        first = finish_unit(d, 0, np.dtype("<u2"), drops)
        files = file_bytes(d)
        assert finish_unit(d, 0, np.dtype("<u2"), drops) == first and file_bytes(d) == files
        out[name] = (first, np.fromfile(d / "shard_00000.bin", "<u2"))
    whole, cut = out["whole"][1], out["cut"][1]
    docs = np.split(whole, np.flatnonzero(whole == tok.eos_id) + 1)[:-1]
    assert np.array_equal(cut, np.concatenate([docs[i] for i in (0, 1, 2, 4, 5)]))  # the second "two" dropped
    assert out["cut"][0]["shards"]["train"]["num_documents"] == 5 and out["cut"][0]["digest"] == out["whole"][0]["digest"]


def test_auto_workers_use_ray_only_where_it_can_win(passages, tokenizer_dir, tmp_path, capsys, monkeypatch):
    """--num_workers auto (the default): on one machine (no Ray cluster named) this process, on a thread per CPU plus
    one, up to AUTO_LOCAL_MAX_BYTES; with a cluster (RAY_ADDRESS, or Ray started here) this process below
    AUTO_RAY_BYTES of input or for a single piece, else one Ray worker per CPU (at most one per piece); the thresholds
    and the measurements behind them: README, bench_corpus."""
    import os

    from openllm_ds.tokenizer import runners
    from openllm_ds.tokenizer.runners import AUTO_LOCAL_MAX_BYTES, AUTO_RAY_BYTES, choose_workers

    for cluster in (False, True):
        monkeypatch.setattr(runners, "ray_cluster_named", lambda: cluster)
        assert choose_workers("auto", AUTO_RAY_BYTES - 1, 100) == 0
        assert choose_workers("auto", AUTO_RAY_BYTES, 1) == 0
        assert choose_workers("auto", AUTO_RAY_BYTES, 8) == ("auto" if cluster else 0)
        assert choose_workers("auto", AUTO_LOCAL_MAX_BYTES, 8) == "auto"
        assert choose_workers(2, 10, 1) == 2 and choose_workers(0, 10**12, 10**5) == 0
    monkeypatch.undo()
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert runners.ray_cluster_named()
    monkeypatch.delenv("RAY_ADDRESS")
    assert runners.local_threads() == len(os.sched_getaffinity(0)) + 1
    src = write_lines(tmp_path / "docs.txt", passages[:20])
    meta = tokenize_corpus(src, tokenizer_dir)
    assert "in this process (1 thread)" in capsys.readouterr().out and meta["nodes"] == []  # one piece: one thread
    with pytest.raises(UserError, match=r"--num_workers must be auto or >= 0"):
        tokenize_corpus(src, tokenizer_dir, tmp_path / "x", num_workers="some")
    from openllm_ds.config import load_run_config

    assert load_run_config(None, {}).tokenizer.num_workers == "auto"
    assert load_run_config(None, {"tokenizer.num_workers": "2"}).tokenizer.num_workers == 2
    with pytest.raises(UserError, match=r"tokenizer\.num_workers must be auto or >= 0"):
        load_run_config(None, {"tokenizer.num_workers": "many"})
