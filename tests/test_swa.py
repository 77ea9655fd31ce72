import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, resume_state, signalled_at, tiny_config, write_config_file
from torch.optim.swa_utils import SWALR

from ewa.engine.config import ConfigError, TrainConfig
from ewa.engine.logger import read_metrics
from ewa.engine.runtime import init_runtime
from ewa.engine.schedule import base_lr
from ewa.engine.start import branch_average
from ewa.engine.trainer import Preempted, Trainer, run
from ewa.files import list_checkpoints, load_weights


def swa_config(out_dir: Path, data_dir: Path, **kw):
    # 40 steps; SWA from step 30 (75%), annealing over 5 steps, averaging every 2 steps
    return tiny_config(out_dir, data_dir, swa=True, **kw)


def test_the_optimizer_lr_follows_the_swa_schedule(tmp_path, data_dir):
    cfg = swa_config(tmp_path / "run", data_dir)
    trainer = Trainer(cfg, init_runtime("cpu", "float32"))
    used = []
    for _ in range(cfg.max_steps):
        trainer.train_step()
        used.append(trainer.optimizer.param_groups[0]["lr"])
    start = cfg.swa_start_step()
    assert used[:start] == pytest.approx([base_lr(cfg, s) for s in range(start)])
    # torch's own SWALR, started from the schedule's value at swa_start, gives the rest
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr(cfg, start))
    swalr = SWALR(opt, swa_lr=cfg.swa_lr, anneal_epochs=cfg.swa_anneal_steps, anneal_strategy="cos")
    expected = []
    for _ in range(start, cfg.max_steps):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        swalr.step()
    assert used[start:] == pytest.approx(expected)
    assert used[-1] == cfg.swa_lr != base_lr(cfg, cfg.max_steps - 1)


def test_swa_weights_are_the_mean_of_the_averaging_steps(tmp_path, data_dir):
    cfg = swa_config(tmp_path / "run", data_dir, ckpt_interval=1)
    last = run(cfg)
    raw = list_checkpoints(tmp_path / "run" / "snapshots" / "raw")
    steps = [32, 34, 36, 38, 40]  # start + every * m
    ref = {}
    for s in steps:
        for k, v in load_weights(raw[s]).items():
            ref[k] = ref.get(k, 0) + v.double() / len(steps)
    swa = load_weights(list_checkpoints(tmp_path / "run" / "snapshots" / "swa")[40])
    assert max((swa[k] - ref[k].float()).abs().max().item() for k in ref) <= 1e-6
    assert list(list_checkpoints(tmp_path / "run" / "snapshots" / "swa"))[0] == 32
    evals = {r["step"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"}
    assert "swa" not in evals[30] and set(evals[40]) >= {"raw", "ema", "swa"} and evals[40]["swa"] == last["swa"]


def test_branch_from_the_original_run_equals_swa_from_scratch(tmp_path, data_dir):
    original = tiny_config(tmp_path / "orig", data_dir, resume_interval=100, keep_resume=1)
    run(original)
    assert list(list_checkpoints(tmp_path / "orig" / "resume")) == [30, 40]  # the SWA start is kept
    run(swa_config(tmp_path / "branch", data_dir, init_from=str(tmp_path / "orig")))
    run(swa_config(tmp_path / "scratch", data_dir))
    a, b = resume_state(tmp_path / "branch", 40), resume_state(tmp_path / "scratch", 40)
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k])
    for k, v in b["averagers"]["swa"]["tensors"]["weights"].items():
        assert torch.equal(a["averagers"]["swa"]["tensors"]["weights"][k], v)
    branch_evals = [r["step"] for r in read_metrics(tmp_path / "branch" / "metrics.jsonl") if r["kind"] == "eval"]
    assert branch_evals == [40]  # the first 75% is not trained (or evaluated) twice


def test_resume_in_the_middle_of_swa(tmp_path, data_dir):
    cfg = swa_config(tmp_path / "split", data_dir)
    with pytest.raises(Preempted, match="at step 35"):
        signalled_at(35)(cfg, init_runtime("cpu", "float32")).fit()
    assert max(list_checkpoints(tmp_path / "split" / "resume")) == 35
    run(cfg.replace(init_from="resume"))
    run(cfg.replace(out_dir=str(tmp_path / "whole")))
    a, b = resume_state(tmp_path / "split", 40), resume_state(tmp_path / "whole", 40)
    assert a["averagers"]["swa"]["num_averaged"] == b["averagers"]["swa"]["num_averaged"] == 5
    for k, v in b["averagers"]["swa"]["tensors"]["weights"].items():
        assert torch.equal(a["averagers"]["swa"]["tensors"]["weights"][k], v)


def test_branch_step_must_exist(tmp_path, data_dir):
    run(tiny_config(tmp_path / "orig", data_dir, max_steps=20, resume_interval=100, keep_resume=1))
    with pytest.raises(ConfigError, match=r"no resume checkpoint at step 7 \(it has \[15, 20\]\)"):
        run(swa_config(tmp_path / "b", data_dir, max_steps=20, init_from=str(tmp_path / "orig"), branch_step=7))


