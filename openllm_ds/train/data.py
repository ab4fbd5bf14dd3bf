"""Training and validation batches from binary token shards, of one source or a weighted mixture.

Sources. ``train.data_file``, or ``train.data_files`` sampled by ``train.data_weights``: each any
source ``openllm-ds tokenize`` reads (or a shards dir it wrote). Rank 0 tokenizes a source into its
default shards dir when those shards are missing or stale. Each source validates on
``train.eval_data`` (one source only), on validation_data.txt beside a training_data.txt, or else on
its own held-out share (``train.holdout_fraction`` of its documents, chosen by hash, never trained on).

Windows. A window is ``max_seq_len + 1`` consecutive tokens of one source (inputs and next-token
targets); window ``i`` starts at token ``i * max_seq_len``. Each source visits its windows in a
permutation seeded by (train.seed, epoch) -- and the source's index, after the first source. A step
takes ``global_batch = micro x grad_accum x world size`` windows: slot by slot, the source whose
share so far lags its weight most (ties: the earlier source), so every source's realised share stays
within one window of its weight at every step; from each source the next windows of its order (a take
that would run past the end of its epoch starts its next epoch). Rank ``r`` takes the ``r``-th
contiguous slice of ``micro x grad_accum`` windows and splits it into ``grad_accum`` micro batches: one
rank with micro 8 x accum 2 and two ranks with micro 8 x accum 1 train on the same 16 windows per step.
With one source this is one permutation per epoch, taken ``global_batch`` windows at a time (the last
partial batch of an epoch dropped). The data position -- per source (epoch, windows of the epoch
taken, windows taken in all) -- is all a checkpoint needs to continue the same sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from openllm_ds.config import RunConfig, validation_source
from openllm_ds.errors import DataError, UserError
from openllm_ds.tokenizer.shards import is_shards_dir
from openllm_ds.train.distributed import DistEnv, broadcast_object


@dataclass
class DataSource:
    name: str  # short label: TensorBoard tags, logs
    source: str  # as the user wrote it
    weight: float
    train: object  # TokenShards
    val: object  # TokenShards: the validation source's, or this source's held-out split
    val_name: str  # what the validation windows come from, for messages


def load_sources(cfg: RunConfig, tokenizer_sha256: str, env: DistEnv) -> list[DataSource]:
    """Every training source with its validation tokens, tokenized first where needed (rank 0)."""
    from openllm_ds.tokenizer import TokenShards

    sources, names = [], set()
    key = "train.data_files" if cfg.train.data_files else "train.data_file (--data_file)"
    shards_dirs(cfg)  # no source listed twice, no two sources with one shards dir: before any work
    for spec, weight in cfg.train.sources:
        val_spec = cfg.eval_data if not cfg.train.data_files else validation_source(spec)
        holdout = 0.0 if val_spec else cfg.train.holdout_fraction
        train_dir = ensure_token_shards(spec, cfg, tokenizer_sha256, env, holdout, key)
        if val_spec:
            val = TokenShards(ensure_token_shards(val_spec, cfg, tokenizer_sha256, env, 0.0, "train.eval_data (--eval_data)"))
            val_name = val_spec
        else:
            val = TokenShards(train_dir, "heldout")
            val_name = f"the held-out {cfg.train.holdout_fraction:g} of {spec}"
        name = source_name(spec, names)
        sources.append(DataSource(name, spec, weight, TokenShards(train_dir), val, val_name))
    return sources


def shards_dirs(cfg: RunConfig) -> list[Path]:
    """The shards dirs ``load_sources`` reads (and builds when missing): the training sources', then the validation
    sources'. A training source listed twice, or two sources whose shards would share one dir, is refused
    (``derived_shards_dirs``); so is a training source that reaches a file another one reaches."""
    from openllm_ds.data.units import is_hub_source, resolve_sources
    from openllm_ds.tokenizer.corpus import derived_shards_dirs, shards_dir_for

    what = "train.data_files" if cfg.train.data_files else "train.data_file (--data_file)"
    specs = [spec for spec, _ in cfg.train.sources]
    train_dirs = derived_shards_dirs(specs, cfg.tokenizer.shards_root, what)
    local = [s for s in specs if not is_shards_dir(s) and not is_hub_source(s)]
    if len(local) > 1:
        resolve_sources(local, cfg.tokenizer.read_options(), what)  # refuses a file that two sources reach
    vals = [cfg.eval_data] if cfg.eval_data else [v for s in specs if cfg.train.data_files and (v := validation_source(s))]
    root = cfg.tokenizer.shards_root
    return train_dirs + [Path(v) if is_shards_dir(v) else shards_dir_for(v, root) for v in vals]


def source_name(spec: str, taken: set[str]) -> str:
    base = Path(spec.removeprefix("hf:").rstrip("/")).name.split(".")[0] or "data"
    base = "".join(c if c.isalnum() or c in "-_" else "_" for c in base)
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def ensure_token_shards(spec: str, cfg: RunConfig, tokenizer_sha256: str, env: DistEnv, holdout: float,
                        what: str) -> Path:
    """The shards dir of ``spec``: itself when it is one, else built (by rank 0) when missing or stale;
    checked against the tokenizer. Every rank gets rank 0's path."""
    from openllm_ds.output_lock import OutputLock
    from openllm_ds.tokenizer import tokenize_corpus
    from openllm_ds.tokenizer.corpus import shards_dir_for
    from openllm_ds.tokenizer.shards import read_meta

    tk = cfg.tokenizer
    result = None
    if env.is_rank_zero:
        try:
            if is_shards_dir(spec):
                out = Path(spec)
                meta = read_meta(out)
                if holdout and not meta.get("heldout"):
                    raise DataError(f"token shards {out} hold no held-out documents to validate on; pass --eval_data, "
                                    f"or tokenize again with --holdout {holdout:g}")
            else:
                # one writer per output dir: the shards dir's lock, as `openllm-ds tokenize` takes it
                with OutputLock(shards_dir_for(spec, tk.shards_root), "train", what):
                    meta = tokenize_corpus(spec, cfg.train.tokenizer_dir, shards_root=tk.shards_root,
                                           options=tk.read_options(), dedup=tk.dedup, holdout=holdout,
                                           num_workers=tk.num_workers, unit_bytes=tk.unit_bytes, what=what)
                out = Path(meta["shards_dir"])
            if meta["tokenizer_sha256"] != tokenizer_sha256:
                raise DataError(f"token shards {out} were built with another tokenizer (tokenizer.model sha256 "
                                f"{meta['tokenizer_sha256'][:12]}..., expected {tokenizer_sha256[:12]}...); tokenize "
                                "the data again with train.tokenizer_dir, or pass its source instead")
            result = ("ok", str(out.resolve()))
        except Exception as e:  # noqa: BLE001 - every rank must stop, not wait for rank 0 at a collective
            result = ("error", e)
    kind, value = broadcast_object(result if env.world_size == 1 else _picklable(result), env)
    if kind == "error":
        if isinstance(value, Exception):
            raise value
        raise DataError(f"rank 0 could not build the token shards of {spec}: {value}")
    return Path(value)


