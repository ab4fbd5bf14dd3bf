"""Train on a Ray cluster: DeepSpeed workers under Ray Train's TorchTrainer.

    ray job submit --working-dir . -- python ray_jobs/train.py --config configs/tiny.yaml --num_workers 2 \
        --output_dir /shared/models/tiny

Takes the flags of `openllm-ds train` (see `python ray_jobs/train.py --help`); without --num_workers
a job trains with one Ray Train worker. Inside a Ray job the launcher connects to the job's cluster
(RAY_ADDRESS). The data, tokenizer and --output_dir must be on storage every node sees at the same
path, and --output_dir absolute (the job runs in a temporary copy of --working-dir); a job submitted
again with the same --output_dir resumes from its latest checkpoint.
"""

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds openllm_ds/

from openllm_ds.cli import build_train_parser, run_config_from_args  # noqa: E402
from openllm_ds.errors import UserError  # noqa: E402
from openllm_ds.utils import check_job_outputs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = build_train_parser(prog="python ray_jobs/train.py").parse_args(argv)
    try:
        cfg = run_config_from_args(args, "train")
        explicit = getattr(args, "train.num_workers") is not None or any(
            o.startswith("train.num_workers=") for o in args.overrides or [])
        if cfg.train.num_workers == 0 and not explicit:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=1))
        check_job_outputs({"--output_dir (train.output_dir)": cfg.output_dir})
        if args.dry_run:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        from openllm_ds.train import launch

        summary = launch(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
