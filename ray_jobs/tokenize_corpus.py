"""Tokenize a corpus on a Ray cluster: the workers read the inputs and write the shards themselves.
(Not named tokenize.py: a script's folder comes first on sys.path, and Python's own `tokenize` module
must stay importable.)

    ray job submit --working-dir . -- python ray_jobs/tokenize_corpus.py --input /shared/corpus/ \
        --tokenizer_dir /shared/tokenizer --output_dir /shared/corpus.tokens --num_workers 16

Takes the flags of `openllm-ds tokenize`. Inside a Ray job the workers run on the job's cluster
(RAY_ADDRESS); the inputs and --output_dir must be on storage every node mounts at the same path.
The job runs in a temporary copy of --working-dir that Ray deletes later, so --output_dir must be given, as an
absolute path.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds openllm_ds/

from openllm_ds.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("tokenize", sys.argv[1:], lambda args: {"--output_dir": args.output_dir}))
