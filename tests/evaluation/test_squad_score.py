"""The official SQuAD scoring: normalisation, EM/F1 by hand, v2.0 unanswerable rules, the published
leaderboard figures from real prediction files, bad input, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from openllm_ds.errors import UserError
from openllm_ds.evaluation import score_predictions, score_squad
from openllm_ds.evaluation.squad_score import exact_match_score, f1_score, normalize_answer

ROOT = Path(__file__).resolve().parents[2]


def squad(questions, version="1.1"):
    """A SQuAD file's content from (id, [gold answers]) pairs, one paragraph."""
    qas = [{"id": qid, "question": f"q {qid}?", "answers": [{"text": a, "answer_start": 0} for a in golds]}
           for qid, golds in questions]
    return {"version": version, "data": [{"title": "t", "paragraphs": [{"context": "ctx", "qas": qas}]}]}


def write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


@pytest.mark.parametrize("raw,norm", [
    ("The Denver Broncos", "denver broncos"),          # case, leading article
    ("a cat, an owl and the dog!", "cat owl and dog"),  # articles anywhere, punctuation
    ("  New\tYork\n City  ", "new york city"),         # whitespace
    ("theater another anthem", "theater another anthem"),  # articles only as whole words
    ("U.S.-based (1990)", "usbased 1990"),             # punctuation removed, not replaced
    ("Ångström’s", "ångström’s"),                      # only ASCII punctuation is removed
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_and_f1_by_hand():
    assert exact_match_score("the Denver Broncos.", "Denver Broncos") == 1.0
    assert exact_match_score("Denver", "Denver Broncos") == 0.0
    # pred {denver, broncos, team} vs gold {denver, broncos}: P = 2/3, R = 1 -> F1 = 0.8
    assert f1_score("Denver Broncos team", "the Denver Broncos") == pytest.approx(0.8)
    # pred {x, y, z, w} vs gold {y, z, q}: P = 2/4, R = 2/3 -> F1 = 2 * (1/2 * 2/3) / (1/2 + 2/3) = 4/7
    assert f1_score("x y z w", "y z q") == pytest.approx(4 / 7)
    # repeated tokens count once per match: {new:2, york:1} & {new:1, york:1} = 2 -> P = 2/3, R = 1
    assert f1_score("new york new", "New York") == pytest.approx(0.8)
    assert f1_score("", "Denver") == 0.0
    assert f1_score("the", "a") == 0.0  # v1.1: nothing left, nothing overlaps
    assert f1_score("the", "a", empty_matches_empty=True) == 1.0  # v2.0: both empty agree


def test_several_gold_answers_take_the_maximum():
    data = squad([("q1", ["Paris", "the city of Paris"]), ("q2", ["1990", "in 1990", "early 1990"])])
    r = score_predictions(data["data"], {"q1": "City of Paris", "q2": "early 1990s"})
    # q1: exact match with the 2nd gold; q2: pred {early, 1990s}, best gold "early 1990" shares one
    # token -> P = R = 1/2, F1 = 1/2 (the other golds score 0)
    assert r["exact_match"] == pytest.approx(50.0)
    assert r["f1"] == pytest.approx(100 * (1.0 + 0.5) / 2)
    assert r["total"] == 2 and r["version"] == "1.1"


def test_v2_unanswerable_rules_and_breakdown(tmp_path):
    data = squad([("u1", []), ("u2", []), ("a1", ["Denver Broncos"]), ("a2", ["Carolina"])], version="v2.0")
    preds = {"u1": "", "u2": "some answer", "a1": "Denver", "a2": ""}
    r = score_squad(write(tmp_path / "d.json", data), write(tmp_path / "p.json", preds))
    # u1 right (1, 1); u2 wrong (0, 0); a1 EM 0, F1 = 2*(1*1/2)/(1+1/2) = 2/3; a2 empty vs answer: 0
    assert r["version"] == "2.0"
    assert r["exact_match"] == pytest.approx(25.0)
    assert r["f1"] == pytest.approx(100 * (1 + 2 / 3) / 4)
    assert (r["NoAns_exact"], r["NoAns_f1"], r["NoAns_total"]) == (50.0, 50.0, 2)
    assert r["HasAns_exact"] == 0.0 and r["HasAns_f1"] == pytest.approx(100 / 3) and r["HasAns_total"] == 2


def test_v2_best_threshold_search_with_no_answer_probabilities(tmp_path):
    data = squad([("a1", ["Paris"]), ("u1", []), ("a2", ["Rome"])], version="v2.0")
    preds = {"a1": "Paris", "u1": "London", "a2": "Milan"}
    probs = {"a1": 0.1, "u1": 0.9, "a2": 0.5}
    r = score_squad(write(tmp_path / "d.json", data), write(tmp_path / "p.json", preds), write(tmp_path / "na.json", probs))
    # answering "" above 0.1 makes u1 and a2 "": a1 right, u1 right, a2 wrong -> 2/3, the best threshold
    assert r["best_exact"] == pytest.approx(200 / 3) and r["best_exact_thresh"] == 0.1
    assert r["best_f1"] == pytest.approx(200 / 3) and r["best_f1_thresh"] == 0.1
    assert r["exact_match"] == pytest.approx(100 / 3)  # threshold 1.0: predictions as given


def test_missing_predictions_count_as_wrong_with_a_warning(tmp_path, capsys):
    data = squad([("q1", ["Paris"]), ("q2", ["Rome"]), ("q3", ["Oslo"])])
    r = score_squad(write(tmp_path / "d.json", data), write(tmp_path / "p.json", {"q1": "Paris", "zz": "x"}))
    assert r["exact_match"] == pytest.approx(100 / 3) and r["total"] == 3 and r["num_missing_predictions"] == 2
    assert "2 of 3 questions have no prediction" in capsys.readouterr().err


def official_v1_evaluate(dataset, predictions):
    """The loop of the official evaluate-v1.1.py (its metric functions are ours, tested above)."""
    f1 = exact_match = total = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue
                ground_truths = [x["text"] for x in qa["answers"]]
                prediction = predictions[qa["id"]]
                exact_match += max(exact_match_score(prediction, g) for g in ground_truths)
                f1 += max(f1_score(prediction, g) for g in ground_truths)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total, "total": total}


def test_repeated_question_ids_count_as_the_official_scripts_count_them(tmp_path):
    """v1.1 scores every question in the file (an id that repeats, each time against its own answers);
    v2.0's script keys its scores by id, so the last occurrence alone counts."""
    questions = [("q1", ["Paris"]), ("q2", ["blue sky"]), ("q1", ["London"]), ("q3", ["red"])]
    preds = {"q1": "Paris", "q2": "the blue sky", "q3": "green"}
    v1 = squad(questions)
    got = score_predictions(v1["data"], preds, "1.1")
    assert {k: got[k] for k in ("exact_match", "f1", "total")} == pytest.approx(official_v1_evaluate(v1["data"], preds))
    assert got["total"] == 4 and got["exact_match"] == pytest.approx(50.0)  # q1 right once, wrong once; q2 right
    v2 = score_predictions(squad(questions, "v2.0")["data"], preds, "2.0")
    assert v2["total"] == 3 and v2["exact_match"] == pytest.approx(100 / 3)  # q1 scored against "London" only
    report = score_squad(write(tmp_path / "dev.json", v1), write(tmp_path / "p.json", {"q2": "blue sky"}))
    assert report["total"] == 4 and report["num_missing_predictions"] == 3


def test_published_leaderboard_figures(squad_dir, predictions_dir):
    dev = squad_dir / "dev-v1.1.json"
    bert = score_squad(dev, predictions_dir / "v1.1_BERT_ensemble_GoogleAI.json")
    assert (round(bert["exact_match"], 1), round(bert["f1"], 1)) == (86.2, 92.2)
    assert bert["total"] == 10570 and bert["num_missing_predictions"] == 0
    lr_file = predictions_dir / "v1.1_LogisticRegression_Stanford.json"
    lr = score_squad(dev, lr_file)
    assert round(lr["f1"], 1) == 51.0
    # published EM 40.0; this file predates v1.1's question set (it lacks 13 of its ids), which the
    # official script scores 0, giving 40.14
    assert lr["exact_match"] == pytest.approx(40.0, abs=0.2)
    ids = {qa["id"] for a in json.loads(dev.read_text())["data"] for p in a["paragraphs"] for qa in p["qas"]}
    assert lr["num_missing_predictions"] == len(ids - set(json.loads(lr_file.read_text()))) == 13


def test_v2_file_all_empty_predictions_score_the_unanswerable_share(squad_dir, tmp_path):
    dev2 = squad_dir / "dev-v2.0-part.json"
    data = json.loads(dev2.read_text())
    qas = [qa for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]]
    unanswerable = sum(1 for qa in qas if not qa["answers"])
    r = score_squad(dev2, write(tmp_path / "p.json", {qa["id"]: "" for qa in qas}))
    assert (r["total"], r["NoAns_total"]) == (6078, 3168) and unanswerable == 3168
    assert r["exact_match"] == pytest.approx(100 * 3168 / 6078) and r["f1"] == r["exact_match"]
    assert r["NoAns_exact"] == 100.0 and r["HasAns_exact"] == 0.0


