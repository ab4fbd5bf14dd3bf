"""The built-in server's completer: prompt -> tokens -> KV-cache generation -> text.

Concurrency: generations run on a fixed pool of ``max_concurrency`` worker threads, each request's
generation on one of them from start to end; further requests wait in the pool's queue (no 503s).
The model is read-only in eval mode, each generation owns its KV cache and its seeded
``torch.Generator``, and PyTorch and onnxruntime release the GIL inside their kernels, so
generations proceed side by side without sharing state. Prompts of different lengths are not
batched together: the model has no padding mask, and per-request generation keeps every answer
identical to a sequential one.

Speed (one client should see the completer's in-process tokens/s): the workers are long-lived threads
(OpenMP's and MKL's per-thread state is built once, not per request), every generation uses
``num_threads`` intra-op threads (default: the cores shared out among the ``max_concurrency``
workers; on a 2-core machine one thread each, which is also the fastest for a small model), and a
warm-up generation at load makes the transposed weight copies of the decode fast path
(``model/transformer.py``'s ``Linear``) before the first request. Each generation records the
path it took (``DecodePath``): inference mode, transposed weights, threads, worker thread. Per token
the completer adds little to the decode step: a normal piece's text is a table lookup (``PieceTexts``),
not a decode of the whole completion, and EOS is checked once, by ``Choice.add``.

A generation stops within one decode step when its ``cancel`` event is set (the client went away).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from openllm_ds.errors import UserError
from openllm_ds.model import generate
from openllm_ds.paths import check_path
from openllm_ds.sampling import SamplingParams
from openllm_ds.serve.chat import ChatTemplate, load_chat_template
from openllm_ds.tokenizer import Tokenizer

PROMPT_CONTEXT_TOKENS = 8  # prompt tokens decoded ahead of the completion, so its first space survives
WORKER_PREFIX = "openllm-ds-generate"


@dataclass(frozen=True)
class DecodePath:
    """How a generation ran: the fast path is inference mode, transposed weights (torch) and the completer's threads."""

    backend: str
    inference_mode: bool | None  # torch: the generated tokens are inference tensors
    transposed_weights: bool | None  # torch: every Linear holds its transposed copy (the decode-step matmul)
    threads: int  # intra-op threads the generation ran with
    worker: str  # the thread it ran on

    @property
    def fast(self) -> bool:
        return self.inference_mode is not False and self.transposed_weights is not False


