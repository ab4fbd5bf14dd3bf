"""The official SQuAD scoring, v1.1 and v2.0, as a library.

Semantics follow the official evaluate scripts:
- v1.1 (``evaluate-v1.1.py``): answers are normalised (lower case, ASCII punctuation removed, the
  articles a/an/the removed, whitespace collapsed); exact match and token F1 are the maximum over the
  gold answers; a question without a prediction scores 0 and counts in the total.
- v2.0 (``evaluate-v2.0.py``): gold answers that normalise to "" are dropped and an unanswerable
  question has the single gold answer "" (so only an empty prediction is right); F1 between an empty
  and a non-empty answer is 0, between two empty answers 1. The report adds ``HasAns_*`` and
  ``NoAns_*`` breakdowns and, with a no-answer probability file, the official threshold search
  (``best_exact``/``best_f1`` and their thresholds). One difference: the official v2.0 script drops a
  question without a prediction from the totals; here it scores 0, as in v1.1, and a warning names it.
  A question id that repeats counts as the official scripts count it: every occurrence in v1.1, once
  (the last) in v2.0.

Scores are percentages (0-100). The version comes from the dataset's ``version`` field ("1.1",
"v2.0"), else from the presence of ``is_impossible``.
"""

from __future__ import annotations

import json
import re
import string
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from openllm_ds.errors import DataError
from openllm_ds.utils import read_json as read_json_file

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str, *, empty_matches_empty: bool = False) -> float:
    """Token-level F1 of the normalised answers.

    ``empty_matches_empty`` is the v2.0 rule: if either side has no tokens, F1 is 1 when both are
    empty and 0 otherwise (v1.1 gives 0 whenever nothing overlaps).
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    if empty_matches_empty and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


# ---- reading and checking the inputs ------------------------------------------------------------

def read_scorer_json(path: str | Path, what: str) -> Any:
    """A JSON input of the scorer, by the one reader policy (``utils.read_json``)."""
    return read_json_file(path, "pass the JSON file as written by the model or the scorer", what, error=DataError)


def check_squad_dataset(dataset: Any, source: str) -> list[dict]:
    """The ``data`` list of a SQuAD file, after checking every article/paragraph/question has the
    fields scoring needs. ``source`` names the file in messages."""
    hint = "expected a SQuAD file: {\"data\": [{\"paragraphs\": [{\"context\", \"qas\": [{\"id\", \"question\", \"answers\"}]}]}]}"
    if not isinstance(dataset, dict) or not isinstance(dataset.get("data"), list):
        raise DataError(f"dataset {source} has no top-level 'data' list; {hint}")
    articles = dataset["data"]
    num_questions = 0
    for i, article in enumerate(articles):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise DataError(f"dataset {source}: data[{i}] has no 'paragraphs' list; {hint}")
        for j, para in enumerate(article["paragraphs"]):
            where = f"data[{i}].paragraphs[{j}]"
            if not isinstance(para, dict) or not isinstance(para.get("context"), str) or not isinstance(para.get("qas"), list):
                raise DataError(f"dataset {source}: {where} lacks a 'context' string or a 'qas' list; {hint}")
            for k, qa in enumerate(para["qas"]):
                answers = qa.get("answers") if isinstance(qa, dict) else None
                if (not isinstance(qa, dict) or not isinstance(qa.get("id"), str) or not isinstance(answers, list)
                        or not all(isinstance(a, dict) and isinstance(a.get("text"), str) for a in answers)):
                    raise DataError(f"dataset {source}: {where}.qas[{k}] lacks an 'id' string or an 'answers' "
                                    f"list of {{\"text\": ...}}; {hint}")
                num_questions += 1
    if num_questions == 0:
        raise DataError(f"dataset {source} holds no questions; {hint}")
    return articles


def squad_version(dataset: dict) -> str:
    """"1.1" or "2.0"."""
    v = str(dataset.get("version", "")).lower().lstrip("v")
    if v.startswith("2"):
        return "2.0"
    if v.startswith("1"):
        return "1.1"
    has_impossible = any("is_impossible" in qa for a in dataset["data"] for p in a["paragraphs"] for qa in p["qas"])
    return "2.0" if has_impossible else "1.1"


def check_predictions(predictions: Any, source: str) -> dict[str, str]:
    if not isinstance(predictions, dict):
        raise DataError(f"predictions {source} must be a JSON object {{question_id: answer text}}, "
                        f"got a JSON {type(predictions).__name__}")
    for qid, answer in predictions.items():
        if not isinstance(answer, str):
            raise DataError(f"predictions {source}: entry {qid!r} is {json.dumps(answer)[:60]}, not a string; "
                            "every value must be the answer text (\"\" for no answer)")
    return predictions


def check_na_probs(na_probs: Any, source: str) -> dict[str, float]:
    if not isinstance(na_probs, dict):
        raise DataError(f"no-answer probability file {source} must be a JSON object {{question_id: probability}}")
    for qid, p in na_probs.items():
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise DataError(f"no-answer probability file {source}: entry {qid!r} is {p!r}, not a number")
    return na_probs


# ---- scoring ------------------------------------------------------------------------------------

def score_squad(dataset: str | Path, predictions: str | Path, na_prob_file: str | Path | None = None) -> dict:
    """Official SQuAD v1.1/v2.0 exact match and F1 (percentages) of a predictions file.

    ``dataset``: a SQuAD JSON file; ``predictions``: a JSON object {question_id: answer};
    ``na_prob_file`` (v2.0): a JSON object {question_id: probability of no answer}.
    """
    data = read_scorer_json(dataset, "dataset")
    articles = check_squad_dataset(data, str(dataset))
    preds = check_predictions(read_scorer_json(predictions, "predictions"), str(predictions))
    na_probs = None
    if na_prob_file is not None:
        na_probs = check_na_probs(read_scorer_json(na_prob_file, "no-answer probability file"), str(na_prob_file))
    report = score_predictions(articles, preds, squad_version(data), na_probs=na_probs)
    return {"dataset": str(dataset), "predictions": str(predictions), **report}


def score_predictions(articles: list[dict], predictions: dict[str, str], version: str = "1.1",
                      na_probs: dict[str, float] | None = None, warn: bool = True) -> dict:
    """Score in-memory predictions against the ``data`` list of a SQuAD file (checked already)."""
    if version not in ("1.1", "2.0"):
        raise ValueError(f"version must be 1.1 or 2.0, got {version!r}")
    v2 = version == "2.0"
    # keyed as the official scripts count: v1.1 scores every question in the file, a repeated id each
    # time (against that occurrence's answers); v2.0 keeps one score per id (the last occurrence's)
    exact: dict = {}
    f1: dict = {}
    has_answer: dict = {}
    unanswered: dict = {}  # key -> question id, for the questions without a prediction
    seen: Counter = Counter()
    for article in articles:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                qid = qa["id"]
                key = qid if v2 else (qid, seen[qid])
                seen[qid] += 1
                gold = [a["text"] for a in qa["answers"]]
                if v2:
                    gold = [g for g in gold if normalize_answer(g)] or [""]
                has_answer[key] = gold != [""]
                if qid not in predictions:
                    unanswered[key] = qid
                    exact[key] = f1[key] = 0.0
                    continue
                pred = predictions[qid]
                exact[key] = max(exact_match_score(pred, g) for g in gold)
                f1[key] = max(f1_score(pred, g, empty_matches_empty=v2) for g in gold)
    missing = list(unanswered.values())
    if missing and warn:
        print(f"warning: {len(missing)} of {len(exact)} questions have no prediction and score 0 "
              f"(first: {missing[0]})", file=sys.stderr)

    report: dict[str, Any] = {"version": version}
    if v2 and na_probs is not None:
        # a question whose no-answer probability exceeds 1.0 (the official default threshold) is
        # answered "" -- with probabilities in [0, 1] this never triggers, as in the official script
        exact_t = _apply_no_answer_threshold(exact, na_probs, has_answer, 1.0)
        f1_t = _apply_no_answer_threshold(f1, na_probs, has_answer, 1.0)
    else:
        exact_t, f1_t = exact, f1
    report.update(_summary(exact_t, f1_t, list(exact)))
    report["num_missing_predictions"] = len(missing)
    if v2:
        has = [q for q, h in has_answer.items() if h]
        no = [q for q, h in has_answer.items() if not h]
        if has:
            report.update({f"HasAns_{k}": v for k, v in _summary(exact_t, f1_t, has, official_names=True).items()})
        if no:
            report.update({f"NoAns_{k}": v for k, v in _summary(exact_t, f1_t, no, official_names=True).items()})
        if na_probs is not None:
            preds_with_missing = {q: predictions.get(q, "") for q in exact}
            probs = {q: float(na_probs.get(q, 0.0)) for q in exact}
            report["best_exact"], report["best_exact_thresh"] = _best_threshold(preds_with_missing, exact, probs, has_answer)
            report["best_f1"], report["best_f1_thresh"] = _best_threshold(preds_with_missing, f1, probs, has_answer)
    return report


def _summary(exact: dict[str, float], f1: dict[str, float], qids: list[str], official_names: bool = False) -> dict:
    total = len(qids)
    em = 100.0 * sum(exact[q] for q in qids) / total if total else 0.0
    f = 100.0 * sum(f1[q] for q in qids) / total if total else 0.0
    return {"exact" if official_names else "exact_match": em, "f1": f, "total": total}


def _apply_no_answer_threshold(scores, na_probs, has_answer, threshold):
    return {q: (float(not has_answer[q]) if na_probs.get(q, 0.0) > threshold else s) for q, s in scores.items()}


def _best_threshold(preds, scores, na_probs, has_answer) -> tuple[float, float]:
    """The official v2.0 search: answer "" above a threshold on the no-answer probability."""
    cur = best = sum(1 for h in has_answer.values() if not h)
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda q: na_probs[q]):
        if has_answer[qid]:
            diff = scores[qid]
        else:
            diff = -1 if preds[qid] else 0
        cur += diff
        if cur > best:
            best, best_thresh = cur, na_probs[qid]
    return 100.0 * best / len(scores), best_thresh
