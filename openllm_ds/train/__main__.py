"""``python -m openllm_ds.train`` and ``deepspeed --num_gpus N --module openllm_ds.train``: the train flags.

Under the deepspeed launcher every rank runs this module; only rank 0 prints the summary and errors.
"""

from __future__ import annotations

import json
import os
import sys

from openllm_ds.errors import UserError


def main(argv: list[str] | None = None) -> int:
    from openllm_ds.cli import build_train_parser, run_config_from_args

    args = build_train_parser(prog="python -m openllm_ds.train").parse_args(argv)
    rank_zero = os.environ.get("RANK", "0") == "0"
    try:
        cfg = run_config_from_args(args, "train")
        if args.dry_run:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        from openllm_ds.train import launch

        summary = launch(cfg)
    except UserError as e:
        if rank_zero:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if rank_zero:
        print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
