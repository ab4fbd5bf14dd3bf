"""``openllm-ds generate``: text from a prompt, streamed to the terminal as it is produced, through the one
generation path (``openllm_ds.inference``)."""

from __future__ import annotations

import sys

import torch

from openllm_ds.errors import UserError
from openllm_ds.inference import load_completer
from openllm_ds.inference.sampling import SamplingParams
from openllm_ds.text import check_text

# the names `openllm-ds generate` gives the sampling parameters
FLAGS = {"max_tokens": "--max_new_tokens", "temperature": "--temperature", "top_p": "--top_p", "top_k": "--top_k",
         "repetition_penalty": "--repetition_penalty", "n": "--num_samples", "seed": "--seed"}


def generate_text(model_dir, prompt: str, max_new_tokens: int = 256, temperature: float = 0.7,
                  top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                  seed: int | None = None, num_samples: int = 1, checkpoint: int | None = None,
                  stream: bool = True) -> list[str]:
    """Continue ``prompt`` ``num_samples`` times; returns the continuations (prompt not included).

    The model sees the prompt as the built-in server and ``openllm_ds.load`` do (``Completer.encode``: after EOS,
    the document boundary it learned) and samples until EOS or ``max_new_tokens`` new tokens (or until its context
    is full). With ``stream`` the prompt and each continuation are printed to stdout as the tokens come. ``seed``
    makes sampling reproducible (one torch.Generator drives all samples, drawn one after another); temperature 0 is
    greedy.
    """
    params = SamplingParams.build(FLAGS, max_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0,
                                  top_p=1.0 if top_p is None else top_p, repetition_penalty=repetition_penalty,
                                  n=num_samples, seed=seed)
    check_text(prompt, "--prompt")
    completer = load_completer(model_dir, step=checkpoint, context_length=1 << 62,  # the model's whole context
                               max_concurrency=1)
    try:
        prompt_ids = completer.encode(prompt)
        if len(prompt_ids) >= completer.context_length:
            raise UserError(f"the prompt is {len(prompt_ids)} tokens; the model's context is "
                            f"{completer.context_length}: shorten the prompt")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=completer.device).manual_seed(seed)
        one = params.replace(n=1)
        out = []
        for i in range(num_samples):
            if stream:
                header = f"--- sample {i + 1}/{num_samples} ---\n" if num_samples > 1 else ""
                sys.stdout.write(header + prompt)
                sys.stdout.flush()
            text = ""
            for updates in completer.generate(prompt_ids, one, generator=generator):
                delta = updates[0].text
                text += delta
                if stream and delta:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
            if stream:
                sys.stdout.write("\n")
                sys.stdout.flush()
            out.append(text)
        return out
    finally:
        completer.close()
