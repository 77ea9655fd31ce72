"""GPU check: every GPU path of the trainer on one GPU, in a few minutes, with its figures.

GPT-2 small's shapes (configs/small.py: 124M parameters, 1024 tokens per sequence, vocabulary
50,304), bf16 autocast, ``torch.compile``, fused AdamW, each run under
``torchrun --nproc_per_node=1`` (so DDP and FSDP2 wrap the model as on a node):

1. ``ddp-base``: no averaging, no snapshots: the reference ms/step;
2. ``ddp``: EMA, SWA (from 40% of the steps), online LAWA, a snapshot of raw, EMA and SWA
   every 40 steps in the background, resume checkpoints; stopped by SIGTERM past halfway,
   then resumed to the end;
3. ``fsdp``: the same under FSDP2;
4. ``ddp-hostavg``: as ``ddp`` with the averages in pinned host memory, updated by a
   background thread (``averaging_device=cpu``; with one rank its share is the whole model).

For each it prints ms/step and MFU (training time only; the first window of each process,
which compiles, left out), the averaging-plus-checkpoint overhead against ``ddp-base`` (the
extra training-thread time per step, checkpoint seconds included), the eval and checkpoint
seconds, and the peak GPU memory; and checks that each run finished, resumed, and wrote
snapshots and resume checkpoints that agree with each other value for value.

    python bench/gpu_check.py --data_dir=data/shakespeare        # ~7 min on an H100
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import ROOT  # noqa: E402

from ewa.engine.logger import read_metrics  # noqa: E402
from ewa.files import Weights, list_checkpoints, read_resume  # noqa: E402

AVERAGING = [
    "--ema=True",
    "--swa_start=0.4",
    "--swa_every=5",
    "--swa_anneal_steps=20",
    "--lawa_online=True",
    "--lawa_k=3",
    "--lawa_nu=20",
    "--ckpt_interval=40",
]
RUNS = {
    "ddp-base": ["--parallel=ddp", "--ema=False", "--swa=False", "--ckpt_interval=100000"],
    "ddp": ["--parallel=ddp", *AVERAGING],
    "fsdp": ["--parallel=fsdp", *AVERAGING],
    "ddp-hostavg": ["--parallel=ddp", "--averaging_device=cpu", *AVERAGING],
}


def train(out: Path, args: list[str], stop_at: int | None) -> float:
    """Run train_swa.py under torchrun; with ``stop_at``, SIGTERM the rank once that step is
    logged, then resume. Returns the wall seconds."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        "train_swa.py",
        *args,
        f"--out_dir={out}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print("   ", line, end="")
        if stop_at is not None and line.startswith(f"step {stop_at:>6}/"):
            for pid in workers(proc.pid):
                os.kill(pid, signal.SIGTERM)
    if proc.wait() != 0:
        raise SystemExit(f"{out.name}: training failed")
    if stop_at is not None:
        return train(out, [*args, "--init_from=resume"], None) + time.perf_counter() - start
    return time.perf_counter() - start


def workers(pid: int) -> list[int]:
    """The processes torchrun started (its children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def summary(run_dir: Path) -> dict:
    """Figures of a run from its metrics.jsonl, weighted by the steps of each train record,
    without the first record of each process (it compiles)."""
    windows, last, first = [], 0, False  # (record, steps it covers)
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if r["kind"] == "start":
            last, first = r["step"], True
        elif r["kind"] == "train":
            if not first:
                windows.append((r, r["step"] - last))
            last, first = r["step"], False
    steps = sum(n for _, n in windows)
    mean = lambda key: sum(r.get(key, 0) * n for r, n in windows) / steps  # noqa: E731
    return {
        "ms_per_step": mean("ms_per_step"),
        "mfu": mean("mfu"),
        "ckpt_s_per_step": sum(r["ckpt_s"] for r, _ in windows) / steps,
        "eval_s": sum(r["eval_s"] for r, _ in windows),
        "peak_mem_gib": max(r.get("peak_mem_gib", 0) for r, _ in windows),
        "tok_per_s": mean("tok_per_s"),
    }


def check_files(run_dir: Path, max_steps: int) -> None:
    """The last resume checkpoint and the last snapshots, written apart from the same GPU
    tensors through pinned buffers and side streams, hold the same values: the model, the
    EMA, the SWA mean and LAWA's newest slot."""
    resume = list_checkpoints(run_dir / "resume")
    state = read_resume(resume[max(resume)])
    assert state["step"] == max_steps, state["step"]
    lawa = state["averagers"]["lawa"]
    saved = {
        "raw": state["model"],
        "ema": state["averagers"]["ema"]["tensors"]["weights"],
        "swa": state["averagers"]["swa"]["tensors"]["weights"],
        "lawa": lawa["tensors"][f"slot{lawa['slot_steps'].index(max_steps)}"],
    }
    for kind, tensors in saved.items():
        snaps = list_checkpoints(run_dir / "snapshots" / ("raw" if kind == "lawa" else kind))
        assert max(snaps) == max_steps, (kind, sorted(snaps))
        snapshot = Weights(snaps[max_steps])
        differ = [name for name, t in tensors.items() if not torch.equal(snapshot.get(name), t)]
        assert not differ, f"{kind}: the resume checkpoint and the snapshot of step {max_steps} differ in {differ[:3]}"
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    assert {"raw", "ema", "swa", "lawa"} <= evals[-1].keys(), evals[-1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data/shakespeare")
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--tokens_per_step", type=int, default=65536, help="4 micro-steps of 16 x 1024 tokens")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: the GPU check runs on a GPU")
    common = [
        "configs/small.py",
        f"--data_dir={args.data_dir}",
        f"--max_steps={args.steps}",
        f"--tokens_per_step={args.tokens_per_step}",
        "--micro_batch_size=16",
        "--warmup_steps=20",
        "--log_interval=20",
        f"--eval_interval={args.steps // 2}",
        "--eval_tokens=65536",
        f"--resume_interval={args.steps // 2}",
        "--dtype=bfloat16",
        "--compile=True",
        "--wandb_log=False",
    ]
    results = {}
    with tempfile.TemporaryDirectory(prefix="ewa-gpu-check-") as tmp:
        for name in args.runs:
            print(f"== {name}", flush=True)
            stop = None if name.endswith("base") else args.steps // 2 + 20  # a step past the resume checkpoint
            wall = train(Path(tmp) / name, [*common, *RUNS[name]], stop)
            if stop is not None:
                check_files(Path(tmp) / name, args.steps)
            results[name] = summary(Path(tmp) / name) | {"wall_s": wall, "resumed": stop is not None}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")  # what is done so far
    base = results.get("ddp-base")
    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}, {args.steps} steps of {args.tokens_per_step:,} tokens")
    print(f"{'run':<10} {'ms/step':>8} {'MFU':>6} {'overhead':>9} {'ckpt s/step':>12} {'eval s':>7} {'peak GiB':>9}")
    for name, r in results.items():
        if base:
            per_step = lambda x: x["ms_per_step"] / 1000 + x["ckpt_s_per_step"]  # noqa: E731
            r["overhead"] = per_step(r) / per_step(base) - 1
        print(
            f"{name:<10} {r['ms_per_step']:>8.1f} {100 * r['mfu']:>5.1f}% {100 * r.get('overhead', 0):>8.1f}% "
            f"{r['ckpt_s_per_step']:>12.4f} {r['eval_s']:>7.1f} {r['peak_mem_gib']:>9.1f}"
        )
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "steps": args.steps,
        "tokens_per_step": args.tokens_per_step,
        "runs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