class PieceTexts:
    """The text each normal piece adds after another normal piece, decoded once per id (``Choice``'s fast path).

    SentencePiece decodes a normal piece alike wherever it follows another piece; byte pieces (which join
    their neighbours into characters), control and unknown pieces have no entry (None).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._anchor = next(i for i in range(tokenizer.vocab_size) if self._normal(i))
        self._anchor_text = tokenizer.decode([self._anchor])
        self._texts: dict[int, str | None] = {}

    def _normal(self, token: int) -> bool:
        sp = self.tokenizer.sp
        return not (sp.is_control(token) or sp.is_unknown(token) or sp.is_byte(token) or sp.is_unused(token))

    def get(self, token: int) -> str | None:
        if token not in self._texts:
            self._texts[token] = (self.tokenizer.decode([self._anchor, token])[len(self._anchor_text):]
                                  if self._normal(token) else None)
        return self._texts[token]


@dataclass
class Choice:
    """One completion of one prompt, assembled token by token.

    Its text is what decoding the prompt's last tokens and all its ids at once gives, less the prompt's own
    text (which keeps the completion's first space). The text up to a normal piece is final, so a step decodes
    only the ids from the last normal piece on, and a normal piece right after another is one lookup.
    """

    index: int
    tokenizer: Tokenizer
    prompt_ids: list[int]
    stop: tuple[str, ...]
    pieces: PieceTexts | None = None  # shared by the completer's generations; one of its own if None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already handed out
    finish_reason: str | None = None
    num_tokens: int = 0

    def __post_init__(self):
        self.pieces = self.pieces or PieceTexts(self.tokenizer)
        self._context = self.prompt_ids[-PROMPT_CONTEXT_TOKENS:]
        self._context_text = self.tokenizer.decode(self._context)
        self._last: int | None = None  # index in ids of the last normal piece; the text up to it is final
        self._final = ""  # that text

    def add(self, token: int, eos_id: int) -> str:
        """Append a generated token; return the text that is now safe to hand out."""
        self.num_tokens += 1
        if token == eos_id:
            return self.finish("stop")
        self.ids.append(token)
        piece = self.pieces.get(token)
        if piece is not None and self._last == len(self.ids) - 2:
            self.text = self._final + piece
        else:
            self.text = self._decode()
        if piece is not None:
            self._last, self._final = len(self.ids) - 1, self.text
        if self.stop:
            hits = [k for k in (self.text.find(s) for s in self.stop) if k >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self.finish("stop")
        safe = len(self.text) - self._holdback()
        if safe <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:safe], safe
        return delta

    def _decode(self) -> str:
        """The text from SentencePiece: the ids from the last normal piece on (less that piece's own text) after the
        final text, else the context and all ids less the context's text."""
        decode = self.tokenizer.decode
        if self._last is not None:
            tail = self.ids[self._last:]
            return self._final + decode(tail)[len(decode(tail[:1])):]
        full = decode(self._context + self.ids)
        return full[len(self._context_text):] if full.startswith(self._context_text) else decode(self.ids)

    def _holdback(self) -> int:
        """Trailing characters that may still change: an incomplete UTF-8 sequence, a partial stop string."""
        text = self.text
        hold = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold

    def finish(self, reason: str) -> str:
        if self.finish_reason is None:
            self.finish_reason = reason
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


@dataclass
class StepUpdate:
    index: int
    text: str
    finish_reason: str | None


def default_threads(max_concurrency: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, max_concurrency))


class Completer:
    """Tokenizer + language model (``Transformer`` or ``OnnxCausalLM``) + chat template + worker threads."""

    def __init__(self, lm, tokenizer: Tokenizer, model_name: str, max_length: int,
                 chat_template: ChatTemplate | None = None, max_concurrency: int = 4, backend: str = "torch",
                 num_threads: int | None = None):
        if max_length < 2:
            raise UserError(f"--max_length must be >= 2, got {max_length}")
        if max_concurrency < 1:
            raise UserError(f"--max_concurrency must be >= 1, got {max_concurrency}")
        self.lm = lm
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_length = min(max_length, lm.cfg.max_seq_len)
        self.chat_template = chat_template
        self.backend = backend
        self.max_concurrency = max_concurrency
        self.num_threads = num_threads or default_threads(max_concurrency)
        self.running = 0  # generations in progress
        self.cancelled = 0  # generations stopped early because their client went away
        self.last_cancelled_steps = 0  # decode steps the last of them ran
        self.last_decode_path: DecodePath | None = None
        self._lock = threading.Lock()
        self._threads_before = torch.get_num_threads()
        if backend == "torch":
            from openllm_ds.model.kernels import Linear

            torch.set_num_threads(self.num_threads)  # process-wide; close() gives the old value back
            self._linears = [m for m in lm.modules() if isinstance(m, Linear)]  # DecodePath checks their copies
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix=WORKER_PREFIX)
        ids = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id)
        self._special = {tokenizer.sp.id_to_piece(i): i for i in ids if i >= 0}  # "<s>" -> 1, "</s>" -> 2, ...
        # longest first, so that one special token that starts another never wins over it
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in sorted(self._special, key=len, reverse=True)) + ")")
        self.cleanup: list = []  # temporary dirs owned by the completer (an on-the-fly ONNX export)
        self.pieces = PieceTexts(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.lm.cfg.vocab_size

    # --- prompts -----------------------------------------------------------------------------------
    def encode(self, text: str, add_prefix: bool = True) -> list[int]:
        """The prompt's ids: the prompt prefix (``Tokenizer.encode_prompt``: EOS, where training documents start)
        unless ``add_prefix`` is false (a chat template writes it itself), then SentencePiece's ids, with
        special-token text ("</s>") mapped to its id as transformers and vLLM do.

        One pass over the text (a prompt of 250,000 "</s>" is as cheap as any other megabyte).
        """
        ids: list[int] = [self.tokenizer.prompt_prefix_id] if add_prefix else []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:  # the split's captured separators: special tokens
                ids.append(self._special[part])
            elif part:
                ids += self.tokenizer.encode(part)
        return ids

    def render_chat(self, messages: list[dict]) -> str:
        if self.chat_template is None:
            raise UserError("this model's tokenizer_config.json has no chat_template; use /v1/completions")
        return self.chat_template.render(messages)

    # --- generation --------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 cancel: threading.Event | None = None) -> "Generation":
        """Step by step in the calling thread; see ``submit`` to run on the completer's workers."""
        return Generation(self, prompt_ids, params, cancel)

    def complete(self, prompt_ids: list[int], params: SamplingParams,
                 cancel: threading.Event | None = None) -> tuple[list[str], list[str], int]:
        """Run to the end: (texts, finish_reasons, completion tokens over all choices)."""
        texts = [""] * params.n
        reasons = ["length"] * params.n
        run = self.generate(prompt_ids, params, cancel)
        for updates in run:
            for u in updates:
                texts[u.index] += u.text
                if u.finish_reason:
                    reasons[u.index] = u.finish_reason
        return texts, reasons, run.completion_tokens

    def submit(self, fn, *args) -> Future:
        """Run ``fn(*args)`` on one of the completer's ``max_concurrency`` worker threads."""
        return self._pool.submit(fn, *args)

    def warm_up(self) -> None:
        """One short generation on a worker: the decode fast path's transposed weights exist before any request."""
        self.submit(self.complete, [self.tokenizer.prompt_prefix_id], SamplingParams(max_tokens=2, temperature=0)).result()

    def close(self) -> None:
        """Stop the workers, give the process its thread count back, remove the completer's temporary dirs."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.backend == "torch":
            torch.set_num_threads(self._threads_before)
        for d in self.cleanup:
            shutil.rmtree(d, ignore_errors=True)

    def _record_path(self, first_token: torch.Tensor) -> None:
        if self.backend == "torch":
            transposed = all(m.packed is not None and m.packed[0] == (m.weight.data_ptr(), m.weight._version)
                             for m in self._linears)
            path = DecodePath("torch", first_token.is_inference(), transposed, torch.get_num_threads(),
                              threading.current_thread().name)
        else:
            path = DecodePath(self.backend, None, None, self.lm.num_threads, threading.current_thread().name)
        self.last_decode_path = path


class Generation:
    """Iterate to get, step by step, the text each choice adds; finished choices carry a finish_reason.

    Choices end on EOS or a stop string ("stop"), or after max_tokens / at the context end ("length").
    A set ``cancel`` event ends the iteration before the next decode step.
    """

    def __init__(self, completer: Completer, prompt_ids: list[int], params: SamplingParams,
                 cancel: threading.Event | None = None):
        self.completer, self.prompt_ids, self.params = completer, prompt_ids, params
        self.cancel = cancel or threading.Event()
        self.choices = [Choice(i, completer.tokenizer, prompt_ids, params.stop, completer.pieces) for i in range(params.n)]
        self.steps = 0  # decode steps run

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    def __iter__(self) -> Iterator[list[StepUpdate]]:
        p, choices, completer = self.params, self.choices, self.completer
        if self.cancel.is_set():
            return
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed)
        idx = torch.tensor([self.prompt_ids] * p.n, dtype=torch.long)
        eos = completer.tokenizer.eos_id
        with completer._lock:
            completer.running += 1
        # no eos_id: Choice.add ends a choice at EOS and the loop below ends once every choice has (rows sample
        # independently, so what a finished row is fed next changes no other row)
        steps = generate(completer.lm, idx, p.max_tokens, temperature=p.temperature, top_k=p.top_k or None,
                         top_p=p.top_p if p.top_p < 1.0 else None, repetition_penalty=p.repetition_penalty,
                         generator=generator)
        tokens = None
        try:
            for tokens in steps:
                self.steps += 1
                updates = []
                for c, tok in zip(choices, tokens.tolist()):
                    if c.finish_reason is not None:
                        continue
                    delta = c.add(tok, eos)
                    if c.finish_reason is None and c.num_tokens >= p.max_tokens:
                        delta += c.finish("length")
                    if delta or c.finish_reason is not None:
                        updates.append(StepUpdate(c.index, delta, c.finish_reason))
                if updates:
                    yield updates
                if all(c.finish_reason is not None for c in choices) or self.cancel.is_set():
                    break
        finally:
            steps.close()
            with completer._lock:
                completer.running -= 1
        if tokens is not None:
            completer._record_path(tokens)
        if self.cancel.is_set():
            with completer._lock:
                completer.cancelled += 1
                completer.last_cancelled_steps = self.steps
            return
        tail = [StepUpdate(c.index, c.finish("length"), "length") for c in choices if c.finish_reason is None]
        if tail:  # the context filled up before max_tokens
            yield tail


def load_completer(model_path: str | Path, backend: str = "torch", max_length: int = 512,
                   model_name: str | None = None, max_concurrency: int = 4, num_threads: int | None = None,
                   warm_up: bool = True) -> Completer:
    """Load a training output, a step dir or any export (``openllm_ds.checkpoint.load_model``) for the built-in server.

    backend torch: anything but an ONNX export. backend onnx: an ONNX export, or any of the others exported to ONNX
    on the fly, as ``openllm-ds export --format onnx`` does, into a temporary dir the completer removes on close.
    """
    from openllm_ds.checkpoint import is_onnx_export, load_model

    path = check_path(model_path, "--model_path", "dir", "export a model first (openllm-ds export --format huggingface)")
    if max_concurrency < 1:
        raise UserError(f"--max_concurrency must be >= 1, got {max_concurrency}")
    if num_threads is not None and num_threads < 1:
        raise UserError(f"--num_threads must be >= 1, got {num_threads}")
    if backend not in ("torch", "onnx"):
        raise UserError(f"--backend must be torch or onnx, got {backend!r}")
    threads = num_threads or default_threads(max_concurrency)
    name = model_name or path.resolve().name
    cleanup = []
    if backend == "onnx" and not is_onnx_export(path):
        tmp = Path(tempfile.mkdtemp(prefix="openllm-ds-onnx-"))
        cleanup.append(tmp)
        try:
            path = _export_onnx_to(path, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    loaded = load_model(path, backend=backend, num_threads=threads)
    completer = Completer(loaded.model, loaded.tokenizer, name, max_length,
                              load_chat_template(loaded.tokenizer_dir, loaded.tokenizer),
                              max_concurrency=max_concurrency, backend=backend, num_threads=threads)
    completer.cleanup = cleanup
    if warm_up:
        completer.warm_up()
    return completer


def _export_onnx_to(model_path: Path, tmp: Path) -> Path:
    from openllm_ds.config import ExportConfig
    from openllm_ds.export import export

    out = tmp / "onnx"
    print(f"exporting {model_path} to ONNX in {out} for --backend onnx")
    export(ExportConfig(model_dir=str(model_path), format="onnx", output_dir=str(out)))
    return out


def model_card(completer: Completer) -> dict:
    return {"id": completer.model_name, "object": "model", "owned_by": "openllm-ds", "max_model_len": completer.max_length,
            "backend": completer.backend}
