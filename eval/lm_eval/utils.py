"""Functions the lm-evaluation-harness task YAMLs in this folder name with `!function utils.<name>`.

Each task's data file is a path in its YAML's `metadata` (`data_key` in `dataset_kwargs` names which),
overridden with lm-eval's `--metadata '{"squad_v1_file": "PATH"}'`; `openllm_ds.evaluation.lm_eval_tasks.data_file`
resolves it (the working directory, then the repository root) or names the fix. Run the tasks with
`openllm-ds lm-eval ...`, which finds this folder by itself; the SQuAD scoring is openllm_ds's own.
"""

from openllm_ds.evaluation.lm_eval_tasks import data_file
from openllm_ds.evaluation.squad_score import exact_match_score, f1_score, normalize_answer

NO_ANSWER_TEXT = "unanswerable"  # what the worked examples answer to an unanswerable question


def text_dataset(task_name, data_key, **metadata):
    """A text file, one row per line, as the `test` split (lm-eval's `custom_dataset`)."""
    import datasets

    path = data_file(task_name, data_key, **metadata)
    return datasets.load_dataset("text", data_files={"test": str(path)})


def squad_dataset(task_name, data_key, **metadata):
    """A SQuAD JSON file's articles as the `validation` split (flattened to questions by `flatten_squad`)."""
    import datasets

    path = data_file(task_name, data_key, **metadata)
    return datasets.load_dataset("json", data_files={"validation": str(path)}, field="data")


def drop_blank_lines(dataset):
    """A `text` dataset has one row per line; blank lines are not documents."""
    return dataset.filter(lambda row: bool(row["text"].strip()))


def flatten_squad(dataset):
    """Articles of a SQuAD file (loaded with `field: data`) -> one row per question."""
    import datasets

    rows = []
    for article in dataset:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = [a["text"] for a in (qa.get("answers") or [])]
                rows.append({
                    "id": qa["id"],
                    "title": article.get("title") or "",
                    "context": para["context"],
                    "question": qa["question"],
                    "answers": answers,
                    "answer": answers[0] if answers else NO_ANSWER_TEXT,
                    "is_impossible": not answers,
                })
    return datasets.Dataset.from_list(rows)


def prediction_from_generation(text: str) -> str:
    """The generated answer, with the no-answer string (or an empty answer) as ""."""
    answer = text.split("\n")[0].strip()
    return "" if normalize_answer(answer) in ("", normalize_answer(NO_ANSWER_TEXT)) else answer


def process_results(doc, results):
    """Official SQuAD v2.0 per-question scores (identical to v1.1 for answerable questions),
    as percentages: unanswerable questions have the single gold answer ""."""
    prediction = prediction_from_generation(results[0])
    gold = [a for a in doc["answers"] if normalize_answer(a)] or [""]
    return {
        "exact_match": 100.0 * max(exact_match_score(prediction, g) for g in gold),
        "f1": 100.0 * max(f1_score(prediction, g, empty_matches_empty=True) for g in gold),
    }
