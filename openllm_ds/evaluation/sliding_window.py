"""Perplexity of a text file with a sliding window, as in Hugging Face's perplexity guide.

How a file becomes tokens: one document a line (blank lines are not documents), each encoded
without BOS/EOS and followed by EOS -- the exact stream of the training shards -- with one EOS in
front as the start-of-document context, so the first document's first token is scored like every
other. Every token of every document, and each document's closing EOS, is scored exactly once.

The window is the model's ``max_seq_len``; it moves by ``stride`` tokens (default half the window)
and scores only the targets no earlier window scored, so each target after the first window sees
at least ``max_seq_len - stride`` tokens of context. stride == max_seq_len is the fast,
non-overlapping evaluation; stride 1 gives every token the full window.

Reported: ``loss`` (mean NLL in nats per token), ``perplexity`` (exp(loss)), ``word_perplexity``
(exp(total NLL / whitespace words)), ``bits_per_byte`` (total NLL / ln 2 / UTF-8 bytes). The bytes
count each document's text plus one byte per document for the newline its EOS stands for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from openllm_ds.errors import DataError, UserError
from openllm_ds.paths import missing_reason

METRICS = ("perplexity", "loss", "word_perplexity", "bits_per_byte")


@dataclass(frozen=True)
class TextStats:
    num_documents: int
    num_words: int
    num_bytes: int


def read_documents(path: str | Path, limit: int | None = None) -> list[str]:
    """Documents of a one-per-line text file: split on newlines, blank lines dropped; or of any other source
    `openllm-ds tokenize` reads (JSON Lines, Parquet, a folder, a glob, hf:NAME...)."""
    from openllm_ds.data import documents, units

    p = Path(path)
    if units.is_hub_source(str(path)) or p.is_dir() or not p.is_file() and units.is_glob(str(path)) \
            or p.is_file() and units.format_of(p.name) not in (("text", None), (None, None)):
        return documents.read_documents(str(path), limit=limit, what="eval data")
    if not p.is_file():
        raise DataError(f"eval file {p} {missing_reason(p)}; pass a text file with one document a line "
                        "(e.g. data/clean/validation_data.txt from `openllm-ds prepare`)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"eval file {p} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    if "\x00" in text:  # what check_text refuses, named by its line here
        raise DataError(f"eval file {p} line {text.count(chr(10), 0, text.index(chr(0))) + 1} holds a NUL byte: it "
                        "looks binary, not text; pass a text file with one document a line")
    docs = [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
    if not docs:
        raise DataError(f"eval file {p} is empty; it needs at least one non-blank line of text")
    return docs[:limit] if limit else docs


def text_stats(docs: list[str]) -> TextStats:
    return TextStats(
        num_documents=len(docs),
        num_words=sum(len(d.split()) for d in docs),
        num_bytes=sum(len(d.encode("utf-8")) + 1 for d in docs),
    )


def encode_documents(tokenizer, docs: list[str]) -> list[int]:
    """[EOS] + doc1 + [EOS] + doc2 + [EOS] + ...: the training stream with a leading EOS."""
    eos = tokenizer.eos_id
    ids = [eos]
    for d in tqdm(docs, desc="tokenizing", unit="doc", leave=False, disable=len(docs) < 1000):
        ids.extend(tokenizer.encode(d))
        ids.append(eos)
    return ids


def sliding_windows(num_tokens: int, max_seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, num_scored) per window over a stream of ``num_tokens`` ids.

    A window feeds ids[begin:end] and predicts ids[begin+1:end+1]; only its last ``num_scored``
    predictions are counted. Targets 1..num_tokens-1 are each counted once.
    """
    if not 1 <= stride <= max_seq_len:
        raise UserError(f"--stride must be between 1 and the context length {max_seq_len}, got {stride}")
    windows = []
    last_target = 0  # targets 1..last_target are scored already
    begin = 0
    while last_target < num_tokens - 1:
        end = min(begin + max_seq_len, num_tokens - 1)
        windows.append((begin, end, end - last_target))
        last_target = end
        begin += stride
    return windows


