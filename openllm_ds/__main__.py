"""``python -m openllm_ds <stage>`` and ``deepspeed --num_gpus N --module openllm_ds train ...``: the CLI."""

import sys

from openllm_ds.cli import main

if __name__ == "__main__":
    sys.exit(main())
