"""Supervised fine-tuning on conversations: ``prepare-sft`` (SQuAD as conversations), the SFT data (conversations ->
examples with answer-only labels -> length-bucketed batches) and ``finetune``, a mode of the training loop."""
