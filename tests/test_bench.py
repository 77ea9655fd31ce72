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
    beside = "step beside the background"  # steps while the host averaging runs, against steps alone
    assert list(rows) == ["none", "ema", "lawa", "swa", "all, background", beside]
    assert [rows[n]["updates"] for n in ("ema", "lawa", "swa", "all, background", beside)] == [4, 2, 2, 2, 2]
    assert all(positive(r["ms_per_step"], r["overhead"]) for n, r in rows.items() if n not in ("none", beside))
    assert positive(rows[beside]["ms_per_step"])
    assert [t["name"] for t in result["targets"]] == [f"{n} overhead" for n in list(rows)[1:]]


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


def test_gpu_check_smoke_runs_every_case_and_reports_failures(tmp_path, data_dir):
    """bench/gpu_check.py --smoke: every case on the CPU through the GPU check's own runner
    (subprocesses under torchrun, SIGTERM and the continued run, check_files, the JSON), with
    one case made to fail (the others still run and pass). Beside it, at the same time, a run
    with one case made to hang: it is killed when the budget runs out, and the next case is
    left "not run: out of time"."""
    from bench.gpu_check import CASE_NAMES

    def start(out: Path, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "bench/gpu_check.py", "--smoke", f"--out_dir={out}", f"--data_dir={data_dir}", *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    every = start(tmp_path / "all", "--inject", "mb32=fail")
    hang = start(tmp_path / "hang", "--cases", "staging", "nanogpt", "--inject", "staging=hang", "--budget_s=15")
    hang_log, _ = hang.communicate(timeout=120)
    log, _ = every.communicate(timeout=300)

    result = json.loads((tmp_path / "all" / "gpu_check.json").read_text())
    cases = result["cases"]
    assert every.returncode == 1, log[-3000:]  # one case failed
    assert result["smoke"] and not result["passed"] and list(cases) == CASE_NAMES
    statuses = {n: c["status"] for n, c in cases.items()}
    assert statuses == {n: "failed" if n == "mb32" else "passed" for n in CASE_NAMES}, log[-3000:]
    failed = cases["mb32"]
    assert failed["exit_status"] == [1] and failed["commands"][0].endswith("--no_such_setting=1")
    assert any("unknown config key 'no_such_setting'" in line for line in failed["stderr_tail"])
    assert "mb32: failed (exit status 1)" in log and "no_such_setting" in log.split("mb32: failed")[-1]
    # the true baseline: train_small.py without averaging, nothing written inside the run
    base = cases["base"]
    assert "train_small.py" in base["commands"][0] and "train_swa.py" not in base["commands"][0]
    assert all(f in base["commands"][0] for f in ("--ema=False", "--swa=False", "--lawa_online=False"))
    assert base["figures"]["files"] == {"resume": [20], "snapshots": {"raw": [0, 20]}}
    assert base["figures"]["evals"] == [0, 20]
    for name in ("ddp", "fsdp", "hostavg"):  # stopped past halfway, continued by the same command, files checked
        c = cases[name]
        assert c["exit_status"] == [0, 0] and c["commands"][0] == c["commands"][1]
        assert "--init_from=auto" in c["commands"][0]
        assert 30 < c["figures"]["stopped_at"] < 60 and c["figures"]["processes"] == 2
        assert isinstance(c["figures"]["overhead_pct"], float)
        assert not (tmp_path / "all" / name / "run" / "resume").exists()  # the weights are removed once checked
    for name in ("base", "ddp", "fsdp", "mb64", "flash", "cudnn", "hostavg"):
        assert positive(cases[name]["figures"]["ms_per_step"], cases[name]["figures"]["tok_per_s"]), name
    assert "--attention=math" in cases["cudnn"]["commands"][0]  # no cuDNN on a CPU
    assert result["settings"]["smoke_attention"] == {"cudnn": "math"}
    staging = cases["staging"]["figures"]["methods"]
    assert set(staging) == {"background_copy", "dcp_default_stager", "sync_to_cpu"}
    assert all(m["equal"] and positive(m["complete_ms"], m["gb_per_s"]) for m in staging.values())
    assert set(cases["nanogpt"]["figures"]["loops"]) == {"nanogpt", "ours"}
    assert "aten::" in (tmp_path / "all" / "profile.txt").read_text() and cases["profile"]["figures"]["top"]
    assert len(result["commands"]) == len(CASE_NAMES) + 3  # three cases ran twice
    assert result["comparison"]["overhead_pct"]["base"] == 0 and "mb32" not in result["comparison"]["overhead_pct"]
    assert [t["holds"] for t in result["targets"]][1] is None  # MFU: not measured on a CPU
    assert all(t["holds"] in (True, False, None) for t in result["targets"]) and result["machine"]["torch"]

    hung = json.loads((tmp_path / "hang" / "gpu_check.json").read_text())
    assert hang.returncode == 1, hang_log[-3000:]
    statuses = {n: c["status"] for n, c in hung["cases"].items()}
    assert statuses == {"staging": "timed out", "nanogpt": "not run: out of time"}
    assert hung["cases"]["staging"]["exit_status"] == [-9] and hung["wall_s"] < 20
