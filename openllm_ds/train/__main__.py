"""``python -m openllm_ds.train`` and ``deepspeed --num_gpus N --module openllm_ds.train``: ``openllm-ds train``.

Under the deepspeed launcher every rank runs this module; only rank 0 prints the summary and errors.
"""

import sys

from openllm_ds.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
