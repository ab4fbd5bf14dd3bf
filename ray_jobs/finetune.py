"""Fine-tune on a Ray cluster: DeepSpeed workers under Ray Train's TorchTrainer, as ray_jobs/train.py trains.

    ray job submit --working-dir . -- python ray_jobs/finetune.py --model_dir /shared/models/tiny \
        --data /shared/data/sft --num_workers 2 --output_dir /shared/models/tiny-sft

Takes the flags of `openllm-ds finetune` (see `python ray_jobs/finetune.py --help`); without --num_workers a job
trains with one Ray Train worker. The base model, the conversations and --output_dir must be on storage every node
sees at the same path, and --output_dir absolute (the job runs in a temporary copy of --working-dir); a job
submitted again with the same --output_dir resumes from its latest checkpoint.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds openllm_ds/

from openllm_ds.cli import job_main, run_config_from_args  # noqa: E402

WORKERS = ("--num_workers", "--num-workers", "train.num_workers=")


def output_dir(args) -> str:
    cfg = run_config_from_args(args)
    return cfg.train.output_dir or f"models/{cfg.name}-sft"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith(WORKERS) for a in argv):
        argv.append("train.num_workers=1")  # a job trains under Ray Train
    return job_main("finetune", argv, lambda args: {"--output_dir (train.output_dir)": output_dir(args)})


if __name__ == "__main__":
    sys.exit(main())
