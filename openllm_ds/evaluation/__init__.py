"""Stage 5, evaluation: perplexity, generation, the official SQuAD scorer, and harness tasks."""

from openllm_ds.evaluation.generate import generate_text
from openllm_ds.evaluation.sliding_window import evaluate_text, perplexity
from openllm_ds.evaluation.run import evaluate
from openllm_ds.evaluation.squad_score import score_predictions, score_squad
from openllm_ds.evaluation.tasks import TaskSpec, available_tasks, load_task, run_task, run_task_on_model

__all__ = [
    "evaluate", "generate_text", "score_squad", "score_predictions", "perplexity", "evaluate_text",
    "run_task", "run_task_on_model", "load_task", "available_tasks", "TaskSpec",
]
