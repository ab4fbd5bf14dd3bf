"""Helpers the test modules share (fixtures are in conftest.py): no test module imports another."""

from __future__ import annotations

import json
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# the tiny random models of the export, serving and evaluation tests
TINY = dict(d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=128, dropout=0.0)
VAL_LOSS = 5.25
# a small trained model for the serving tests (conftest.trained_export): head size 32
TRAINED_SHAPE = dict(d_model=64, n_layers=2, n_heads=2, d_ff=128, max_seq_len=128, dropout=0.0)
WORDS = ("river", "castle", "Norman", "empire", "music", "science", "harbour", "winter", "market", "church",
         "railway", "island", "treaty", "garden", "engine", "library", "village", "theatre", "bridge", "forest")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generated_text(lines: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return "".join(" ".join(rng.choice(WORDS, size=14)) + ".\n" for _ in range(lines))


# ---- fake training outputs ------------------------------------------------------------------------

def tiny_config(vocab_size: int, **kw):
    """The evaluation tests' model: context 32."""
    from openllm_ds.config import ModelConfig

    base = dict(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32, dropout=0.0)
    return ModelConfig(**{**base, **kw})


def make_fake_run(out: Path, tokenizer_dir: Path, steps=(10,), cfg=None, *, tie: bool = True, seed: int | None = 0,
                  vocab_size: int | None = None, val_loss: float | None = VAL_LOSS, tokens_per_step: int | None = 4096,
                  zero_final_norm: bool = False, name: str = "fake-run", train: dict | None = None, **model_kw) -> dict:
    """A training output as the trainer writes it, with random models: checkpoints/step_N/{model.safetensors,
    train_state.json, run_config.yaml}, checkpoints/latest, run_config.yaml, tokenizer/. Returns {step: model}.

    ``cfg``: the model config (default: TINY with ``tie`` and ``model_kw``); ``seed``: step i's weights from
    seed + i (None: from the step number); ``zero_final_norm`` zeroes the final RMSNorm weight, so every logit is
    0 (a uniform model); ``train``: TrainConfig fields (default max_steps = the last step)."""
    import torch
    from safetensors.torch import save_file

    from openllm_ds.config import ModelConfig, RunConfig, TrainConfig
    from openllm_ds.model import Transformer
    from openllm_ds.tokenizer import load_tokenizer

    out = Path(out)
    if cfg is None:
        vocab = vocab_size or load_tokenizer(tokenizer_dir).vocab_size
        cfg = ModelConfig(vocab_size=vocab, tie_embeddings=tie, **{**TINY, **model_kw})
    train_fields = train if train is not None else {"max_steps": max(steps)}
    run = RunConfig(name=name, model=cfg, train=TrainConfig(tokenizer_dir=str(tokenizer_dir), **train_fields))
    out.mkdir(parents=True, exist_ok=True)
    run.save(out / "run_config.yaml")
    models = {}
    for i, step in enumerate(steps):
        torch.manual_seed(step if seed is None else seed + i)
        model = Transformer(cfg).eval()
        if zero_final_norm:
            model.norm.weight.data.zero_()
        d = out / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()
              if not (cfg.tie_embeddings and k == "lm_head.weight")}
        save_file(sd, str(d / "model.safetensors"))
        state = {"step": step, **({"val_loss": val_loss} if val_loss is not None else {}),
                 **({"tokens_seen": step * tokens_per_step} if tokens_per_step is not None else {})}
        (d / "train_state.json").write_text(json.dumps(state))
        run.save(d / "run_config.yaml")
        models[step] = model
    (out / "checkpoints" / "latest").write_text(f"step_{max(steps):08d}")
    shutil.copytree(tokenizer_dir, out / "tokenizer")
    return models


def eval_run(root: Path, tokenizer_dir: Path, steps=(10,), cfg=None, zero_final_norm: bool = False,
             data_file: str | None = None) -> Path:
    """``make_fake_run`` as the evaluation tests use it: their tiny_config model, weights seeded by step, the run's
    output_dir (and data_file) in its config; returns the run dir."""
    from openllm_ds.tokenizer import load_tokenizer

    root = Path(root)
    make_fake_run(root, tokenizer_dir, steps, cfg or tiny_config(load_tokenizer(tokenizer_dir).vocab_size), seed=None,
                  val_loss=None, tokens_per_step=1000, zero_final_norm=zero_final_norm, name="fake",
                  train={"output_dir": str(root), **({"data_file": data_file} if data_file else {})})
    return root


def biased(model, token_logits: dict[int, float]):
    """Replace the LM head by a bias: fixed next-token probabilities whatever the input."""
    import torch

    head = torch.nn.Linear(model.cfg.d_model, model.cfg.vocab_size, bias=True)
    head.weight.data.zero_()
    head.bias.data.fill_(-1e4)
    for t, v in token_logits.items():
        head.bias.data[t] = v
    model.lm_head = head
    return model


