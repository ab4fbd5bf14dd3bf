"""The SentencePiece tokenizer every stage uses: a thin wrapper with the ids the model sees."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import sentencepiece as spm

from openllm_ds.errors import UserError
from openllm_ds.paths import check_path
from openllm_ds.text import check_text, check_texts
from openllm_ds.utils import sha256_file

MODEL_FILE = "tokenizer.model"


class Tokenizer:
    """`encode` adds no BOS/EOS: the token shards append one EOS after each document.

    The prompt convention: a text to continue starts where a training document starts, after an EOS
    (`encode_prompt`). Generation, evaluation, the built-in server and the Hugging Face export (whose
    BOS token is `</s>`, as GPT-2's is `<|endoftext|>`, so transformers, vLLM and lm-eval add it
    themselves) all put `prompt_prefix_id` before the text.
    """

    def __init__(self, model_file: str | Path):
        self.model_file = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))

    def encode(self, text: str, name: str = "text") -> list[int]:
        """The text's ids; text that is not a string, not Unicode or holds NUL is a UserError naming ``name``."""
        return self.sp.encode(check_text(text, name))

    def encode_prompt(self, text: str, name: str = "prompt") -> list[int]:
        """The ids a model continues: the prompt prefix (EOS), then the text's tokens."""
        return [self.prompt_prefix_id] + self.encode(text, name)

    def encode_batch(self, texts: list[str], name: str = "texts") -> list[list[int]]:
        return self.sp.encode(check_texts(texts, name))

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def pieces(self, text: str) -> list[str]:
        return self.sp.encode(check_text(text, "text"), out_type=str)

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def prompt_prefix_id(self) -> int:
        """The token every prompt starts with: EOS, the boundary that precedes each training document."""
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @cached_property
    def sha256(self) -> str:
        return sha256_file(self.model_file)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_file)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(tokenizer_dir: str | Path) -> Tokenizer:
    d = check_path(tokenizer_dir, "tokenizer dir", "dir",
                   f"train one first: openllm-ds train-tokenizer --output_dir {tokenizer_dir}")
    model_file = d / MODEL_FILE
    if not model_file.is_file():
        raise UserError(
            f"tokenizer dir {d} has no {MODEL_FILE}; pass the --output_dir of train-tokenizer (e.g. data/tokenizer)"
        )
    try:
        return Tokenizer(model_file)
    except (OSError, RuntimeError) as e:
        raise UserError(f"{model_file} is not a SentencePiece model ({e}); re-run train-tokenizer") from None
