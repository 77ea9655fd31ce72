"""OpenWebText (about 9B GPT-2 tokens) for the paper's GPT-2 runs, the nanoGPT way:
Hugging Face ``datasets`` + GPT-2 BPE (tiktoken), tokenized with several processes and
written to uint16 memmaps ``train.bin`` (~17 GB) and ``val.bin`` (~8.5 MB) beside this file.

    python data/openwebtext/prepare.py [--num_proc=8] [--source=openwebtext]

Needs the network once (about 54 GB of download into the datasets cache). Interrupted runs
resume: datasets caches finished tokenization, finished splits are kept, each .bin appears
only when complete, and meta.json is written last. ``--source`` also takes local text files
(``--source=/path/*.txt``) for a corpus of your own.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `ewa`

from ewa.tools.prepare import split_done, token_dtype, tokenize_example, write_meta, write_tokens  # noqa: E402
from ewa.tools.tokenizer import get_tokenizer  # noqa: E402

HERE = Path(__file__).resolve().parent
VAL_FRACTION = 0.0005  # nanoGPT's split: ~4M validation tokens
SEED = 2357


def load_source(source: str, num_proc: int):
    """A ``datasets.DatasetDict`` with "train" and "val" splits of documents."""
    from datasets import load_dataset

    if os.path.exists(source) or any(ch in source for ch in "*?["):
        files = sorted(glob.glob(source)) if not os.path.isdir(source) else sorted(glob.glob(f"{source}/*.txt"))
        if not files:
            sys.exit(f"--source={source}: no text files found")
        dataset = load_dataset("text", data_files={"train": files}, sample_by="document", num_proc=num_proc)
    else:
        dataset = load_dataset(source, num_proc=num_proc, trust_remote_code=True)
    split = dataset["train"].train_test_split(test_size=VAL_FRACTION, seed=SEED, shuffle=True)
    split["val"] = split.pop("test")
    return split


def tokenize(splits, tokenizer: str, num_proc: int):
    return splits.map(
        tokenize_example,
        fn_kwargs={"tokenizer": tokenizer},
        remove_columns=["text"],
        desc="tokenizing",
        num_proc=num_proc,
    )


def write_split(dataset, path: Path, dtype: str, shards: int = 1024) -> int:
    """Concatenate every document's ids into ``path``; returns the number of tokens."""
    total = int(np.sum(dataset["len"], dtype=np.uint64))
    shards = max(1, min(shards, len(dataset)))

    def chunks():
        for i in range(shards):
            shard = dataset.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")
            yield np.concatenate(shard["ids"]).astype(dtype) if len(shard) else np.empty(0, dtype)

    if not split_done(path.parent, path.stem, total, dtype):
        write_tokens(path, chunks(), total, dtype, desc=f"writing {path.name}")
    return total


def prepare(source: str, out_dir: Path, tokenizer: str = "gpt2", num_proc: int = 8) -> dict[str, int]:
    dtype = token_dtype(get_tokenizer(tokenizer).vocab_size)
    tokenized = tokenize(load_source(source, num_proc), tokenizer, num_proc)
    counts = {split: write_split(ds, out_dir / f"{split}.bin", dtype) for split, ds in tokenized.items()}
    write_meta(out_dir, tokenizer, counts, source=source)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="openwebtext", help="a hub dataset id, or local text files")
    parser.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "bytes"])
    parser.add_argument("--out_dir", default=str(HERE))
    args = parser.parse_args()
    counts = prepare(args.source, Path(args.out_dir), args.tokenizer, args.num_proc)
    print(", ".join(f"{k}: {v:,} tokens" for k, v in counts.items()))


if __name__ == "__main__":
    main()
