"""Cluster operation on one machine: two torchrun agents on 127.0.0.1 (``--nnodes=2``) train
the weights of one ``--standalone --nproc_per_node=2`` run; torchrun restarts continue a run;
a failing rank ends the job at once; ranks that see different out_dirs stop; the ranks of an
attempt agree on a fresh store namespace."""

from __future__ import annotations

import datetime
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, resume_state, tiny_config, write_config_file

from ewa.engine.distributed import attempt_namespace

# torchrun sets OMP_NUM_THREADS=1 only with --nproc_per_node > 1: one thread per rank in both
# layouts, else a one-worker agent's 2-thread kernels sum in another order (differences ~1e-7)
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(launch: list[str], config: Path, out_dir: Path, log: Path) -> tuple[subprocess.Popen, Path]:
    """One torchrun agent in the background, its output in ``log`` (a file: no pipe to fill)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "train_small.py", str(config)]
    cmd.append(f"--out_dir={out_dir}")
    with log.open("w") as out:
        return subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT), log


def finish(agents: list[tuple[subprocess.Popen, Path]]) -> None:
    """Wait for every agent; on a failure or a hang, stop the others and show what each printed."""
    try:
        for proc, _ in agents:
            proc.wait(timeout=TIMEOUT)
    finally:
        for proc, _ in agents:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in agents:
        assert proc.returncode == 0, log.read_text()[-3000:]


def test_two_agents_train_the_weights_of_one_standalone_run(tmp_path, data_dir):
    cfg = tiny_config(tmp_path / "run", data_dir)  # 40 steps, resume checkpoints every 10
    config = write_config_file(tmp_path / "tiny.py", cfg)
    two_nodes, one_node = tmp_path / "two_nodes", tmp_path / "one_node"

    node = ["--nnodes=2", "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    finish([train([*node, f"--node_rank={r}"], config, two_nodes, tmp_path / f"node{r}.log") for r in (0, 1)])
    finish([train(["--standalone", "--nproc_per_node=2"], config, one_node, tmp_path / "standalone.log")])

    a, b = resume_state(two_nodes), resume_state(one_node)
    assert a["step"] == b["step"] == cfg.max_steps
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert (a["model"][k] - b["model"][k]).abs().max().item() == 0.0, k


# train_small.py under a fault: FAULT="<when>:<what>" makes rank 1 of the first attempt fail at
# its start ("start:raise") or at a step ("15:raise", "15:kill": SIGKILL, once the resume
# checkpoints already started are complete on both ranks); RANK1_CWD runs rank 1 in another
# folder, as a node whose out_dir is not the shared one
FAULTY = """
import os, runpy, signal, sys, time
from ewa.engine.trainer import Trainer
from ewa.files import CheckpointError
rank, attempt = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
when, what = os.environ.get("FAULT", "never:none").split(":")
faulty = rank == 1 and attempt == 0
real_init, real_step = Trainer.__init__, Trainer.train_step
def init(self, *args):
    if faulty and when == "start":
        raise CheckpointError("rank 1 fails at its start")
    real_init(self, *args)
def train_step(self):
    if faulty and str(self.step) == when:
        if what == "kill":
            self.background.wait()
            time.sleep(1.0)  # rank 0 renames the checkpoint into place
            os.kill(os.getpid(), signal.SIGKILL)
        raise CheckpointError(f"rank 1 fails at step {self.step}")
    return real_step(self)
Trainer.__init__, Trainer.train_step = init, train_step
if rank == 1 and os.environ.get("RANK1_CWD"):
    os.chdir(os.environ["RANK1_CWD"])
