"""Stage 1, data: SQuAD download or folder or Hub -> cleaned, deduplicated train/validation passages."""

from openllm_ds.data.clean import clean_passage, count_words
from openllm_ds.data.preparation import prepare

__all__ = ["prepare", "clean_passage", "count_words"]
