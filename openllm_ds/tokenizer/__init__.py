"""Stage 2: SentencePiece tokenizer, Hugging Face tokenizer files, corpus -> binary token shards."""

from openllm_ds.tokenizer.corpus import shards_dir_for, tokenize_corpus, tokenize_each
from openllm_ds.tokenizer.shards import TokenShards
from openllm_ds.tokenizer.tokenizer import Tokenizer, load_tokenizer
from openllm_ds.tokenizer.train import train_tokenizer

__all__ = ["train_tokenizer", "load_tokenizer", "Tokenizer", "tokenize_corpus", "tokenize_each", "shards_dir_for", "TokenShards"]
