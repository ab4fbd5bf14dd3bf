"""Training on a user's own corpus: a JSON Lines file validated on its held-out share, and a weighted
mixture of two sources (deterministic shares, per-source validation, exact resume, no silent data swap)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from openllm_ds.cli import main
from openllm_ds.config import load_run_config
from openllm_ds.errors import ConfigError, UserError
from openllm_ds.tokenizer import TokenShards
from openllm_ds.train import train

from helpers import ROOT, killed_after_checkpoint, logged

pytestmark = pytest.mark.slow


def last_json(stdout: str) -> dict:
    """The JSON object the CLI prints last."""
    return json.loads(stdout[stdout.rindex("\n{\n") + 1:] if "\n{\n" in stdout else stdout[stdout.index("{"):])


def run_cfg(tokenizer_dir, output_dir, **values):
    base = {
        "name": "own-data",
        "model.vocab_size": 8000, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.d_ff": 192,
        "model.max_seq_len": 64, "model.dropout": 0.0, "tokenizer.num_workers": 0,
        "train.tokenizer_dir": str(tokenizer_dir), "train.ds_config": str(ROOT / "ds_configs/zero2.json"),
        "train.output_dir": str(output_dir), "train.micro_batch_size": 8, "train.learning_rate": 3e-3,
        "train.warmup_steps": 4, "train.eval_batches": 4, "train.log_every": 1, "train.keep_last": 5,
    }
    return load_run_config(None, {**base, **values})


@pytest.fixture(scope="module")
def wiki(wikitext_test, tmp_path_factory) -> Path:
    """WikiText-2's test file, copied (its shards are written beside it, never into ../shared/data)."""
    dst = tmp_path_factory.mktemp("wiki") / "wiki.txt"
    shutil.copy(wikitext_test, dst)
    return dst


def test_a_jsonl_corpus_trains_and_validates_on_its_held_out_share(prepared_data, tokenizer_dir, tmp_path, capsys):
    passages = (prepared_data / "training_data.txt").read_text(encoding="utf-8").split("\n")[:-1]
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"content": p}) + "\n" for p in passages), encoding="utf-8")
    out = tmp_path / "run"
    argv = ["train", "--data_file", str(src), "--text_field", "content", "--tokenizer_dir", str(tokenizer_dir),
            "--ds_config", str(ROOT / "ds_configs/zero2.json"), "--output_dir", str(out), "--max_steps", "6",
            "--batch_size", "8", "--eval_every", "6", "--save_every", "6", "--holdout_fraction", "0.05",
            "model.vocab_size=8000", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.d_ff=192",
            "model.max_seq_len=64", "tokenizer.num_workers=0", "train.eval_batches=4"]
    assert main(argv) == 0
    summary = last_json(capsys.readouterr().out)
    shards = src.with_name("corpus.jsonl.tokens")
    train_part, held = TokenShards(shards), TokenShards(shards, "heldout")
    assert train_part.num_documents + held.num_documents == len(passages)
    assert 0.02 < held.num_documents / len(passages) < 0.08
    (source,) = summary["sources"]
    assert source["validation"] == f"the held-out 0.05 of {src}" and source["token_share"] == 1.0
    assert summary["val_loss"] == source["val_loss"] < 9.0

    # evaluate with no --eval_data scores the run's held-out documents, decoded from their shards
    assert main(["evaluate", "--model_dir", str(out), "--stride", "64"]) == 0
    report = last_json(capsys.readouterr().out)
    assert report["num_documents"] == held.num_documents
    assert report["eval_data"].startswith(f"held-out documents of {src}")