def test_train_swa_script_writes_next_to_the_original(tmp_path, data_dir):
    run(tiny_config(tmp_path / "orig", data_dir))
    config_file = write_config_file(tmp_path / "cfg.py", tiny_config(tmp_path / "orig", data_dir))
    proc = subprocess.run(
        [sys.executable, "train_swa.py", str(config_file), f"--init_from={tmp_path / 'orig'}", "--swa_start=0.25"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    evals = [r for r in read_metrics(tmp_path / "orig-swa" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [20, 30, 40] and all("swa" in r for r in evals)


@pytest.mark.parametrize("weights", ["ema", "ema_0.5", "lawa"])
def test_a_branch_starts_from_the_average_it_asked_for(tmp_path, data_dir, weights):
    from ewa.window import merge_weights

    original = tiny_config(tmp_path / "orig", data_dir, resume_interval=10, lawa_k=3, lawa_nu=10, ema_decays="0.5")
    run(original)
    branch = original.replace(out_dir=str(tmp_path / "branch"), init_from=str(tmp_path / "orig"), branch_step=30,
                              branch_weights=weights, lawa_weights="1-sqrt")
    run(branch)
    first = load_weights(list_checkpoints(tmp_path / "branch" / "snapshots" / "raw")[30])
    if weights.startswith("ema"):  # the paper-decay EMA, or the extra one of decay 0.5
        want = load_weights(list_checkpoints(tmp_path / "orig" / "snapshots" / weights)[30])
    else:  # the 1-sqrt merge of steps 10, 20, 30, straight from the formula
        snaps = list_checkpoints(tmp_path / "orig" / "snapshots" / "raw")
        members, c = [load_weights(snaps[s]) for s in (10, 20, 30)], merge_weights("1-sqrt", 3)
        want = {k: sum(ci * m[k].double() for ci, m in zip(c, members)).float() for k in first}
    assert first.keys() == want.keys() and all(torch.allclose(first[k], want[k], atol=1e-6) for k in want)
    ema = load_weights(list_checkpoints(tmp_path / "branch" / "snapshots" / "ema")[30])
    assert all(torch.equal(ema[k], first[k]) for k in first)  # the averages restart from it
    records = read_metrics(tmp_path / "branch" / "metrics.jsonl")
    start = next(r for r in records if r["kind"] == "start")
    assert start["branch"] == {"from": str(tmp_path / "orig"), "step": 30, "weights": weights, "reset_optimizer": False}
    assert [r["step"] for r in records if r["kind"] == "eval"] == [30, 40]
    # the optimizer state is the raw checkpoint's at step 30
    saved, now = resume_state(tmp_path / "orig", 30), resume_state(tmp_path / "branch", 30)
    assert all(torch.equal(now["model"][k], first[k]) for k in saved["model"])
    opt_saved, opt_branch = read_optimizer(tmp_path / "orig", 30), read_optimizer(tmp_path / "branch", 30)
    assert opt_saved.keys() == opt_branch.keys() and all(torch.equal(opt_branch[k], v) for k, v in opt_saved.items())


def test_a_branch_keeps_the_originals_lr_schedule():
    """A branch cools down only where the original did (or where a cooldown branch asks to)."""
    from ewa.engine.schedule import lr_at
    from ewa.tools.stages import branch_config, cooldown_config

    original = TrainConfig(max_steps=100, warmup_steps=5, cooldown_steps=10, eval_interval=10)
    run_dir = Path("out/orig")
    for t, steps in ((40, 20), (80, 20)):  # ends before the original's cooldown; ends with it
        branch = branch_config(original, run_dir, t, steps, "b")
        assert [lr_at(branch, s) for s in range(t, t + steps)] == [lr_at(original, s) for s in range(t, t + steps)]
    cooldown = cooldown_config(original, run_dir, 40, 10, 10)
    assert cooldown.cooldown_steps == 10 and lr_at(cooldown, 49) == pytest.approx(lr_at(original, 40) / 10, rel=1e-12)


def read_optimizer(run_dir: Path, step: int) -> dict:
    return resume_state(run_dir, step)["optimizer"]


def test_a_branch_can_reset_the_optimizer(tmp_path, data_dir):
    original = tiny_config(tmp_path / "orig", data_dir, resume_interval=10)
    run(original)
    branch = original.replace(out_dir=str(tmp_path / "branch"), init_from=str(tmp_path / "orig"), branch_step=20,
                              branch_reset_optimizer=True, max_steps=21, resume_interval=1)
    trainer = Trainer(branch, init_runtime("cpu", "float32"))
    assert trainer.step == 20 and trainer.optimizer.state == {}  # fresh AdamW, the raw weights at step 20
    saved = resume_state(tmp_path / "orig", 20)["model"]
    assert all(torch.equal(p.detach(), saved[n]) for n, p in zip(trainer.names, trainer.params))
    trainer.close()
    with pytest.raises(ConfigError, match=r"branch_weights=lawa at step 20: .*snapshots/raw has no snapshot at step\(s\) \[-10\]"):
        run(branch.replace(out_dir=str(tmp_path / "b2"), branch_weights="lawa", lawa_k=4, lawa_nu=10, ckpt_interval=100))
    with pytest.raises(ConfigError, match=r"branch_weights=ema_0.5: .*orig keeps no ema_0.5 snapshots \(its kinds: ema, raw"):
        branch_average(tmp_path / "orig", 20, branch.replace(branch_weights="ema_0.5"))
