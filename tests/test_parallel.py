"""The multi-process path on the CPU (gloo): DDP and FSDP2 under ``torchrun --nproc_per_node=2``
against one process, sharded averaging state, sharded snapshots, and resume checkpoints that
survive SIGKILL in the middle of an asynchronous save and reshard between process counts."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, resume_state, signalled_at, tiny_config, write_config_file

from ewa.engine.background import Background
from ewa.engine.checkpointer import Checkpointer
from ewa.engine.config import TrainConfig, config_from_dict
from ewa.engine.logger import read_metrics
from ewa.engine.parallel import FlatLayout
from ewa.engine.runtime import Runtime, peak_flops_of
from ewa.engine.trainer import run
from ewa.files import CheckpointError, SafeReader, Weights, list_checkpoints, load_weights, read_resume, save_snapshot

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}

# One rank of a run: trains, then writes what the rank holds to <out>/rank<r>.json.
RANK_REPORT = """
import json, sys, torch
from ewa.engine.config import load_config
from ewa.engine.runtime import init_runtime, shutdown
from ewa.engine.trainer import Trainer
cfg = load_config(sys.argv[1], sys.argv[3:])
rt = init_runtime(cfg.device, cfg.dtype, group=cfg.parallel == "fsdp")
trainer = Trainer(cfg, rt)
trainer.fit()
held = {name: sum(t.numel() for t in a.state_dict().values() if isinstance(t, torch.Tensor))
        for name, a in trainer.averaging.averagers.items()}
report = {"accum": trainer.accum, "share": trainer.layout.shares.numel, "held": held,
          "model": sum(p.numel() for p in trainer.params), "lawa_out": lawa.mean.numel() if (lawa := trainer.averaging.averagers.get("lawa")) else 0}
