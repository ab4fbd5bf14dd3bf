"""Train a SentencePiece tokenizer on the cleaned corpus and write the Hugging Face files beside it.

SentencePiece settings and why:
- BPE with byte_fallback: characters outside the vocabulary become byte pieces, never <unk>.
- <unk>=0, <s>=1, </s>=2, <pad>=3; the vocabulary is exactly vocab_size (hard limit).
- normalization_rule_name=identity and remove_extra_whitespaces=False: the data stage already
  NFKC-normalises and collapses whitespace, and with no rewriting inside SentencePiece a plain
  `tokenizer.json` (no precompiled charsmap) gives the same ids as SentencePiece on any text.
- split_digits: numbers are spelled digit by digit, as in Llama.
- Deterministic: by default the whole corpus is read (input_sentence_size=0, no sampling or
  shuffling); the pieces do not depend on num_threads. For a corpus too large to hold in memory,
  tokenizer.input_sentence_size=N trains on N lines that SentencePiece samples from all of it.
"""

from __future__ import annotations

import io
import os
import re
import time
from collections import Counter
from pathlib import Path

import sentencepiece as spm

from tqdm import tqdm

from openllm_ds.config import TokenizerConfig
from openllm_ds.data.documents import read_unit
from openllm_ds.data.units import UNIT_BYTES, plan_units, resolve_sources
from openllm_ds.errors import DataError, UserError
from openllm_ds.output_lock import OutputLock
from openllm_ds.tokenizer.hf_files import SPECIAL_TOKENS, write_hf_files
from openllm_ds.tokenizer.tokenizer import MODEL_FILE, Tokenizer
from openllm_ds.utils import OutputKind, atomic_dir, claim_output_dir, describe_entries, ensure_writable_dir

