"""The built-in server's generation threads: ``max_concurrency`` long-lived workers, each request's generation on
one of them from start to end; further requests wait in the pool's queue (no 503s).

Speed (one client should see the completer's in-process tokens/s): the workers are long-lived threads (OpenMP's and
MKL's per-thread state is built once, not per request), every generation uses the completer's ``num_threads``
intra-op threads (``inference.load_completer`` shares the cores out among the ``max_concurrency`` workers; on a
2-core machine one thread each, which is also the fastest for a small model), and a warm-up generation on a worker
makes the transposed weight copies of the decode fast path (``model/kernels.py``'s ``Linear``) before the first
request.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from openllm_ds.errors import UserError
from openllm_ds.inference import Completer, SamplingParams

WORKER_PREFIX = "openllm-ds-generate"


class Workers:
    """``submit(fn, *args)`` runs on one of ``max_concurrency`` worker threads; ``close()`` stops them."""

    def __init__(self, max_concurrency: int):
        if max_concurrency < 1:
            raise UserError(f"--max_concurrency must be >= 1, got {max_concurrency}")
        self.max_concurrency = max_concurrency
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix=WORKER_PREFIX)

    def submit(self, fn, *args) -> Future:
        return self._pool.submit(fn, *args)

    def warm_up(self, completer: Completer) -> None:
        """One short generation on a worker: the decode fast path's transposed weights exist before any request."""
        params = SamplingParams(max_tokens=2, temperature=0)
        self.submit(completer.complete, [completer.tokenizer.prompt_prefix_id], params).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
