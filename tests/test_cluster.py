"""Two nodes on one machine: two torchrun agents on 127.0.0.1 (``--nnodes=2 --node_rank=0|1
--nproc_per_node=1``) train the same weights as one ``--standalone --nproc_per_node=2`` run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, resume_state, tiny_config, write_config_file

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
