"""Two nodes on one machine: two torchrun agents on 127.0.0.1 (``--nnodes=2 --node_rank=0|1
--nproc_per_node=1``) train the same weights as one ``--standalone --nproc_per_node=2`` run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, resume_state, tiny_config, write_config_file

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(launch: list[str], config: Path, out_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "train_small.py", str(config), f"--out_dir={out_dir}"]
    return subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen]) -> None:
    """Wait for every agent; on a failure or a hang, stop the others and show what each printed."""
    try:
        outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


def test_two_agents_train_the_weights_of_one_standalone_run(tmp_path, data_dir):
    cfg = tiny_config(tmp_path / "run", data_dir)  # 40 steps, resume checkpoints every 10
    config = write_config_file(tmp_path / "tiny.py", cfg)
    two_nodes, one_node = tmp_path / "two_nodes", tmp_path / "one_node"

    port = free_port()
    finish(
        [
            train(
                ["--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}"],
                config,
                two_nodes,
            )
            for node in (0, 1)
        ]
    )
    finish([train(["--standalone", "--nproc_per_node=2"], config, one_node)])

    a, b = resume_state(two_nodes), resume_state(one_node)
    assert a["step"] == b["step"] == cfg.max_steps
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert (a["model"][k] - b["model"][k]).abs().max().item() == 0.0, k
