"""Stage 1 (prepare): cleaning, dedupe/split rule, input validation, download, Hub, real SQuAD data."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path

import pytest

from openllm_ds.config import DataConfig
from openllm_ds.data import clean_passage, prepare
from openllm_ds.data import download as download_mod
from openllm_ds.data.download import SquadFile, download_official
from openllm_ds.data.preparation import dedupe_and_split
from openllm_ds.data.sources import SquadInput, load_hub
from openllm_ds.errors import ConfigError, DataError, UserError
from openllm_ds.utils import MANIFEST

DEV_V11_SHA256 = "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9"  # published hash
OUTPUTS = ("training_data.txt", "validation_data.txt", "stats.json")


def squad_json(*articles: list[str]) -> dict:
    """A minimal SQuAD file: one article per list of contexts."""
    return {"version": "1.1", "data": [
        {"title": f"a{i}", "paragraphs": [{"context": c, "qas": []} for c in contexts]}
        for i, contexts in enumerate(articles)
    ]}


def raw_contexts(path: Path) -> list[str]:
    return [p["context"] for a in json.loads(path.read_text(encoding="utf-8"))["data"] for p in a["paragraphs"]]


def read_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n")
    return text.splitlines()


def words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{k}" for k in range(n))


# ---------------------------------------------------------------- cleaning


@pytest.mark.parametrize("raw, clean", [
    ("  The  cat\tsat\n\non the\r\nmat.  ", "The cat sat on the mat."),
    ("no\u00a0break and\u3000ideographic space", "no break and ideographic space"),  # NFKC -> U+0020
    ("zero\u200bwidth \ufeffBOM \u200eLRM co\u00adoperate", "zerowidth BOM LRM cooperate"),
    ("showrunner\u200d\u2014\u200cthe producer", "showrunner\u2014the producer"),
    ("bell\x07 and del\x7f gone", "bell and del gone"),
    ("\ufb01ne \uff26\uff55\uff4c\uff4c width", "fine Full width"),  # ligature, full-width letters
    ("cafe\u0301 Tad\u017eikistan \u0422\u043e\u04b7\u0438\u043a", "caf\u00e9 Tad\u017eikistan \u0422\u043e\u04b7\u0438\u043a"),
    ("line\u2028sep\u2029para\x85next\x0bvt\x0cff", "line sep para next vt ff"),
    ("\n \t\u200b ", ""),
])
def test_clean_passage_examples(raw, clean):
    assert clean_passage(raw) == clean


def test_cleaning_fixes_the_whitespace_facts_of_dev_v11(squad_dir):
    contexts = raw_contexts(squad_dir / "dev-v1.1.json")
    # The facts ../shared/data/README.md states about the raw file.
    assert len(contexts) == 2067
    assert sum("\n" in c for c in contexts) == 28
    assert sum(c != c.strip() for c in contexts) == 6
    assert sum("  " in c for c in contexts) == 15
    cleaned = [clean_passage(c) for c in contexts]
    assert not any("\n" in c or "  " in c or c != c.strip() or "\t" in c for c in cleaned)
    assert all(len(c.splitlines()) == 1 for c in cleaned)
    assert [clean_passage(c) for c in cleaned] == cleaned  # idempotent
    # On plain-ASCII text cleaning only touches whitespace: the tokens are unchanged.
    ascii_ones = [c for c in contexts if c.isascii()]
    assert len(ascii_ones) > 1000
    assert all(clean_passage(c).split() == c.split() for c in ascii_ones)


# ---------------------------------------------------------------- dedupe and split rule


def test_dedupe_and_split_rule():
    long_a, long_b, long_c, long_d = (words(10, t) for t in "abcd")
    inputs = [  # a train file that sorts before the dev file by name
        SquadInput("c-train.json", "train", ("x",) * 3),
        SquadInput("b-dev.json", "validation", ("x",) * 4),
        SquadInput("a-train.json", "train", ("x",) * 4),
    ]
    cleaned = [
        [long_c, long_d, words(3)],          # long_c was kept from a-train
        [long_a, words(9), long_b, long_a],  # 9 words < min_words; long_a twice in one file
        [long_b, long_c, "", long_c],        # long_b is a dev passage; "" is too short even with min_words=0
    ]
    passages, stats = dedupe_and_split(inputs, cleaned, min_words=10)
    assert passages == {"validation": [long_a, long_b], "train": [long_c, long_d]}
    assert list(stats) == ["b-dev.json", "a-train.json", "c-train.json"]  # processing order
    pick = lambda s: {k: s[k] for k in ("split", "paragraphs", "kept", "too_short", "duplicates", "characters", "words")}
    assert pick(stats["b-dev.json"]) == dict(split="validation", paragraphs=4, kept=2, too_short=1, duplicates=1,
                                            characters=len(long_a) + len(long_b), words=20)
    assert pick(stats["a-train.json"]) == dict(split="train", paragraphs=4, kept=1, too_short=1, duplicates=2,
                                              characters=len(long_c), words=10)
    assert pick(stats["c-train.json"]) == dict(split="train", paragraphs=3, kept=1, too_short=1, duplicates=1,
                                              characters=len(long_d), words=10)

    passages, stats = dedupe_and_split(inputs, cleaned, min_words=0)
    assert passages == {"validation": [long_a, words(9), long_b], "train": [long_c, long_d, words(3)]}
    assert stats["a-train.json"]["too_short"] == 1 and stats["c-train.json"]["kept"] == 2


# ---------------------------------------------------------------- bad input


def _write(folder: Path, name: str, data: bytes | dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(json.dumps(data).encode() if isinstance(data, dict) else data)
    return path


GOOD = squad_json([words(12)])


@pytest.mark.parametrize("name, data, expect", [
    ("train.json", json.dumps(GOOD).encode()[:25], "not valid JSON"),
    ("dev.json", json.dumps(squad_json(["caf\u00e9 " + words(12)]), ensure_ascii=False).encode("latin-1"), "not UTF-8"),
    ("train.json", b"", "is empty"),
    ("train.json", b" \n ", "is empty"),
    ("preds.json", {"56be4db0acb8001400a502ec": "Denver Broncos"}, "no top-level 'data' list"),
    ("train.json", {"data": [{"title": "t", "paragraphs": [{"text": "no context key"}]}]}, "data[0].paragraphs[0] has no 'context'"),
    ("train.json", {"data": [{"title": "t"}]}, "data[0] has no 'paragraphs'"),
    ("train.json", {"version": "1.1", "data": []}, "holds no paragraphs"),
])
def test_bad_input_file_fails_before_writing(tmp_path, name, data, expect):
    squad = tmp_path / "squad"
    _write(squad, "a-good-dev.json", GOOD)  # a valid file first: every file is checked before any work
    bad = _write(squad, name, data)
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        prepare(DataConfig(squad_dir=str(squad), output_dir=str(out)))
    msg = str(e.value)
    assert expect in msg and str(bad) in msg and "\n" not in msg
    assert not any((out / f).exists() for f in OUTPUTS)


def test_bad_folder_and_output_dir(tmp_path):
    with pytest.raises(DataError, match=r"--squad_dir .*missing does not exist"):
        prepare(DataConfig(squad_dir=str(tmp_path / "missing"), output_dir=str(tmp_path / "o1")))
    _write(tmp_path / "nojson", "notes.txt", b"not json")
    with pytest.raises(DataError, match=r"nojson holds no \*\.json files"):
        prepare(DataConfig(squad_dir=str(tmp_path / "nojson"), output_dir=str(tmp_path / "o2")))
    _write(tmp_path / "squad", "dev.json", GOOD)
    blocker = _write(tmp_path, "a-file", b"x")
    with pytest.raises(UserError, match=r"--output_dir .*a-file/out: .*a-file is a file, not a directory"):
        prepare(DataConfig(squad_dir=str(tmp_path / "squad"), output_dir=str(blocker / "out")))
    with pytest.raises(ConfigError, match="needs --squad_dir"):
        prepare(DataConfig(source="dir", output_dir=str(tmp_path / "o3")))
    with pytest.raises(ConfigError, match="both given"):
        prepare(DataConfig(source="hub", squad_dir=str(tmp_path / "squad"), output_dir=str(tmp_path / "o4")))
    for o in ("o1", "o2", "o3", "o4"):
        assert not any((tmp_path / o / f).exists() for f in OUTPUTS)


# ---------------------------------------------------------------- download


def _no_network(*args, **kwargs):
    raise AssertionError("the cached file should have been used")


def test_download_checks_sha256_and_reuses_the_cache(squad_dir, tmp_path, monkeypatch):
    source = squad_dir / "dev-v1.1.json"
    official = (SquadFile("dev-v1.1.json", source.as_uri(), DEV_V11_SHA256),)
    cache = tmp_path / "cache"
    [path] = download_official(cache, official)
    assert path == cache / "dev-v1.1.json" and path.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == ["dev-v1.1.json"]  # no temp file left
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    assert download_official(cache, official) == [path]


def test_download_rejects_a_hash_mismatch_and_replaces_a_corrupt_cache(squad_dir, tmp_path):
    cache = tmp_path / "cache"
    wrong = (SquadFile("dev-v1.1.json", (squad_dir / "train-v1.1-subset.json").as_uri(), DEV_V11_SHA256),)
    with pytest.raises(DataError, match=r"sha256 .* published hash is 95aa6a52d5d6a735"):
        download_official(cache, wrong)
    assert list(cache.iterdir()) == []  # neither the official name nor a .part file
    (cache / "dev-v1.1.json").write_bytes(b"{}")  # corrupt cached copy: fetched again
    right = (SquadFile("dev-v1.1.json", (squad_dir / "dev-v1.1.json").as_uri(), DEV_V11_SHA256),)
    download_official(cache, right)
    assert hashlib.sha256((cache / "dev-v1.1.json").read_bytes()).hexdigest() == DEV_V11_SHA256


def test_offline_download_says_to_pass_squad_dir(tmp_path, monkeypatch):
    unreachable = (SquadFile("dev-v1.1.json", "http://127.0.0.1:9/dev-v1.1.json", DEV_V11_SHA256),)
    monkeypatch.setattr(download_mod, "OFFICIAL_FILES", unreachable)
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        prepare(DataConfig(source="download", cache_dir=str(tmp_path / "cache"), output_dir=str(out)))
    msg = str(e.value)
    assert "cannot download http://127.0.0.1:9/dev-v1.1.json" in msg and "--squad_dir DIR" in msg and "\n" not in msg
    assert not any((out / f).exists() for f in OUTPUTS)


# ---------------------------------------------------------------- Hub


def test_hub_unreachable_is_a_clear_error(tmp_path):
    # conftest sets HF_DATASETS_OFFLINE=1, and the cache is empty: the Hub cannot be reached.
    with pytest.raises(DataError) as e:
        prepare(DataConfig(source="hub", cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out")))
    assert "cannot load rajpurkar/squad from the Hugging Face Hub" in str(e.value) and "--squad_dir" in str(e.value)
    assert not any((tmp_path / "out" / f).exists() for f in OUTPUTS)


def test_hub_rows_fold_into_paragraphs(tmp_path, monkeypatch):
    import datasets

    rows = {"train": ["P1", "P1", "P2", "P1"], "validation": ["D1", "D1", "D1"]}
    fake = datasets.DatasetDict({k: datasets.Dataset.from_dict({"context": v}) for k, v in rows.items()})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, cache_dir: calls.append(repo) or fake)
    inputs = load_hub(tmp_path)
    assert calls == ["rajpurkar/squad", "rajpurkar/squad_v2"]
    assert [(i.name, i.split, i.contexts) for i in inputs[:2]] == [
        ("rajpurkar/squad:validation", "validation", ("D1",)),
        ("rajpurkar/squad:train", "train", ("P1", "P2", "P1")),  # only consecutive repeats fold
    ]


# ---------------------------------------------------------------- real data (../shared/data/squad)


def test_prepared_passages_match_the_source_files(prepared_data, squad_dir):
    min_words = 10

    def kept(name):
        texts = [clean_passage(c) for c in raw_contexts(squad_dir / name)]
        return [t for t in texts if len(t.split()) >= min_words]

    dev, dev2, train = kept("dev-v1.1.json"), kept("dev-v2.0-part.json"), kept("train-v1.1-subset.json")
    assert set(dev2) <= set(dev)  # README: every v2.0-part context is in dev-v1.1
    validation = read_lines(prepared_data / "validation_data.txt")
    training = read_lines(prepared_data / "training_data.txt")
    assert validation == list(dict.fromkeys(dev))  # every unique dev passage, in order of first appearance
    assert training == [t for t in dict.fromkeys(train) if t not in set(dev)]
    assert not set(training) & set(validation)
    assert len(set(training)) == len(training) == len(set(train))


def test_prepared_stats(prepared_data, squad_dir):
    stats = json.loads((prepared_data / "stats.json").read_text())
    files = stats["files"]
    # Paragraph counts from ../shared/data/README.md; the train subset repeats one context.
    assert {n: f["paragraphs"] for n, f in files.items()} == {
        "dev-v1.1.json": 2067, "dev-v2.0-part.json": 646, "train-v1.1-subset.json": 2430}
    assert files["train-v1.1-subset.json"]["duplicates"] == 1
    assert files["dev-v2.0-part.json"]["kept"] == 0
    for name, f in files.items():
        assert f["kept"] + f["too_short"] + f["duplicates"] == f["paragraphs"]
        assert f["paragraphs"] == len(raw_contexts(squad_dir / name))
        assert f["sha256"] == hashlib.sha256((squad_dir / name).read_bytes()).hexdigest()
    assert files["dev-v1.1.json"]["sha256"] == DEV_V11_SHA256
    for split, name in (("train", "training_data.txt"), ("validation", "validation_data.txt")):
        lines = read_lines(prepared_data / name)
        total = stats["splits"][split]
        assert total["output"] == name
        assert total["kept"] == len(lines) == sum(f["kept"] for f in files.values() if f["split"] == split)
        assert total["characters"] == sum(map(len, lines))
        assert total["words"] == sum(len(line.split()) for line in lines)
        assert total["sha256"] == hashlib.sha256((prepared_data / name).read_bytes()).hexdigest()


def test_outputs_do_not_depend_on_num_workers(prepared_data, squad_dir, tmp_path):
    out = tmp_path / "clean"
    out.mkdir()
    for name in OUTPUTS:  # a previous run's outputs are replaced
        (out / name).write_text("stale\n")
    stats = prepare(DataConfig(squad_dir=str(squad_dir), output_dir=str(out), num_workers=1))
    assert json.loads((out / "stats.json").read_text()) == stats
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (prepared_data / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUTS, MANIFEST])  # no temp files left


def test_download_source_gives_the_same_passages(prepared_data, squad_dir, tmp_path, monkeypatch):
    official = tuple(
        SquadFile(name, (squad_dir / name).as_uri(), hashlib.sha256((squad_dir / name).read_bytes()).hexdigest())
        for name in ("dev-v1.1.json", "dev-v2.0-part.json", "train-v1.1-subset.json")
    )
    monkeypatch.setattr(download_mod, "OFFICIAL_FILES", official)
    out = tmp_path / "clean"
    stats = prepare(DataConfig(source="download", cache_dir=str(tmp_path / "cache"), output_dir=str(out)))
    assert stats["source"] == "download"
    for name in ("training_data.txt", "validation_data.txt"):
        assert (out / name).read_bytes() == (prepared_data / name).read_bytes()


def test_tiny_folder_end_to_end(tmp_path):
    """Cleaning on Ray, a lone surrogate, a cross-split duplicate and min_words, on a hand-made folder."""
    a, b, c = words(10, "a"), words(10, "b"), words(10, "c")
    squad = tmp_path / "squad"
    _write(squad, "a-train.json", squad_json([" " + a + "\n", "x\ud800 " + b, "short one"], [c.replace(" ", "\u00a0 ")]))
    _write(squad, "dev.json", squad_json([a]))
    stats = prepare(DataConfig(squad_dir=str(squad), output_dir=str(tmp_path / "out"), min_words=10, num_workers=2))
    assert read_lines(tmp_path / "out" / "validation_data.txt") == [a]
    assert read_lines(tmp_path / "out" / "training_data.txt") == ["x " + b, c]
    t = stats["files"]["a-train.json"]
    assert (t["paragraphs"], t["kept"], t["too_short"], t["duplicates"]) == (4, 2, 1, 1)
    assert (t["words"], t["characters"]) == (21, len("x " + b) + len(c))