json.dump(report, open(f"{sys.argv[2]}/rank{rt.rank}.json", "w"))
trainer.close()
shutdown(rt)
"""


def averaging_config(out_dir: Path, data_dir: Path, **overrides):
    """EMA, SWA from step 20, online LAWA; snapshots every 5 steps, resume every 10."""
    return tiny_config(
        out_dir, data_dir, swa=True, swa_start=0.5, lawa_online=True, lawa_k=3, lawa_nu=5, eval_interval=10, **overrides
    )


def torchrun(
    script: Path, *args: str, nproc: int = 2, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(script),
        *args,
    ]
    return subprocess.run(cmd, env=env or ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def ranked(tmp: Path, cfg, nproc: int) -> list[dict]:
    script = tmp / "rank_report.py"
    script.write_text(RANK_REPORT)
    config_file = write_config_file(tmp / f"{Path(cfg.out_dir).name}.py", cfg)
    proc = torchrun(script, str(config_file), str(tmp), f"--out_dir={cfg.out_dir}", nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> dict[str, Path]:
    """The same 40-step run in one process, and in two under DDP and under FSDP2 (with the
    averages in host memory, updated in the background: averaging_device=cpu)."""
    tmp = tmp_path_factory.mktemp("parallel")
    one = averaging_config(tmp / "one", data_dir)
    run(one)
    out = {"one": Path(one.out_dir)}
    for parallel in ("ddp", "fsdp"):
        sub = tmp / parallel
        sub.mkdir()
        cfg = one.replace(
            out_dir=str(sub / "run"), parallel=parallel, averaging_device="cpu" if parallel == "fsdp" else "gpu"
        )
        out[f"{parallel}_ranks"] = ranked(sub, cfg, 2)
        out[parallel] = Path(cfg.out_dir)
    return out


def evals(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_give_one_process_weights_and_averages(runs, parallel):
    one, two = resume_state(runs["one"]), resume_state(runs[parallel])
    assert one["step"] == two["step"] == 40 and runs[f"{parallel}_ranks"][0]["accum"] == 1  # 2 ranks x 8 sequences
    for k in one["model"]:
        assert torch.allclose(two["model"][k], one["model"][k], atol=5e-4), k  # float sums in another order, 40 steps
    for name in ("ema", "swa", "lawa"):
        assert two["averagers"][name]["tensors"].keys() == one["averagers"][name]["tensors"].keys()
        for buffer, tensors in one["averagers"][name]["tensors"].items():
            for k, v in tensors.items():
                assert torch.allclose(two["averagers"][name]["tensors"][buffer][k], v, atol=5e-4), (name, buffer, k)
    a, b = evals(runs["one"]), evals(runs[parallel])
    assert a.keys() == b.keys() and {"raw", "ema", "swa", "lawa"} <= a[40].keys()
    for step in a:
        for model in a[step].keys() - {"kind", "step", "tokens"}:
            assert b[step][model] == pytest.approx(a[step][model], abs=2e-4), (step, model)


def test_with_micro_steps_fsdp_and_ddp_sync_on_the_last_and_train_alike(tmp_path, data_dir):
    """Two micro-steps per step: DDP skips its all-reduce and FSDP2 its reduce-scatter on the
    first (``Wrapped.accumulating``); both reach the weights of one process."""
    one = tiny_config(tmp_path / "one", data_dir, max_steps=10, ema=False)
    run(one)
    for parallel in ("ddp", "fsdp"):
        (tmp_path / parallel).mkdir()
        cfg = one.replace(out_dir=str(tmp_path / parallel / "run"), parallel=parallel, micro_batch_size=4)
        assert ranked(tmp_path / parallel, cfg, 2)[0]["accum"] == 2
        got, want = resume_state(tmp_path / parallel / "run")["model"], resume_state(tmp_path / "one")["model"]
        assert all(torch.allclose(got[k], v, atol=5e-4) for k, v in want.items()), parallel


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_each_rank_holds_its_share_of_the_averages(runs, parallel):
    ranks = runs[f"{parallel}_ranks"]
    model = ranks[0]["model"]
    assert sum(r["share"] for r in ranks) == model  # the shares split the model: nothing is held twice
    for r in ranks:
        # EMA + SWA + k = 3 LAWA slots of this rank's share, and LAWA's output buffer beside them
        assert sum(r["held"].values()) == (2 + 3) * r["share"] <= (2 + 3) * model / 2 * 1.05
        assert r["lawa_out"] == r["share"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_sharded_snapshots_read_as_the_weights_and_feed_lawa(runs, parallel):
    folder = runs[parallel] / "snapshots" / "raw"
    snaps = list_checkpoints(folder)
    assert sorted(snaps) == list(range(0, 41, 5)) and all(p.is_dir() for p in snaps.values())
    assert sorted(f.name for f in snaps[40].iterdir()) == [
        "shard-00000-of-00002.safetensors",
        "shard-00001-of-00002.safetensors",
    ]
    whole = load_weights(snaps[40])
    final = resume_state(runs[parallel])["model"]
    assert whole.keys() == final.keys() and all(torch.equal(whole[k], final[k]) for k in final)
    lawa = evals(runs[parallel])[40]["lawa"]  # online, from the in-memory slots
    proc = subprocess.run(
        [sys.executable, "lawa.py", str(runs[parallel]), "--k=3", "--nu=5", "--interval=40", "--start=40"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (record,) = [json.loads(line) for line in (runs[parallel] / "lawa_k3_nu5.jsonl").read_text().splitlines()]
    assert record["step"] == 40 and record["lawa"] == pytest.approx(lawa, abs=1e-5)


def test_an_incomplete_sharded_snapshot_is_not_listed_and_is_named(tmp_path):
    layout = FlatLayout(["w"], [torch.Size([10])], world=2, rank=0)
    folder = tmp_path / "step_00000005"
    from ewa.files import save_snapshot_shard

    save_snapshot_shard(folder, 0, 2, [("w", 0, torch.Size([10]), torch.ones(5))], {"step": "5"})
    assert list_checkpoints(tmp_path) == {}
    with pytest.raises(CheckpointError, match=r"incomplete sharded snapshot \(missing \['shard-00001-of-00002"):
        Weights(folder)
    assert layout.shares.numel == 5


def test_background_snapshot_equals_a_synchronous_save(tmp_path):
    torch.manual_seed(0)
    names, shapes = ["a", "b"], [torch.Size([6, 4]), torch.Size([7])]
    params = [torch.randn(s) for s in shapes]
    meta = {"step": "3", "format": "ewa-snapshot-1", "model_config": "{}"}
    save_snapshot(tmp_path / "sync" / "step_00000003.safetensors", dict(zip(names, params)), meta | {"kind": "raw"})
    for world in (1, 3):
        for rank in range(world):
            layout = FlatLayout(names, shapes, world, rank)
            rt = Runtime(rank, 0, world, torch.device("cpu"), torch.float32)
            background = Background(rt.device)
            checkpointer = Checkpointer(TrainConfig(out_dir=str(tmp_path / f"w{world}")), {}, layout, background, rt, {})
            checkpointer.save_snapshots(3, {"raw": layout.pieces(params)})
            background.wait()
            background.close()
    sync = Weights(tmp_path / "sync" / "step_00000003.safetensors")
    written = [tmp_path / f"w{w}" / "snapshots" / "raw" / f"step_00000003{s}" for w, s in ((1, ".safetensors"), (3, ""))]
    for written in written:
        got = Weights(written)
        assert got.metadata == sync.metadata == meta | {"kind": "raw"} and got.keys() == sync.keys()
        assert all(torch.equal(got.get(n), sync.get(n)) for n in names)


# A rank of train_small.py whose KILL_AT-step resume checkpoint dies half-written: the
# background writer writes its shard, cuts it short, and SIGKILLs the process.
DIES_DURING_ASYNC_SAVE = """
import os, runpy, signal, sys
import ewa.engine.checkpointer as ck
class Dying(ck.FileSystemWriter):
    def write_data(self, plan, planner):
        if f"step_{int(os.environ['KILL_AT']):08d}" in str(self.path):
            result = super().write_data(plan, planner)
            result.wait()
            for f in os.listdir(self.path):
                if f.endswith(".distcp"):
                    with open(os.path.join(self.path, f), "r+b") as fh:
                        fh.truncate(os.path.getsize(os.path.join(self.path, f)) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().write_data(plan, planner)
ck.FileSystemWriter = Dying
sys.argv = ["train_small.py", *sys.argv[1:]]
runpy.run_path("train_small.py", run_name="__main__")
"""


def assert_every_checkpoint_loads(run_dir: Path) -> None:
    for path in list_checkpoints(run_dir / "resume").values():
        read_resume(path)
    for kind in ("raw", "ema", "swa"):
        for path in list_checkpoints(run_dir / "snapshots" / kind).values():
            Weights(path).get("transformer.wte.weight")


COUNTER = {"ema": "num_updates", "swa": "num_averaged", "lawa": "slot_steps"}


@pytest.mark.parametrize("resume_nproc", [2, 1])
def test_sigkill_during_an_async_save_then_resume_on_two_or_one(runs, tmp_path, data_dir, resume_nproc):
    reference = resume_state(runs["ddp"])
    cfg = averaging_config(tmp_path / "run", data_dir)
    config_file = write_config_file(tmp_path / "cfg.py", cfg)
    script = tmp_path / "dies.py"
    script.write_text(DIES_DURING_ASYNC_SAVE)
    assert torchrun(script, str(config_file), env={**ENV, "KILL_AT": "30"}).returncode != 0
    run_dir = Path(cfg.out_dir)
    assert list(run_dir.glob("resume/.step_00000030.tmp")), "the interrupted save leaves its temporary directory"
    assert list(list_checkpoints(run_dir / "resume")) == [10, 20]  # the newest complete checkpoint is step 20
    assert_every_checkpoint_loads(run_dir)
    args = [str(config_file), "--init_from=resume"]
    proc = torchrun(ROOT / "train_small.py", *args, nproc=resume_nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(run_dir.glob("resume/.*.tmp*"))
    # the same two ranks redo the same steps, bit for bit; one process sums in another order
    assert_same_state(resume_state(run_dir), reference, atol=0 if resume_nproc == 2 else 1e-4)


def truncated_copy(run_dir: Path, dest: Path, step: int) -> Path:
    """A copy of a run as if it had stopped at ``step``: no resume checkpoint or snapshot after it."""
    shutil.copytree(run_dir, dest)
    for folder in [dest / "resume", *(dest / "snapshots").iterdir()]:
        for s, path in list_checkpoints(folder).items():
            if s > step:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return dest


def assert_same_state(got: dict, want: dict, atol: float) -> None:
    """The same model and averages (within ``atol``; 0: bit for bit), at the same counters."""
    same = lambda a, b: torch.allclose(a, b, rtol=0, atol=atol)  # noqa: E731
    assert got["step"] == want["step"]
    assert all(same(got["model"][k], v) for k, v in want["model"].items())
    for name, counter in COUNTER.items():
        assert got["averagers"][name][counter] == want["averagers"][name][counter], name
        for buffer, tensors in want["averagers"][name]["tensors"].items():
            mine = got["averagers"][name]["tensors"][buffer]
            assert all(same(mine[k], v) for k, v in tensors.items()), (name, buffer)


def test_a_one_process_checkpoint_resumes_on_two(runs, tmp_path):
    """The other way round: one process's checkpoint at step 20 (plain tensors) continues
    under DDP on two processes (each takes its slice of the averages) to the two-process run."""
    run_dir = truncated_copy(runs["one"], tmp_path / "run", 20)
    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text())).replace(out_dir=str(run_dir))
    config_file = write_config_file(tmp_path / "cfg.py", cfg)
    proc = torchrun(ROOT / "train_small.py", str(config_file), "--init_from=resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_state(resume_state(run_dir), resume_state(runs["ddp"]), atol=5e-4)


def test_a_two_process_fsdp_checkpoint_resumes_in_one_fsdp_process(runs, tmp_path):
    """FSDP2 in a lone process (its own process group) reads the shards two ranks wrote at
    step 20, model, AdamW and averages, and ends where the two-process run ended."""
    run_dir = truncated_copy(runs["fsdp"], tmp_path / "run", 20)
    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    run(cfg.replace(out_dir=str(run_dir), init_from="resume"))
    assert_same_state(resume_state(run_dir), resume_state(runs["fsdp"]), atol=5e-4)


@pytest.mark.parametrize("name", ["one", "ddp", "fsdp"])
def test_the_gpu_checks_own_check_holds_on_the_cpu(runs, name):
    """bench/gpu_check.py compares the last resume checkpoint with the last snapshots, value
    for value; written by one process or as shards by two, they agree on the CPU too."""
    from bench.gpu_check import check_files, summary

    check_files(runs[name], 40)
    figures = summary(runs[name])  # its figures of training time, weighted by the steps of each record
    assert figures["ms_per_step"] > 0 and figures["tok_per_s"] > 0 and figures["ckpt_s_per_step"] > 0


def test_checkpoint_metadata_that_would_run_code_is_refused(tmp_path, data_dir):
    run(tiny_config(tmp_path / "run", data_dir, max_steps=10))
    checkpoint = list_checkpoints(tmp_path / "run" / "resume")[10]

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (checkpoint / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match=r"refused or unreadable checkpoint metadata \(refused posix.system\)"):
        SafeReader(checkpoint).read_metadata()
    assert not (tmp_path / "pwned").exists()


def test_the_batch_split_error_is_printed_once_with_choices_that_work(tmp_path, data_dir):
    config_file = write_config_file(
        tmp_path / "cfg.py", tiny_config(tmp_path / "run", data_dir, tokens_per_step=2048, micro_batch_size=16)
    )
    proc = torchrun(ROOT / "train_small.py", str(config_file), nproc=3, timeout=120)
    message = (
        "error: tokens_per_step=2048 cannot be split over 3 processes of micro_batch_size=16 x block_size=32: "
        "use --tokens_per_step=1536 or --tokens_per_step=3072 (multiples of micro_batch_size*block_size*processes "
        "= 1536), or a process count of 1/2/4"
    )
    assert proc.returncode != 0 and (proc.stderr + proc.stdout).count(message) == 1, proc.stderr[-2000:]


def test_the_evaluation_is_left_out_of_the_throughput(tmp_path, data_dir, monkeypatch):
    """On a fake clock: a training step takes 1 s, scoring one model 50 s."""
    import ewa.engine.logger
    from ewa.engine.runtime import init_runtime
    from ewa.engine.trainer import Trainer

    clock = [0.0]
    monkeypatch.setattr(ewa.engine.logger.time, "perf_counter", lambda: clock[0])

    class Timed(Trainer):
        def train_step(self):
            clock[0] += 1.0
            return super().train_step()

    cfg = tiny_config(tmp_path / "run", data_dir, max_steps=24, log_interval=2, eval_interval=4)
    trainer = Timed(cfg, init_runtime("cpu", "float32"))
    score = trainer.evaluator.loss
    trainer.evaluator.loss = lambda model: (clock.__setitem__(0, clock[0] + 50.0), score(model))[1]
    trainer.fit()
    trainer.close()
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["tok_per_s"] for r in train] == [cfg.tokens_per_step / 1.0] * 12  # every window alike
    assert [r["ms_per_step"] for r in train] == [1000.0] * 12
    # the evals at steps 4, 8, ... (raw and EMA: 100 s) fall in the windows that end 2 steps later
    assert [r["eval_s"] for r in train] == [0.0, 0.0] + [100.0, 0.0] * 5
    assert all(r["ckpt_s"] == 0.0 for r in train)


def test_mfu_peaks_by_exact_device():
    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_of("NVIDIA H100 NVL") == 835e12
    assert peak_flops_of("NVIDIA H200") == 989e12
    assert peak_flops_of("NVIDIA A100-SXM4-80GB") == peak_flops_of("NVIDIA A100-PCIE-40GB") == 312e12
    assert peak_flops_of("NVIDIA GeForce RTX 4090") is None


def test_averages_are_restored_in_place_on_the_parameters_device(tmp_path, data_dir):
    """Resume loads every average into the buffers the averagers allocated, on the device
    they were asked for (the training device), never into tensors left where the file was read."""
    from ewa.engine.runtime import init_runtime
    from ewa.engine.trainer import Trainer

    cfg = averaging_config(tmp_path / "run", data_dir, max_steps=30)
    run(cfg)
    trainer = Trainer(cfg.replace(init_from="resume", max_steps=40), init_runtime("cpu", "float32"))
    assert trainer.step == 30
    for name, averager in trainer.averaging.averagers.items():
        buffers = {k: t for k, t in averager.state_dict().items() if isinstance(t, torch.Tensor)}
        for buffer, t in buffers.items():
            assert t.device == trainer.params[0].device == averager.device, (name, buffer)
    # loaded in place: the buffers checkpoints read are those the updates write through their views
    ema, swa, lawa = (trainer.averaging.averagers[n] for n in ("ema", "swa", "lawa"))
    views = [(ema.flat, ema.views), (swa.flat, swa.views), *lawa.slots]
    assert all(v.untyped_storage().data_ptr() == flat.data_ptr() for flat, vs in views for v in vs)
    saved = resume_state(tmp_path / "run")["averagers"]["swa"]["tensors"]["weights"]
    swa = trainer.averaging.averagers["swa"]
    assert torch.equal(swa.flat, torch.cat([saved[n].flatten() for n in trainer.names]))
    trainer.close()


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_sigterm_under_torchrun_saves_and_exits_on_every_rank(tmp_path, data_dir):
    cfg = averaging_config(tmp_path / "run", data_dir, max_steps=400, log_interval=2)
    config_file = write_config_file(tmp_path / "cfg.py", cfg)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "train_small.py",
            str(config_file),
        ],
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("step     12/"):
            for worker in children(proc.pid):  # as a scheduler signals every task of a job
                os.kill(worker, signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, rest[-2000:]
    stopped = int(rest.split("stopped by a signal at step ")[1].split(";")[0])
    assert stopped in list_checkpoints(tmp_path / "run" / "resume") and stopped < 400


def test_background_averaging_is_checkpointed_consistently(tmp_path, data_dir, monkeypatch):
    """averaging_device=cpu with slow background updates (as a full model's on one rank):
    a resume checkpoint holds the counters of the same step as the tensors, so a run stopped
    and resumed keeps its LAWA window and SWA count."""
    import time as clock

    import ewa.engine.averaging
    from ewa.engine.runtime import init_runtime
    from ewa.engine.trainer import Preempted

    for cls in (ewa.engine.averaging.EMA, ewa.engine.averaging.SWA, ewa.engine.averaging.OnlineLAWA):
        slow = cls.update
        monkeypatch.setattr(
            cls, "update", lambda self, share, step, slow=slow: (clock.sleep(0.05), slow(self, share, step))[1]
        )

    cfg = averaging_config(tmp_path / "run", data_dir, averaging_device="cpu")
    trainer = signalled_at(30)(cfg, init_runtime("cpu", "float32"))
    with pytest.raises(Preempted, match="at step 30"):
        trainer.fit()
    trainer.close()
    state = resume_state(tmp_path / "run", 30)
    assert sorted(state["averagers"]["lawa"]["slot_steps"]) == [20, 25, 30]
    lawa = state["averagers"]["lawa"]
    slot30 = lawa["tensors"][f"slot{lawa['slot_steps'].index(30)}"]
    assert all(torch.equal(slot30[k], v) for k, v in state["model"].items())  # the slot of step 30 holds step 30
    assert state["averagers"]["swa"]["num_averaged"] == 5  # steps 22, 24, ..., 30
    run(cfg.replace(init_from="resume"))
    assert {"raw", "ema", "swa", "lawa"} <= evals(tmp_path / "run")[40].keys()


def test_a_fsdp_checkpoint_continues_under_ddp_in_one_process(runs, tmp_path, capsys):
    """Switching `parallel` keeps the model and optimizer; the averages, sharded otherwise, restart."""
    from ewa.engine.runtime import init_runtime
    from ewa.engine.trainer import Trainer

    saved = json.loads((runs["fsdp"] / "config.json").read_text())
    cfg = config_from_dict(saved).replace(
        out_dir=str(tmp_path / "ddp"),
        init_from=str(runs["fsdp"]),
        branch_step=40,
        parallel="ddp",
        averaging_device="gpu",
    )
    trainer = Trainer(cfg, init_runtime("cpu", "float32"))
    final = resume_state(runs["fsdp"])
    assert trainer.step == 40
    assert all(torch.equal(p.detach(), final["model"][n]) for n, p in zip(trainer.names, trainer.params))
    out = capsys.readouterr().out
    assert "has no ema state of this layout (it was saved under the other `parallel`); ema restarts from the loaded weights" in out
    trainer.close()


def test_a_host_staging_copy_is_made_off_the_training_thread(monkeypatch):
    """On a CPU the copy into the staging buffers runs on the background's copy thread: ``copy``
    returns before it is done, and ``fence()`` (passed before the optimizer writes the weights)
    returns only once it is."""
    import threading

    from ewa.engine import background as bg

    gate, real = threading.Event(), bg._copy_bytes
    monkeypatch.setattr(bg, "_copy_bytes", lambda dst, src: (gate.wait(timeout=30), real(dst, src)))
    background = Background(torch.device("cpu"))
    weights, staged = torch.arange(1000, dtype=torch.float32), torch.empty(1000)
    done = background.copy([staged], [weights])
    assert not done.done()  # the training thread goes on while the copy waits
    threading.Timer(0.2, gate.set).start()
    background.fence()
    weights.add_(1.0)  # the optimizer's step, after the fence
    bg.wait_for(done)
    assert torch.equal(staged, torch.arange(1000, dtype=torch.float32))
    background.close()


def test_one_process_trains_the_model_itself_not_ddp():
    """A process group of one (torchrun --nproc_per_node=1): DDP would only split the compiled
    graph at its buckets and add collectives, so the model is trained as it is."""
    from ewa.engine.parallel import wrap
    from ewa.engine.runtime import init_runtime, shutdown
    from model import GPT, GPTConfig

    rt = init_runtime("cpu", "float32", group=True)
    try:
        model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
        wrapped = wrap(model, "ddp", False, rt)
        assert torch.distributed.is_initialized() and wrapped.train is model and wrapped.eval is model
    finally:
        shutdown(rt)
