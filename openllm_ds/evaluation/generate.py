"""Text generation from a prompt, streamed to the terminal as it is produced."""

from __future__ import annotations

import sys

import torch

from openllm_ds.checkpoint import load_model
from openllm_ds.errors import UserError
from openllm_ds.model import generate
from openllm_ds.sampling import SamplingParams
from openllm_ds.text import check_text
from openllm_ds.utils import select_device

# the names `openllm-ds generate` gives the sampling parameters
FLAGS = {"max_tokens": "--max_length", "temperature": "--temperature", "top_p": "--top_p", "top_k": "--top_k",
         "repetition_penalty": "--repetition_penalty", "n": "--num_samples", "seed": "--seed"}


def generate_text(model_dir, prompt: str, max_length: int = 256, temperature: float = 0.7, top_k: int | None = None,
                  top_p: float | None = None, repetition_penalty: float = 1.0, seed: int | None = None,
                  num_samples: int = 1, checkpoint: int | None = None, stream: bool = True) -> list[str]:
    """Continue ``prompt`` ``num_samples`` times; returns the continuations (prompt not included).

    The model sees the prompt prefix (EOS, the document boundary it learned; ``Tokenizer.encode_prompt``) + the
    prompt's tokens, as the built-in server, transformers and vLLM do, and samples until EOS or ``max_length`` new tokens
    (or until its context is full). With ``stream`` the prompt and each continuation are printed
    to stdout as the tokens come. ``seed`` makes sampling reproducible (one torch.Generator drives
    all samples, drawn one after another); temperature 0 is greedy.
    """
    params = SamplingParams.build(FLAGS, max_tokens=max_length, temperature=temperature, top_k=top_k or 0,
                                  top_p=1.0 if top_p is None else top_p, repetition_penalty=repetition_penalty,
                                  n=num_samples, seed=seed)
    check_text(prompt, "--prompt")

    device = select_device()
    loaded = load_model(model_dir, step=checkpoint, device=device)
    tokenizer = loaded.tokenizer
    model = loaded.model
    prompt_ids = tokenizer.encode_prompt(prompt)  # the prompt convention: after EOS, as a training document
    if len(prompt_ids) >= model.cfg.max_seq_len:
        raise UserError(f"the prompt is {len(prompt_ids)} tokens; the model's context is {model.cfg.max_seq_len}: "
                        "shorten the prompt")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    out = []
    for i in range(num_samples):
        if stream:
            header = f"--- sample {i + 1}/{num_samples} ---\n" if num_samples > 1 else ""
            sys.stdout.write(header + prompt)
            sys.stdout.flush()
        ids = sample_ids(model, prompt_ids, params, tokenizer.eos_id, generator, tokenizer if stream else None)
        if stream:
            sys.stdout.write("\n")
            sys.stdout.flush()
        out.append(continuation_text(tokenizer, prompt_ids, ids))
    return out


def continuation_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add after the prompt, with the space a word piece starts with
    (decoding the new ids alone would drop it)."""
    base = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(list(prompt_ids) + list(new_ids))
    return full[len(base):] if full.startswith(base) else tokenizer.decode(new_ids)


@torch.no_grad()
def sample_ids(model, prompt_ids: list[int], params: SamplingParams, eos_id: int | None, generator=None,
               stream_tokenizer=None) -> list[int]:
    """New token ids after ``prompt_ids`` (EOS not included); prints decoded text when given a tokenizer."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    ids: list[int] = []
    shown = ""
    for nxt in generate(model, idx, params.max_tokens, temperature=params.temperature, top_k=params.top_k or None,
                        top_p=params.top_p if params.top_p < 1.0 else None, eos_id=eos_id,
                        repetition_penalty=params.repetition_penalty, generator=generator):
        token = int(nxt[0])
        if token == eos_id:
            break
        ids.append(token)
        if stream_tokenizer is not None:
            # decode the whole continuation: a multi-byte character may span several tokens
            text = continuation_text(stream_tokenizer, prompt_ids, ids)
            if len(text) > len(shown) and not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
    return ids
