"""Evaluate on a Ray cluster: harness tasks x checkpoints, one Ray task per pair.

    ray job submit --working-dir . -- python ray_jobs/eval.py \
        --model_dir /shared/models/tiny --tasks squad_v1_qa,wikitext2_ppl --checkpoints all

Takes the flags of `openllm-ds evaluate` (see `python ray_jobs/eval.py --help`); inside a Ray job
the library connects to the job's cluster (RAY_ADDRESS) instead of starting a local one. The job runs in
a temporary copy of --working-dir that Ray deletes later, so --model_dir (where the report goes) and
--output must be absolute paths.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds openllm_ds/

from openllm_ds.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("evaluate", sys.argv[1:], lambda args: {"--model_dir": args.model_dir,
                                                               **({"--output": args.output} if args.output else {})}))
