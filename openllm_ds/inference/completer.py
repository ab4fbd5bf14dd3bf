"""The completer, the one generation path: prompt -> tokens -> KV-cache generation -> text, for
``openllm_ds.load``, the built-in server's backends and ``openllm-ds generate``.

The prompt convention is here (``Completer.encode``: the prompt after EOS, where training documents start,
special-token text mapped to its id), detokenisation and stop strings in ``detokenize.Choice``, the sampling
parameters' ranges in ``sampling.SamplingParams``, the chat template in ``openllm_ds.tokenizer.chat``.

A generation runs in the thread that iterates it; the built-in server runs them on its worker threads
(``serve/workers.py``), side by side: the model is read-only in eval mode, each generation owns its KV cache and its
seeded ``torch.Generator``, and PyTorch and onnxruntime release the GIL inside their kernels. Prompts of different
lengths are not batched together: the model has no padding mask, and per-request generation keeps every answer
identical to a sequential one. Each generation records the path it took (``DecodePath``): inference mode, the
decode step's transposed weights (``model.kernels``), threads, the thread it ran on. Per token the completer adds
little to the decode step: a normal piece's text is a table lookup (``PieceTexts``), not a decode of the whole
completion, and EOS is checked once, by ``Choice.add``.

A generation stops within one decode step when its ``cancel`` event is set (the client went away).
"""

from __future__ import annotations

import os
import secrets
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from openllm_ds.errors import UserError
from openllm_ds.inference.detokenize import Choice, PieceTexts, StepUpdate
from openllm_ds.inference.sampling import SamplingParams
from openllm_ds.model import generate
from openllm_ds.tokenizer import Tokenizer
from openllm_ds.tokenizer.chat import ChatTemplate, SpecialTokens


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


def default_threads(max_concurrency: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, max_concurrency))


class Completer:
    """Tokenizer + language model (``Transformer`` or ``OnnxCausalLM``) + chat template. A generation runs in the
    thread that iterates it (the server's worker threads are the server's: ``serve/workers.py``), with
    ``num_threads`` intra-op threads (default: every core)."""

    def __init__(self, lm, tokenizer: Tokenizer, model_name: str, context_length: int,
                 chat_template: ChatTemplate | None = None, backend: str = "torch", num_threads: int | None = None):
        if context_length < 2:
            raise UserError(f"--context_length must be >= 2, got {context_length}")
        self.lm = lm
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context_length = min(context_length, lm.cfg.max_seq_len)  # prompt + completion, at most
        self.chat_template = chat_template
        self.backend = backend
        self.num_threads = num_threads or default_threads(1)
        self.running = 0  # generations in progress
        self.cancelled = 0  # generations stopped early because their client went away
        self.last_cancelled_steps = 0  # decode steps the last of them ran
        self.last_decode_path: DecodePath | None = None
        self._lock = threading.Lock()
        self._threads_before = torch.get_num_threads()
        if backend == "torch":
            torch.set_num_threads(self.num_threads)  # process-wide; close() gives the old value back
        self.special = SpecialTokens(tokenizer)
        self.on_close: list[Callable[[], None]] = []  # what close() also does (remove an on-the-fly ONNX export)
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
        prefix = [self.tokenizer.prompt_prefix_id] if add_prefix else []
        return prefix + self.special.encode(text)

    def render_chat(self, messages: list[dict]) -> str:
        if self.chat_template is None:
            raise UserError("this model's tokenizer_config.json has no chat_template; use /v1/completions")
        return self.chat_template.render(messages)

    @property
    def device(self) -> torch.device:
        """Where the prompt's ids go: the torch model's device (the CPU for onnxruntime)."""
        if self.backend == "torch":
            return next(self.lm.parameters()).device
        return torch.device("cpu")

    # --- generation --------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event | None = None,
                 generator: torch.Generator | None = None) -> "Generation":
        """Step by step in the calling thread; see ``submit`` to run on the completer's workers. ``generator``: one
        the caller keeps drawing from (default: one seeded with ``params.seed``, else at random)."""
        return Generation(self, prompt_ids, params, cancel, generator)

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

    def close(self) -> None:
        """Give the process its thread count back, run the ``on_close`` callbacks."""
        if self.backend == "torch":
            torch.set_num_threads(self._threads_before)
        for fn in self.on_close:
            fn()

    def _record_path(self, first_token: torch.Tensor) -> None:
        if self.backend == "torch":
            from openllm_ds.model.kernels import transposed_weights_ready

            transposed = transposed_weights_ready(self.lm)
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
                 cancel: threading.Event | None = None, generator: torch.Generator | None = None):
        self.completer, self.prompt_ids, self.params, self.generator = completer, prompt_ids, params, generator
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
        device = completer.device
        generator = self.generator
        if generator is None:
            seed = p.seed if p.seed is not None else secrets.randbits(63)
            generator = torch.Generator(device=device).manual_seed(seed)
        idx = torch.tensor([self.prompt_ids] * p.n, dtype=torch.long, device=device)
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


@torch.inference_mode()
def greedy_continuation(model, tokenizer: Tokenizer, prompt_ids: list[int], max_new_tokens: int, stop_when) -> str:
    """Greedy text after ``prompt_ids`` until EOS, ``stop_when(text)`` or ``max_new_tokens`` (the harness tasks': a
    model already loaded, one prompt at a time)."""
    from openllm_ds.inference.detokenize import continuation_text

    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    ids: list[int] = []
    text = ""
    for nxt in generate(model, idx, max_new_tokens, temperature=0.0, eos_id=tokenizer.eos_id):
        token = int(nxt[0])
        if token == tokenizer.eos_id:
            break
        ids.append(token)
        text = continuation_text(tokenizer, prompt_ids, ids)
        if stop_when(text):
            break
    return text
