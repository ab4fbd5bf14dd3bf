"""Fine-tuning data: conversations from JSON Lines -> (ids, labels) examples -> length-bucketed batches.

Records. One JSON object a line (``data/documents.read_json_lines``: files, .gz/.zst, folders, globs), in OpenAI's
fine-tuning format ``{"messages": [{"role", "content"}, ...]}`` (multi-turn too) or ``{"prompt", "completion"}``
(a user turn and the assistant's answer). A bad record is one DataError naming its file and line: no messages, a
missing or unknown role, a content that is not a string, an empty assistant turn, no assistant turn at all, a
conversation longer than the context (unless ``finetune.truncate``: its head is kept, and the count reported).

Examples. ``tokenizer.chat.encode_conversation``: the ids of the rendered conversation and labels that keep only
the answers (each assistant turn's content and its closing EOS). ``finetune.copy_drill`` adds that share of
synthetic examples to every epoch: a run of 20-60 tokens of a training conversation, then the same run again, loss on
the second copy. Extractive answers are copied from the passage; a small model that has not learned to copy from its
context (tiny: the loss on a repeated run equals the first pass's) learns it from this drill within a few hundred steps
when the runs are real text (runs of random pieces teach it far more slowly).

Batches. An epoch is a seeded permutation of its examples, cut into chunks of 64 global batches; each chunk is
sorted by length and cut into global batches, and the batches are shuffled: every batch holds examples of about
one length, so little of it is padding (``padding_share``). The position -- (epoch, batches of the epoch taken,
batches taken) -- is all a checkpoint needs to go on with the same batches, as for pretraining's windows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from openllm_ds.errors import DataError
from openllm_ds.text import text_problem
from openllm_ds.tokenizer.chat import IGNORE_INDEX, ROLES, SpecialTokens, encode_conversation
from openllm_ds.train.data import DataPosition
from openllm_ds.train.distributed import DistEnv

CHUNK_BATCHES = 64  # global batches sorted by length together
DRILL_LENGTHS = (20, 60)  # a copy drill's run of tokens, shortest and longest


def conversation_of(obj, where: str) -> list[dict]:
    """A record's conversation as ``[{"role", "content"}]`` (roles mapped as the server maps them)."""
    if isinstance(obj, dict) and "messages" not in obj and ("prompt" in obj or "completion" in obj):
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(obj.get(key)).__name__}; write "
                                "{\"prompt\": \"...\", \"completion\": \"...\"}")
        obj = {"messages": [{"role": "user", "content": obj["prompt"]},
                            {"role": "assistant", "content": obj["completion"]}]}
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise DataError(f"{where} is not a conversation: write {{\"messages\": [{{\"role\": \"user\", \"content\": "
                        "...}, {\"role\": \"assistant\", \"content\": ...}]} or {\"prompt\": ..., \"completion\": ...}")
    out = []
    for i, m in enumerate(obj["messages"]):
        if not isinstance(m, dict) or "role" not in m:
            raise DataError(f"{where}: messages[{i}] has no role; give each message a role of {', '.join(ROLES)}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}] has the role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            kind = "missing" if "content" not in m else type(m["content"]).__name__
            raise DataError(f"{where}: messages[{i}].content is {kind}, not a string")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: messages[{i}] is an empty assistant turn: nothing to learn; fill it or drop it")
        if problem := text_problem(m["content"]):  # a NUL or a lone surrogate escape
            raise DataError(f"{where}: messages[{i}].content {problem}")
        out.append({"role": ROLES[m["role"]], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn: nothing to learn")
    return out


@dataclass
class SftExamples:
    """Tokenised conversations: ``ids[i]`` and ``labels[i]`` (equal lengths; IGNORE_INDEX where no loss)."""

    ids: list[np.ndarray]
    labels: list[np.ndarray]
    source: str
    sha256: str  # of the records read, for resuming on the same data
    truncated: int = 0  # conversations longer than the context whose head was kept
    dropped: int = 0  # of those, the ones whose head holds no answer token (left out)

    def __len__(self) -> int:
        return sum(len(x) for x in self.ids)  # tokens


def load_examples(source: str, template, special: SpecialTokens, max_len: int, truncate: bool,
                  what: str = "finetune.data (--data)") -> SftExamples:
    """Every conversation of ``source`` tokenised; ``max_len``: the most tokens one example may hold (context + 1:
    inputs and next-token targets)."""
    from tqdm.auto import tqdm

    from openllm_ds.data.documents import read_json_lines

    ids, labels, digest = [], [], hashlib.sha256()
    truncated = dropped = 0
    for where, obj in tqdm(read_json_lines(source, what), desc=f"reading {Path(source).name}", unit=" conv",
                           mininterval=5, leave=False):
        messages = conversation_of(obj, where)
        x, y = encode_conversation(messages, template, special)
        digest.update(np.asarray(x, dtype=np.int32).tobytes() + np.asarray(y, dtype=np.int32).tobytes())
        if len(x) > max_len:
            if not truncate:
                raise DataError(f"{where}: the conversation is {len(x)} tokens, longer than the context "
                                f"(finetune.max_seq_len + 1 = {max_len}); pass --truncate to keep its head, raise "
                                "--max_seq_len, or shorten it")
            truncated += 1
            x, y = x[:max_len], y[:max_len]
            if all(v == IGNORE_INDEX for v in y[1:]):
                dropped += 1
                continue
        ids.append(np.asarray(x, dtype=np.int32))
        labels.append(np.asarray(y, dtype=np.int64))
    if not ids:
        raise DataError(f"{what} {source} holds no conversations to train on")
    return SftExamples(ids, labels, source, digest.hexdigest(), truncated, dropped)


def copy_drill(rng: np.random.Generator, texts: list[np.ndarray], prefix_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One drill example: the prompt prefix, a run of 20-60 tokens from one of ``texts`` (conversations' ids, each
    longer than the shortest run), the same run again; labels on the second copy only."""
    source = texts[int(rng.integers(len(texts)))]
    n = int(rng.integers(DRILL_LENGTHS[0], min(DRILL_LENGTHS[1], len(source) - 1) + 1))
    start = int(rng.integers(1, len(source) - n + 1))  # past the conversation's opening token
    run = source[start:start + n]
    ids = np.concatenate([[prefix_id], run, run]).astype(np.int32)
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[1 + n:] = run
    return ids, labels


class SftBatches:
    """This rank's micro batches of each global batch of conversations, in a seeded, resumable order (the
    interface of ``train.data.TrainBatches``: ``next_batch(position)``)."""

    def __init__(self, examples: SftExamples, micro_batch: int, grad_accum: int, env: DistEnv, seed: int,
                 pad_id: int, drill_share: float = 0.0, prefix_id: int = 0):
        self.examples, self.micro, self.accum, self.env, self.seed = examples, micro_batch, grad_accum, env, seed
        self.pad_id, self.prefix_id = pad_id, prefix_id
        self.global_batch = micro_batch * grad_accum * env.world_size
        self.num_drill = round(drill_share * len(examples.ids))
        self.drill_texts = [x for x in examples.ids if len(x) > DRILL_LENGTHS[0] + 1] if self.num_drill else []
        if self.num_drill and not self.drill_texts:
            raise DataError(f"{examples.source}: finetune.copy_drill copies runs of {DRILL_LENGTHS[0]}-{DRILL_LENGTHS[1]} "
                            f"tokens of the conversations, and none is longer than {DRILL_LENGTHS[0] + 1} tokens; pass "
                            "--copy_drill 0")
        self.steps_per_epoch = (len(examples.ids) + self.num_drill) // self.global_batch
        if self.steps_per_epoch < 1:
            raise DataError(f"{examples.source} holds {len(examples.ids)} conversations, fewer than one global batch "
                            f"of {self.global_batch} (finetune.batch_size x gradient accumulation x ranks); lower "
                            "--batch_size or add conversations")
        self._epoch: tuple[int, list, list, list] | None = None

    def epoch(self, epoch: int) -> tuple[list, list, list]:
        """(ids, labels, batches) of an epoch: its examples (the drill's drawn for it) and their global batches."""
        if self._epoch is None or self._epoch[0] != epoch:
            ids, labels = list(self.examples.ids), list(self.examples.labels)
            if self.num_drill:
                rng = np.random.default_rng([self.seed, epoch, 1])
                for _ in range(self.num_drill):
                    x, y = copy_drill(rng, self.drill_texts, self.prefix_id)
                    ids.append(x)
                    labels.append(y)
            order = np.random.default_rng([self.seed, epoch]).permutation(len(ids))
            lengths = np.asarray([len(x) for x in ids])
            B, chunk = self.global_batch, self.global_batch * CHUNK_BATCHES
            batches = []
            for c in range(0, self.steps_per_epoch * B, chunk):
                part = order[c:min(c + chunk, self.steps_per_epoch * B)]
                part = part[np.argsort(lengths[part], kind="stable")]
                batches += [part[k:k + B] for k in range(0, len(part), B)]
            perm = np.random.default_rng([self.seed, epoch, 2]).permutation(len(batches))
            self._epoch = (epoch, ids, labels, [batches[i] for i in perm])
        return self._epoch[1], self._epoch[2], self._epoch[3]

    def padding_share(self, epoch: int = 0) -> float:
        """The share of an epoch's batch positions that are padding (each micro batch padded to its longest)."""
        ids, _, batches = self.epoch(epoch)
        real = padded = 0
        for batch in batches:
            for k in range(0, len(batch), self.micro):
                lens = [len(ids[i]) - 1 for i in batch[k:k + self.micro]]
                real += sum(lens)
                padded += max(lens) * len(lens)
        return 1 - real / padded

    def next_batch(self, pos: DataPosition) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], DataPosition, list[int]]:
        """This rank's ``grad_accum`` (inputs, targets) micro batches, the position after them, and the tokens
        (inputs, padding left out) of the whole global batch."""
        epoch, index, taken = pos.sources[0]
        if index >= self.steps_per_epoch:
            epoch, index = epoch + 1, 0
        ids, labels, batches = self.epoch(epoch)
        batch = batches[index]
        share = self.micro * self.accum
        mine = batch[self.env.rank * share:(self.env.rank + 1) * share]
        micro_batches = [self.collate([ids[i] for i in mine[k:k + self.micro]], [labels[i] for i in mine[k:k + self.micro]])
                         for k in range(0, len(mine), self.micro)]
        tokens = int(sum(len(ids[i]) - 1 for i in batch))
        return micro_batches, DataPosition([[epoch, index + 1, taken + 1]]), [tokens]

    def step_tokens(self, taken: list[int]) -> list[int]:
        return taken

    def collate(self, ids: list[np.ndarray], labels: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        return collate(ids, labels, self.pad_id, self.env.torch_device)


def collate(ids: list[np.ndarray], labels: list[np.ndarray], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (padded with the pad id to the longest) and next-token targets (IGNORE_INDEX on prompt and padding)."""
    T = max(len(x) for x in ids) - 1
    x = np.full((len(ids), T), pad_id, dtype=np.int64)
    y = np.full((len(ids), T), IGNORE_INDEX, dtype=np.int64)
    for r, (a, b) in enumerate(zip(ids, labels)):
        x[r, :len(a) - 1] = a[:-1]
        y[r, :len(b) - 1] = b[1:]
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


class SftEvalBatches:
    """A fixed set of validation conversations (at most ``num_requested``, spread evenly, sorted by length); each
    rank scores a disjoint share. The loop's validation loss over them is the answer tokens' mean loss."""

    def __init__(self, examples: SftExamples, num_requested: int, micro_batch: int, env: DistEnv, pad_id: int):
        n = min(num_requested, len(examples.ids))
        n -= n % env.world_size
        if n < 1:
            raise DataError(f"validation data {examples.source} holds {len(examples.ids)} conversations, fewer than "
                            f"the {env.world_size} rank(s)")
        picked = (np.arange(n) * len(examples.ids)) // n
        picked = sorted(picked, key=lambda i: len(examples.ids[i]))
        self.examples, self.picked, self.micro, self.env, self.pad_id = examples, picked, micro_batch, env, pad_id

    def batches(self):
        mine = self.picked[self.env.rank::self.env.world_size]
        for k in range(0, len(mine), self.micro):
            part = mine[k:k + self.micro]
            yield collate([self.examples.ids[i] for i in part], [self.examples.labels[i] for i in part], self.pad_id,
                          self.env.torch_device)