# ---- training runs ----------------------------------------------------------------------------------

def tiny_cfg(prepared_data, tokenizer_dir, output_dir, **overrides):
    """The tiny training run of the train tests (``section__key=value`` overrides)."""
    from openllm_ds.config import load_run_config

    values = {
        "name": "tiny-test",
        "model.vocab_size": 8000, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.d_ff": 192,
        "model.max_seq_len": 64, "model.dropout": 0.0,
        "train.data_file": str(prepared_data / "training_data.txt"), "train.tokenizer_dir": str(tokenizer_dir),
        "train.ds_config": str(ROOT / "ds_configs/zero2.json"), "train.output_dir": str(output_dir),
        "train.micro_batch_size": 8, "train.learning_rate": 3e-3, "train.warmup_steps": 10, "train.max_steps": 60,
        "train.eval_every": 20, "train.eval_batches": 4, "train.save_every": 20, "train.keep_last": 2,
        "train.log_every": 1,
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_run_config(None, values)


def run_cfg(ds_config, **overrides):
    """A run config for the config-generation tests: a 512-token model, context 32."""
    from openllm_ds.config import load_run_config

    base = {"model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.d_ff": 128,
            "model.max_seq_len": 32, "train.ds_config": str(ds_config), "train.output_dir": "/tmp/run-x"}
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_run_config(None, base)


DISTRIBUTED_STEPS = 6  # the multi-rank tests' run length


def train_flags(prepared_data, tokenizer_dir, out, ds_config="zero2", max_steps=DISTRIBUTED_STEPS) -> list[str]:
    """The flags of the tiny test run (as tiny_cfg with the multi-rank tests' settings) for the command-line
    launchers."""
    return ["--data_file", str(prepared_data / "training_data.txt"), "--tokenizer_dir", str(tokenizer_dir),
            "--output_dir", str(out), "--ds_config", str(ROOT / f"ds_configs/{ds_config}.json"),
            "--batch_size", "8", "--max_steps", str(max_steps), "--save_every", "3", "--eval_every", "3",
            "--learning_rate", "3e-3", "train.warmup_steps=2", "train.eval_batches=4", "train.log_every=1",
            "model.vocab_size=8000", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.d_ff=192",
            "model.max_seq_len=64", "model.dropout=0.0"]


def logged(output_dir, key="train/loss"):
    """{step: value} from train_log.jsonl (the last line for a step wins, as after a resume)."""
    out = {}
    for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if key in row:
            out[row["step"]] = float(row[key])
    return out


# ---- token shards -----------------------------------------------------------------------------------

def file_bytes(root) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(root).iterdir())}


def write_shards(root, stream: np.ndarray, cuts: list[int], vocab_size: int):
    """A shards dir holding ``stream`` cut at ``cuts``, with its meta.json, written by hand."""
    from openllm_ds.tokenizer.shards import token_dtype

    dtype = token_dtype(vocab_size)
    shards = []
    for k, part in enumerate(np.split(stream, cuts)):
        name = f"shard_{k:05d}.bin"
        part.astype(dtype).tofile(Path(root) / name)
        shards.append({"file": name, "num_tokens": int(part.size), "num_documents": 0, "num_bytes": 0,
                       "max_id": int(part.max()), "unit": k})
    meta = {"format": 2, "vocab_size": vocab_size, "dtype": dtype.name, "eos_id": 2, "tokenizer_sha256": "-",
            "source": {}, "num_tokens": int(stream.size), "num_documents": 1, "shards": shards}
    (Path(root) / "meta.json").write_text(json.dumps(meta))


# ---- fine-tuning ------------------------------------------------------------------------------------

SFT_PLACES = ("river", "castle", "harbour", "market", "church", "village", "bridge", "forest")


def place_conversation(a: str, b: str) -> list[dict]:
    """A SQuAD-style conversation: a one-sentence passage, a blank line, the question; the span as the answer."""
    return [{"role": "user", "content": f"The {a} is beside the {b}.\n\nWhat is beside the {a}?"},
            {"role": "assistant", "content": f"the {b}"}]


@contextmanager
def killed_after_checkpoint(monkeypatch, step: int):
    """Inside the block the training loop's save of step ``step`` is followed by a KeyboardInterrupt, as if the
    process were killed right after that checkpoint; the real save is back after the block."""
    from openllm_ds.train import loop

    real_save = loop.save_checkpoint

    def save_then_die(engine, cfg, state, env, stage):
        path = real_save(engine, cfg, state, env, stage)
        if state.step == step:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    try:
        yield
    finally:
        monkeypatch.setattr(loop, "save_checkpoint", real_save)
