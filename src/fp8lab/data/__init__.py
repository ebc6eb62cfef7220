"""Packed token data: shard format, prepared datasets, `prepare`, the embedded corpus and the loader."""

from fp8lab.data.corpus import (
    BYTE_EOS_ID,
    BYTE_VOCAB_SIZE,
    byte_detokenize,
    byte_tokenize,
    default_cache_dir,
    embedded_dataset,
)
from fp8lab.data.dataset import Dataset, DatasetExistsError, DatasetWriter, Split, open_dataset, write_dataset
from fp8lab.data.loader import IGNORE_INDEX, TokenLoader, eval_batches
from fp8lab.data.prepare import PrepareReport, prepare_dataset
from fp8lab.data.shards import Shard, open_shard, sha256_file, write_shard

__all__ = [
    "BYTE_EOS_ID",
    "BYTE_VOCAB_SIZE",
    "Dataset",
    "DatasetExistsError",
    "DatasetWriter",
    "IGNORE_INDEX",
    "PrepareReport",
    "Shard",
    "Split",
    "TokenLoader",
    "byte_detokenize",
    "byte_tokenize",
    "default_cache_dir",
    "embedded_dataset",
    "eval_batches",
    "open_dataset",
    "open_shard",
    "prepare_dataset",
    "sha256_file",
    "write_dataset",
    "write_shard",
]
