"""Configs: every shipped preset parses, precedence, and errors that name the key and the file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openllm_ds.cli import build_parser, run_config_from_args
from openllm_ds.config import ModelConfig, load_run_config
from openllm_ds.errors import ConfigError
from openllm_ds.model import Transformer

ROOT = Path(__file__).resolve().parents[2]
EXPECTED_PARAMS = {"tiny": (1.5e6, 2.5e6), "small": (22e6, 28e6), "medium": (110e6, 125e6), "large": (330e6, 380e6)}


@pytest.mark.parametrize("preset", sorted(EXPECTED_PARAMS))
def test_every_preset_parses_and_has_its_size(preset):
    cfg = load_run_config(ROOT / "configs" / f"{preset}.yaml")
    assert cfg.name == preset
    assert cfg.model.vocab_size == cfg.tokenizer.vocab_size
    # the model JSON of the user guide describes the same shape as the YAML preset
    model_json = json.loads((ROOT / "configs" / f"{preset}_model.json").read_text())
    assert ModelConfig(**model_json) == cfg.model
    with torch.device("meta"):
        n = Transformer(cfg.model).num_params()
    lo, hi = EXPECTED_PARAMS[preset]
    assert lo <= n <= hi, n


def test_precedence_defaults_yaml_model_json_cli(tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text("name: exp\ntrain:\n  max_steps: 50\n  learning_rate: 1.0e-3\nmodel:\n  d_model: 64\n  n_heads: 4\n")
    mj = tmp_path / "m.json"
    mj.write_text(json.dumps({"d_model": 96, "n_heads": 6}))
    cfg = load_run_config(yml, {"train.max_steps": "7"}, mj)
    assert (cfg.name, cfg.train.max_steps, cfg.train.learning_rate) == ("exp", 7, 1e-3)
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_layers) == (96, 6, 12)
    assert cfg.output_dir == "models/exp"
    assert cfg.eval_data == str(Path("data/clean/validation_data.txt"))


def test_cli_flags_and_overrides_map_to_config():
    args = build_parser().parse_args(
        ["train", "--config", str(ROOT / "configs/tiny.yaml"), "--batch-size", "4", "--max_steps", "9", "train.warmup_steps=3", "model.dropout=0.1"]
    )
    cfg = run_config_from_args(args)
    assert (cfg.train.micro_batch_size, cfg.train.max_steps, cfg.train.warmup_steps, cfg.model.dropout) == (4, 9, 3, 0.1)


@pytest.mark.parametrize(
    "yaml_text,needle",
    [
        ("train:\n  max_stepz: 3\n", "unknown key 'train.max_stepz'"),
        ("trian:\n  max_steps: 3\n", "unknown section 'trian'"),
        ("train:\n  max_steps: many\n", "'train.max_steps'"),
        ("train:\n  gradient_checkpointing: maybe\n", "'train.gradient_checkpointing'"),
        ("model:\n  d_model: 100\n  n_heads: 3\n", "model.n_heads (3) must divide model.d_model (100)"),
        ("train:\n  precision: fp8\n", "train.precision"),
        ("- a\n- b\n", "must hold a mapping"),
        ("train: [1\n", "not valid YAML"),
    ],
)
def test_config_errors_name_the_key_and_file(tmp_path, yaml_text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_run_config(p)
    assert needle in str(e.value)
    assert "bad.yaml" in str(e.value)


def test_missing_config_file_and_bad_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config("no/such.yaml")
    with pytest.raises(ConfigError, match="unknown section 'foo'"):
        load_run_config(None, {"foo.bar": "1"})


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "openllm_ds.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_exits_2_with_one_line_error():
    r = _cli("train", "--config", "configs/tiny.yaml", "train.bogus=1", "--dry_run")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown key 'train.bogus'" in r.stderr


@pytest.mark.parametrize("stage", ["prepare", "train-tokenizer", "tokenize", "train", "evaluate", "generate", "score-squad", "export", "serve", "pipeline"])
def test_every_stage_documents_its_flags(stage):
    r = _cli(stage, "--help")
    assert r.returncode == 0, r.stderr
    assert "--" in r.stdout and "usage: openllm-ds " + stage in r.stdout


def test_kebab_case_and_negated_flags():
    args = build_parser().parse_args(["export", "--model-dir", "m", "--format", "onnx", "--no-verify", "--optimize-for-inference"])
    assert (args.model_dir, args.verify, args.optimize_for_inference) == ("m", False, True)