def test_a_weighted_mixture_samples_resumes_and_validates_per_source(prepared_data, tokenizer_dir, wiki, tmp_path,
                                                                     monkeypatch):
    squad = str(prepared_data / "training_data.txt")
    mix = {"train.data_files": [squad, str(wiki)], "train.data_weights": [0.7, 0.3], "train.max_steps": 16,
           "train.save_every": 4, "train.eval_every": 8}
    straight = train(run_cfg(tokenizer_dir, tmp_path / "straight", **mix))

    # every step keeps each source's share of the windows within one window of its weight
    for name, weight in (("training_data", 0.7), ("wiki", 0.3)):
        shares = logged(tmp_path / "straight", f"data/share/{name}")
        assert sorted(shares) == list(range(1, 17))
        assert all(abs(shares[s] - weight) <= 1 / (8 * s) + 1e-12 for s in shares), (name, shares)
    names = [s["name"] for s in straight["sources"]]
    assert names == ["training_data", "wiki"]
    assert [s["validation"] for s in straight["sources"]] == [str(prepared_data / "validation_data.txt"),
                                                               f"the held-out 0.01 of {wiki}"]
    a, b = (logged(tmp_path / "straight", f"eval/{n}/loss") for n in names)
    overall = logged(tmp_path / "straight", "eval/loss")
    assert sorted(overall) == [8, 16]
    assert all(overall[s] == pytest.approx(0.7 * a[s] + 0.3 * b[s], rel=1e-12) for s in overall)
    assert a[16] != b[16]  # two validation sets, two losses
    assert sum(s["token_share"] for s in straight["sources"]) == pytest.approx(1.0)

    # killed right after the step-8 checkpoint, then resumed: the same losses and shares, bit for bit
    cfg = run_cfg(tokenizer_dir, tmp_path / "resumed", **mix)
    with killed_after_checkpoint(monkeypatch, 8), pytest.raises(KeyboardInterrupt):
        train(cfg)
    resumed = train(cfg)
    assert resumed["resumed_from_step"] == 8
    for key in ("train/loss", "data/share/wiki", "eval/wiki/loss"):
        assert logged(tmp_path / "resumed", key) == logged(tmp_path / "straight", key), key
    assert resumed["sources"] == straight["sources"]

    # other data for a checkpoint is refused, unless asked for
    other = {**mix, "train.data_weights": [0.5, 0.5], "train.max_steps": 18}
    with pytest.raises(UserError, match=r"was trained on other data than .*train\.allow_data_change=true"):
        train(run_cfg(tokenizer_dir, tmp_path / "resumed", **other))
    changed = train(run_cfg(tokenizer_dir, tmp_path / "resumed", **other, **{"train.allow_data_change": True}))
    assert changed["resumed_from_step"] == 16 and changed["final_step"] == 18


def test_mixture_config_errors():
    with pytest.raises(ConfigError, match=r"train\.data_file and train\.data_files were both set in the command line"):
        load_run_config(None, {"train.data_file": "a.txt", "train.data_files": "b.txt,c.txt"})
    with pytest.raises(ConfigError, match=r"train\.eval_data is for one train\.data_file"):
        load_run_config(None, {"train.data_files": "b.txt,c.txt", "train.eval_data": "v.txt"})
    cfg = load_run_config(None, {"train.data_files": "b.txt,c.txt", "train.data_weights": "3,1"})
    assert cfg.train.sources == [("b.txt", 0.75), ("c.txt", 0.25)] and cfg.eval_data is None
    assert load_run_config(None, {"train.data_file": "x/training_data.txt"}).eval_data == "x/validation_data.txt"
    assert load_run_config(None, {"train.data_file": "x/validation_data.txt"}).eval_data is None  # not itself


def test_train_takes_the_lock_of_the_shards_dir_it_writes(prepared_data, tokenizer_dir, tmp_path):
    """train tokenizes its data into a shards dir: one writer at a time there, as with `openllm-ds tokenize`."""
    from openllm_ds.output_lock import OutputLock
    from openllm_ds.tokenizer.corpus import shards_dir_for
    from openllm_ds.train.data import ensure_token_shards
    from openllm_ds.train.distributed import DistEnv
    from openllm_ds.tokenizer import load_tokenizer

    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"document number {i} of the corpus\n" for i in range(50)), encoding="utf-8")
    cfg = run_cfg(tokenizer_dir, tmp_path / "run", **{"train.data_file": str(text)})
    sha = load_tokenizer(tokenizer_dir).sha256
    env = DistEnv(rank=0, local_rank=0, world_size=1, device="cpu")
    with OutputLock(shards_dir_for(str(text)), "tokenize"):  # another writer holds it
        with pytest.raises(UserError, match=r"corpus\.tokens is in use by openllm-ds tokenize"):
            ensure_token_shards(str(text), cfg, sha, env, 0.1, "--data_file")
    assert not shards_dir_for(str(text)).exists()  # nothing written under another writer
    out = ensure_token_shards(str(text), cfg, sha, env, 0.1, "--data_file")  # free again: it builds
    assert out == shards_dir_for(str(text)).resolve() and (out / "meta.json").is_file()
    assert not (tmp_path / ".corpus.tokens.lock").exists()  # released
