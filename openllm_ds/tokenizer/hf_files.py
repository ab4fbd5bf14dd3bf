"""Hugging Face tokenizer files for a SentencePiece model, built with the `tokenizers` library.

`tokenizer.json` must give the same ids as `SentencePieceProcessor.encode` on any text. The model is
trained with identity normalisation and `remove_extra_whitespaces=False` (see train.py), so
SentencePiece's whole pre-processing is: turn every " " into "▁" and put one "▁" in front (the dummy
prefix). The normalizer below does exactly that. Transformers 5's `LlamaTokenizer` class does not:
its Metaspace pre-tokenizer skips the dummy prefix when the text already starts with a space, so
" Hello" encodes differently. `tokenizer_class` is therefore `PreTrainedTokenizerFast`, which
transformers (4.x and 5.x) and vLLM load from `tokenizer.json` verbatim.

BPE merges come from the piece scores, as SentencePiece applies them: the merge that forms the
piece with the highest score goes first. Byte pieces (`<0x00>` ... `<0xFF>`) are reached through
`byte_fallback` only and are never merged.

With model_type=unigram the two Viterbi searches can pick different segmentations of near-equal
score: a 4k unigram model on SQuAD differed on 1 of 6,426 validation + WikiText texts. BPE is exact.

Known difference: a special token written as text ("</s>") is one id for transformers and plain
characters for SentencePiece. The chat template relies on it to end an assistant turn.

Prompt convention (see `Tokenizer.encode_prompt`): generation starts after `</s>`, where every
training document starts. The Hugging Face files say so as GPT-2's do with `<|endoftext|>`: the BOS
token is `</s>` and the post-processor puts it before every text (`tok(text)`; `add_special_tokens=False`
gives the plain ids), so transformers' `generate(**tok(text))`, vLLM and lm-eval start there by
themselves; the chat template opens with it too (chat prompts are tokenized without special tokens).
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from openllm_ds.utils import atomic_write_json, read_json

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
# The roles transformers reads: its BOS is the prompt prefix, `</s>` (SentencePiece's <s> stays unused).
HF_SPECIAL_TOKENS = {**SPECIAL_TOKENS, "bos_token": SPECIAL_TOKENS["eos_token"]}
PROMPT_PREFIX = SPECIAL_TOKENS["eos_token"]
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]  # no token_type_ids: generate(**tok(text)) must work
NO_MAX_LENGTH = int(1e30)  # transformers' VERY_LARGE_INTEGER: "no limit"; the export sets the model's context

# Plain-text chat format for the built-in server and vLLM: the model is a base LM, not chat-tuned.
# The conversation starts after the prompt prefix (bos_token, "</s>"); an assistant turn ends with
# EOS, and the next turn starts like a new training document.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


OLDER_CHAT_TEMPLATES = (CHAT_TEMPLATE.removeprefix("{{ bos_token }}"),)  # before the prompt prefix


def is_normal_piece(sp: spm.SentencePieceProcessor, i: int) -> bool:
    return not (sp.is_unknown(i) or sp.is_control(i) or sp.is_unused(i) or sp.is_byte(i))


def bpe_merges(sp: spm.SentencePieceProcessor) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, highest piece score first (ties by id)."""
    normal = {sp.id_to_piece(i): (sp.get_score(i), i) for i in range(sp.get_piece_size()) if is_normal_piece(sp, i)}
    ranked = []
    for piece, (score, piece_id) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, piece_id, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def check_sentencepiece_normalisation(sp: spm.SentencePieceProcessor, model_file: str | Path) -> None:
    """The normalizer below reproduces identity rules + dummy prefix + kept whitespace only."""
    probe = " a  b\tÅﬁ"
    if sp.normalize(probe) != "▁" + probe.replace(" ", "▁"):
        raise ValueError(
            f"{model_file}: tokenizer.json conversion needs a model trained with normalization_rule_name=identity, "
            "add_dummy_prefix=True and remove_extra_whitespaces=False"
        )


