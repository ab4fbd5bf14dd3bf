"""`ray job submit --working-dir . -- python ray_jobs/pipeline.py --config configs/tiny.yaml --work_dir /shared/runs/tiny`

Runs the whole pipeline as a Ray job: data and tokenization across the cluster's workers,
training through Ray Train (train.num_workers defaults to 1 here). The job runs in a temporary copy of
--working-dir that Ray deletes later, so --work_dir must be an absolute path every node mounts.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds openllm_ds/

from openllm_ds.cli import job_main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a.startswith("train.num_workers=") for a in argv):
        argv.append("train.num_workers=1")
    sys.exit(job_main("pipeline", argv, lambda args: {"--work_dir": args.work_dir}))
