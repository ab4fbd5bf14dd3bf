"""The Python API: ``openllm_ds.load(path)``, one object for any trained weights.

    import openllm_ds
    lm = openllm_ds.load("models/tiny")                  # a training output, a step dir, or any export
    print(lm.generate("The Normans were", max_new_tokens=32))
    print(lm.chat([{"role": "user", "content": "Who were the Normans?"}], max_new_tokens=32))
    print(lm.perplexity(["The Normans gave their name to Normandy."]))
    ids = lm.tokenizer.encode("Normandy")

It is the generation path of the built-in server (``openllm_ds.inference.load_completer``) without the server: the
same prompt convention (the prompt after EOS, where training documents start), the same decoding and chat template,
with the torch or onnx backend.
"""

from __future__ import annotations

from pathlib import Path

from openllm_ds.errors import UserError
from openllm_ds.text import check_text, check_texts


class LanguageModel:
    """Trained weights, their tokenizer and a ``Completer`` that decodes; ``close()`` (or ``with``) frees its worker threads."""

    def __init__(self, completer, path: Path):
        self.completer = completer
        self.path = path

    @property
    def tokenizer(self):
        return self.completer.tokenizer

    @property
    def model(self):
        """The ``Transformer`` (torch backend) or ``OnnxCausalLM`` (onnx backend)."""
        return self.completer.lm

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: str | list[str] | tuple[str, ...] = ()) -> str:
        """The continuation of ``prompt`` (without the prompt): at most ``max_new_tokens`` tokens, fewer where the
        context ends first. Temperature 0 is greedy; the parameters take the ranges of ``openllm_ds.inference.sampling``."""
        ids = self.completer.encode(check_text(prompt, "prompt"))
        return self._complete(ids, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop)

    def chat(self, messages: list[dict], max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
             stop: str | list[str] | tuple[str, ...] = ()) -> str:
        """The assistant's answer to ``messages`` (``[{"role": "user", "content": ...}, ...]``, roles system, user and
        assistant), rendered by the model's chat template as the server's /v1/chat/completions renders them."""
        from openllm_ds.tokenizer.chat import check_messages

        text = self.completer.render_chat(check_messages(messages, "messages"))
        ids = self.completer.encode(text, add_prefix=False)  # the template writes the prompt prefix itself
        return self._complete(ids, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop)

    def _complete(self, ids: list[int], max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop):
        from openllm_ds.inference.sampling import SamplingParams

        params = SamplingParams.build({"max_tokens": "max_new_tokens"}, max_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, top_k=top_k,
                                      repetition_penalty=repetition_penalty, stop=stop, seed=seed)
        if len(ids) >= self.completer.context_length:
            raise UserError(f"the prompt is {len(ids)} tokens; the model's context is {self.completer.context_length}")
        texts, _, _ = self.completer.complete(ids, params)
        return texts[0]

    def perplexity(self, texts: str | list[str], stride: int | None = None) -> float:
        """Per-token perplexity of the texts (each a document: after EOS, as in training), over sliding windows of
        the model's context (``openllm-ds evaluate``'s measure)."""
        from openllm_ds.evaluation.sliding_window import evaluate_text

        docs = [check_text(texts, "texts")] if isinstance(texts, str) else check_texts(texts, "texts")
        if not any(d.strip() for d in docs):
            raise UserError("perplexity needs at least one non-empty text")
        if stride is not None and (not isinstance(stride, int) or isinstance(stride, bool) or stride < 1):
            raise UserError(f"stride must be an integer >= 1 (or None: half the context), got {stride!r}")
        return evaluate_text(self.model, self.tokenizer, docs, stride=stride, progress=False)["perplexity"]

    def close(self) -> None:
        self.completer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"LanguageModel({str(self.path)!r}, backend={self.completer.backend!r})"


def load(path: str | Path, backend: str = "torch", context_length: int = 2048) -> LanguageModel:
    """Trained weights from ``path``: a training output (its latest checkpoint), one of its ``checkpoints/step_*``
    dirs, or a Hugging Face, PyTorch or ONNX export. ``backend="onnx"`` runs onnxruntime (an export to ONNX is
    made in a temporary dir when ``path`` is not one). ``context_length``: prompt + new tokens at most (the model's
    own context when that is shorter)."""
    from openllm_ds.inference import load_completer

    if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 2:
        raise UserError(f"context_length must be an integer >= 2 (the context served), got {context_length!r}")
    completer = load_completer(path, backend=backend, context_length=context_length, max_concurrency=1)
    return LanguageModel(completer, Path(path))
