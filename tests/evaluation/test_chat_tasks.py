"""The chat harness task: SQuAD questions through the model's chat template, answered as `openllm_ds.load(...).chat`
answers them, scored with the official EM/F1."""

from __future__ import annotations

import dataclasses
import json

import pytest

import openllm_ds
from openllm_ds.cli import main
from openllm_ds.evaluation.qa_tasks import read_squad, sample
from openllm_ds.evaluation.squad_score import score_predictions
from openllm_ds.evaluation.tasks import load_task, run_task
from openllm_ds.finetune.prepare import user_turn


PASSAGES = [("Normandy is a region in the north of France.", "Where is Normandy?", "the north of France"),
            ("The Normans conquered England in 1066.", "When did the Normans conquer England?", "1066"),
            ("Oxygen is a chemical element with the symbol O.", "What is the symbol of oxygen?", "O"),
            ("The Amazon river flows into the Atlantic Ocean.", "Where does the Amazon flow?", "the Atlantic Ocean")]


def short_squad(path):
    """A SQuAD v1.1 file of short passages: every prompt fits the test model's context of 128 tokens."""
    paragraphs = [{"context": c, "qas": [{"id": f"q{i}", "question": q, "answers": [{"text": a, "answer_start": c.find(a)}]}]}
                  for i, (c, q, a) in enumerate(PASSAGES)]
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


def test_squad_chat_answers_as_the_chat_api_and_scores_them(trained_export, tmp_path, capsys):
    import random

    hf, _ = trained_export
    spec = dataclasses.replace(load_task("squad_v1_chat", check_data=False), data=str(short_squad(tmp_path / "dev.json")),
                               limit=3, max_new_tokens=8)
    result = run_task(spec, str(hf), progress=False)
    questions, _ = read_squad(spec.data)
    chosen = sample(questions, 3, random.Random(spec.seed))
    lm = openllm_ds.load(str(hf))
    answers = {q.qid: lm.chat([{"role": "user", "content": user_turn(q.context, q.question, spec.layout)}],
                              max_new_tokens=8, stop="\n").strip() for q in chosen}
    assert [e["prediction"] for e in result["metrics"]["examples"]] == [answers[q.qid] for q in chosen]
    scored = score_predictions([{"paragraphs": [{"context": q.context, "qas": [q.raw]} for q in chosen]}],
                               answers, "1.1", warn=False)
    assert result["num_examples"] == 3 and result["value"] == pytest.approx(scored["f1"])
    assert result["metrics"]["num_shots"] == 0 and result["metrics"]["num_truncated_prompts"] == 0

    # the CLI: --tasks squad_v1_chat --limit N on a base model (a copy: the harness writes the model dir's eval/)
    import shutil

    hf = shutil.copytree(hf, tmp_path / "hf")
    yaml_file = tmp_path / "squad_v1_chat.yaml"
    yaml_file.write_text(f"kind: squad_chat\ndata: {spec.data}\nlimit: 50\nmax_new_tokens: 8\n")
    out = tmp_path / "report.json"
    assert main(["evaluate", "--model_dir", str(hf), "--tasks", str(yaml_file), "--limit", "2", "--num_workers", "0",
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["results"][0]["num_examples"] == 2 and report["results"][0]["kind"] == "squad_chat"
    assert main(["evaluate", "--model_dir", str(hf), "--limit", "2"]) == 2
    assert "--limit sets the examples of each --tasks task" in capsys.readouterr().err