def build_hf_tokenizer(model_file: str | Path, model_type: str = "bpe") -> Tokenizer:
    """A `tokenizers.Tokenizer` that encodes and decodes like the SentencePiece model."""
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    check_sentencepiece_normalisation(sp, model_file)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    if model_type == "bpe":
        model = models.BPE(
            vocab={p: i for i, p in enumerate(pieces)}, merges=bpe_merges(sp),
            unk_token=pieces[sp.unk_id()], fuse_unk=True, byte_fallback=True,
        )
    elif model_type == "unigram":
        scores = [(p, sp.get_score(i)) for i, p in enumerate(pieces)]
        model = models.Unigram(scores, unk_id=sp.unk_id(), byte_fallback=True)
    else:
        raise ValueError(f"model_type must be bpe or unigram, got {model_type!r}")
    tok = Tokenizer(model)
    # Prepend before Replace: a leading space becomes "▁▁", as in SentencePiece.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    # Fuse before Strip: Strip works per token, and only the dummy prefix of the text must go.
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.post_processor = prompt_post_processor(sp.eos_id())
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS.values()])
    return tok


def prompt_post_processor(prefix_id: int) -> processors.TemplateProcessing:
    """With special tokens, a text starts after the prompt prefix `</s>` (where training documents start); no EOS
    is appended: training documents end with an EOS the data pipeline adds."""
    return processors.TemplateProcessing(single=f"{PROMPT_PREFIX} $A:0", pair=f"{PROMPT_PREFIX} $A:0 $B:1",
                                         special_tokens=[(PROMPT_PREFIX, prefix_id)])


def tokenizer_config(max_length: int = NO_MAX_LENGTH) -> dict:
    added = {
        str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS.values())
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **HF_SPECIAL_TOKENS,
        "add_bos_token": True,  # the post-processor in tokenizer.json adds it; this flag says so to other readers
        "add_eos_token": False,
        "model_input_names": MODEL_INPUT_NAMES,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "padding_side": "left",  # batched generation pads on the left
        "chat_template": CHAT_TEMPLATE,
    }


def write_hf_files(model_file: str | Path, out_dir: str | Path, model_type: str = "bpe") -> Tokenizer:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json beside the model."""
    out = Path(out_dir)
    tok = build_hf_tokenizer(model_file, model_type)
    tok.save(str(out / "tokenizer.json"))
    atomic_write_json(out / "tokenizer_config.json", tokenizer_config())
    atomic_write_json(out / "special_tokens_map.json", dict(HF_SPECIAL_TOKENS))
    return tok


def apply_prompt_convention(out_dir: str | Path, prefix_id: int, max_length: int = NO_MAX_LENGTH) -> None:
    """Bring the Hugging Face files of ``out_dir`` (any earlier version of ours) to the prompt convention:
    the post-processor, BOS = `</s>`, ``model_input_names``, the chat template, and ``model_max_length``."""
    out = Path(out_dir)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.post_processor = prompt_post_processor(prefix_id)
    tok.save(str(out / "tokenizer.json"))
    cfg_file = out / "tokenizer_config.json"
    cfg = read_json(cfg_file, "delete it to have it written afresh", expect=dict) if cfg_file.is_file() else {}
    fresh = tokenizer_config(max_length)
    for key in ("tokenizer_class", *HF_SPECIAL_TOKENS, "add_bos_token", "add_eos_token", "model_input_names",
                "model_max_length"):
        cfg[key] = fresh[key]
    if not cfg.get("chat_template") or cfg["chat_template"] in OLDER_CHAT_TEMPLATES:
        cfg["chat_template"] = CHAT_TEMPLATE
    atomic_write_json(cfg_file, cfg)
    atomic_write_json(out / "special_tokens_map.json", dict(HF_SPECIAL_TOKENS))
