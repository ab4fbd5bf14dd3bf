"""The chat harness task kind ``squad_chat``: SQuAD dev questions asked through the model's chat template, zero-shot,
greedy, scored with the official EM/F1 (and, on SQuAD 2.0, how often the no-answer reply is given exactly when it is
right).

The question is asked as ``prepare-sft`` asks its training questions (``finetune.prepare.user_turn``, the task's
``layout``), as one user turn rendered by the model's own chat template (tokenizer_config.json's) with the generation
prompt; the answer is the greedy text up to EOS or a newline. A prompt longer than the context (less the answer's
``max_new_tokens``) drops passage tokens from its front, keeping its first token, and is counted. An answer that
normalises to ``no_answer_text`` (prepare-sft's reply), or an empty one, is the prediction "".
"""

from __future__ import annotations

import random

from tqdm import tqdm

from openllm_ds.errors import UserError
from openllm_ds.evaluation.qa_tasks import fit_prompt, read_squad, sample, squad_answer, squad_scores
from openllm_ds.evaluation.squad_score import normalize_answer
from openllm_ds.inference import greedy_continuation


def chat_prompt_ids(tokenizer, context: str, question: str, layout: str) -> list[int]:
    """The ids of a SQuAD question as the model's chat template asks it (the server's rule: SpecialTokens.encode)."""
    from openllm_ds.finetune.prepare import user_turn
    from openllm_ds.tokenizer.chat import SpecialTokens, load_chat_template

    template = load_chat_template(tokenizer.model_file.parent, tokenizer)
    if template is None:
        raise UserError(f"the model's tokenizer ({tokenizer.model_file.parent}) has no chat_template: chat tasks need "
                        "one (every tokenizer `openllm-ds train-tokenizer` writes has it)")
    text = template.render([{"role": "user", "content": user_turn(context, question, layout)}], True)
    return SpecialTokens(tokenizer).encode(text)


def run_squad_chat(spec, model, tokenizer, progress: bool) -> dict:
    questions, version = read_squad(spec.data)
    rng = random.Random(spec.seed)
    chosen = sample(questions, spec.limit, rng)
    budget = model.cfg.max_seq_len - spec.max_new_tokens
    no_answer = normalize_answer(spec.no_answer_text)

    def stop_when(text: str) -> bool:
        return any(s in text for s in spec.stop)

    predictions, examples, num_truncated = {}, [], 0
    for q in tqdm(chosen, desc=spec.name, unit="q", disable=not progress):
        ids = chat_prompt_ids(tokenizer, q.context, q.question, spec.layout)
        ids, truncated = fit_prompt(ids[0], ids[1:], budget)
        num_truncated += truncated
        answer, predictions[q.qid] = squad_answer(
            greedy_continuation(model, tokenizer, ids, spec.max_new_tokens, stop_when), spec.stop, no_answer)
        if len(examples) < 3:
            examples.append({"question": q.question, "prediction": answer, "gold": list(q.answers[:3])})

    unanswerable = [q for q in chosen if not q.answers]
    out = {
        **squad_scores(chosen, predictions, version, rng),
        "num_shots": 0,
        "layout": spec.layout,
        "num_truncated_prompts": num_truncated,
        "no_answer_rate": sum(p == "" for p in predictions.values()) / len(predictions),
        "examples": examples,
    }
    if unanswerable:  # SQuAD 2.0: the no-answer reply given exactly where it is right
        right = sum((predictions[q.qid] == "") == (not q.answers) for q in chosen)
        out["no_answer_accuracy"] = 100.0 * right / len(chosen)
        out["baseline"]["no_answer_accuracy"] = 100.0 * max(len(unanswerable), len(chosen) - len(unanswerable)) / len(chosen)
    return out
