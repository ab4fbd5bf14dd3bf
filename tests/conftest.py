"""Shared test fixtures: paths to the real data in ../shared/data, and Ray clean-up."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, TRAINED_SHAPE, free_port, generated_text, make_fake_run, place_conversation, SFT_PLACES

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
def tok(tokenizer_dir):
    """tokenizer_dir's tokenizer, loaded."""
    from openllm_ds.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def token_shards(prepared_data, tokenizer_dir) -> dict[str, Path]:
    """Token shards of both splits, at the default place beside each text file."""
    from openllm_ds.tokenizer import tokenize_corpus

    out = {}
    for split, name in (("train", "training_data.txt"), ("val", "validation_data.txt")):
        meta = tokenize_corpus(prepared_data / name, tokenizer_dir, num_workers=2)
        out[split] = Path(meta["shards_dir"])
    return out


@pytest.fixture()
def ray_head(tmp_path):
    """A real Ray head started with `ray start --head` (2 CPUs, job server on a free port); stopped after."""
    import ray

    ray.shutdown()  # an instance this test process started earlier; `ray stop` below would kill it anyway
    bin_dir = Path(sys.executable).parent
    # token authentication on, with one token for the head and every client (a head started with
    # auth and a client without it, or the reverse, refuse each other)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    gcs, dashboard = free_port(), free_port()
    start = [str(bin_dir / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
             "--disable-usage-stats"]
    r = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    address = f"http://127.0.0.1:{dashboard}"
    try:
        # the head's job agent comes up some seconds after `ray start` returns: wait for a first job
        deadline = time.monotonic() + 120
        while True:
            r = subprocess.run([str(bin_dir / "ray"), "job", "submit", "--address", address, "--", "python", "-c", "0"],
                               env=env, capture_output=True, text=True, timeout=120)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        yield env, address
    finally:
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


# A small trained model for the serving tests: vLLM, the built-in server, transformers and `generate` must
# agree on its greedy tokens and first logits (a random model's near-uniform logits would make ties).



@pytest.fixture(scope="session")
def trained_export(prepared_data, tokenizer_dir, tmp_path_factory):
    """(Hugging Face export dir, model): TRAINED_SHAPE trained 150 steps on the training passages by a plain
    PyTorch loop (seconds), saved as a training output and exported with `openllm-ds export`."""
    import torch

    from openllm_ds.config import ModelConfig
    from openllm_ds.model import Transformer
    from openllm_ds.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    ids = []
    for line in (prepared_data / "training_data.txt").read_text(encoding="utf-8").splitlines()[:1500]:
        ids += tok.encode(line) + [tok.eos_id]  # documents end with EOS, as in the token shards
    data = torch.tensor(ids)
    cfg = ModelConfig(vocab_size=tok.vocab_size, tie_embeddings=True, **TRAINED_SHAPE)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        start = torch.randint(0, len(data) - 65, (16,), generator=g)
        window = torch.stack([data[i:i + 65] for i in start])
        loss = model(window[:, :-1], window[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return export_trained(model, cfg, tokenizer_dir, tmp_path_factory.mktemp("trained"), 150, loss.item(), "trained-tiny")


def export_trained(model, cfg, tokenizer_dir, root: Path, steps: int, loss: float, name: str):
    """(Hugging Face export dir, model): ``model`` saved as a training output at step ``steps`` in ``root``/run (with
    its tokenizer), exported with `openllm-ds export` to ``root``/hf."""
    from safetensors.torch import save_file

    from openllm_ds.config import ExportConfig, RunConfig, TrainConfig
    from openllm_ds.export import export

    step = root / "run" / "checkpoints" / f"step_{steps:08d}"
    step.mkdir(parents=True)
    run = RunConfig(name=name, model=cfg, train=TrainConfig(tokenizer_dir=str(tokenizer_dir), max_steps=steps))
    run.save(root / "run" / "run_config.yaml")
    run.save(step / "run_config.yaml")
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(step / "model.safetensors"))
    (step / "train_state.json").write_text(json.dumps({"step": steps, "val_loss": loss, "tokens_seen": steps * 1024}))
    (root / "run" / "checkpoints" / "latest").write_text(step.name)
    shutil.copytree(tokenizer_dir, root / "run" / "tokenizer")
    export(ExportConfig(model_dir=str(root / "run"), format="huggingface", output_dir=str(root / "hf"), verify=True))
    return root / "hf", model


@pytest.fixture(scope="session")
def finetuned_export(trained_export, tokenizer_dir, tmp_path_factory):
    """(Hugging Face export dir, model): trained_export's model fine-tuned 80 steps on SQuAD-style conversations by a
    plain PyTorch loop over the SFT data path (tokenizer/chat.encode_conversation, finetune/data.collate: loss on the
    answers), saved and exported as a training output (seconds)."""
    import copy
    import itertools

    import numpy as np
    import torch

    from openllm_ds.finetune.data import collate
    from openllm_ds.tokenizer import load_tokenizer
    from openllm_ds.tokenizer.chat import SpecialTokens, encode_conversation, load_chat_template

    _, base = trained_export
    tok = load_tokenizer(tokenizer_dir)
    template, special = load_chat_template(tokenizer_dir, tok), SpecialTokens(tok)
    examples = [encode_conversation(place_conversation(a, b), template, special)
                for a, b in itertools.permutations(SFT_PLACES, 2)]
    model = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(80):
        batch = [examples[i] for i in rng.choice(len(examples), 16)]
        x, y = collate([np.asarray(i) for i, _ in batch], [np.asarray(lab) for _, lab in batch], tok.pad_id, "cpu")
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return export_trained(model, base.cfg, tokenizer_dir, tmp_path_factory.mktemp("finetuned"), 80, loss.item(),
                          "trained-tiny-sft")


# A small model that needs no shared data: a 300-token tokenizer trained on generated sentences, and a random
# model of context 32 saved as a training output (seconds to build). For tests of the read side's boundaries:
# sampling parameters, text, output locks.

@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    """A training output (models/NAME layout) of a random 1-layer model, context 32, with its own tokenizer."""
    from openllm_ds.config import ModelConfig, TokenizerConfig
    from openllm_ds.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("small_run")
    (root / "training_data.txt").write_text(generated_text(200, 0), encoding="utf-8")
    train_tokenizer(TokenizerConfig(input=str(root / "training_data.txt"), output_dir=str(root / "tok"), vocab_size=300))
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=32, dropout=0.0)
    make_fake_run(root / "run", root / "tok", steps=(2,), cfg=cfg, seed=0, val_loss=None, tokens_per_step=None,
                  name="small")
    return root / "run"