TOKENIZER_FILES = (MODEL_FILE, "tokenizer.vocab", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TOKENIZER = OutputKind("a tokenizer", "openllm-ds train-tokenizer", TOKENIZER_FILES.__contains__)
PARITY_SAMPLE_LINES = 200
REPORT_DOCUMENTS = 5000  # documents of the input the report reads when no validation file is given
WORD = re.compile(r"[^\W\d_]+")  # runs of letters, any script


def train_tokenizer(cfg: TokenizerConfig, validation_file: str | None = None, *, verbose: bool = False,
                    sources: list[str] | None = None) -> dict:
    """Train on ``cfg.input`` (or ``sources``: any sources `tokenize` reads); write the SentencePiece and
    Hugging Face files into ``cfg.output_dir``.

    A plain text file (a document a line) goes to SentencePiece as it is; other sources are streamed to it
    line by line (each document's lines; blank lines dropped). Returns (and prints) a report: vocab size,
    tokens per word on ``validation_file`` (else on the input's first documents), and how a common and a
    rare word split. ``verbose`` shows SentencePiece's own log. One writer at a time in ``cfg.output_dir``.
    """
    with OutputLock(cfg.output_dir, "train-tokenizer"):
        return _train_tokenizer(cfg, validation_file, verbose, sources)


def _train_tokenizer(cfg: TokenizerConfig, validation_file: str | None, verbose: bool, sources: list[str] | None):
    sources = list(sources or [cfg.input])
    options = cfg.read_options()
    files = resolve_sources(sources, options, "--input")
    plain = len(files) == 1 and files[0].format == "text" and not files[0].compression \
        and options.doc_separator == "newline"
    report_file = check_text_file(validation_file, "validation file") if validation_file else None
    out = check_output_dir(Path(cfg.output_dir))
    name = ", ".join(sources)
    if plain:
        input_file = check_text_file(sources[0], "--input")
        corpus = scan_corpus(input_file, cfg.max_sentence_length)
    else:
        corpus = {"num_lines": 0, "num_long_lines": 0, "num_bytes": sum(f.size for f in files)}
    if plain and corpus["num_lines"] == corpus["num_long_lines"]:
        raise DataError(f"every line of --input {name} is longer than --max_sentence_length {cfg.max_sentence_length} "
                        "bytes, so SentencePiece would train on nothing; raise --max_sentence_length")

    print(f"training SentencePiece {cfg.model_type} (vocab {cfg.vocab_size}) on {name} "
          f"({corpus['num_lines']:,} lines, {corpus['num_bytes'] / 1e6:.1f} MB)" if plain else
          f"training SentencePiece {cfg.model_type} (vocab {cfg.vocab_size}) on {name} "
          f"({len(files)} file(s), {corpus['num_bytes'] / 1e6:.1f} MB)")
    start = time.perf_counter()
    if plain:
        model_bytes = run_sentencepiece(cfg, name, verbose, input_file_path=input_file)
    else:
        lines = SourceLines(files, options, cfg.max_sentence_length)
        model_bytes = run_sentencepiece(cfg, name, verbose, sentences=lines)
        corpus["num_lines"], corpus["num_long_lines"] = lines.num_lines, lines.num_long
    train_seconds = time.perf_counter() - start

    with atomic_dir(out, TOKENIZER) as tmp:
        (tmp / MODEL_FILE).write_bytes(model_bytes)
        tok = Tokenizer(tmp / MODEL_FILE)
        if tok.vocab_size != cfg.vocab_size or [tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id] != [0, 1, 2, 3]:
            raise RuntimeError(f"SentencePiece returned vocab {tok.vocab_size} with special ids "
                               f"{[tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id]}; expected {cfg.vocab_size}, [0, 1, 2, 3]")
        write_vocab_file(tok, tmp / "tokenizer.vocab")
        hf_tokenizer = write_hf_files(tmp / MODEL_FILE, tmp, cfg.model_type)
        lines = read_lines(report_file) if report_file else first_documents(files, options, REPORT_DOCUMENTS)
        check_parity(tok, hf_tokenizer, lines[:PARITY_SAMPLE_LINES], cfg.model_type)
        report = {
            "output_dir": str(out),
            "input": name,
            "model_type": cfg.model_type,
            "vocab_size": tok.vocab_size,
            "num_lines": corpus["num_lines"],
            "lines_over_max_sentence_length": corpus["num_long_lines"],
            "train_seconds": round(train_seconds, 2),
            "tokens_per_word": tokens_per_word(tok, lines),
            "tokens_per_word_file": str(report_file) if report_file else f"the first {len(lines):,} documents of {name}",
            "examples": example_splits(tok, lines),
            "tokenizer_sha256": tok.sha256,
        }
    print_report(report, cfg.max_sentence_length)
    return report


def sentencepiece_args(cfg: TokenizerConfig, verbose: bool) -> dict:
    return dict(
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        max_sentence_length=cfg.max_sentence_length,
        byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece=SPECIAL_TOKENS["unk_token"], bos_piece=SPECIAL_TOKENS["bos_token"],
        eos_piece=SPECIAL_TOKENS["eos_token"], pad_piece=SPECIAL_TOKENS["pad_token"],
        hard_vocab_limit=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        input_sentence_size=cfg.input_sentence_size,
        shuffle_input_sentence=cfg.input_sentence_size > 0,  # an even sample, not the corpus's first lines
        num_threads=min(os.cpu_count() or 1, 16),
        train_extremely_large_corpus=False,
        minloglevel=0 if verbose else 2,
    )


def run_sentencepiece(cfg: TokenizerConfig, input_file: str, verbose: bool, *, input_file_path: Path | None = None,
                      sentences=None) -> bytes:
    """Train in memory on a file or an iterator of lines; SentencePiece's size errors become one-line
    UserErrors naming --vocab_size."""
    model = io.BytesIO()
    where = ({"input": [str(input_file_path)]} if input_file_path is not None  # a list: a comma stays in the path
             else {"sentence_iterator": iter(sentences)})
    try:
        spm.SentencePieceTrainer.train(**sentencepiece_args(cfg, verbose), **where, model_writer=model)
    except RuntimeError as e:
        if sentences is not None and sentences.error is not None:
            raise sentences.error from None
        msg = str(e)
        if sentences is not None and sentences.num_lines == sentences.num_long:
            raise DataError(f"--input {input_file} has no line SentencePiece can train on ({sentences.num_lines:,} "
                            f"lines, every one empty or longer than --max_sentence_length {cfg.max_sentence_length} "
                            "bytes); check the input, --text_field, or raise --max_sentence_length") from None
        if m := re.search(r"Vocabulary size (?:is )?too high.*?<=\s*(\d+)", msg):
            raise UserError(
                f"--vocab_size {cfg.vocab_size} is too large for {input_file}: SentencePiece finds at most "
                f"{m.group(1)} pieces in it; pass --vocab_size {m.group(1)} or less, or train on more text"
            ) from None
        if m := re.search(r"smaller than required_chars\.\s*\d+ vs (\d+)", msg):
            raise UserError(
                f"--vocab_size {cfg.vocab_size} is too small for the characters of {input_file}: pass "
                f"--vocab_size {m.group(1)} or more, or lower --character_coverage (now {cfg.character_coverage})"
            ) from None
        raise
    if sentences is not None and sentences.error is not None:  # SentencePiece trained on the lines before it
        raise sentences.error
    return model.getvalue()


def check_text_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{what} {p} is a directory; pass a text file (one document a line), e.g. data/clean/training_data.txt")
    if not p.is_file():
        raise DataError(f"{what} {p} does not exist; run `openllm-ds prepare` first or pass an existing text file")
    with open(p, "rb") as f:
        if not any(line.strip() for line in f):
            raise DataError(f"{what} {p} is empty; it needs one document per line (run `openllm-ds prepare`)")
    return p


def check_output_dir(out: Path) -> Path:
    """The dir is replaced whole, so it may hold only tokenizer files; its parent must be writable."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file; pass a directory for the tokenizer files")
    other = claim_output_dir(out, TOKENIZER, "--output_dir")
    if other:
        raise UserError(f"--output_dir {out} holds other files ({describe_entries(other)}); "
                        "pass a new or empty directory for the tokenizer (e.g. data/tokenizer)")
    ensure_writable_dir(out.parent, f"--output_dir {out}: parent directory")
    return out


def read_lines(path: Path) -> list[str]:
    """Documents of a one-per-line text file: split on "\\n" only, blank lines dropped."""
    text = path.read_text(encoding="utf-8")
    return [line.removesuffix("\r") for line in text.split("\n") if line.strip()]


def scan_corpus(path: Path, max_sentence_length: int) -> dict:
    """Lines, lines SentencePiece leaves out (too long) and bytes of a text file, which must be UTF-8."""
    num_lines = num_long = num_bytes = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            num_bytes += len(line)
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"--input {path} line {number} is not UTF-8 (byte 0x{line[e.start]:02x} at column "
                                f"{e.start + 1}); convert it to UTF-8, e.g. with iconv -f latin1 -t utf-8") from None
            if line.strip():
                num_lines += 1
                num_long += len(line.rstrip(b"\r\n")) > max_sentence_length
    return {"num_lines": num_lines, "num_long_lines": num_long, "num_bytes": num_bytes}


class SourceLines:
    """The non-blank lines of every document of ``files``, in order, for SentencePiece; counts them as it goes.

    Bad input met while SentencePiece reads (a record that is not JSON, not text, a file that is not UTF-8) ends the
    lines and is kept in ``error``: SentencePiece would turn it into its own RuntimeError with a traceback, or train
    on the lines before it; ``run_sentencepiece`` raises it instead."""

    def __init__(self, files, options, max_sentence_length: int, unit_bytes: int = UNIT_BYTES):
        self.units = plan_units(files, unit_bytes)
        self.options, self.max_bytes = options, max_sentence_length
        self.num_lines = self.num_long = 0
        self.error: UserError | None = None

    def __iter__(self):
        try:
            for unit in tqdm(self.units, desc="reading for SentencePiece", unit="unit", disable=len(self.units) < 2):
                for doc in read_unit(unit, self.options):
                    for line in doc.split("\n"):
                        if line.strip():
                            self.num_lines += 1
                            self.num_long += len(line.encode("utf-8")) > self.max_bytes
                            yield line
        except UserError as e:
            self.error = e


def first_documents(files, options, limit: int) -> list[str]:
    """Up to ``limit`` documents from the start of ``files`` (the tokens-per-word report)."""
    docs: list[str] = []
    for unit in plan_units(files):
        for doc in read_unit(unit, options):
            docs.append(doc)
            if len(docs) >= limit:
                return docs
    return docs


def write_vocab_file(tok: Tokenizer, path: Path) -> None:
    """`piece<TAB>score` per id, the format of SentencePiece's own .vocab file."""
    sp = tok.sp
    rows = (f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    path.write_text("".join(rows), encoding="utf-8")


def check_parity(tok: Tokenizer, hf_tokenizer, lines: list[str], model_type: str) -> None:
    """tokenizer.json must reproduce SentencePiece's ids. For BPE a mismatch is a conversion bug;
    for unigram, rare near-equal segmentations can differ (see hf_files.py): reported, not fatal."""
    probes = lines + ["", " leading space", "two  spaces ", "digits 12345", "Zürich 東京 🙂", "a\nb\tc"]
    got = [e.ids for e in hf_tokenizer.encode_batch(probes, add_special_tokens=False)]
    mismatches = [text for text, ids, want in zip(probes, got, tok.encode_batch(probes)) if ids != want]
    if mismatches and model_type == "bpe":
        raise RuntimeError(f"tokenizer.json disagrees with SentencePiece on {mismatches[0][:80]!r}")
    if mismatches:
        print(f"  note: tokenizer.json segments {len(mismatches)} of {len(probes)} sample texts differently "
              f"from SentencePiece (unigram near-equal segmentations); BPE gives identical ids")


def tokens_per_word(tok: Tokenizer, lines: list[str]) -> float:
    num_words = sum(len(line.split()) for line in lines)
    num_tokens = sum(len(ids) for ids in tok.encode_batch(lines))
    return round(num_tokens / max(num_words, 1), 4)


def example_splits(tok: Tokenizer, lines: list[str]) -> dict:
    """The most frequent word of 5+ letters, and the once-seen word that splits into the most pieces
    (among words the vocabulary spells without byte pieces, which would only show UTF-8 bytes)."""
    counts = Counter(w for line in lines for w in WORD.findall(line))
    common = min((w for w in counts if len(w) >= 5), key=lambda w: (-counts[w], w), default=None)
    once = {w: tok.encode(w) for w, c in counts.items() if c == 1}
    spelled = [w for w, ids in once.items() if not any(tok.sp.is_byte(i) for i in ids)]
    rare = min(spelled, key=lambda w: (-len(once[w]), w), default=None)
    return {
        kind: {"word": w, "count": counts[w], "pieces": tok.pieces(w)}
        for kind, w in (("common", common), ("rare", rare)) if w is not None
    }


def print_report(report: dict, max_sentence_length: int) -> None:
    print(f"tokenizer written to {report['output_dir']}: {report['model_type']}, vocab {report['vocab_size']:,}, "
          f"trained in {report['train_seconds']:.1f} s")
    if report["lines_over_max_sentence_length"]:
        print(f"  {report['lines_over_max_sentence_length']:,} lines longer than --max_sentence_length "
              f"{max_sentence_length} bytes were left out of training")
    print(f"  tokens per word on {report['tokens_per_word_file']}: {report['tokens_per_word']:.3f}")
    for kind, ex in report["examples"].items():
        print(f"  {kind} word {ex['word']!r} (seen {ex['count']}x): {' '.join(ex['pieces'])}")