@torch.no_grad()
def perplexity(model, token_ids, max_seq_len: int | None = None, stride: int | None = None,
               batch_size: int = 8, progress: bool = True) -> tuple[float, int]:
    """Summed next-token NLL (nats, float64) and the number of scored tokens over one id stream.

    ``token_ids``: a 1-D sequence; the first id is context only. ``max_seq_len`` defaults to the
    model's, ``stride`` to half of it. ``model(idx)`` returns the logits.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise UserError(f"need at least 2 tokens to score, got {ids.numel()}")
    max_seq_len = max_seq_len or model.cfg.max_seq_len
    if max_seq_len > model.cfg.max_seq_len:
        raise UserError(f"window of {max_seq_len} tokens exceeds the model's context ({model.cfg.max_seq_len})")
    stride = stride or max(1, max_seq_len // 2)
    windows = sliding_windows(ids.numel(), max_seq_len, stride)
    torch_model = isinstance(model, torch.nn.Module)  # else an OnnxCausalLM (onnxruntime, host memory)
    device = next(model.parameters()).device if torch_model else torch.device("cpu")
    was_training = torch_model and model.training
    model.eval()
    total_nll = 0.0
    num_scored = 0
    try:
        with tqdm(total=ids.numel() - 1, desc="perplexity", unit="tok", disable=not progress) as bar:
            for i in range(0, len(windows), batch_size):
                batch = windows[i : i + batch_size]
                T = max(end - begin for begin, end, _ in batch)
                x = torch.zeros(len(batch), T, dtype=torch.long)
                y = torch.full((len(batch), T), -100, dtype=torch.long)
                for row, (begin, end, n) in enumerate(batch):
                    x[row, : end - begin] = ids[begin:end]
                    y[row, end - begin - n : end - begin] = ids[end - n + 1 : end + 1]
                logits = model(x.to(device))
                nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.to(device).reshape(-1),
                                      ignore_index=-100, reduction="sum")
                total_nll += float(nll.double())
                n_batch = sum(n for _, _, n in batch)
                num_scored += n_batch
                bar.update(n_batch)
    finally:
        model.train(was_training)
    return total_nll, num_scored


def perplexity_metrics(total_nll: float, num_tokens: int, stats: TextStats) -> dict:
    loss = total_nll / num_tokens
    return {
        "perplexity": math.exp(loss),
        "loss": loss,
        "word_perplexity": math.exp(total_nll / stats.num_words) if stats.num_words else float("nan"),
        "bits_per_byte": total_nll / math.log(2) / stats.num_bytes,
    }


def evaluate_text(model, tokenizer, docs: list[str], stride: int | None = None, batch_size: int = 8,
                  progress: bool = True) -> dict:
    """All perplexity metrics plus counts for documents already read."""
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.cfg.vocab_size}; "
                        "evaluate with the tokenizer the model was trained with")
    stats = text_stats(docs)
    ids = encode_documents(tokenizer, docs)
    stride = stride or max(1, model.cfg.max_seq_len // 2)
    total_nll, num_tokens = perplexity(model, ids, model.cfg.max_seq_len, stride, batch_size, progress)
    return {
        **perplexity_metrics(total_nll, num_tokens, stats),
        "total_nll": total_nll,
        "num_tokens": num_tokens,
        "num_words": stats.num_words,
        "num_bytes": stats.num_bytes,
        "num_documents": stats.num_documents,
        "stride": stride,
        "max_seq_len": model.cfg.max_seq_len,
    }


def check_metrics(metrics) -> tuple[str, ...]:
    metrics = tuple(metrics) or ("perplexity", "loss")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UserError(f"unknown metric {unknown[0]!r} in --metrics; valid: {', '.join(METRICS)}")
    return metrics
