"""Shared test fixtures: paths to the real data in ../shared/data, and Ray clean-up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("OPENLLM_SHARED_DATA", ROOT.parent / "shared" / "data"))
SQUAD_DIR = SHARED_DATA / "squad"
WIKITEXT_TEST = SHARED_DATA / "wikitext-2" / "wiki.test.raw"
PREDICTIONS_DIR = SHARED_DATA / "squad-predictions"

# Tests must never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (real SQuAD/WikiText files live in ../shared/data beside the repo)")
    return path


@pytest.fixture(scope="session")
def squad_dir() -> Path:
    return need_shared(SQUAD_DIR)


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    return need_shared(WIKITEXT_TEST)


@pytest.fixture(scope="session")
def predictions_dir() -> Path:
    return need_shared(PREDICTIONS_DIR)


@pytest.fixture(scope="session", autouse=True)
def _ray_shutdown():
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


# Session-wide pipeline artefacts built once from the real shared data (stages 1-2), reused
# by the tokenizer, training, evaluation and export tests.

@pytest.fixture(scope="session")
def prepared_data(squad_dir, tmp_path_factory) -> Path:
    """data/clean built by `prepare` from ../shared/data/squad: training_data.txt, validation_data.txt, stats.json."""
    from openllm_ds.config import DataConfig
    from openllm_ds.data import prepare

    out = tmp_path_factory.mktemp("clean")
    prepare(DataConfig(source="dir", squad_dir=str(squad_dir), output_dir=str(out), num_workers=2))
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(prepared_data, tmp_path_factory) -> Path:
    """An 8k SentencePiece BPE tokenizer trained on prepared_data/training_data.txt."""
    from openllm_ds.config import TokenizerConfig
    from openllm_ds.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(
        TokenizerConfig(input=str(prepared_data / "training_data.txt"), output_dir=str(out), vocab_size=8000),
        validation_file=str(prepared_data / "validation_data.txt"),
    )
    return out


@pytest.fixture(scope="session")
def token_shards(prepared_data, tokenizer_dir) -> dict[str, Path]:
    """Token shards of both splits, at the default place beside each text file."""
    from openllm_ds.tokenizer import tokenize_file

    out = {}
    for split, name in (("train", "training_data.txt"), ("val", "validation_data.txt")):
        meta = tokenize_file(prepared_data / name, tokenizer_dir, num_workers=2)
        out[split] = Path(meta["shards_dir"])
    return out
