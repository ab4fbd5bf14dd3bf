"""Stage 2: SentencePiece tokenizer, Hugging Face tokenizer files, corpus -> binary token shards."""

from openllm_ds.tokenizer.corpus import tokenize_file
from openllm_ds.tokenizer.shards import TokenShards, shards_dir_for
from openllm_ds.tokenizer.tokenizer import Tokenizer, load_tokenizer
from openllm_ds.tokenizer.train import train_tokenizer

__all__ = ["train_tokenizer", "load_tokenizer", "Tokenizer", "tokenize_file", "shards_dir_for", "TokenShards"]
