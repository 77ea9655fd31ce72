import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ewa.engine.data import BatchSampler, DataError, data_meta, eval_offsets, eval_windows, fingerprint, open_tokens
from ewa.tools.prepare import prepare_texts, write_tokens
from ewa.tools.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def sampler(tokens, world_size=1, seed=0) -> BatchSampler:
    return BatchSampler(tokens, block_size=8, micro_batch_size=2, sequences_per_step=8, world_size=world_size, seed=seed)


def test_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = sampler(tokens), sampler(tokens)
    assert torch.equal(a.batch(5, 1, 0), b.batch(5, 1, 0))
    assert not torch.equal(a.batch(5, 1, 0), a.batch(6, 1, 0))
    rows = a.batch(3, 0, 0)
    assert rows.shape == (2, 9) and rows.is_contiguous()
    start = int(rows[0, 0])  # the tokens are 0, 1, 2, ...: a row is a run of consecutive tokens
    assert torch.equal(rows[0], torch.arange(start, start + 9))


def test_global_batch_is_the_same_for_any_world_size():
    tokens = np.arange(5000, dtype=np.uint16)

    def global_batch(world):
        s = sampler(tokens, world_size=world)
        accum = 8 // (2 * world)
        rows = [s.batch(7, m, r) for m in range(accum) for r in range(world)]
        return torch.cat(rows).sort(dim=0).values

    assert torch.equal(global_batch(1), global_batch(2))
    assert torch.equal(global_batch(1), global_batch(4))


def test_eval_windows_are_fixed_and_cover_the_split():
    tokens = np.arange(10_000, dtype=np.uint16)
    offs = eval_offsets(len(tokens), 64, 20)
    assert offs[0] == 0 and offs[-1] == 10_000 - 65
    w = eval_windows(tokens, 64, 20)
    assert w.shape == (20, 65) and torch.equal(w[3], torch.arange(offs[3], offs[3] + 65))
    assert fingerprint(w) == fingerprint(eval_windows(tokens, 64, 20))
    assert fingerprint(w) != fingerprint(eval_windows(tokens, 64, 21))


def test_missing_or_small_data_is_a_clear_error(tmp_path, corpus):
    with pytest.raises(DataError, match="meta.json not found: prepare the data first"):
        data_meta(tmp_path)
    prepare_texts(tmp_path, {"train": corpus["train"][:5000], "val": "tiny"}, "bytes", source="test")
    with pytest.raises(DataError, match=r"val.bin holds 4 tokens, fewer than the 65"):
        open_tokens(tmp_path, "val", 65)
    (tmp_path / "train.bin").write_bytes(b"abc")
    with pytest.raises(DataError, match="not a whole number"):
        open_tokens(tmp_path, "train", 2)


def test_prepare_writes_bins_and_meta(tmp_path, corpus):
    prepare_texts(tmp_path, {"train": "hello world", "val": "héllo"}, "bytes", source="test")
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["vocab_size"] == 256 and meta["tokens"] == {"train": 11, "val": 6}
    val = np.memmap(tmp_path / "val.bin", dtype=meta["dtype"], mode="r")
    assert bytes(val.astype(np.uint8)).decode() == "héllo"
    assert not list(tmp_path.glob(".*tmp*"))  # no temporaries left behind


def test_write_tokens_keeps_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "train.bin"
    write_tokens(path, [np.arange(4, dtype=np.uint16)], 4, "uint16")

    def failing():
        yield np.arange(2, dtype=np.uint16)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_tokens(path, failing(), 4, "uint16")
    assert np.array_equal(np.fromfile(path, dtype=np.uint16), np.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["train.bin"]


def test_gpt2_tokenizer_works_offline():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's ids
    assert tok.decode(tok.encode("LAWA averages weights.")) == "LAWA averages weights."
    assert tok.enc.n_vocab == 50257


def test_shakespeare_markup_is_stripped():
    ns = runpy.run_path(str(ROOT / "data" / "shakespeare" / "prepare.py"))
    md = "# Play\n\n## ACT I\n\n_Enter KING,\nand others_\n\n**KING**  \nO, \\[aside\\] my lord--  \n_Exit_\n\n**QUEEN**  \nAy.\n"
    assert ns["play_to_text"](md) == "KING:\nO, [aside] my lord--\n\nQUEEN:\nAy.\n\n"


def test_openwebtext_prepare_on_local_text_with_two_processes(tmp_path):
    # run as a user does: datasets forks worker processes, which must not inherit this test
    # process's threads (torch's thread pools are running by now)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"doc{i}.txt").write_text(f"Document number {i}. " * 20)
    cmd = [sys.executable, "data/openwebtext/prepare.py", f"--source={src}", f"--out_dir={tmp_path / 'out'}", "--num_proc=2"]
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    counts = meta["tokens"]
    assert meta["tokenizer"] == "gpt2" and meta["dtype"] == "uint16" and f"train: {counts['train']:,} tokens" in proc.stdout
    train = np.memmap(tmp_path / "out" / "train.bin", dtype=np.uint16, mode="r")
    assert len(train) == counts["train"] and counts["val"] > 0
    assert (train == 50256).sum() == 29  # one end-of-text token per training document
    text = get_tokenizer("gpt2").decode([int(t) for t in train[: list(train).index(50256)]])
    assert text.startswith("Document number") and text.endswith(". ")
