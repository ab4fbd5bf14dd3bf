"""`openllm-ds finetune`: the training loop in its fine-tuning mode, from a Hugging Face export, with exact resume,
validation loss over the answers only, an export that carries the fine-tuned context and the chat template, and a
base model it never writes into."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from openllm_ds.checkpoint import load_model
from openllm_ds.cli import main
from openllm_ds.tokenizer.chat import IGNORE_INDEX
from openllm_ds.tokenizer.hf_files import CHAT_TEMPLATE
from helpers import SFT_PLACES, file_bytes, killed_after_checkpoint, logged, place_conversation


def conversations(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"messages": place_conversation(*rng.choice(SFT_PLACES, 2, replace=False))} for _ in range(n)]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    for name, n, seed in (("train.jsonl", 96, 0), ("validation.jsonl", 12, 1)):
        (d / name).write_text("".join(json.dumps(c) + "\n" for c in conversations(n, seed)), encoding="utf-8")
    return d


def finetune(hf, data, out, *extra):
    return main(["finetune", "--model_dir", str(hf), "--data", str(data), "--output_dir", str(out), "--batch_size", "4",
                 "--lr", "1e-3", "--warmup_steps", "1", "--max_seq_len", "192", "--save_every", "2", "--eval_every", "2",
                 "--ds_config", "ds_configs/zero2.json", "train.log_every=1", "train.eval_batches=4", *extra])


def test_finetune_from_an_hf_export_resumes_exactly_and_exports_its_context(trained_export, sft_dir, tmp_path,
                                                                              monkeypatch, capsys):
    hf, _ = trained_export
    before = file_bytes(hf)
    assert finetune(hf, sft_dir, tmp_path / "straight", "--max_steps", "6") == 0
    with killed_after_checkpoint(monkeypatch, 4):  # the process is killed right after the step-4 checkpoint
        assert finetune(hf, sft_dir, tmp_path / "resumed", "--max_steps", "6") == 130
    assert finetune(hf, sft_dir, tmp_path / "resumed", "--max_steps", "6") == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.rindex("\n{") + 1:])
    assert summary["resumed_from_step"] == 4 and summary["final_step"] == 6
    straight = logged(tmp_path / "straight")
    assert sorted(straight) == list(range(1, 7))
    assert {s: v for s, v in logged(tmp_path / "resumed").items() if s > 4} == {5: straight[5], 6: straight[6]}
    ft = summary["finetune"]
    assert ft["conversations"] == 96 and ft["truncated"] == 0 and ft["steps_per_epoch"] == 24 and ft["context"] == 192
    assert file_bytes(hf) == before  # the base export is untouched

    # the validation loss is the mean loss over the validation answers' tokens (and their closing EOS) alone
    loaded = load_model(tmp_path / "resumed")
    assert loaded.step == 6 and loaded.model_config.max_seq_len == 192
    from openllm_ds.finetune.data import load_examples
    from openllm_ds.tokenizer.chat import SpecialTokens, load_chat_template

    tok = loaded.tokenizer
    val = load_examples(str(sft_dir / "validation.jsonl"), load_chat_template(tmp_path / "resumed" / "tokenizer", tok),
                        SpecialTokens(tok), 193, False)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(val.ids, val.labels):
            logits = loaded.model.eval()(torch.tensor(ids[None, :-1], dtype=torch.long))[0]
            target = torch.tensor(labels[1:])
            keep = target != IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    assert summary["val_loss"] == pytest.approx(total / count, rel=1e-4)

    # the export carries the fine-tuned context and the chat template it was trained with
    assert main(["export", "--model_dir", str(tmp_path / "resumed"), "--format", "huggingface", "--output_dir",
                 str(tmp_path / "hf_sft")]) == 0
    assert json.loads((tmp_path / "hf_sft" / "config.json").read_text())["max_position_embeddings"] == 192
    assert json.loads((tmp_path / "hf_sft" / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


def test_finetune_refuses_to_write_into_its_base_and_long_conversations(trained_export, sft_dir, tmp_path, capsys):
    hf, _ = trained_export
    assert finetune(hf, sft_dir, hf / "sft", "--max_steps", "2") == 2
    assert "a fine-tune never writes into the run it starts from" in capsys.readouterr().err
    assert not (hf / "sft").exists()
    assert finetune(hf, sft_dir, tmp_path / "short", "--max_steps", "2", "--max_seq_len", "8") == 2
    err = capsys.readouterr().err
    assert "train.jsonl line 1: the conversation is" in err and "--truncate" in err


def test_a_fine_tune_of_another_base_never_resumes_a_run_in_its_output_dir(trained_export, sft_dir, tmp_path,
                                                                           capsys):
    hf, _ = trained_export
    assert finetune(hf, sft_dir, tmp_path / "ft", "--max_steps", "2") == 0
    def tree(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    before = tree(tmp_path / "ft")
    other = tmp_path / "other-base"  # the same weights under another path: another base as far as a run can tell
    shutil.copytree(hf, other)
    capsys.readouterr()
    assert finetune(other, sft_dir, tmp_path / "ft", "--max_steps", "4") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"belongs to a run started from {hf}, not from {other}" in err, err
    assert "pass a new --output_dir" in err
    assert tree(tmp_path / "ft") == before  # nothing written
    assert finetune(hf, sft_dir, tmp_path / "ft", "--max_steps", "4") == 0  # its own base resumes it
    out = capsys.readouterr().out
    assert json.loads(out[out.rindex("\n{") + 1:])["resumed_from_step"] == 2