def test_bad_input_is_a_user_error_naming_the_problem(tmp_path):
    good = write(tmp_path / "d.json", squad([("q1", ["Paris"])]))
    with pytest.raises(UserError, match=r"predictions .*nope\.json does not exist"):
        score_squad(good, tmp_path / "nope.json")
    with pytest.raises(UserError, match="must be a JSON object"):
        score_squad(good, write(tmp_path / "list.json", ["Paris"]))
    with pytest.raises(UserError, match=r"entry 'q2' is \{\"text\": \"Rome\"\}, not a string"):
        score_squad(good, write(tmp_path / "bad.json", {"q1": "Paris", "q2": {"text": "Rome"}}))
    broken = tmp_path / "broken.json"
    broken.write_text('{"q1": "Par')
    with pytest.raises(UserError, match="is not valid JSON"):
        score_squad(good, broken)
    with pytest.raises(UserError, match=r"data\[0\] has no 'paragraphs' list"):
        score_squad(write(tmp_path / "notsquad.json", {"data": [{"title": "x"}]}), good)
    with pytest.raises(UserError, match="no top-level 'data' list"):
        score_squad(write(tmp_path / "preds_as_dataset.json", {"q1": "Paris"}), good)


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "openllm_ds.cli", "score-squad", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_score_squad(tmp_path):
    data = write(tmp_path / "d.json", squad([("q1", ["Paris"]), ("q2", ["Rome"])]))
    ok = _cli("--dataset", str(data), "--predictions", str(write(tmp_path / "p.json", {"q1": "paris", "q2": "Milan"})))
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert (report["exact_match"], report["f1"], report["total"]) == (50.0, 50.0, 2)
    bad = _cli("--dataset", str(data), "--predictions", str(write(tmp_path / "bad.json", {"q1": 3})))
    assert bad.returncode == 2 and bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: predictions") and "'q1'" in lines[0]
