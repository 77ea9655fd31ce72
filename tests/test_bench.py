"""Smoke test of bench/: every benchmark runs at its smallest size and writes a JSON file with
the expected keys and sane values. No timing is asserted; counts and sizes, which do not
depend on the machine, are."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

TINY_TRAINING = [
    "--threads=1",
    "--n_layer=1",
    "--n_head=2",
    "--n_embd=32",
    "--block_size=32",
    "--tokens_per_step=256",
    "--micro_batch_size=4",
    "--eval_tokens=1024",
]


def run_bench(name: str, out: Path, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, f"bench/{name}.py", f"--out={out}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["benchmark"] == name and f"wrote {out}" in proc.stdout
    assert {"cpu", "cores", "torch", "device", "device_name"} <= result["machine"].keys()
    assert result["results"] and result["targets"]
    assert all(isinstance(t["holds"], bool) and math.isfinite(t["value"]) for t in result["targets"])
    return result


def positive(*values: float) -> bool:
    return all(v > 0 and math.isfinite(v) for v in values)


def test_train_throughput(tmp_path, data_dir):
    result = run_bench(
        "train_throughput",
        tmp_path / "t.json",
        f"--data_dir={data_dir}",
        *TINY_TRAINING,
        "--steps=1",
        "--warmup=1",
        "--repeats=2",
    )
    rows = {r["loop"]: r for r in result["results"]}
    assert set(rows) == {"nanogpt", "ours"}
    assert all(positive(r["tokens_per_s"], r["ms_per_step"], r["ratio"]) and r["mfu"] is None for r in rows.values())
    assert rows["ours"]["ratio_min"] <= rows["ours"]["ratio"] <= rows["ours"]["ratio_max"]
    assert result["settings"]["grad_accum_steps"] == 2 and result["settings"]["n_layer"] == 1


def test_averaging_overhead(tmp_path, data_dir):
    result = run_bench(
        "averaging_overhead",
        tmp_path / "a.json",
        f"--data_dir={data_dir}",
        *TINY_TRAINING,
        "--lawa_nu=2",
        "--swa_every=2",
        "--steps=4",
        "--warmup=1",
    )
    rows = {r["averaging"]: r for r in result["results"]}
    assert list(rows) == ["none", "ema", "lawa", "swa", "all, background"]
    assert [rows[n]["updates"] for n in ("ema", "lawa", "swa", "all, background")] == [4, 2, 2, 4]
    assert all(positive(r["ms_per_step"], r["overhead"]) for n, r in rows.items() if n != "none")
    assert [t["name"] for t in result["targets"]] == [f"{n} overhead" for n in ("ema", "lawa", "swa", "all, background")]


def test_offline_lawa(tmp_path):
    result = run_bench(
        "offline_lawa",
        tmp_path / "l.json",
        "--threads=1",
        "--m=5",
        "--interval=1",
        "--ks",
        "2",
        "3",
        "--n_layer=1",
        "--n_embd=32",
        "--vocab_size=64",
        "--block_size=32",
        "--repeats=1",
    )
    rows = {(r["variant"], r["k"]): r for r in result["results"]}
    assert set(rows) == {("raw", None), ("read", None), ("naive", 2), ("ours", 2), ("naive", 3), ("ours", 3)}
    snapshot = result["settings"]["snapshot_bytes"]
    assert rows["raw", None]["bytes_read"] == rows["read", None]["bytes_read"] == pytest.approx(5 * snapshot, rel=1e-3)
    assert rows["naive", 3]["bytes_read"] == pytest.approx(3 * 3 * snapshot, rel=1e-3)  # 3 windows of 3
    assert rows["ours", 3]["bytes_read"] < rows["naive", 3]["bytes_read"]
    assert all(r["bytes_vs_distinct"] <= 2 for (v, _), r in rows.items() if v == "ours")
    assert all(positive(r["wall_s"], r["peak_rss"]) for r in rows.values())
    for k in (2, 3):
        assert rows["ours", k]["checksum"] == pytest.approx(rows["naive", k]["checksum"], rel=1e-9)


def test_checkpoint_cost(tmp_path):
    result = run_bench("checkpoint_cost", tmp_path / "c.json", "--threads=1", "--models", "tiny", "--repeats=1")
    rows = {r["checkpoint"]: r for r in result["results"]}
    assert set(rows) == {"nanogpt_full", "snapshot"}
    assert all(positive(r["bytes"], r["write_s"]) for r in rows.values())
    # fp32 weights vs weights + AdamW's two moments: about a third
    assert 0.3 < rows["snapshot"]["size_vs_full"] < 0.36


def test_checkpoint_blocking(tmp_path, data_dir):
    result = run_bench("checkpoint_blocking", tmp_path / "b.json", f"--data_dir={data_dir}", "--config=configs/tiny.py",
                       *TINY_TRAINING, "--repeats=1")
    rows = {(r["checkpoint"], r["mode"]) for r in result["results"]}
    assert rows == {("model", "one copy"), ("snapshot", "synchronous"), ("snapshot", "background"),
                    ("resume", "synchronous"), ("resume", "background")}
    assert all(positive(r["blocked_ms"]) for r in result["results"])
    assert [t["name"] for t in result["targets"]] == ["snapshot background blocking", "resume background blocking"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_memory_plan_counts_each_ranks_share(parallel):
    proc = subprocess.run(
        [sys.executable, "bench/memory_plan.py", "--config=configs/large.py", "--world_size=8", f"--parallel={parallel}",
         "--lawa_online=True", "--lawa_k=5", "--ema_decays=0.99", "--averaging_device=cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    from ewa.engine.config import load_config
    from model import GPT

    with torch.device("meta"):
        model = GPT(load_config(ROOT / "configs" / "large.py", []).model_config(0))
    assert plan["model_bytes"] == 4 * sum(p.numel() for p in model.parameters())
    share = plan["rows"]["EMA"]["host"]
    assert share == pytest.approx(plan["model_bytes"] / 8, rel=0.01)  # rank 0's share: an eighth
    assert plan["rows"]["EMA_0.99"]["host"] == share  # every averager the trainer builds
    assert plan["rows"]["LAWA (k=5)"]["host"] == 5 * share and plan["averaging_bytes_per_rank"] == 7 * share
    assert plan["averaging_host_bytes_per_rank"] - share <= 2.5e9  # the target (one copy per LAWA slot was 15.5 GB)
    # the pinned buffers: one share per snapshot kind (raw and the two EMAs), and the resume state
    assert plan["rows"]["snapshot buffers (pinned)"]["host"] == 3 * share
    assert plan["rows"]["resume staging (pinned)"]["host"] == pytest.approx(
        plan["averaging_bytes_per_rank"] + 3 * plan["model_bytes"] / 8, rel=0.01  # model and AdamW: an eighth
    )
    optimizer = plan["rows"]["optimizer (AdamW)"]["device"]
    assert optimizer == pytest.approx(2 * plan["model_bytes"] / (8 if parallel == "fsdp" else 1), rel=0.01)