sys.argv = ["train_small.py", *sys.argv[1:]]
runpy.run_path(sys.argv[0].replace("train_small.py", %r), run_name="__main__")
""" % str(ROOT / "train_small.py")


def faulty_run(tmp_path: Path, config: Path, *args: str, restarts: int = 0, **env: str) -> subprocess.CompletedProcess:
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", str(script), str(config), *args]
    return subprocess.run(cmd, env={**ENV, **env}, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir) -> tuple[Path, dict]:
    """A 2-process run of 40 steps with init_from=auto, and its final state."""
    tmp = tmp_path_factory.mktemp("restarts")
    config = write_config_file(tmp / "tiny.py", tiny_config(tmp / "run", data_dir, init_from="auto"))
    proc = faulty_run(tmp, config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, resume_state(tmp / "run")


@pytest.mark.parametrize("kill_at", [15, 26, 33])
def test_a_torchrun_restart_continues_to_the_uninterrupted_weights(uninterrupted, tmp_path, kill_at):
    """A worker SIGKILLed mid-run: torchrun restarts both (on its store, which still holds the
    first attempt's keys), they continue from the last resume checkpoint (init_from=auto) and
    end with the uninterrupted run's weights, bit for bit."""
    config, want = uninterrupted
    proc = faulty_run(tmp_path, config, f"--out_dir={tmp_path / 'run'}", restarts=2, FAULT=f"{kill_at}:kill")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"from step {kill_at // 10 * 10}" in proc.stdout  # the restart resumed, not started over
    got = resume_state(tmp_path / "run")
    assert got["step"] == 40 and all(torch.equal(got["model"][k], v) for k, v in want["model"].items())
    assert all(torch.equal(got["averagers"]["ema"]["tensors"]["weights"][k], v)
               for k, v in want["averagers"]["ema"]["tensors"]["weights"].items())


@pytest.mark.parametrize("fault", ["start:raise", "15:raise"])
def test_a_failing_rank_ends_the_job_at_once_with_its_error_printed_once(uninterrupted, tmp_path, fault):
    config, _ = uninterrupted
    t0 = time.monotonic()
    proc = faulty_run(tmp_path, config, f"--out_dir={tmp_path / 'run'}", FAULT=fault)
    assert proc.returncode != 0 and time.monotonic() - t0 < 60
    out = proc.stdout + proc.stderr
    assert out.count("error (rank 1): rank 1 fails") == 1, out[-3000:]
    assert "Connection closed by peer" not in out, out[-3000:]  # rank 0's error is rank 1's doing: not printed
    assert out.count("Traceback") == 1 and "ChildFailedError" in out  # torchrun's own summary only


def test_ranks_that_see_different_out_dirs_stop_with_one_line(uninterrupted, tmp_path):
    """Rank 1 runs in another folder: the same relative out_dir is not the same folder there."""
    config, _ = uninterrupted
    (tmp_path / "node1").mkdir()
    proc = faulty_run(tmp_path, config, "--out_dir=out/shared", RANK1_CWD=str(tmp_path / "node1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("error: out_dir=out/shared is not the same folder on every rank") == 1, out[-3000:]


def test_the_ranks_of_an_attempt_agree_on_a_fresh_namespace_of_a_store_full_of_old_ones():
    """Threads stand in for ranks on one store that keeps every earlier attempt's keys: ranks
    start in any order, world sizes change; a rank missing ends the handshake at its deadline."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=10))
    rng, seen = random.Random(0), set()

    def attempt(world: int, missing: int | None = None) -> tuple[dict, dict]:
        tokens, errors = {}, {}
        delays = [rng.uniform(0, 0.2) for _ in range(world)]

        def rank(r: int) -> None:
            time.sleep(delays[r])
            store = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=datetime.timedelta(seconds=10))
            try:
                tokens[r] = attempt_namespace(store, r, world, time.monotonic() + 2)
            except TimeoutError as e:
                errors[r] = str(e)

        threads = [threading.Thread(target=rank, args=(r,)) for r in range(world) if r != missing]
        [t.start() for t in threads]
        [t.join() for t in threads]
        return tokens, errors

    for i in range(12):
        world = rng.choice([2, 3, 4])
        if i % 6 == 5:
            tokens, errors = attempt(world, missing=world - 1)
            assert 0 in errors and set(tokens) | set(errors) == set(range(world - 1))
            continue
        tokens, errors = attempt(world)
        assert not errors and len(tokens) == world and len(set(tokens.values())) == 1
        assert tokens[0] not in seen
        seen.add(tokens[0])
