"""Faults injected into real runs: kills, preemption, full disks, NaNs, failing ranks, bad input."""

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, resume_state, tiny_config, write_config_file

import ewa.engine.checkpointer
import ewa.files

from ewa.engine.logger import read_metrics
from ewa.engine.runtime import init_runtime
from ewa.engine.logger import NonFiniteLoss
from ewa.engine.trainer import Trainer, run
from ewa.files import CheckpointError, Weights, list_checkpoints, read_resume

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}

# Runs train_small.py, but the KILL_AT_WRITE-th checkpoint write dies half-way: the
# temporary file is cut short and the process SIGKILLs itself before the rename.
DIES_WHILE_WRITING = """
import os, runpy, signal, sys
import ewa.files as ck
calls, real = [0], ck.atomic_write
def atomic_write(path, write):
    calls[0] += 1
    if calls[0] != int(os.environ["KILL_AT_WRITE"]):
        return real(path, write)
    def dying(tmp):
        write(tmp)
        with open(tmp, "r+b") as f:
            f.truncate(os.path.getsize(tmp) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, dying)
ck.atomic_write = atomic_write
sys.argv = ["train_small.py", *sys.argv[1:]]
runpy.run_path("train_small.py", run_name="__main__")
"""


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = resume_state(run_dir)
    return {**state["model"], **{f"ema.{k}": v for k, v in state["averagers"]["ema"]["tensors"]["weights"].items()}}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def assert_every_file_loads(run_dir: Path) -> None:
    for kind in ("raw", "ema"):
        folder = run_dir / "snapshots" / kind
        for path in list_checkpoints(folder).values() if folder.is_dir() else []:
            Weights(path).get("transformer.wte.weight")
    if (run_dir / "resume").is_dir():
        for path in list_checkpoints(run_dir / "resume").values():
            read_resume(path)


def start(config_file: Path, *args: str, script: str = "train_small.py") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, script, str(config_file), *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def resume_args(run_dir: Path) -> list[str]:
    has_resume = (run_dir / "resume").is_dir() and list_checkpoints(run_dir / "resume")
    return ["--init_from=resume"] if has_resume else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """An uninterrupted run, and the config file of the same run elsewhere."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(tmp / "whole", data_dir, max_steps=60, ckpt_interval=2, resume_interval=4, keep_resume=2, log_interval=2)
    run(cfg)
    return Path(cfg.out_dir), write_config_file(tmp / "cfg.py", cfg.replace(out_dir=str(tmp / "killed")))


def test_sigkill_at_random_moments_then_resume_is_bit_exact(reference):
    whole, config_file = reference
    killed = Path(config_file.parent / "killed")
    rng = random.Random(0)
    for _ in range(3):
        proc = start(config_file, *resume_args(killed))
        time.sleep(rng.uniform(2.5, 4.0))  # past the imports, somewhere in training
        proc.kill()
        proc.wait()
        assert_every_file_loads(killed)
    proc = start(config_file, *resume_args(killed))
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    assert_same_weights(whole, killed)
    steps = [(r["kind"], r["step"]) for r in read_metrics(killed / "metrics.jsonl") if r["kind"] != "start"]
    assert len(steps) == len(set(steps))


@pytest.mark.parametrize("kill_at", [3, 8])  # a snapshot write, and a resume checkpoint write
def test_killed_while_writing_a_checkpoint(reference, tmp_path, kill_at):
    whole, config_file = reference
    config_file = Path(str(config_file))
    out = tmp_path / "run"
    script = tmp_path / "dies.py"
    script.write_text(DIES_WHILE_WRITING)
    env = {**ENV, "KILL_AT_WRITE": str(kill_at)}
    proc = subprocess.run([sys.executable, str(script), str(config_file), f"--out_dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert list(out.glob("*/**/.*.tmp*")), "the interrupted write should have left its temporary file"
    assert_every_file_loads(out)  # the half-written file never took a checkpoint's name
    proc = start(config_file, f"--out_dir={out}", *resume_args(out))
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    assert not list(out.glob("*/**/.*.tmp*"))
    assert_same_weights(whole, out)


def test_sigterm_saves_a_resume_checkpoint_and_exits_cleanly(reference, tmp_path):
    whole, config_file = reference
    out = tmp_path / "run"
    proc = start(config_file, f"--out_dir={out}")
    for line in proc.stdout:
        if line.startswith("step     10/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0
    assert "stopped by a signal at step" in rest and "--init_from=auto" in rest
    stopped_at = int(rest.split("stopped by a signal at step ")[1].split(";")[0])
    assert stopped_at in list_checkpoints(out / "resume") and stopped_at < 60
    proc = start(config_file, f"--out_dir={out}", "--init_from=resume")
    assert proc.wait(timeout=300) == 0
    assert_same_weights(whole, out)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failing_disk_stops_the_run_and_keeps_the_last_resume_checkpoint(tmp_path, data_dir, monkeypatch, code):
    real, calls = ewa.files.write_safetensors, [0]

    def failing(path, tensors, metadata):
        calls[0] += 1
        if calls[0] > 12:  # the snapshots of steps 0..25 (two kinds) succeed
            raise OSError(code, os.strerror(code))
        return real(path, tensors, metadata)

    monkeypatch.setattr(ewa.files, "write_safetensors", failing)
    cfg = tiny_config(tmp_path / "run", data_dir)
    with pytest.raises(CheckpointError, match=rf"could not write .*step_00000030.safetensors: {os.strerror(code)}; "
                                              r"the last good resume checkpoint is .*step_000000[23]0$"):
        run(cfg)
    assert list(list_checkpoints(tmp_path / "run" / "resume"))[:2] == [10, 20]
    assert not list((tmp_path / "run").glob("*/**/.*.tmp*"))
    assert_every_file_loads(tmp_path / "run")


def test_a_failing_resume_write_stops_the_run_at_the_next_step(tmp_path, data_dir, monkeypatch):
    class FailsAt20(ewa.engine.checkpointer.FileSystemWriter):
        def write_data(self, plan, planner):
            if "step_00000020" in str(self.path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write_data(plan, planner)

    monkeypatch.setattr(ewa.engine.checkpointer, "FileSystemWriter", FailsAt20)
    with pytest.raises(CheckpointError, match=r"could not write the resume checkpoint .*\.step_00000020.tmp: .*"
                                              r"No space left on device.*the last good resume checkpoint is .*step_00000010$"):
        run(tiny_config(tmp_path / "run", data_dir))
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert max(r["step"] for r in metrics) < 30  # stopped within a few steps
    assert list(list_checkpoints(tmp_path / "run" / "resume")) == [10]


class PoisonedAt12(Trainer):
    """A weight becomes NaN during step 12 (as after an overflow), so losses from step 13 on are NaN."""

    def train_step(self):
        loss = super().train_step()
        if self.step == 12:
            with torch.no_grad():
                self.params[0][0, 0] = float("nan")
        return loss


class NaNBatchAt7(Trainer):
    """Step 7's batch yields a NaN loss, without harming the weights."""

    def train_step(self):
        if self.step == 6:
            real = self.wrapped.train
            self.wrapped.train = lambda x, y: (None, real(x, y)[1] * float("nan"))
            try:
                return super().train_step()
            finally:
                self.wrapped.train = real
        return super().train_step()


