"""Token data: ``train.bin`` / ``val.bin`` memmaps with a ``meta.json`` beside them.

Training batches are a pure function of (seed, step): the global batch of a step is drawn
from a generator seeded with both, then split into (micro-step, rank) slices. A resumed run
therefore sees exactly the batches the original run would have seen, and the same global
batch is trained whatever the number of processes.

Evaluation uses a FIXED list of held-out windows, evenly spaced over ``val.bin``: every model
compared (raw, EMA, SWA, LAWA, any step) is scored on the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """Missing or unusable token data; the message names the file and the fix."""


def data_meta(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise DataError(
            f"{path} not found: prepare the data first, e.g. `python data/shakespeare/prepare.py` "
            "or `python data/openwebtext/prepare.py`"
        )
    meta = json.loads(path.read_text())
    for key in ("vocab_size", "dtype", "tokenizer"):
        if key not in meta:
            raise DataError(f"{path}: missing {key!r}")
    return meta


def open_tokens(data_dir: str | os.PathLike, split: str, min_tokens: int) -> np.memmap:
    """The memmapped tokens of ``split``; errors if the file holds fewer than ``min_tokens``."""
    meta = data_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise DataError(f"{path} not found: re-run the prepare script of {data_dir}")
    itemsize = np.dtype(meta["dtype"]).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole number of {meta['dtype']} tokens (truncated?)")
    if size // itemsize < min_tokens:
        raise DataError(
            f"{path} holds {size // itemsize} tokens, fewer than the {min_tokens} one block needs; "
            "use more data or a smaller block_size"
        )
    return np.memmap(path, dtype=meta["dtype"], mode="r")


@dataclass
class BatchSampler:
    """Stateless training batches: ``batch(step, micro, rank)`` is the same in every run."""

    tokens: np.memmap
    block_size: int
    micro_batch_size: int
    sequences_per_step: int
    world_size: int
    seed: int

    def offsets(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.block_size, size=self.sequences_per_step)

    def batch(self, step: int, micro: int, rank: int) -> torch.Tensor:
        """One micro-batch of one rank: (micro_batch_size, block_size + 1) int64 tokens on the
        CPU, in one contiguous block (one pinned copy to a GPU); inputs are ``[:, :-1]``,
        targets ``[:, 1:]``."""
        first = (micro * self.world_size + rank) * self.micro_batch_size
        offs = self.offsets(step)[first : first + self.micro_batch_size]
        return torch.from_numpy(np.stack([self.tokens[o : o + self.block_size + 1] for o in offs]).astype(np.int64))


def eval_offsets(n_tokens: int, block_size: int, n_windows: int) -> np.ndarray:
    """Start offsets of ``n_windows`` windows of block_size+1 tokens spread evenly over the data."""
    last = n_tokens - block_size - 1
    return np.linspace(0, last, num=n_windows).round().astype(np.int64)


def eval_windows(tokens: np.memmap, block_size: int, n_windows: int) -> torch.Tensor:
    """The fixed held-out windows, shape (n_windows, block_size + 1), int64."""
    offs = eval_offsets(len(tokens), block_size, n_windows)
    return torch.from_numpy(np.stack([tokens[o : o + block_size + 1] for o in offs]).astype(np.int64))


def fingerprint(windows: torch.Tensor) -> str:
    """A short hash of the evaluation tokens, logged so runs compared can be checked to
    have been scored on the same tokens."""
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
