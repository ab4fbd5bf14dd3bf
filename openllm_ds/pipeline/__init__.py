"""`openllm-ds pipeline`: every stage in order (``orchestrator.py``), skipping the ones whose outputs are complete,
then the run's report (``report.py``)."""

from openllm_ds.pipeline.orchestrator import run_pipeline, train_stage, uses_prepare

__all__ = ["run_pipeline", "train_stage", "uses_prepare"]
