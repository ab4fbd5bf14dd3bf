"""``openllm-ds prepare-sft``: SQuAD's training questions as conversations in OpenAI's messages format.

Each question of a training file (train-v1.1.json; names without "dev") is one conversation: the user turn is the
passage and the question (``--layout``: passage, blank line, question by default), the assistant turn its first
gold answer; an unanswerable question (SQuAD 2.0's ``is_impossible``) gets ``NO_ANSWER``. The conversations are split
by passage: a passage (by its text, seeded) goes with all its questions to validation.jsonl or to train.jsonl, never
both. The dev files stay untouched, for scoring (the harness's squad_v1_chat / squad_v2_chat).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from openllm_ds.config import PrepareSftConfig
from openllm_ds.data.sources import list_squad_dir, split_of
from openllm_ds.errors import DataError
from openllm_ds.finetune.run import TRAIN_FILE, VALIDATION_FILE
from openllm_ds.output_lock import OutputLock
from openllm_ds.utils import OutputKind, atomic_write_bytes, atomic_write_json, claim_output_dir, write_manifest

NO_ANSWER = "The passage does not say."  # the one reply to a question the passage does not answer
STATS_FILE = "stats.json"
SFT_DATA = OutputKind("fine-tuning conversations", "openllm-ds prepare-sft",
                      lambda name: name in (TRAIN_FILE, VALIDATION_FILE, STATS_FILE))


def user_turn(context: str, question: str, layout: str) -> str:
    """The user's message of a SQuAD question (the harness's chat tasks ask it the same way)."""
    return f"{question}\n\n{context}" if layout == "question_passage" else f"{context}\n\n{question}"


def is_validation_passage(context: str, seed: int, share: float) -> bool:
    """A passage's side of the split: by a seeded hash of its text (the same passage always lands on one side)."""
    digest = hashlib.sha256(f"{seed}\x00{context}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def squad_conversations(path: Path, layout: str):
    """(context, conversation) of every question of a SQuAD training file."""
    from openllm_ds.data.documents import parse_json

    obj = parse_json(path.read_bytes(), str(path), f"re-download it or remove it from {path.parent}")
    data = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(data, list):
        raise DataError(f"{path} has no top-level 'data' list; pass SQuAD JSON files")
    for i, article in enumerate(data):
        for j, paragraph in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str):
                raise DataError(f"{path}: data[{i}].paragraphs[{j}] has no 'context' string; pass SQuAD JSON files")
            for k, qa in enumerate(paragraph.get("qas", [])):
                answers = [a.get("text") for a in qa.get("answers", []) if isinstance(a, dict)]
                answer = NO_ANSWER if qa.get("is_impossible") else next((a for a in answers if a and a.strip()), None)
                if answer is None or not isinstance(qa.get("question"), str):
                    raise DataError(f"{path}: data[{i}].paragraphs[{j}].qas[{k}] has no question or gold answer")
                yield context, {"messages": [{"role": "user", "content": user_turn(context, qa["question"], layout)},
                                             {"role": "assistant", "content": answer}]}


def prepare_sft(cfg: PrepareSftConfig) -> dict:
    """Write train.jsonl, validation.jsonl and stats.json into ``cfg.output_dir``; return the stats."""
    from tqdm.auto import tqdm

    out = Path(cfg.output_dir).expanduser()
    with OutputLock(out, "prepare-sft"):
        claim_output_dir(out, SFT_DATA, "--output_dir")
        files = [p for p in list_squad_dir(cfg.squad_dir) if split_of(p.name) == "train"]
        if not files:
            raise DataError(f"--squad_dir {cfg.squad_dir} holds no training file (train-v1.1.json, ...); the dev files "
                            "are kept for scoring")
        lines = {TRAIN_FILE: [], VALIDATION_FILE: []}
        passages = {TRAIN_FILE: set(), VALIDATION_FILE: set()}
        no_answer = 0
        for path in tqdm(files, desc="SQuAD questions -> conversations", unit="file"):
            for context, conv in squad_conversations(path, cfg.layout):
                name = VALIDATION_FILE if is_validation_passage(context, cfg.seed, cfg.validation_share) else TRAIN_FILE
                lines[name].append(json.dumps(conv, ensure_ascii=False))
                passages[name].add(context)
                no_answer += conv["messages"][-1]["content"] == NO_ANSWER
        if not lines[TRAIN_FILE] or not lines[VALIDATION_FILE]:
            raise DataError(f"--squad_dir {cfg.squad_dir}: {len(lines[TRAIN_FILE])} training and "
                            f"{len(lines[VALIDATION_FILE])} validation conversations; both need some (raise or lower "
                            "--validation_share, or add SQuAD files)")
        stats = {"files": [p.name for p in files], "layout": cfg.layout, "seed": cfg.seed,
                 "validation_share": cfg.validation_share, "no_answer_reply": NO_ANSWER, "no_answer": no_answer,
                 "train": {"conversations": len(lines[TRAIN_FILE]), "passages": len(passages[TRAIN_FILE])},
                 "validation": {"conversations": len(lines[VALIDATION_FILE]), "passages": len(passages[VALIDATION_FILE])},
                 "output_dir": str(out)}
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, SFT_DATA, [TRAIN_FILE, VALIDATION_FILE, STATS_FILE])
        for name, rows in lines.items():
            atomic_write_bytes(out / name, ("\n".join(rows) + "\n").encode("utf-8", "backslashreplace"))
        atomic_write_json(out / STATS_FILE, stats)  # last: its presence says the others are complete
    return stats