def _picklable(result):
    if result is not None and result[0] == "error":
        return result if isinstance(result[1], UserError) else ("error", str(result[1]))
    return result


def num_windows(num_tokens: int, seq_len: int) -> int:
    return max(0, (num_tokens - 1) // seq_len)


def windows_needed(weights, global_batch: int) -> list[int]:
    """The most windows one step can take from each source (its share of the global batch, plus the at most
    one window by which the slot order runs ahead of it): what each source must hold at least."""
    return [min(global_batch, math.ceil(w * global_batch) + 1) for w in weights]


@dataclass
class DataPosition:
    """Per source: [epoch, windows of that epoch's order taken, windows taken in all]."""

    sources: list[list[int]]

    @classmethod
    def start(cls, num_sources: int) -> DataPosition:
        return cls([[0, 0, 0] for _ in range(num_sources)])


class TrainBatches:
    """This rank's micro batches of each global batch, in a seeded, resumable order."""

    def __init__(self, tokens: list, weights: list[float], seq_len: int, micro_batch: int, grad_accum: int,
                 env: DistEnv, seed: int):
        self.tokens, self.weights = list(tokens), np.asarray(weights, dtype=np.float64)
        self.seq_len, self.micro, self.accum, self.env, self.seed = seq_len, micro_batch, grad_accum, env, seed
        self.global_batch = micro_batch * grad_accum * env.world_size
        self.num_windows = [num_windows(len(t), seq_len) for t in self.tokens]
        need = windows_needed(self.weights / self.weights.sum(), self.global_batch)
        if any(have < n for have, n in zip(self.num_windows, need)):  # preflight.check_lengths tells the user
            raise ValueError(f"{self.num_windows} windows < the most a step takes from each source, {need}")
        self._orders: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def steps_per_epoch(self) -> int:
        """Steps until the first source's (or the only one's) windows have all been seen."""
        return int(self.num_windows[0] // max(1.0, self.global_batch * self.weights[0] / self.weights.sum()))

    def order(self, source: int, epoch: int) -> np.ndarray:
        cached = self._orders.get(source)
        if cached is None or cached[0] != epoch:
            key = [self.seed, epoch] if source == 0 else [self.seed, epoch, source]
            cached = (epoch, np.random.default_rng(key).permutation(self.num_windows[source]))
            self._orders[source] = cached
        return cached[1]

    def slots(self, taken: list[int]) -> list[int]:
        """The source of each of the next global batch's windows, given the windows taken so far."""
        counts = np.asarray(taken, dtype=np.float64)
        out = []
        for _ in range(self.global_batch):
            lag = self.weights * (counts.sum() + 1) - counts
            s = int(np.argmax(lag))  # the first of equal lags
            out.append(s)
            counts[s] += 1
        return out

    def next_batch(self, pos: DataPosition) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], DataPosition, list[int]]:
        """This rank's ``grad_accum`` (inputs, targets) micro batches, the position after them, and how many
        windows of the global batch came from each source."""
        slots = self.slots([p[2] for p in pos.sources])
        new = [list(p) for p in pos.sources]
        picked: dict[int, list[int]] = {}
        for s in range(len(self.tokens)):
            n = slots.count(s)
            if not n:
                continue
            epoch, index, taken = new[s]
            if index + n > self.num_windows[s]:
                epoch, index = epoch + 1, 0
            picked[s] = self.order(s, epoch)[index:index + n].tolist()
            new[s] = [epoch, index + n, taken + n]
        windows = [(s, picked[s].pop(0)) for s in slots]
        share = self.micro * self.accum
        rows = self.read(windows[self.env.rank * share:(self.env.rank + 1) * share])
        micro_batches = [(rows[k * self.micro:(k + 1) * self.micro, :-1], rows[k * self.micro:(k + 1) * self.micro, 1:])
                         for k in range(self.accum)]
        return micro_batches, DataPosition(new), [slots.count(s) for s in range(len(self.tokens))]

    def step_tokens(self, taken: list[int]) -> list[int]:
        """The tokens of ``next_batch``'s windows per source."""
        return [k * self.seq_len for k in taken]

    def read(self, windows: list[tuple[int, int]]) -> torch.Tensor:
        T = self.seq_len
        rows = np.stack([self.tokens[s][w * T:w * T + T + 1] for s, w in windows])
        check_ids(rows, self.tokens[windows[0][0]])
        return torch.from_numpy(rows).to(self.env.torch_device)


def check_ids(rows: np.ndarray, tokens) -> None:
    """Ids past the vocabulary (shard bytes changed after they were written) stop the run with the file's name."""
    vocab_size = getattr(tokens, "vocab_size", None)  # a plain array (tests) has none
    if vocab_size is not None and rows.size and (rows.max() >= vocab_size or rows.min() < 0):
        raise DataError(f"token shards {tokens.dir} hold id {int(rows.max())}, past the vocabulary of "
                        f"{vocab_size}: the files changed after they were written; delete {tokens.dir} and "
                        "tokenize again")


class EvalWindows:
    """A fixed set of validation windows, spread evenly over the tokens; each rank scores a disjoint share."""

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
            check_ids(rows, self.tokens)
            rows = torch.from_numpy(rows).to(self.env.torch_device)
            yield rows[:, :-1], rows[:, 1:]
