"""The tokenize-and-write core shared by the ``data/*/prepare.py`` scripts.

Each split is written to a temporary memmap and renamed into place when complete, and
``meta.json`` is written last: a folder with a meta.json holds complete data, and an
interrupted preparation restarts only the splits that are missing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ewa.files import atomic_write, atomic_write_text
from ewa.tools.tokenizer import get_tokenizer


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def tokenize_example(example: dict, tokenizer: str = "gpt2") -> dict:
    """``datasets.map`` function: ids of one document, ended with the end-of-text token
    when the tokenizer has one (module-level so worker processes can pickle it)."""
    tok = get_tokenizer(tokenizer)
    ids = tok.encode(example["text"])
    if tok.eot is not None:
        ids.append(tok.eot)
    return {"ids": ids, "len": len(ids)}


def write_tokens(path: str | Path, chunks: Iterable[np.ndarray], total: int, dtype: str, desc: str = "") -> None:
    """Write ``total`` tokens arriving in ``chunks`` to ``path`` atomically, with a progress bar."""

    def write(tmp: Path) -> None:
        out = np.memmap(tmp, dtype=dtype, mode="w+", shape=(total,))
        pos = 0
        with tqdm(total=total, desc=desc or Path(path).name, unit="tok", unit_scale=True) as bar:
            for chunk in chunks:
                out[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
                bar.update(len(chunk))
        if pos != total:
            raise RuntimeError(f"{path}: expected {total} tokens, got {pos}")
        out.flush()
        del out

    atomic_write(path, write)


def split_done(data_dir: str | Path, split: str, n_tokens: int, dtype: str) -> bool:
    path = Path(data_dir) / f"{split}.bin"
    return path.exists() and path.stat().st_size == n_tokens * np.dtype(dtype).itemsize


def write_meta(data_dir: str | Path, tokenizer: str, counts: dict[str, int], source: str) -> None:
    vocab_size = get_tokenizer(tokenizer).vocab_size
    meta = {"tokenizer": tokenizer, "vocab_size": vocab_size, "dtype": token_dtype(vocab_size), "tokens": counts,
            "source": source}
    atomic_write_text(Path(data_dir) / "meta.json", json.dumps(meta, indent=2) + "\n")


def prepare_texts(data_dir: str | Path, splits: dict[str, str], tokenizer: str, source: str) -> None:
    """Tokenize in-memory texts (a small corpus) into ``<split>.bin`` files and meta.json."""
    tok = get_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    counts = {}
    for split, text in splits.items():
        ids = np.array(tok.encode(text), dtype=dtype)
        write_tokens(Path(data_dir) / f"{split}.bin", [ids], len(ids), dtype, desc=split)
        counts[split] = len(ids)
    write_meta(data_dir, tokenizer, counts, source)
