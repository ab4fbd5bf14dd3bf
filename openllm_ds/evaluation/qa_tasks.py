"""The SQuAD-based harness task kinds: generative QA, last-word cloze, and answer ranking.

Prompts use the lm-evaluation-harness convention: ``Context: ...\\nQuestion: ...\\nAnswer:`` and the
answer after one space. A prompt longer than the model's context keeps its leading EOS and drops tokens from
the front (worked examples go first, then the start of the passage), so the question is always seen.

squad_qa, unanswerable questions (v2.0): worked examples include unanswerable questions answered
with ``no_answer_text`` ("unanswerable" by default); a generated answer that normalises to it, or
an empty answer, is the prediction "" -- which the official v2.0 scoring counts as right exactly
for unanswerable questions.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from openllm_ds.inference import greedy_continuation
from openllm_ds.evaluation.sliding_window import read_documents
from openllm_ds.evaluation.squad_score import (check_squad_dataset, normalize_answer, read_scorer_json,
                                               score_predictions, squad_version)
from openllm_ds.errors import DataError

_STRIP = string.punctuation + "\u201c\u201d\u2018\u2019"
SHOT_POOL = 200  # worked examples are drawn from the shortest passages, so that they fit the context


@dataclass(frozen=True)
class SquadQuestion:
    qid: str
    context: str
    question: str
    answers: tuple[str, ...]  # empty for an unanswerable question
    raw: dict  # the question as in the file, for scoring


def read_squad(path: str) -> tuple[list[SquadQuestion], str]:
    data = read_scorer_json(path, "task data")
    articles = check_squad_dataset(data, path)
    questions = [
        SquadQuestion(qa["id"], p["context"], str(qa.get("question", "")), tuple(a["text"] for a in qa["answers"]), qa)
        for a in articles for p in a["paragraphs"] for qa in p["qas"]
    ]
    return questions, squad_version(data)


def qa_prompt(context: str, question: str) -> str:
    return f"Context: {context}\nQuestion: {question}\nAnswer:"


def fit_prompt(start_id: int, ids: list[int], budget: int) -> tuple[list[int], bool]:
    """[start] + ids, dropping ids from the front to fit ``budget`` tokens; (ids, truncated).

    ``start`` is the prompt prefix (``Tokenizer.prompt_prefix_id``, EOS): in training every document follows
    the previous one's EOS.
    """
    if 1 + len(ids) <= budget:
        return [start_id] + ids, False
    return [start_id] + ids[len(ids) - (budget - 1):], True


def sample(items: list, limit: int | None, rng: random.Random) -> list:
    order = list(range(len(items)))
    rng.shuffle(order)
    return [items[i] for i in order[: limit or len(items)]]


# ---- squad_qa ----------------------------------------------------------------------------------

def run_squad_qa(spec, model, tokenizer, progress: bool) -> dict:
    questions, version = read_squad(spec.data)
    rng = random.Random(spec.seed)
    chosen = sample(questions, spec.limit, rng)
    shots = pick_shots(questions, {q.context for q in chosen}, spec.num_shots, rng)
    shot_text = "".join(f"{qa_prompt(s.context, s.question)} {s.answers[0] if s.answers else spec.no_answer_text}\n\n"
                        for s in shots)
    budget = model.cfg.max_seq_len - spec.max_new_tokens
    no_answer = normalize_answer(spec.no_answer_text)

    def stop_when(text: str) -> bool:
        return any(s in text for s in spec.stop)

    predictions, examples = {}, []
    num_truncated = 0
    for q in tqdm(chosen, desc=f"{spec.name}", unit="q", disable=not progress):
        ids, truncated = fit_prompt(tokenizer.prompt_prefix_id,
                                    tokenizer.encode(shot_text + qa_prompt(q.context, q.question)), budget)
        num_truncated += truncated
        answer, predictions[q.qid] = squad_answer(
            greedy_continuation(model, tokenizer, ids, spec.max_new_tokens, stop_when), spec.stop, no_answer)
        if len(examples) < 3:
            examples.append({"question": q.question, "prediction": predictions[q.qid], "gold": list(q.answers[:3])})
    return {
        **squad_scores(chosen, predictions, version, rng),
        "num_shots": len(shots),
        "num_truncated_prompts": num_truncated,
        "no_answer_rate": sum(p == "" for p in predictions.values()) / len(predictions),
        "examples": examples,
    }


def squad_answer(text: str, stop: tuple[str, ...], no_answer: str) -> tuple[str, str]:
    """(the answer: generated text up to the first stop string, stripped; the prediction scored: "" when the
    answer normalises to nothing or to the no-answer text)."""
    for s in stop:
        text = text.split(s)[0]
    answer = text.strip()
    return answer, "" if normalize_answer(answer) in ("", no_answer) else answer


def squad_scores(chosen: list[SquadQuestion], predictions: dict[str, str], version: str, rng: random.Random) -> dict:
    """Official EM/F1 (and the v2.0 HasAns_/NoAns_ breakdowns) of ``predictions`` on the questions ``chosen``, with
    the random-span baseline."""
    subset = [{"paragraphs": [{"context": q.context, "qas": [q.raw]} for q in chosen]}]
    report = score_predictions(subset, predictions, version, warn=False)
    baseline = score_predictions(subset, random_span_predictions(chosen, rng), version, warn=False)
    return {
        "exact_match": report["exact_match"],
        "f1": report["f1"],
        **{k: v for k, v in report.items() if k.startswith(("HasAns_", "NoAns_"))},
        "baseline": {"exact_match": baseline["exact_match"], "f1": baseline["f1"]},
        "baseline_kind": "chance: a random span of the passage, as long as the median gold answer",
        "num_examples": len(chosen),
        "squad_version": version,
    }


def pick_shots(questions: list[SquadQuestion], exclude_contexts: set[str], k: int, rng: random.Random):
    """``k`` worked examples from passages not evaluated, short ones first; alternately
    answerable and unanswerable when the file has both (SQuAD v2.0)."""
    if k == 0:
        return []
    pool = sorted((q for q in questions if q.context not in exclude_contexts), key=lambda q: len(q.context))
    answerable = [q for q in pool if q.answers][:SHOT_POOL]
    unanswerable = [q for q in pool if not q.answers][:SHOT_POOL]
    shots = []
    for i in range(k):
        group = unanswerable if (i % 2 == 1 and unanswerable) or not answerable else answerable
        if not group:
            break
        shots.append(group.pop(rng.randrange(len(group))))
    return shots


def random_span_predictions(questions: list[SquadQuestion], rng: random.Random) -> dict[str, str]:
    lengths = sorted(len(a.split()) for q in questions for a in q.answers[:1]) or [3]
    n = max(1, lengths[len(lengths) // 2])
    out = {}
    for q in questions:
        words = q.context.split()
        start = rng.randrange(max(1, len(words) - n + 1))
        out[q.qid] = " ".join(words[start : start + n])
    return out


# ---- cloze -------------------------------------------------------------------------------------

def cloze_examples(passages: list[str], min_words: int = 8) -> list[tuple[str, str, list[str]]]:
    """(context, target word, context words) for passages whose last word is alphabetic."""
    out = []
    for passage in passages:
        words = passage.split()
        if len(words) < min_words:
            continue
        target = words[-1].rstrip(_STRIP)
        if not target.isalpha():
            continue
        context = passage.rstrip()[: passage.rstrip().rfind(words[-1])].rstrip()
        out.append((context, target, [w.strip(_STRIP) for w in words[:-1]]))
    return out


def run_cloze(spec, model, tokenizer, progress: bool) -> dict:
    if spec.data.endswith(".json"):
        passages = list(dict.fromkeys(q.context for q in read_squad(spec.data)[0]))
    else:
        passages = read_documents(spec.data)
    examples = cloze_examples(passages)
    if not examples:
        raise DataError(f"task {spec.name}: no passage of {spec.data} ends in a word (8+ words, last word alphabetic)")
    rng = random.Random(spec.seed)
    chosen = sample(examples, spec.limit, rng)
    budget = model.cfg.max_seq_len - spec.max_new_tokens

    def word_done(text: str) -> bool:  # a word followed by a space or punctuation is complete
        s = text.lstrip()
        return bool(s) and (any(c.isspace() for c in s) or s[-1] in _STRIP)

    correct, expected_chance, shown = 0, 0.0, []
    for context, target, context_words in tqdm(chosen, desc=spec.name, unit="passage", disable=not progress):
        ids, _ = fit_prompt(tokenizer.prompt_prefix_id, tokenizer.encode(context), budget)
        text = greedy_continuation(model, tokenizer, ids, spec.max_new_tokens, word_done)
        split = text.split()
        predicted = split[0].strip(_STRIP) if split else ""
        correct += predicted == target
        expected_chance += context_words.count(target) / len(context_words)
        if len(shown) < 3:
            shown.append({"context_end": context[-80:], "target": target, "prediction": predicted})
    return {
        "accuracy": correct / len(chosen),
        "baseline": {"accuracy": expected_chance / len(chosen)},
        "baseline_kind": "chance: a random word of the passage (expected accuracy)",
        "num_examples": len(chosen),
        "num_passages_usable": len(examples),
        "examples": shown,
    }


# ---- answer_ranking ----------------------------------------------------------------------------

def ranking_choices(q: SquadQuestion, paragraph_answers: list[str], num_choices: int, rng: random.Random):
    """Gold answer plus distractor spans of the same passage: other questions' answers first,
    then random spans as long as the gold. None when the passage cannot supply enough."""
    gold = q.answers[0]
    taken = {normalize_answer(a) for a in q.answers}
    choices = [gold]
    for cand in paragraph_answers + [None] * 50:
        if len(choices) == num_choices:
            break
        if cand is None:
            words = q.context.split()
            n = max(1, len(gold.split()))
            start = rng.randrange(max(1, len(words) - n + 1))
            cand = " ".join(words[start : start + n])
        key = normalize_answer(cand)
        if key and key not in taken:
            taken.add(key)
            choices.append(cand)
    if len(choices) < num_choices:
        return None
    order = list(range(num_choices))
    rng.shuffle(order)
    return [choices[i] for i in order], order.index(0)


@torch.no_grad()
def continuation_logprobs(model, requests: list[tuple[list[int], list[int]]]) -> list[float]:
    """Summed log p(continuation | context) per (context ids, continuation ids) pair, one batch.
    Contexts (which start with EOS) lose tokens after it when the pair exceeds the window."""
    max_len = model.cfg.max_seq_len
    seqs, spans = [], []
    for ctx, cont in requests:
        cont = cont[: max_len - 1]
        budget = max_len + 1 - len(cont)
        if len(ctx) > budget:
            ctx = ctx[:1] + ctx[len(ctx) - (budget - 1):]
        seqs.append(ctx + cont)
        spans.append((len(ctx), len(cont)))
    T = max(len(s) for s in seqs) - 1
    device = next(model.parameters()).device
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : len(s) - 1] = torch.tensor(s[:-1])
    logprobs = F.log_softmax(model(x.to(device)).float(), dim=-1)
    out = []
    for i, (s, (n_ctx, n_cont)) in enumerate(zip(seqs, spans)):
        targets = torch.tensor(s[n_ctx:], device=device)
        rows = logprobs[i, n_ctx - 1 : n_ctx - 1 + n_cont]
        out.append(float(rows.gather(1, targets[:, None]).sum()))
    return out


def run_answer_ranking(spec, model, tokenizer, progress: bool) -> dict:
    questions, _ = read_squad(spec.data)
    by_context: dict[str, list[str]] = {}
    for q in questions:
        if q.answers:
            by_context.setdefault(q.context, []).append(q.answers[0])
    rng = random.Random(spec.seed)
    pool = sample([q for q in questions if q.answers], None, rng)
    correct = correct_norm = num = 0
    skipped = 0
    for q in tqdm(pool, desc=spec.name, unit="q", total=spec.limit or len(pool), disable=not progress):
        if spec.limit and num == spec.limit:
            break
        others = [a for a in by_context[q.context] if normalize_answer(a) not in {normalize_answer(g) for g in q.answers}]
        built = ranking_choices(q, sorted(set(others)), spec.num_choices, rng)
        if built is None:
            skipped += 1
            continue
        choices, gold = built
        prompt = qa_prompt(q.context, q.question)
        ctx_ids = tokenizer.encode(prompt)
        requests = []
        for c in choices:
            whole = tokenizer.encode(f"{prompt} {c}")
            cont = whole[len(ctx_ids):] if whole[: len(ctx_ids)] == ctx_ids else tokenizer.encode(c)
            requests.append(([tokenizer.prompt_prefix_id] + ctx_ids, cont))
        scores = continuation_logprobs(model, requests)
        per_byte = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, choices)]
        correct += max(range(len(choices)), key=scores.__getitem__) == gold
        correct_norm += max(range(len(choices)), key=per_byte.__getitem__) == gold
        num += 1
    if num == 0:
        raise DataError(f"task {spec.name}: no question of {spec.data} has {spec.num_choices} distinct answer spans")
    chance = 1.0 / spec.num_choices
    return {
        "accuracy": correct / num,
        "accuracy_norm": correct_norm / num,
        "baseline": {"accuracy": chance, "accuracy_norm": chance},
        "baseline_kind": f"chance: 1/{spec.num_choices} choices",
        "num_examples": num,
        "num_choices": spec.num_choices,
        "num_skipped": skipped,
    }