def test_nan_loss_stops_the_run_naming_the_step(tmp_path, data_dir):
    cfg = tiny_config(tmp_path / "run", data_dir)
    with pytest.raises(NonFiniteLoss, match=r"at step 13; stopped without saving \(the last resume checkpoint is step 10\)"):
        PoisonedAt12(cfg, init_runtime("cpu", "float32")).fit()
    assert list(list_checkpoints(tmp_path / "run" / "resume")) == [10]
    assert max(list_checkpoints(tmp_path / "run" / "snapshots" / "raw")) == 10
    assert_every_file_loads(tmp_path / "run")


def test_skip_nonfinite_skips_the_batch_and_goes_on(tmp_path, data_dir, capsys):
    cfg = tiny_config(tmp_path / "run", data_dir, skip_nonfinite=True, max_steps=20)
    last = NaNBatchAt7(cfg, init_runtime("cpu", "float32")).fit()
    assert "non-finite loss at step 7: batch skipped" in capsys.readouterr().err
    assert last["raw"] == last["raw"] and max(list_checkpoints(tmp_path / "run" / "resume")) == 20


def test_retention_keeps_what_a_lawa_window_needs(tmp_path, data_dir):
    cfg = tiny_config(tmp_path / "run", data_dir, max_snapshots=2, lawa_k=3, lawa_nu=10, keep_resume=1)
    run(cfg)
    assert list(list_checkpoints(tmp_path / "run" / "snapshots" / "raw")) == [20, 25, 30, 35, 40]
    assert list(list_checkpoints(tmp_path / "run" / "snapshots" / "ema")) == [35, 40]
    assert list(list_checkpoints(tmp_path / "run" / "resume")) == [30, 40]  # the latest, and the SWA start


def test_a_damaged_latest_resume_checkpoint_falls_back_to_the_previous(tmp_path, data_dir, capsys):
    cfg = tiny_config(tmp_path / "run", data_dir, max_steps=20)
    run(cfg)
    latest = list_checkpoints(tmp_path / "run" / "resume")[20]
    (data,) = latest.glob("*.distcp")
    data.write_bytes(data.read_bytes()[:1000])
    run(cfg.replace(init_from="resume", max_steps=30))
    assert "warning: skipping" in capsys.readouterr().err
    evals = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals == [0, 10, 20, 30]


FAILING_RANK = """
import os, runpy, sys
from ewa.engine.trainer import Trainer
real = Trainer.train_step
def train_step(self):
    if self.rt.rank == 1 and self.step == 5:
        raise RuntimeError("rank 1 fails")
    return real(self)
Trainer.train_step = train_step
sys.argv = ["train_small.py", *sys.argv[1:]]
runpy.run_path("train_small.py", run_name="__main__")
"""


def test_a_failing_rank_fails_the_whole_job_promptly(tmp_path, data_dir):
    config_file = write_config_file(tmp_path / "cfg.py", tiny_config(tmp_path / "run", data_dir, max_steps=1000))
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(config_file)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode != 0 and "rank 1 fails" in proc.stderr
    assert time.time() - t0 < 120


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data_dir=/nonexistent"], "error: /nonexistent/meta.json not found: prepare the data first"),
        (["--micro_batch_size=5"], "error: configs/tiny.py: tokens_per_step=4096 must be a multiple of micro_batch_size*block_size=640"),
        (["--n_layers=3"], "error: command line: unknown config key 'n_layers'; did you mean n_layer"),
        (["--max_steps=1.5"], "error: --max_steps=1.5: expected an int"),
        (["--init_from=/nonexistent.pt"], "error: /nonexistent.pt: no such checkpoint file or directory"),
        pytest.param(["--device=cuda"], "error: device=cuda:0 asked for, but no CUDA GPU is visible; use --device=cpu",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")),
    ],
)
def test_bad_input_gives_one_clear_line(args, message, tmp_path, data_dir):
    base = ["configs/tiny.py", f"--out_dir={tmp_path}", f"--data_dir={data_dir}"]  # a later --data_dir wins
    proc = subprocess.run([sys.executable, "train_small.py", *base, *args],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == message or message in proc.stderr
    assert "Traceback" not in proc.stderr
