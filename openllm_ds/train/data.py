"""Training and validation batches from binary token shards.

A window is ``max_seq_len + 1`` consecutive tokens (inputs and next-token targets); window ``i``
starts at token ``i * max_seq_len``, so the inputs of different windows never overlap. Each epoch
visits the windows in a permutation seeded by (train.seed, epoch). A step takes the next
``global_batch = micro x grad_accum x world size`` windows of that order; rank ``r`` takes the
``r``-th contiguous slice of ``micro x grad_accum`` windows and splits it into ``grad_accum`` micro
batches. So one rank with micro 8 x accum 2 and two ranks with micro 8 x accum 1 train on the same
16 windows per step. The data position (epoch, index into the epoch's order) is all a checkpoint
needs to continue the same sequence; a step that would run past the end of an epoch starts the
next one (the last partial batch is dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from openllm_ds.errors import DataError
from openllm_ds.train.distributed import DistEnv, broadcast_object


@dataclass
class DataPosition:
    epoch: int = 0
    index: int = 0  # windows of this epoch's order already consumed


def ensure_token_shards(text_file: str | Path, tokenizer_dir: str | Path, tokenizer_sha256: str, env: DistEnv,
                        num_workers: int = 2):
    """The shards of ``text_file`` (built beside it by rank 0 when missing or stale), checked against the tokenizer."""
    from openllm_ds.tokenizer import TokenShards, shards_dir_for, tokenize_file

    failure = None
    if env.is_rank_zero:
        try:
            tokenize_file(text_file, tokenizer_dir, num_workers=num_workers)
        except Exception as e:  # noqa: BLE001 - every rank must stop, not wait for rank 0 at a barrier
            failure = e
    message = broadcast_object(None if failure is None else str(failure), env)
    if failure is not None:
        raise failure
    if message is not None:
        raise DataError(f"rank 0 could not build the token shards of {text_file}: {message}")
    shards = TokenShards(shards_dir_for(text_file))
    if shards.meta["tokenizer_sha256"] != tokenizer_sha256:
        raise DataError(f"token shards {shards.dir} were built with another tokenizer (tokenizer.model sha256 "
                        f"{shards.meta['tokenizer_sha256'][:12]}..., expected {tokenizer_sha256[:12]}...); "
                        f"delete {shards.dir} to rebuild them with train.tokenizer_dir")
    return shards


def num_windows(num_tokens: int, seq_len: int) -> int:
    return max(0, (num_tokens - 1) // seq_len)


class TrainBatches:
    """This rank's micro batches of each global batch, in a seeded, resumable order."""

    def __init__(self, tokens, seq_len: int, micro_batch: int, grad_accum: int, env: DistEnv, seed: int):
        self.tokens, self.seq_len, self.micro, self.accum, self.env, self.seed = \
            tokens, seq_len, micro_batch, grad_accum, env, seed
        self.global_batch = micro_batch * grad_accum * env.world_size
        self.num_windows = num_windows(len(tokens), seq_len)
        if self.num_windows < self.global_batch:  # preflight.check_lengths reports this to the user
            raise ValueError(f"{self.num_windows} windows < one global batch of {self.global_batch}")
        self._order_epoch, self._order = -1, None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_windows // self.global_batch

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def next_batch(self, pos: DataPosition) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], DataPosition]:
        """The ``grad_accum`` (inputs, targets) micro batches of this rank, and the position after them."""
        epoch, index = pos.epoch, pos.index
        if index + self.global_batch > self.num_windows:
            epoch, index = epoch + 1, 0
        windows = self.order(epoch)[index : index + self.global_batch]
        share = self.micro * self.accum
        mine = windows[self.env.rank * share : (self.env.rank + 1) * share]
        rows = self.read(mine)
        micro_batches = []
        for k in range(self.accum):
            block = rows[k * self.micro : (k + 1) * self.micro]
            micro_batches.append((block[:, :-1], block[:, 1:]))
        return micro_batches, DataPosition(epoch, index + self.global_batch)

    def read(self, windows: np.ndarray) -> torch.Tensor:
        T = self.seq_len
        rows = np.stack([self.tokens[int(w) * T : int(w) * T + T + 1] for w in windows])
        return torch.from_numpy(rows).to(self.env.torch_device)


class EvalWindows:
    """A fixed set of validation windows, spread evenly over the file; each rank scores a disjoint share."""

    def __init__(self, tokens, seq_len: int, num_requested: int, micro_batch: int, env: DistEnv):
        available = num_windows(len(tokens), seq_len)
        n = min(num_requested, available)
        n -= n % env.world_size  # equal shares: every rank runs the same forward passes (ZeRO-3 gathers)
        if n < 1:  # preflight.check_lengths reports this to the user
            raise ValueError(f"{available} validation windows for {env.world_size} rank(s)")
        self.tokens, self.seq_len, self.micro, self.env = tokens, seq_len, micro_batch, env
        self.windows = (np.arange(n) * available) // n
        self.num_tokens = n * seq_len

    def batches(self):
        mine = self.windows[self.env.rank :: self.env.world_size]
        T = self.seq_len
        for i in range(0, len(mine), self.micro):
            rows = np.stack([self.tokens[int(w) * T : int(w) * T + T + 1] for w in mine[i : i + self.micro]])
            rows = torch.from_numpy(rows).to(self.env.torch_device)
            yield rows[:, :-1], rows[:, 1:]
