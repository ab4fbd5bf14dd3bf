"""Bad input to every stage: one table of cases, each run through the real CLI in a fresh directory.

Every case gives the argv, the exit code (2 for every user error: a UserError in cli.main, or an
argparse error), a regex the one-line error must match (it names the file, field or flag, and most
say the fix), and the paths that must not exist afterwards. Beyond each case's own list, no
completion marker (stats.json, meta.json, tokenizer.model, checkpoints/latest, config.json, ...)
may appear that was not there before, no temporary file may be left behind, and the files in
``kept`` (an earlier complete output) must hold the same bytes: a failed stage loses nothing and
leaves nothing a later stage would take for complete.

The cases fail in a second or a few (the train ones import DeepSpeed first); none starts Ray.
The one that fails after real work (train, past its output dir and token shards) gets its shards
built here, in this process, by the project's own shard writer.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXIT_USER_ERROR = 2  # cli.main: every UserError (and argparse's own errors)
MARKERS = {"stats.json", "meta.json", "tokenizer.model", "tokenizer.json", "latest", "config.json", "state.json",
           "report.md", "report.json", "model.safetensors", "model.onnx", "train_state.json"}

WORDS = ("river", "castle", "Norman", "empire", "music", "science", "harbour", "winter", "market", "church",
         "railway", "island", "treaty", "garden", "engine", "library", "village", "theatre", "bridge", "forest")


def _corpus(lines: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return "".join(" ".join(rng.choice(WORDS, size=14)) + ".\n" for _ in range(lines))


TEXT = _corpus(200, 0)
VALIDATION_TEXT = _corpus(60, 1)  # other documents: validation data that is training data stops a run
CJK_TEXT = "".join("".join(chr(0x4E00 + (i * 7 + j) % 300) for j in range(40)) + "\n" for i in range(120))
SQUAD = json.dumps({"version": "1.1", "data": [{"title": "Normans", "paragraphs": [{
    "context": "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy.",
    "qas": [{"id": "q1", "question": "Who gave their name to Normandy?",
             "answers": [{"text": "The Normans", "answer_start": 0}]}]}]}]})
TRUNCATED_SQUAD = SQUAD[: len(SQUAD) // 2]
GZ_DOCS = gzip.compress("".join(json.dumps({"text": line}) + "\n" for line in TEXT.splitlines()).encode(), mtime=0)
GARBAGE = bytes(range(7, 107))  # 100 bytes that are neither a SentencePiece model nor safetensors
MODEL_YAML = ("name: t\nmodel: {vocab_size: 300, d_model: 32, n_layers: 1, n_heads: 2, d_ff: 64, max_seq_len: 16}\n"
              "tokenizer: {num_workers: 0}\n"
              "train: {data_file: training_data.txt, tokenizer_dir: tok, ds_config: {root}/ds_configs/zero0.json,"
              " micro_batch_size: 2, max_steps: 2, warmup_steps: 0, output_dir: run}\n")
TRAIN_FILES = {"t.yaml": MODEL_YAML, "tok": "<tok>", "training_data.txt": TEXT, "validation_data.txt": VALIDATION_TEXT}
HF_CONFIG = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300,
                        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                        "max_position_embeddings": 16})
HF_TIED = HF_CONFIG[:-1] + ', "tie_word_embeddings": true}'  # the shape of MODEL_YAML's model
CORRUPT_RUN = {"model/run_config.yaml": MODEL_YAML, "model/tokenizer": "<tok>",
               "model/checkpoints/latest": "step_00000002",
               "model/checkpoints/step_00000002/model.safetensors": GARBAGE,
               "model/checkpoints/step_00000002/train_state.json": '{"step": 2}'}
RESUMABLE = {**TRAIN_FILES, "run/run_config.yaml": MODEL_YAML, "run/checkpoints/latest": "step_00000002",
             "run/checkpoints/step_00000002/model.safetensors": GARBAGE,
             "run/checkpoints/step_00000002/train_state.json": '{"step": 2}'}
OLD_CLEAN = {"out/training_data.txt": "an earlier passage\n", "out/validation_data.txt": "an earlier one\n",
             "out/stats.json": '{"splits": {}}'}


@dataclass(frozen=True)
class Symlink:
    """A file of a case that is a symbolic link to ``target`` (relative to the link)."""
    target: str


@dataclass(frozen=True)
class Case:
    stage: str
    what: str
    code: int
    argv: str  # after `openllm-ds`; {root} is the repo root
    message: str  # regex the one error line must match
    absent: tuple[str, ...] = ()  # paths (relative to the run dir) that must not exist afterwards
    files: dict = field(default_factory=dict)  # written first; "<tok>" copies the tiny tokenizer, "<shards>" its shards
    # of training_data.txt ("<val_shards>": of validation_data.txt), "/" a dir
    kept: tuple[str, ...] = ()  # files that must hold the same bytes afterwards
    leaves: tuple[str, ...] = ()  # what a failure after some work may leave: none of it a completion marker

    @property
    def id(self) -> str:
        return f"{self.stage}: {self.what}"


CASES = [
    # ---- prepare -------------------------------------------------------------------------------
    Case("prepare", "squad_dir missing", 2, "prepare --squad_dir nope --output_dir out",
         r"--squad_dir nope does not exist; pass a folder holding SQuAD JSON files", ("out/stats.json",)),
    Case("prepare", "squad_dir without JSON", 2, "prepare --squad_dir squad --output_dir out",
         r"--squad_dir squad holds no \*\.json files; put SQuAD files there", ("out/stats.json",),
         files={"squad/": "", "squad/notes.txt": "not json"}),
    Case("prepare", "JSON file that is not SQuAD", 2, "prepare --squad_dir squad --output_dir out",
         r"squad/dev-v1\.1\.json has no top-level 'data' list; expected SQuAD JSON .*remove dev-v1\.1\.json",
         ("out/stats.json", "out/training_data.txt"), files={"squad/dev-v1.1.json": '{"version": "1.1"}'}),
    Case("prepare", "truncated JSON", 2, "prepare --squad_dir squad --output_dir out",
         r"squad/train-v1\.1\.json is not valid JSON \(.*truncated\?\); re-download it", ("out/stats.json",),
         files={"squad/dev-v1.1.json": SQUAD, "squad/train-v1.1.json": TRUNCATED_SQUAD}),
    Case("prepare", "JSON nested 100,000 deep", 2, "prepare --squad_dir squad --output_dir out",
         r"squad/dev-v1\.1\.json is not valid JSON \(nested too deeply to read\); re-download it", ("out/stats.json",),
         files={"squad/dev-v1.1.json": "[" * 100_000 + "]" * 100_000}),
    Case("prepare", "rerun over a complete output with a truncated file keeps the old output", 2,
         "prepare --squad_dir squad --output_dir out", r"train-v1\.1\.json is not valid JSON", (),
         files={**OLD_CLEAN, "squad/dev-v1.1.json": SQUAD, "squad/train-v1.1.json": TRUNCATED_SQUAD},
         kept=tuple(OLD_CLEAN)),
    Case("prepare", "min_words negative", 2, "prepare --squad_dir squad --min_words -1 --output_dir out",
         r"data\.min_words must be >= 0, got -1 \(from the command line\)", ("out",), files={"squad/dev-v1.1.json": SQUAD}),
    Case("prepare", "min_words not an int", 2, "prepare --squad_dir squad --min_words ten --output_dir out",
         r"argument --min_words: expected an integer, got 'ten'", ("out",), files={"squad/dev-v1.1.json": SQUAD}),
    Case("prepare", "output_dir is a file", 2, "prepare --squad_dir squad --output_dir out",
         r"--output_dir out is a file, not a directory; pass a directory", (),
         files={"squad/dev-v1.1.json": SQUAD, "out": "a file"}, kept=("out",)),
    # ---- train-tokenizer -------------------------------------------------------------------------
    Case("train-tokenizer", "input missing", 2, "train-tokenizer --input missing.txt --vocab_size 300 --output_dir tk",
         r"--input missing\.txt does not exist; run `openllm-ds prepare` first", ("tk",)),
    Case("train-tokenizer", "input empty", 2, "train-tokenizer --input empty.txt --vocab_size 300 --output_dir tk",
         r"--input empty\.txt is empty; it needs one document per line", ("tk",), files={"empty.txt": "\n \n"}),
    Case("train-tokenizer", "input is a folder without files", 2, "train-tokenizer --input texts --vocab_size 300 "
         "--output_dir tk", r"--input texts matches no files; check the path or pattern", ("tk",), files={"texts/": ""}),
    Case("train-tokenizer", "every line longer than max_sentence_length", 2,
         "train-tokenizer --input text.txt --vocab_size 300 --max_sentence_length 20 --output_dir tk",
         r"every line of --input text\.txt is longer than --max_sentence_length 20 bytes.*raise --max_sentence_length",
         ("tk",), files={"text.txt": TEXT}),
    Case("train-tokenizer", "Latin-1 text", 2, "train-tokenizer --input text.txt --vocab_size 300 --output_dir tk",
         r"--input text\.txt line 202 is not UTF-8 \(byte 0xe9 at column 4\); convert it to UTF-8", ("tk",),
         files={"text.txt": TEXT.encode() + b"\nCaf\xe9 au lait\n"}),
    Case("train-tokenizer", "JSON Lines without the text field", 2,
         "train-tokenizer --input docs.jsonl --vocab_size 300 --output_dir tk",
         r"docs\.jsonl line 1 has no field 'text' \(its fields: content\); pass --text_field", ("tk",),
         files={"docs.jsonl": '{"content": "a document"}\n'}),
    Case("train-tokenizer", "vocab_size below the byte-fallback minimum", 2,
         "train-tokenizer --input text.txt --vocab_size 100 --output_dir tk",
         r"tokenizer\.vocab_size must be >= 260 \(byte fallback needs 256 \+ 4 specials\), got 100", ("tk",),
         files={"text.txt": TEXT}),
    Case("train-tokenizer", "vocab_size too large for the text", 2,
         "train-tokenizer --input text.txt --vocab_size 5000 --output_dir tk",
         r"--vocab_size 5000 is too large for text\.txt: .*pass --vocab_size \d+ or less", ("tk",),
         files={"text.txt": TEXT}),
    Case("train-tokenizer", "vocab_size too small for the characters", 2,
         "train-tokenizer --input cjk.txt --vocab_size 300 --character_coverage 1.0 --output_dir tk",
         r"--vocab_size 300 is too small for the characters of cjk\.txt: pass --vocab_size \d+ or more", ("tk",),
         files={"cjk.txt": CJK_TEXT}),
    Case("train-tokenizer", "failed retrain keeps the earlier tokenizer", 2,
         "train-tokenizer --input text.txt --vocab_size 5000 --output_dir tok", r"--vocab_size 5000 is too large", (),
         files={"text.txt": TEXT, "tok": "<tok>"}, kept=("tok/tokenizer.model", "tok/tokenizer.json")),
    Case("train-tokenizer", "unknown model_type", 2,
         "train-tokenizer --input text.txt --vocab_size 300 --model_type wordpiece --output_dir tk",
         r"tokenizer\.model_type must be bpe or unigram, got 'wordpiece'", ("tk",), files={"text.txt": TEXT}),
    Case("train-tokenizer", "character_coverage above 1", 2,
         "train-tokenizer --input text.txt --vocab_size 300 --character_coverage 1.5 --output_dir tk",
         r"tokenizer\.character_coverage must be in \(0, 1\], got 1\.5", ("tk",), files={"text.txt": TEXT}),
    Case("train-tokenizer", "max_sentence_length 0", 2,
         "train-tokenizer --input text.txt --vocab_size 300 --max_sentence_length 0 --output_dir tk",
         r"tokenizer\.max_sentence_length must be in \[10, 2\^30\] bytes, got 0", ("tk",), files={"text.txt": TEXT}),
    Case("train-tokenizer", "output_dir holds other files", 2,
         "train-tokenizer --input text.txt --vocab_size 300 --output_dir busy",
         r"--output_dir busy holds other files \(notes\.txt\); pass a new or empty directory", ("busy/tokenizer.model",),
         files={"text.txt": TEXT, "busy/notes.txt": "keep me"}, kept=("busy/notes.txt",)),
    # ---- tokenize --------------------------------------------------------------------------------
    Case("tokenize", "tokenizer dir missing", 2, "tokenize --input text.txt --tokenizer_dir notok",
         r"tokenizer dir notok does not exist; train one first: openllm-ds train-tokenizer", ("text.tokens",),
         files={"text.txt": TEXT}),
    Case("tokenize", "corrupt tokenizer.model", 2, "tokenize --input text.txt --tokenizer_dir badtok",
         r"badtok/tokenizer\.model is not a SentencePiece model .*; re-run train-tokenizer", ("text.tokens",),
         files={"text.txt": TEXT, "badtok/tokenizer.model": GARBAGE}),
    Case("tokenize", "second input empty: nothing encoded", 2, "tokenize --input text.txt empty.txt --tokenizer_dir tok",
         r"--input empty\.txt is empty", ("text.tokens", "empty.tokens"),
         files={"text.txt": TEXT, "empty.txt": "", "tok": "<tok>"}),
    Case("tokenize", "one input of several missing: nothing encoded", 2,
         "tokenize --input a.txt nothere/*.jsonl --tokenizer_dir tok --output_dir shards --num_workers 0",
         r"--input nothere/\*\.jsonl matches no files; check the path or pattern", ("shards", "a.tokens"),
         files={"a.txt": TEXT, "tok": "<tok>"}),
    Case("tokenize", "malformed JSON Lines record", 2, "tokenize --input docs.jsonl --tokenizer_dir tok --num_workers 0",
         r"docs\.jsonl line 2 is not valid JSON: Expecting ',' delimiter \(column 16\); fix the record, or pass "
         r"--on_bad_record skip", ("docs.jsonl.tokens",),
         files={"docs.jsonl": '{"text": "one"}\n{"text": "two" "x"}\n', "tok": "<tok>"}),
    Case("tokenize", "missing text field", 2, "tokenize --input docs.jsonl --tokenizer_dir tok --num_workers 0",
         r"docs\.jsonl line 1 has no field 'text' \(its fields: body\); pass --text_field", ("docs.jsonl.tokens",),
         files={"docs.jsonl": '{"body": "one"}\n', "tok": "<tok>"}),
    Case("tokenize", "text field of the wrong type", 2,
         "tokenize --input docs.jsonl --tokenizer_dir tok --num_workers 0 --text_field n",
         r"docs\.jsonl line 1 field 'n' is int, not a string; fix the record", ("docs.jsonl.tokens",),
         files={"docs.jsonl": '{"n": 1}\n', "tok": "<tok>"}),
    Case("tokenize", "binary file", 2, "tokenize --input blob.txt --tokenizer_dir tok --num_workers 0",
         r"blob\.txt line 1 holds a NUL byte: .*looks binary, not text", ("blob.tokens",),
         files={"blob.txt": b"\x7fELF\x02\x01\x00\x00binary\n", "tok": "<tok>"}),
    Case("tokenize", "truncated gzip", 2, "tokenize --input docs.jsonl.gz --tokenizer_dir tok --num_workers 0",
         r"docs\.jsonl\.gz is a truncated or corrupt \.gz file \(.*\); download or compress it again",
         ("docs.jsonl.gz.tokens",), files={"docs.jsonl.gz": GZ_DOCS[:-20], "tok": "<tok>"}),
    Case("tokenize", "nothing left after filtering", 2, "tokenize --input docs.jsonl --tokenizer_dir tok --num_workers 0",
         r"docs\.jsonl: no document left to train on \(2 documents read, 0 duplicates, 0 empty and 0 bad records "
         r"skipped\)|docs\.jsonl: no document left to train on \(0 documents read, 0 duplicates, 2 empty",
         ("docs.jsonl.tokens",), files={"docs.jsonl": '{"text": " "}\n{"text": ""}\n', "tok": "<tok>"}),
    Case("tokenize", "Latin-1 text", 2, "tokenize --input text.txt --tokenizer_dir tok --num_workers 0",
         r"text\.txt line 201 is not UTF-8 \(byte 0xe9 at column 4\); convert .* to UTF-8", ("text.tokens",),
         files={"text.txt": TEXT.encode() + b"Caf\xe9\n", "tok": "<tok>"}),
    Case("tokenize", "JSON nested 100,000 deep", 2, "tokenize --input deep.jsonl --tokenizer_dir tok --num_workers 0",
         r"deep\.jsonl line 1 is JSON nested too deeply to read", ("deep.jsonl.tokens",),
         files={"deep.jsonl": "[" * 100_000 + "]" * 100_000 + "\n", "tok": "<tok>"}),
    Case("tokenize", "unknown doc_separator", 2, "tokenize --input text.txt --tokenizer_dir tok --doc_separator tab",
         r"tokenizer\.doc_separator must be newline or blank_line, got 'tab' \(from the command line\)", ("text.tokens",),
         files={"text.txt": TEXT, "tok": "<tok>"}),
    Case("tokenize", "a file of another kind in the folder", 2, "tokenize --input docs --tokenizer_dir tok",
         r"docs/notes\.pdf \(in docs\) is not a corpus file this reads .*move it out of the folder, or pass a glob",
         ("docs.tokens",), files={"docs/a.txt": TEXT, "docs/notes.pdf": "%PDF-1.4", "tok": "<tok>"}),
    Case("tokenize", "hf: dataset while offline", 2, "tokenize --input hf:someone/corpus --tokenizer_dir tok",
         r"cannot load hf:someone/corpus: offline \(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set\) and it is not in the "
         r"local cache", ("data",), files={"tok": "<tok>"}),
    # ---- train: the config ----------------------------------------------------------------------
    Case("train", "unknown config key", 2, "train --config unk.yaml",
         r"unknown key 'train\.max_stepz' in unk\.yaml; valid keys of 'train': .*max_steps", ("models",),
         files={"unk.yaml": "train:\n  max_stepz: 3\n"}),
    Case("train", "wrong type", 2, "train --config wt.yaml",
         r"'train\.max_steps' in wt\.yaml: expected an integer, got 'lots'", ("models",),
         files={"wt.yaml": "train:\n  max_steps: lots\n"}),
    Case("train", "YAML that does not parse", 2, "train --config broken.yaml",
         r"config file broken\.yaml is not valid YAML \(.* at line 3 column 1\)", ("models",),
         files={"broken.yaml": "model:\n  d_model: [1\n"}),
    Case("train", "config file missing", 2, "train --config nope.yaml",
         r"--config nope\.yaml does not exist; pass a YAML file or a preset name \(large, medium, small, tiny\)",
         ("models",)),
    Case("train", "n_heads does not divide d_model", 2, "train --config t.yaml model.n_heads=3",
         r"model\.n_heads \(3\) must divide model\.d_model \(32\) \(model\.n_heads from the command line, "
         r"model\.d_model from t\.yaml\)", ("run",), files=TRAIN_FILES),
    Case("train", "n_heads 0", 2, "train --config t.yaml model.n_heads=0",
         r"model\.n_heads must be >= 1, got 0 \(from the command line\)", ("run",), files=TRAIN_FILES),
    Case("train", "max_steps 0", 2, "train --config t.yaml --max_steps 0",
         r"train\.max_steps must be >= 1, got 0 \(from the command line\)", ("run",), files=TRAIN_FILES),
    Case("train", "max_steps negative in the YAML", 2, "train --config neg.yaml",
         r"train\.max_steps must be >= 1, got -5 \(from neg\.yaml\)", ("models",),
         files={"neg.yaml": "train:\n  max_steps: -5\n"}),
    Case("train", "learning_rate NaN as an override", 2, "train --config t.yaml train.learning_rate=nan",
         r"'train\.learning_rate' in .*: expected a finite number, got 'nan'", ("run",), files=TRAIN_FILES),
    Case("train", "unknown section.key override", 2, "train --config t.yaml train.bogus=1",
         r"unknown key 'train\.bogus' in the command line; valid keys of 'train'", ("run",), files=TRAIN_FILES),
    Case("train", "unknown section override", 2, "train --config t.yaml bogus.key=1",
         r"unknown section 'bogus' in command-line override 'bogus\.key'; valid: data, tokenizer, model", ("run",),
         files=TRAIN_FILES),
    Case("train", "override without a value", 2, "train --config t.yaml train.max_steps",
         r"cannot read override 'train\.max_steps': write section\.key=value", ("run",), files=TRAIN_FILES),
    # ---- train: files, checked before any compute ----------------------------------------------
    Case("train", "vocab_size differs from the tokenizer", 2, "train --config t.yaml model.vocab_size=512",
         r"model\.vocab_size=512 but the tokenizer in tok has 300 tokens; set model\.vocab_size=300", ("run",),
         files=TRAIN_FILES),
    Case("train", "impossible batch triplet", 2, "train --config t.yaml --ds_config triplet.json",
         r"train\.ds_config triplet\.json: train_batch_size=3 is impossible with train\.micro_batch_size=2 .*"
         r"set it to \"auto\"", ("run",),
         files={**TRAIN_FILES, "triplet.json": '{"train_batch_size": 3, "zero_optimization": {"stage": 0}}'}),
    Case("train", "ds_config JSON that does not parse", 2, "train --config t.yaml --ds_config bad.json",
         r"train\.ds_config bad\.json is not valid JSON \(.*\); fix the file", ("run",),
         files={**TRAIN_FILES, "bad.json": '{"zero_optimization": {"stage": 0},'}),
    Case("train", "ds_config missing", 2, "train --config t.yaml --ds_config zero9.json",
         r"train\.ds_config zero9\.json does not exist; pass a DeepSpeed JSON", ("run",), files=TRAIN_FILES),
    Case("train", "negative mixture weight", 2, "train --config t.yaml --data_files a.txt b.txt --data_weights 1 -1",
         r"train\.data_weights must be >= 0, finite, and not all 0, got \[1\.0, -1\.0\]", ("run",), files=TRAIN_FILES),
    Case("train", "weights that do not match the files", 2, "train --config t.yaml --data_files a.txt b.txt "
         "--data_weights 0.7", r"train\.data_weights has 1 weights for 2 train\.data_files; give one weight per file",
         ("run",), files=TRAIN_FILES),
    Case("train", "a mixture source missing", 2, "train --config t.yaml --data_files training_data.txt none.jsonl",
         r"train\.data_files \(--data_files\) none\.jsonl does not exist", ("run",), files=TRAIN_FILES),
    Case("train", "seed past numpy's range", 2, "train --config t.yaml --seed 5000000000",
         r"train\.seed must be in \[0, 2\^31\), got 5000000000", ("run",), files=TRAIN_FILES),
    Case("train", "learning_rate inf as a flag", 2, "train --config t.yaml --learning_rate inf",
         r"argument --learning_rate: expected a finite number, got 'inf'", ("run",), files=TRAIN_FILES),
    Case("train", "a 20-digit override", 2, "train --config t.yaml train.warmup_steps=99999999999999999999",
         r"'train\.warmup_steps' in .*: 99999999999999999999 is out of range", ("run",), files=TRAIN_FILES),
    Case("train", "max_steps below the checkpoint's step: nothing trained or rewritten", 2,
         "train --config t.yaml --max_steps 1",
         r"train\.max_steps \(--max_steps\) is 1, below step 2 of the checkpoint it resumes .*step_00000002\); "
         r"pass --max_steps above 2", ("run/tokenizer", "run/tensorboard", "run/train_log.jsonl"),
         files=RESUMABLE, kept=("run/run_config.yaml", "run/checkpoints/latest")),
    Case("train", "a checkpoint whose global batch no micro batch can keep on this number of ranks", 2,
         "train --config t.yaml --max_steps 5",
         r"checkpoint .*step_00000002 was trained with a global batch of 5 windows \(ZeRO-0 on 2 rank\(s\)\); on 1 "
         r"rank\(s\) no gradient accumulation with train\.micro_batch_size \(--batch_size\) 2 gives it: pass a "
         r"--batch_size .*\(1, 5 work\)", ("run/tokenizer", "run/tensorboard"),
         files={**RESUMABLE, "run/checkpoints/step_00000002/train_state.json":
                '{"step": 2, "world_size": 2, "zero_stage": 0, "global_batch": 5}'}, kept=("run/run_config.yaml",)),
    Case("train", "a ZeRO checkpoint resumed without ZeRO in bf16", 2, "train --config t.yaml --max_steps 5 "
         "--precision bf16", r"step_00000002 was written with ZeRO-2 on 2 rank\(s\); a run without ZeRO in bf16 keeps "
         r"DeepSpeed's own optimizer state, .*resume it under ZeRO \(--ds_config ds_configs/zero2\.json, any number of "
         r"ranks\), or .*--init_from", ("run/tokenizer", "run/tensorboard"),
         files={**RESUMABLE, "run/checkpoints/step_00000002/train_state.json":
                '{"step": 2, "world_size": 2, "zero_stage": 2, "global_batch": 4}'}, kept=("run/run_config.yaml",)),
    Case("train", "init_from missing", 2, "train --config t.yaml --init_from nowhere",
         r"train\.init_from \(--init_from\) nowhere does not exist; pass a training output", ("run",),
         files=TRAIN_FILES),
    Case("train", "init_from of another model shape", 2, "train --config t.yaml --init_from hf",
         r"train\.init_from hf holds a model of another shape \(model\.n_layers: 2 there, 1 here\); give this run "
         r"that model's config", ("run",),
         files={**TRAIN_FILES, "hf/config.json": HF_TIED.replace('"num_hidden_layers": 1', '"num_hidden_layers": 2'),
                "hf/model.safetensors": GARBAGE}),
    Case("train", "init_from a Llama this model cannot reproduce (RoPE scaling)", 2, "train --config t.yaml --init_from hf",
         r"hf/config\.json describes a model this one cannot reproduce \(rope type='llama3'; this model is a Llama with "
         r"SiLU, no biases, plain RoPE", ("run",),
         files={**TRAIN_FILES, "hf/config.json": HF_TIED[:-1] + ', "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}',
                "hf/model.safetensors": GARBAGE}),
    Case("train", "init_from trained with another tokenizer", 2, "train --config t.yaml --init_from hf",
         r"train\.init_from hf was trained with another tokenizer \(hf\) than train\.tokenizer_dir tok: .*train "
         r"with --tokenizer_dir hf", ("run",),
         files={**TRAIN_FILES, "hf/config.json": HF_TIED, "hf/model.safetensors": GARBAGE,
                "hf/tokenizer.model": GARBAGE}),
    Case("train", "train_state.json of the checkpoint does not parse", 2, "train --config t.yaml --max_steps 5",
         r"run/checkpoints/step_00000002/train_state\.json is not valid JSON .*; that checkpoint is damaged: use "
         r"another one", ("run/tokenizer", "run/tensorboard"),
         files={**RESUMABLE, "run/checkpoints/step_00000002/train_state.json": '{"step": 2'},
         kept=("run/run_config.yaml",)),
    Case("train", "data file missing", 2, "train --config t.yaml --data_file nothere.txt",
         r"train\.data_file \(--data_file\) nothere\.txt does not exist; run `openllm-ds prepare` first", ("run",),
         files=TRAIN_FILES),
    Case("train", "too little data, found after the shards: nothing in the run dir", 2,
         "train --config t.yaml --batch_size 1000",
         r"train\.data_file training_data\.txt has [\d,]+ tokens = \d+ windows .* fewer than one global batch of "
         r"1000 windows .*; lower --batch_size",
         ("run/run_config.yaml", "run/tokenizer", "run/checkpoints", "run/tensorboard", "run/train_log.jsonl"),
         files={**TRAIN_FILES, "training_data.tokens": "<shards>", "validation_data.tokens": "<val_shards>"}),
    # ---- evaluate --------------------------------------------------------------------------------
    Case("evaluate", "model_dir missing", 2, "evaluate --model_dir nomodel --eval_data text.txt --output rep.json",
         r"--model_dir nomodel does not exist; pass a training output", ("rep.json",), files={"text.txt": TEXT}),
    Case("evaluate", "unknown metric", 2, "evaluate --model_dir model --eval_data text.txt --metrics accuracy",
         r"unknown metric 'accuracy' in --metrics; valid: perplexity, loss", (), files={"text.txt": TEXT}),
    Case("evaluate", "eval data missing", 2, "evaluate --model_dir model --eval_data missing.txt --output rep.json",
         r"--eval_data: eval file missing\.txt does not exist", ("rep.json",)),
    Case("evaluate", "--output names a directory: refused before the evaluation", 2,
         "evaluate --model_dir model --eval_data text.txt --output reports",
         r"--output reports is a directory; name a file in it, e\.g\. reports/report\.json", (),
         files={**CORRUPT_RUN, "text.txt": TEXT, "reports/": "/"}),
    Case("evaluate", "corrupt model.safetensors", 2, "evaluate --model_dir model --eval_data text.txt --output rep.json",
         r"model/checkpoints/step_00000002/model\.safetensors is not a readable safetensors file .* corrupt or truncated",
         ("rep.json",), files={**CORRUPT_RUN, "text.txt": TEXT}),
    Case("evaluate", "a DeepSpeed tag of truncated ZeRO shards only", 2,
         "evaluate --model_dir model --eval_data text.txt --output rep.json",
         r"model/checkpoints/step_00000002 is not a complete DeepSpeed ZeRO checkpoint \(zero_to_fp32 said: .*\); "
         r"copy it again, or pass another checkpoint", ("rep.json",),
         files={**{k: v for k, v in CORRUPT_RUN.items() if not k.endswith("model.safetensors")}, "text.txt": TEXT,
                "model/checkpoints/step_00000002/mp_rank_00_model_states.pt": "",
                "model/checkpoints/step_00000002/zero_pp_rank_0_mp_rank_00_optim_states.pt": ""}),
    # ---- generate --------------------------------------------------------------------------------
    Case("generate", "an ONNX export whose config.json is a JSON list", 2, "generate --model_dir onnx --prompt Hi",
         r"onnx/config\.json must hold an object, not a list; re-export the model \(--format onnx\)", (),
         files={"onnx/config.json": "[]", "onnx/model.onnx": GARBAGE}),
    Case("generate", "an ONNX export of the layout before optimum's", 2, "generate --model_dir onnx --prompt Hi",
         r"onnx is an ONNX export of an older layout \(decoder_with_past\.onnx, no Llama config\.json\); re-export it "
         r"from its training output: openllm-ds export --model_dir models/NAME --format onnx --output_dir onnx "
         r"--overwrite", (), files={"onnx/config.json": '{"vocab_size": 8000, "d_model": 64}',
                                    "onnx/model.onnx": GARBAGE, "onnx/decoder_with_past.onnx": GARBAGE}),
    Case("generate", "negative temperature", 2, "generate --model_dir model --prompt Hi --temperature -1",
         r"--temperature must be a number in \[0, 2\] \(0: greedy\), got -1\.0", ()),
    Case("generate", "temperature NaN", 2, "generate --model_dir model --prompt Hi --temperature nan",
         r"argument --temperature: expected a finite number, got 'nan'", ()),
    Case("generate", "a 20-digit seed", 2, "generate --model_dir model --prompt Hi --seed 99999999999999999999",
         r"--seed must be an integer in \[-2\^63, 2\^64 - 1\] \(unset: a random seed\), got 99999999999999999999", ()),
    Case("generate", "a seed below -2^63", 2, "generate --model_dir model --prompt Hi --seed -9223372036854775809",
         r"--seed must be an integer in \[-2\^63, 2\^64 - 1\]", ()),
    Case("generate", "max_new_tokens 0", 2, "generate --model_dir model --prompt Hi --max_new_tokens 0",
         r"--max_new_tokens must be an integer >= 1, got 0", ()),
    Case("generate", "max_length 0 (the alias of --max_new_tokens)", 2,
         "generate --model_dir model --prompt Hi --max_length 0", r"--max_new_tokens must be an integer >= 1, got 0", ()),
    Case("generate", "export dir whose config.json is not Llama", 2, "generate --model_dir hf --prompt Hi",
         r"hf/config\.json is not a LlamaForCausalLM config \(no .*num_attention_heads", (),
         files={"hf/config.json": '{"model_type": "bert"}', "hf/model.safetensors": GARBAGE}),
    # ---- score-squad -----------------------------------------------------------------------------
    Case("score-squad", "predictions not JSON", 2, "score-squad --dataset dev.json --predictions preds.txt",
         r"predictions preds\.txt is not valid JSON", (), files={"dev.json": SQUAD, "preds.txt": "q1: Normans"}),
    Case("score-squad", "dataset missing", 2, "score-squad --dataset missing.json --predictions preds.json",
         r"dataset missing\.json does not exist", (), files={"preds.json": '{"q1": "Normans"}'}),
    Case("score-squad", "dataset not SQuAD", 2, "score-squad --dataset dev.json --predictions preds.json",
         r"dataset dev\.json has no top-level 'data' list; expected a SQuAD file", (),
         files={"dev.json": '{"version": "1.1"}', "preds.json": '{"q1": "Normans"}'}),
    Case("score-squad", "predictions not an object", 2, "score-squad --dataset dev.json --predictions preds.json",
         r"predictions preds\.json must be a JSON object \{question_id: answer text\}, got a JSON list", (),
         files={"dev.json": SQUAD, "preds.json": '["Normans"]'}),
    # ---- export ----------------------------------------------------------------------------------
    Case("export", "unknown format", 2, "export --model_dir model --format tflite",
         r"export\.format must be huggingface, pytorch, onnx or gguf \(--format\), got 'tflite'", ("exports",)),
    Case("export", "output_dir holds an earlier export, no --overwrite", 2,
         "export --model_dir model --format pytorch --output_dir out",
         r"--output_dir out holds an earlier export \(model\.pt\); pass --overwrite to replace it", (),
         files={**CORRUPT_RUN, "out/model.pt": "an earlier export"}, kept=("out/model.pt",)),
    Case("export", "--overwrite never replaces a user's files", 2,
         "export --model_dir model --format huggingface --output_dir out --overwrite",
         r"--output_dir out holds notes\.md, plots/, which no export wrote; move them out", (),
         files={**CORRUPT_RUN, "out/config.json": HF_CONFIG, "out/notes.md": "mine", "out/plots/a.png": "mine"},
         kept=("out/config.json", "out/notes.md", "out/plots/a.png")),
    Case("export", "model dir without a checkpoint", 2, "export --model_dir run --format huggingface --output_dir out",
         r"--model_dir run holds no checkpoint .*; train first or point at an export", ("out",),
         files={"run/run_config.yaml": MODEL_YAML}),
    Case("export", "run without run_config.yaml", 2, "export --model_dir model --format huggingface --output_dir out",
         r"model/checkpoints/step_00000002 has no run_config\.yaml .*the model shape is unknown", ("out",),
         files={k: v for k, v in CORRUPT_RUN.items() if k != "model/run_config.yaml"}),
    Case("export", "corrupt weights with --overwrite keep the earlier export", 2,
         "export --model_dir model --format huggingface --output_dir out --overwrite",
         r"model\.safetensors is not a readable safetensors file", (),
         files={**CORRUPT_RUN, "out/config.json": HF_CONFIG, "out/model.safetensors": GARBAGE},
         kept=("out/config.json", "out/model.safetensors")),
    Case("export", "an export whose openllm_ds.json is not an object", 2,
         "export --model_dir hf --format pytorch --output_dir out",
         r"hf/openllm_ds\.json must hold an object, not a string; re-export the model", ("out",),
         files={"hf/config.json": HF_TIED, "hf/model.safetensors": GARBAGE, "hf/openllm_ds.json": '"step 3"'}),
    # ---- serve -----------------------------------------------------------------------------------
    Case("serve", "port past 65535", 2, "serve --model_path exp --port 70000",
         r"argument --port: a TCP port is 0-65535 \(0: any free one\), got 70000", ()),
    Case("serve", "export dir missing", 2, "serve --model_path nothere --engine builtin",
         r"--model_dir nothere does not exist; export a model first", ()),
    # ---- pipeline --------------------------------------------------------------------------------
    Case("pipeline", "config missing", 2, "pipeline --config nope.yaml",
         r"--config nope\.yaml does not exist", ("runs", "data")),
    Case("pipeline", "unknown key in the config", 2, "pipeline --config unk.yaml",
         r"unknown key 'model\.d_modle' in unk\.yaml", ("runs", "data"), files={"unk.yaml": "model:\n  d_modle: 64\n"}),
    Case("pipeline", "missing ds_config stops it before prepare", 2,
         "pipeline --config tiny --squad_dir squad train.ds_config=zero9.json",
         r"train\.ds_config zero9\.json does not exist; .*train\.ds_config=PATH.* or a shipped one by name \(zero0, "
         r"zero1, zero2, zero2_offload, zero3, zero3_offload\)", ("runs", "data"),
         files={"squad/dev-v1.1.json": SQUAD}),
    Case("pipeline", "work_dir is a file", 2,
         "pipeline --config {root}/configs/tiny.yaml --squad_dir squad --work_dir wd "
         "train.ds_config={root}/ds_configs/zero2.json",
         r"--work_dir wd is a file, not a directory", ("runs", "data"),
         files={"squad/dev-v1.1.json": SQUAD, "wd": "a file"}, kept=("wd",)),
]


# ---- text that is not text, paths of the wrong kind, damaged files, validation that is training data ----------
E9 = os.fsdecode(b"\xe9")  # a byte that is not UTF-8, as Python hands it over from argv (surrogateescape)
DEEP = "[" * 100_000 + "]" * 100_000
STEP2 = "run/checkpoints/step_00000002"

CASES += [
    # text (openllm_ds.text.check_text): argv bytes that are not UTF-8, and the same for every flag
    Case("generate", "a prompt that is not UTF-8", 2, f"generate --model_dir model --prompt caf{E9}",
         r"--prompt is not UTF-8 \(byte 0xe9 at character 3\); pass UTF-8 text", ()),
    Case("train", "an output_dir that is not UTF-8", 2, f"train --config t.yaml --output_dir run{E9}",
         r"--output_dir is not UTF-8 \(byte 0xe9 at character 3\); pass UTF-8 text", ("run",), files=TRAIN_FILES),
    Case("pipeline", "an override value that is not UTF-8", 2, f"pipeline --config tiny train.output_dir=m{E9}",
         r"train\.output_dir is not UTF-8 \(byte 0xe9 at character 1\)", ("runs", "data")),
    Case("serve", "an api_key no HTTP header can carry", 2, "serve --model_path exp --engine builtin --api_key clé",
         r"--api_key holds characters an HTTP Authorization header cannot carry", (), files={"exp/": "/"}),
    Case("evaluate", "eval data holding a NUL byte", 2, "evaluate --model_dir model --eval_data nul.txt",
         r"--eval_data: eval file nul\.txt line 2 holds a NUL byte", (), files={"nul.txt": b"one line\ntwo \x00\n"}),
    # sampling parameters (openllm_ds.inference.sampling): one set of ranges
    Case("generate", "temperature above 2", 2, "generate --model_dir model --prompt Hi --temperature 2.5",
         r"--temperature must be a number in \[0, 2\] \(0: greedy\), got 2\.5", ()),
    Case("generate", "17 samples", 2, "generate --model_dir model --prompt Hi --num_samples 17",
         r"--num_samples must be an integer in \[1, 16\], got 17", ()),
    Case("generate", "top_p 0", 2, "generate --model_dir model --prompt Hi --top_p 0",
         r"--top_p must be a number in \(0, 1\], got 0\.0", ()),
    Case("generate", "top_k negative", 2, "generate --model_dir model --prompt Hi --top_k -1",
         r"--top_k must be an integer >= 0 \(0: every token\), got -1", ()),
    Case("generate", "repetition_penalty 0", 2, "generate --model_dir model --prompt Hi --repetition_penalty 0",
         r"--repetition_penalty must be a finite number > 0 \(1: no penalty\), got 0\.0", ()),
    Case("evaluate", "a task whose stop string is empty", 2, "evaluate --model_dir model --tasks t.yaml",
         r"task 't' \(t\.yaml\): stop\[0\] must be a non-empty string", (),
         files={"t.yaml": "kind: cloze\ndata: text.txt\nstop: ['']\n", "text.txt": TEXT}),
    # paths of the wrong kind (openllm_ds.paths.check_path): named as such, never "does not exist"
    Case("train", "--config a directory", 2, "train --config conf", r"--config conf is a directory, not a file",
         ("models",), files={"conf/": "/"}),
    Case("train", "--ds_config a directory", 2, "train --config t.yaml --ds_config dsdir",
         r"train\.ds_config dsdir is a directory, not a file", ("run",), files={**TRAIN_FILES, "dsdir/": "/"}),
    Case("train", "--tokenizer_dir a file", 2, "train --config t.yaml --tokenizer_dir t.yaml",
         r"tokenizer dir t\.yaml is a file, not a directory", ("run",), files=TRAIN_FILES),
    Case("train", "--init_from a file", 2, "train --config t.yaml --init_from t.yaml",
         r"train\.init_from \(--init_from\) t\.yaml is a file, not a directory", ("run",), files=TRAIN_FILES),
    Case("train", "--resume a file", 2, "train --config t.yaml --resume t.yaml",
         r"train\.resume \(--resume\) t\.yaml is a file, not a directory", ("run",), files=TRAIN_FILES),
    Case("train", "--data_file under a file", 2, "train --config t.yaml --data_file t.yaml/x.txt",
         r"train\.data_file \(--data_file\) t\.yaml/x\.txt does not exist \(t\.yaml is a file, not a directory\)",
         ("run",), files=TRAIN_FILES),
    Case("generate", "--model_dir a file", 2, "generate --model_dir m.txt --prompt Hi",
         r"--model_dir m\.txt is a file, not a directory", (), files={"m.txt": "weights?"}),
    Case("evaluate", "--model_dir a file", 2, "evaluate --model_dir m.txt --eval_data m.txt",
         r"--model_dir m\.txt is a file, not a directory", (), files={"m.txt": TEXT}),
    Case("export", "--model_dir a file", 2, "export --model_dir m.txt --format pytorch --output_dir out",
         r"--model_dir m\.txt is a file, not a directory", ("out",), files={"m.txt": "weights?"}),
    Case("serve", "--model_path a file", 2, "serve --model_path m.txt --engine builtin",
         r"--model_dir m\.txt is a file, not a directory", (), files={"m.txt": "weights?"}),
    Case("prepare", "--squad_dir a file", 2, "prepare --squad_dir dev.json --output_dir out",
         r"--squad_dir dev\.json is a file, not a directory; pass a folder holding SQuAD JSON files", ("out",),
         files={"dev.json": SQUAD}),
    Case("train-tokenizer", "--validation_file a directory", 2,
         "train-tokenizer --input text.txt --vocab_size 300 --output_dir tk --validation_file val",
         r"--validation_file val is a directory, not a file", ("tk",), files={"text.txt": TEXT, "val/": "/"}),
    Case("tokenize", "--tokenizer_dir a file", 2, "tokenize --input text.txt --tokenizer_dir text.txt",
         r"tokenizer dir text\.txt is a file, not a directory", ("text.tokens",), files={"text.txt": TEXT}),
    Case("score-squad", "--dataset a directory", 2, "score-squad --dataset dev --predictions preds.json",
         r"dataset dev is a directory, not a file", (), files={"dev/": "/", "preds.json": '{"q1": "x"}'}),
    # damaged files (utils.read_text / read_json / read_yaml): one line naming the file, never a traceback
    Case("train", "a config that is not UTF-8", 2, "train --config latin.yaml",
         r"config file latin\.yaml is not UTF-8 text \(byte 0xe9 at offset 31\)", ("models",),
         files={"latin.yaml": b"train:\n  max_steps: 3\nname: caf\xe9\n"}),
    Case("train", "a config holding a NUL byte", 2, "train --config nul.yaml",
         r"config file nul\.yaml holds a NUL byte at offset 13: it is binary or damaged", ("models",),
         files={"nul.yaml": b"train:\n  max_\x00steps: 3\n"}),
    Case("train", "a config nested 100,000 deep", 2, "train --config deep.yaml",
         r"config file deep\.yaml is not valid YAML \(nested too deeply to read\)", ("models",),
         files={"deep.yaml": DEEP}),
    Case("train", "a config that is a list", 2, "train --config list.yaml",
         r"config file list\.yaml must hold a mapping, not a list", ("models",), files={"list.yaml": "- train\n"}),
    Case("train", "a model_config nested 100,000 deep", 2, "train --config t.yaml --model_config deep.json",
         r"model config deep\.json is not valid JSON \(nested too deeply to read\)", ("run",),
         files={**TRAIN_FILES, "deep.json": DEEP}),
    Case("train", "a model_config that is not UTF-8", 2, "train --config t.yaml --model_config m.json",
         r"model config m\.json is not UTF-8 text \(byte 0xe9 at offset 10\)", ("run",),
         files={**TRAIN_FILES, "m.json": b'{"name": "\xe9"}'}),
    Case("train", "a model_config that is a list", 2, "train --config t.yaml --model_config m.json",
         r"model config m\.json must hold an object, not a list", ("run",), files={**TRAIN_FILES, "m.json": "[64]"}),
    Case("train", "a ds_config truncated", 2, "train --config t.yaml --ds_config ds.json",
         r"train\.ds_config ds\.json is not valid JSON \(.*; truncated\?\)", ("run",),
         files={**TRAIN_FILES, "ds.json": '{"zero_optimization": {"stage": 0'}),
    Case("train", "checkpoints/latest not UTF-8", 2, "train --config t.yaml --max_steps 5",
         r"run/checkpoints/latest is not UTF-8 text \(byte 0xe9 at offset 5\); delete .*latest", ("run/tensorboard",),
         files={**RESUMABLE, "run/checkpoints/latest": b"step_\xe9"}, kept=("run/run_config.yaml",)),
    Case("train", "checkpoints/latest naming a path", 2, "train --config t.yaml --max_steps 5",
         r"run/checkpoints/latest names '\.\./\.\./etc', which is not a checkpoint tag", ("run/tensorboard",),
         files={**RESUMABLE, "run/checkpoints/latest": "../../etc\n"}, kept=("run/run_config.yaml",)),
    Case("train", "a checkpoint's run_config.yaml that is a list", 2, "train --config t.yaml --max_steps 5",
         r"step_00000002/run_config\.yaml must hold a mapping, not a list; that checkpoint is damaged",
         ("run/tensorboard",), files={**RESUMABLE, f"{STEP2}/run_config.yaml": "- 1\n"}),
    Case("train", "a checkpoint's train_state.json that is a list", 2, "train --config t.yaml --max_steps 5",
         r"step_00000002/train_state\.json must hold an object, not a list; that checkpoint is damaged",
         ("run/tensorboard",), files={**RESUMABLE, f"{STEP2}/train_state.json": "[2]"}),
    Case("evaluate", "a task YAML that is not UTF-8", 2, "evaluate --model_dir model --tasks t.yaml",
         r"task file t\.yaml is not UTF-8 text \(byte 0xe9 at offset 13\)", (),
         files={"t.yaml": b"kind: cloze\n#\xe9\n"}),
    Case("evaluate", "a task YAML that is a list", 2, "evaluate --model_dir model --tasks t.yaml",
         r"task file t\.yaml must hold a mapping, not a list", (), files={"t.yaml": "- cloze\n"}),
    Case("score-squad", "a dataset that is not UTF-8", 2, "score-squad --dataset dev.json --predictions preds.json",
         r"dataset dev\.json is not UTF-8 text \(byte 0xe9 at offset 1\)", (),
         files={"dev.json": b"{\xe9}", "preds.json": '{"q1": "x"}'}),
    Case("score-squad", "predictions nested 100,000 deep", 2, "score-squad --dataset dev.json --predictions p.json",
         r"predictions p\.json is not valid JSON \(nested too deeply to read\)", (),
         files={"dev.json": SQUAD, "p.json": DEEP}),
    Case("score-squad", "predictions holding an unpaired surrogate", 2,
         "score-squad --dataset dev.json --predictions p.json",
         r"predictions p\.json is not valid JSON \(it holds an unpaired UTF-16 surrogate escape", (),
         files={"dev.json": SQUAD, "p.json": '{"q1": "\\ud800"}'}),
    Case("score-squad", "predictions holding a NUL byte", 2, "score-squad --dataset dev.json --predictions p.json",
         r"predictions p\.json holds a NUL byte at offset 8", (), files={"dev.json": SQUAD, "p.json": b'{"q1": "\x00"}'}),
    Case("score-squad", "a no-answer file truncated", 2,
         "score-squad --dataset dev.json --predictions p.json --na_prob_file na.json",
         r"no-answer probability file na\.json is not valid JSON \(.*; truncated\?\)", (),
         files={"dev.json": SQUAD, "p.json": '{"q1": "x"}', "na.json": '{"q1": 0.5'}),
    # validation data that is the run's own training data (train/validation.py): the run stops before any work
    Case("train", "eval_data: the training file by another path", 2,
         "train --config t.yaml --eval_data ./sub/../training_data.txt",
         r"train\.eval_data \(--eval_data\) \./sub/\.\./training_data\.txt is training data: .*training_data\.txt is "
         r"what train\.data_file \(--data_file\) training_data\.txt trains on; validation on training data measures "
         r"memorisation", ("run",), files={**TRAIN_FILES, "sub/": "/"}),
    Case("train", "eval_data: a symlink to the training file", 2, "train --config t.yaml --eval_data link.txt",
         r"train\.eval_data \(--eval_data\) link\.txt is training data: .*training_data\.txt is what", ("run",),
         files={**TRAIN_FILES, "link.txt": Symlink("training_data.txt")}),
    Case("train", "eval_data: a byte-identical copy of the training file", 2, "train --config t.yaml --eval_data c.txt",
         r"train\.eval_data \(--eval_data\) c\.txt is training data: .*c\.txt \(a byte-identical copy of "
         r".*training_data\.txt\)", ("run",), files={**TRAIN_FILES, "c.txt": TEXT}),
    Case("train", "eval_data: the token shards of the training file", 2,
         "train --config t.yaml --eval_data training_data.tokens",
         r"train\.eval_data \(--eval_data\) training_data\.tokens is training data", ("run",),
         files={**TRAIN_FILES, "training_data.tokens": "<shards>"}),
    Case("train", "validation_data.txt beside training_data.txt is a copy of it", 2, "train --config t.yaml",
         r"the validation file validation_data\.txt is training data: .*a byte-identical copy", ("run",),
         files={**TRAIN_FILES, "validation_data.txt": TEXT}),
    Case("train", "a mixture whose validation file is another source's training data", 2,
         "train --config t.yaml --data_files training_data.txt b/training_data.txt",
         r"the validation file of --data_files .*b/validation_data\.txt is training data: .*what train\.data_files",
         ("run",), files={**TRAIN_FILES, "b/training_data.txt": _corpus(80, 2), "b/validation_data.txt": TEXT}),
]

# ---- records that are not text, fine-tuning's inputs, one stage's output dir that is another's ------------------
DOCS_JSONL = "".join(json.dumps({"text": line}) + "\n" for line in TEXT.splitlines())
SFT_LINES = ["".join(json.dumps({"messages": [{"role": "user", "content": f"Where is the {a}? {line[:30]}"},
                                              {"role": "assistant", "content": f"beside the {b}"}]}) + "\n"
                     for line in _corpus(n, seed).splitlines())
             for n, seed, a, b in ((16, 3, "river", "castle"), (4, 4, "market", "church"))]
SFT_FILES = {"base": "<run>", "sft/train.jsonl": SFT_LINES[0], "sft/validation.jsonl": SFT_LINES[1]}
FINETUNE = "finetune --model_dir base --data sft --max_seq_len 128 --batch_size 2 --max_steps 1"
SURROGATE_TURN = '{"messages": [{"role": "user", "content": "x \\ud800"}, {"role": "assistant", "content": "y"}]}\n'
EXPORT_MANIFEST = "# kind: a huggingface export\n# written by: openllm-ds export --format huggingface\nconfig.json\n"
RUN_MANIFEST = "# kind: a training run\n# written by: openllm-ds train (or finetune)\n"

CASES += [
    # a record's text is text (text.text_problem, in data/documents._Records): a bad record, never a traceback
    Case("tokenize", "a JSON Lines text holding a lone surrogate escape", 2,
         "tokenize --input docs.jsonl --tokenizer_dir tok --num_workers 0",
         r"docs\.jsonl line 201 field 'text' holds an unpaired UTF-16 surrogate \(U\+D800\) at character 2.*"
         r"--on_bad_record skip", ("docs.jsonl.tokens",),
         files={"docs.jsonl": DOCS_JSONL + '{"text": "x \\ud800"}\n', "tok": "<tok>"}),
    Case("tokenize", "a JSON Lines text holding a NUL escape", 2,
         "tokenize --input docs.jsonl --tokenizer_dir tok --num_workers 0",
         r"docs\.jsonl line 1 field 'text' holds a NUL character at character 1", ("docs.jsonl.tokens",),
         files={"docs.jsonl": '{"text": "a\\u0000b"}\n' + DOCS_JSONL, "tok": "<tok>"}),
    Case("train-tokenizer", "a JSON Lines text holding a lone surrogate escape", 2,
         "train-tokenizer --input docs.jsonl --vocab_size 300 --output_dir tk",
         r"docs\.jsonl line 201 field 'text' holds an unpaired UTF-16 surrogate", ("tk",),
         files={"docs.jsonl": DOCS_JSONL + '{"text": "x \\ud800"}\n'}),
    Case("train-tokenizer", "a JSON Lines record past the first that does not parse", 2,
         "train-tokenizer --input docs.jsonl --vocab_size 300 --output_dir tk",
         r"docs\.jsonl line 201 is not valid JSON: Unterminated string", ("tk",),
         files={"docs.jsonl": DOCS_JSONL + '{"text": "cut\n'}),
    Case("finetune", "conversations holding a lone surrogate escape", 2, f"{FINETUNE} --output_dir ft",
         r"sft/train\.jsonl line 1: messages\[0\]\.content holds an unpaired UTF-16 surrogate \(U\+D800\)", ("ft",),
         files={**SFT_FILES, "sft/train.jsonl": SURROGATE_TURN + SFT_LINES[0]}),
    # a fine-tune's validation conversations are not its training ones (train/validation.check_validation_apart)
    Case("finetune", "eval_data: the training file", 2, f"{FINETUNE} --eval_data ./sft/train.jsonl --output_dir ft",
         r"finetune\.eval_data \(--eval_data\) \./sft/train\.jsonl is training data: .*sft/train\.jsonl is what "
         r"finetune\.data \(--data\) sft/train\.jsonl trains on", ("ft",), files=SFT_FILES),
    Case("finetune", "eval_data: the folder holding train.jsonl", 2, f"{FINETUNE} --eval_data sft --output_dir ft",
         r"finetune\.eval_data \(--eval_data\) sft is training data", ("ft",), files=SFT_FILES),
    Case("finetune", "data under a file", 2, "finetune --model_dir base --data sft/train.jsonl/x --output_dir ft",
         r"finetune\.data \(--data\) sft/train\.jsonl/x does not exist \(sft/train\.jsonl is a file, not a "
         r"directory\); run `openllm-ds prepare-sft` first", ("ft",), files=SFT_FILES),
    # one stage's output dir is never another's (utils.claim_output_dir; a training run's manifest names its kind)
    Case("finetune", "output_dir an export", 2, f"{FINETUNE} --output_dir exp",
         r"train\.output_dir \(--output_dir\) exp is the output of `openllm-ds export --format huggingface` \(a "
         r"huggingface export\)", ("exp/checkpoints", "exp/run_config.yaml", "exp/tokenizer"),
         files={**SFT_FILES, "exp/.openllm-ds-files": EXPORT_MANIFEST, "exp/config.json": HF_TIED},
         kept=("exp/config.json", "exp/.openllm-ds-files")),
    Case("train", "output_dir a tokenizer", 2, "train --config t.yaml --output_dir tok2",
         r"train\.output_dir \(--output_dir\) tok2 is the output of `openllm-ds train-tokenizer` \(a tokenizer\)",
         ("tok2/checkpoints", "tok2/run_config.yaml"), files={**TRAIN_FILES, "tok2": "<tok>"},
         kept=("tok2/tokenizer.model",)),
    Case("prepare-sft", "output_dir a training run", 2, "prepare-sft --squad_dir squad --output_dir run",
         r"--output_dir run is the output of `openllm-ds train \(or finetune\)` \(a training run\)",
         ("run/train.jsonl", "run/stats.json"), files={"squad/train-v1.1.json": SQUAD,
                                                        "run/.openllm-ds-files": RUN_MANIFEST,
                                                        "run/run_config.yaml": MODEL_YAML},
         kept=("run/run_config.yaml", "run/.openllm-ds-files")),
]

# train --dry_run makes every check the run makes before its work: each train case the run refuses before work
# (past its config: a case with a tokenizer), as a dry run, stops with the same line and writes nothing at all
CASES += [dataclasses.replace(c, what=f"{c.what} (--dry_run)", argv=f"{c.argv} --dry_run", leaves=())
          for c in list(CASES) if c.stage == "train" and "tok" in c.files and "after the shards" not in c.what
          and not c.message.startswith("argument") and "override" not in c.what]


# ---- fixtures: a tiny real tokenizer and its token shards, built without Ray ---------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    from helpers import make_fake_run

    from openllm_ds.config import ModelConfig, TokenizerConfig
    from openllm_ds.tokenizer import tokenize_corpus, train_tokenizer

    root = tmp_path_factory.mktemp("bad_input_assets")
    text = root / "training_data.txt"
    text.write_text(TEXT, encoding="utf-8")
    tok = root / "tok"
    train_tokenizer(TokenizerConfig(input=str(text), output_dir=str(tok), vocab_size=300))
    shards = Path(tokenize_corpus(text, tok, num_workers=0)["shards_dir"])  # the workers' code, in this process
    val = root / "validation_data.txt"  # a shards dir records its source: validation_data.tokens is built from this
    val.write_text(TEXT, encoding="utf-8")
    val_shards = Path(tokenize_corpus(val, tok, num_workers=0)["shards_dir"])
    run = root / "run"  # a training output to fine-tune: MODEL_YAML's model at context 64
    make_fake_run(run, tok, steps=(2,), cfg=ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                                                        max_seq_len=64), seed=0, val_loss=None, tokens_per_step=None)
    return {"<tok>": tok, "<shards>": shards, "<val_shards>": val_shards, "<run>": run}


def write_files(run_dir: Path, files: dict, assets: dict[str, Path]) -> None:
    for rel, content in files.items():
        dst = run_dir / rel
        if rel.endswith("/"):
            dst.mkdir(parents=True, exist_ok=True)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Symlink):
            dst.symlink_to(content.target)
        elif isinstance(content, str) and content in assets:
            shutil.copytree(assets[content], dst)
        elif isinstance(content, bytes):
            dst.write_bytes(content)
        else:
            dst.write_text(content.replace("{root}", str(ROOT)), encoding="utf-8")


def snapshot(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in run_dir.rglob("*") if p.is_file()}



def test_the_table_covers_every_stage():
    assert len(CASES) >= 30
    assert {c.stage for c in CASES} == {"prepare", "train-tokenizer", "tokenize", "train", "prepare-sft", "finetune",
                                        "evaluate", "generate", "score-squad", "export", "serve", "pipeline"}
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.code for c in CASES} == {EXIT_USER_ERROR}  # one exit code for every kind of bad input


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, assets, tmp_path):
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    write_files(run_dir, case.files, assets)
    before = snapshot(run_dir)
    argv = shlex.split(case.argv.replace("{root}", str(ROOT)))

    r = subprocess.run([sys.executable, "-m", "openllm_ds.cli", *argv], cwd=run_dir, capture_output=True, text=True,
                       timeout=180)

    assert r.returncode == case.code, f"exit {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    # one error line (progress bars share lines through "\r"), and it names the file/field/flag
    errors = [line for line in re.split(r"[\r\n]+", r.stderr) if re.match(r"(openllm-ds[\w -]*: )?error: ", line)]
    assert len(errors) == 1, r.stderr[-3000:]
    assert re.search(case.message, errors[0]), f"{errors[0]!r} does not match {case.message!r}"

    after = snapshot(run_dir)
    for rel in case.absent:
        assert not (run_dir / rel).exists(), f"{rel} exists after the failure: {sorted(after)}"
    new = {f for f in set(after) - set(before) if not f.startswith(case.leaves)}
    assert not [f for f in new if Path(f).name in MARKERS], f"completion markers written by a failed run: {sorted(new)}"
    assert not [p for p in run_dir.rglob("*") if p.name.endswith((".tmp", ".part"))], "temporary files left behind"
    for rel in case.kept:
        assert after.get(rel) == before[rel], f"{rel} changed or vanished"
