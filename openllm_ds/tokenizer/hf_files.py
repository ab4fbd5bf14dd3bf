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
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from openllm_ds.utils import atomic_write_json

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
NO_MAX_LENGTH = int(1e30)  # transformers' VERY_LARGE_INTEGER: "no limit"; the export sets the model's context

# Plain-text chat format for the built-in server and vLLM: the model is a base LM, not chat-tuned.
# An assistant turn ends with EOS, and the next turn starts like a new training document.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


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
    # No BOS/EOS on encode: training documents carry no BOS and end with an EOS the data pipeline adds.
    tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS.values()])
    return tok


def tokenizer_config(max_length: int = NO_MAX_LENGTH) -> dict:
    added = {
        str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS.values())
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **SPECIAL_TOKENS,
        "add_bos_token": False,
        "add_eos_token": False,
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
    atomic_write_json(out / "special_tokens_map.json", dict(SPECIAL_TOKENS))
    return tok
