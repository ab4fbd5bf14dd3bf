"""The README's "Train on your own data" commands, run as written in a fresh directory holding the data they
name (a folder of .txt files, a JSON Lines file with a `content` field, a saved Hugging Face dataset, and
`prepare`'s output for the mixture). Training commands get a few overrides appended (a smaller model, 3
steps) so that the run takes seconds; every flag the README gives is used as it stands."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from openllm_ds.cli import main
from openllm_ds.tokenizer import TokenShards

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--max_steps", "3", "train.eval_every=3", "train.save_every=3", "train.warmup_steps=1",
         "train.micro_batch_size=4", "train.eval_batches=2", "model.d_model=64", "model.n_layers=1",
         "model.max_seq_len=64", "tokenizer.num_workers=0"]

pytestmark = pytest.mark.slow


def section_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Train on your own data"):]
    section = section[:section.index("\n## ", 1)]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture()
def workdir(prepared_data, tmp_path, monkeypatch):
    """A directory holding what the commands read."""
    import datasets

    passages = (prepared_data / "training_data.txt").read_text(encoding="utf-8").split("\n")[:-1]
    (tmp_path / "my_texts").mkdir()
    for k in range(3):
        (tmp_path / "my_texts" / f"part{k}.txt").write_text("\n".join(passages[k::3]) + "\n", encoding="utf-8")
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"id": i, "content": p}) + "\n"
                                                   for i, p in enumerate(passages)), encoding="utf-8")
    datasets.Dataset.from_dict({"text": passages[::2]}).save_to_disk(str(tmp_path / "wikitext103"))
    shutil.copytree(prepared_data, tmp_path / "data/clean")
    for folder in ("configs", "ds_configs"):  # the commands run from the repo root
        (tmp_path / folder).symlink_to(ROOT / folder)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_own_data_commands_run_as_written(workdir, capsys):
    commands = section_commands()
    assert len(commands) == 7
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "openllm-ds", command
        args = argv[1:] + (SHORT if argv[1] == "train" else [])
        if argv[1] == "train" and "--data_files" in argv:  # the mixture trains with the preset's tokenizer
            shutil.copytree(workdir / "data/my_tokenizer", workdir / "data/tokenizer", dirs_exist_ok=True)
        assert main(args) == 0, command
    capsys.readouterr()

    for run in ("my_texts", "corpus", "wikitext", "mix"):
        assert (workdir / "models" / run / "checkpoints/step_00000003/model.safetensors").is_file(), run
    assert (workdir / "data/my_tokenizer/tokenizer.json").is_file()
    held = TokenShards(workdir / "my_texts.tokens", "heldout")  # built by train, beside the folder
    assert held.num_documents > 0 and TokenShards(workdir / "my_texts.tokens").num_documents > 2000
    corpus = TokenShards(workdir / "data/corpus.tokens")
    assert corpus.meta["source"]["options"]["text_field"] == "content" and corpus.meta["heldout"]["num_documents"] > 0
    assert TokenShards(workdir / "wikitext103.tokens").num_documents > 1000
    state = json.loads((workdir / "models/mix/checkpoints/step_00000003/train_state.json").read_text())
    assert len(state["data"]) == 2 and sum(state["source_tokens"]) == 3 * 4 * 64
