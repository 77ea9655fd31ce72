import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, resume_state, signalled_at, tiny_config

from ewa.engine.config import ConfigError
from ewa.engine.logger import read_metrics
from ewa.engine.runtime import init_runtime
from ewa.engine.trainer import Preempted, run
from ewa.files import CheckpointError, list_checkpoints, load_weights


def evals(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"}


def final_state(run_dir: Path) -> dict:
    return resume_state(run_dir)


def test_tiny_run_learns_and_writes_its_files(tmp_path, data_dir):
    cfg = tiny_config(tmp_path / "run", data_dir)
    last = run(cfg)
    run_dir = Path(cfg.out_dir)
    ev = evals(run_dir)
    assert sorted(ev) == [0, 10, 20, 30, 40]
    assert ev[40]["raw"] < ev[0]["raw"] - 1.5 and set(last) == {"raw", "ema"}
    assert ev[40]["ema"] == last["ema"]
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert json.loads((run_dir / "config.json").read_text()) == cfg.to_dict()
    for kind in ("raw", "ema"):
        assert list(list_checkpoints(run_dir / "snapshots" / kind)) == list(range(0, 41, 5))
    assert list(list_checkpoints(run_dir / "resume")) == [10, 20, 30, 40]
    snap = load_weights(run_dir / "snapshots" / "raw" / "step_00000040.safetensors")
    assert all(torch.equal(snap[k], v) for k, v in final_state(run_dir)["model"].items())


def test_resume_equals_an_uninterrupted_run(tmp_path, data_dir):
    whole = tiny_config(tmp_path / "whole", data_dir, lr_decay_steps=40, dropout=0.1)
    run(whole)
    first = whole.replace(out_dir=str(tmp_path / "split"), max_steps=20)
    run(first)
    run(first.replace(max_steps=40, init_from="resume"))
    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "split")
    assert a["step"] == b["step"] == 40
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["averagers"]["ema"]["tensors"]["weights"].items():
        assert torch.equal(v, b["averagers"]["ema"]["tensors"]["weights"][k]), k
    assert evals(tmp_path / "whole")[40] == evals(tmp_path / "split")[40]
    steps = [(r["kind"], r["step"]) for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if r["kind"] != "start"]
    assert len(steps) == len(set(steps))  # no step logged twice


def test_train_records_cover_every_step_across_checkpoints_and_a_stop(tmp_path, data_dir):
    """Snapshots (every 5 steps) move the losses to the host between train records (every 4),
    and a signal stops the run at the very step it arrives: each record's loss is still the
    mean of every step since the previous record, and the stop saves what step 15 is due."""
    per_step = tiny_config(tmp_path / "per_step", data_dir, max_steps=16, lr_decay_steps=40, log_interval=1)
    run(per_step)
    loss = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "per_step" / "metrics.jsonl") if r["kind"] == "train"}
    cfg = per_step.replace(out_dir=str(tmp_path / "run"), max_steps=40, log_interval=4)
    trainer = signalled_at(15)(cfg, init_runtime("cpu", "float32"))  # between two train records
    with pytest.raises(Preempted, match="at step 15;"):
        trainer.fit()
    trainer.close()
    train = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"}
    assert list(train) == [4, 8, 12, 15]
    for end, start in ((4, 1), (8, 5), (12, 9), (15, 13)):
        assert train[end] == pytest.approx(sum(loss[s] for s in range(start, end + 1)) / (end - start + 1), rel=1e-6)
    assert max(list_checkpoints(tmp_path / "run" / "resume")) == 15
    assert max(list_checkpoints(tmp_path / "run" / "snapshots" / "raw")) == 15


def test_ema_in_the_trainer_equals_a_reference_over_raw_snapshots(tmp_path, data_dir):
    cfg = tiny_config(tmp_path / "run", data_dir, max_steps=12, ckpt_interval=1, ema_decay=0.7)
    run(cfg)
    raw = list_checkpoints(tmp_path / "run" / "snapshots" / "raw")
    ema_file = list_checkpoints(tmp_path / "run" / "snapshots" / "ema")[12]
    ref = load_weights(raw[0])
    for step in range(1, 13):
        ref = {k: 0.7 * v + 0.3 * w for (k, v), w in zip(ref.items(), load_weights(raw[step]).values())}
    got = load_weights(ema_file)
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-6


def test_a_finished_run_is_not_overwritten(tmp_path, data_dir):
    cfg = tiny_config(tmp_path / "run", data_dir, max_steps=10)
    run(cfg)
    with pytest.raises(ConfigError, match="already holds a run.*--init_from=resume"):
        run(cfg)
    with pytest.raises(ConfigError, match=r"holds a run with n_embd=32, this command has n_embd=64: continue it with"):
        run(cfg.replace(init_from="resume", n_embd=64, max_steps=20))


def test_auto_starts_continues_and_finishes_with_the_same_command(tmp_path, data_dir, capsys):
    """init_from=auto: scratch in an empty out_dir; the same command continues an interrupted run
    to the uninterrupted weights, says a finished run is complete, refuses other model or data."""
    whole = tiny_config(tmp_path / "whole", data_dir, lr_decay_steps=40)
    run(whole)
    cut = whole.replace(out_dir=str(tmp_path / "cut"), init_from="auto")
    run(cut.replace(max_steps=20))  # "preempted" at step 20: the same out_dir, a shorter run
    run(cut)
    assert resume_state(tmp_path / "cut")["step"] == 40
    a, b = resume_state(tmp_path / "whole")["model"], resume_state(tmp_path / "cut")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = (tmp_path / "cut" / "metrics.jsonl").read_text()
    assert run(cut) == {} and "is complete (step 40 of max_steps=40): nothing to train" in capsys.readouterr().out
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == metrics
    with pytest.raises(ConfigError, match=r"holds a run with n_layer=2, seed=1337, this command has n_layer=3, seed=1: "):
        run(cut.replace(n_layer=3, seed=1, max_steps=60))


def test_init_from_weights_file(tmp_path, data_dir):
    src = tiny_config(tmp_path / "a", data_dir, max_steps=10)
    run(src)
    snap = tmp_path / "a" / "snapshots" / "raw" / "step_00000010.safetensors"
    run(tiny_config(tmp_path / "b", data_dir, max_steps=1, init_from=str(snap), learning_rate=0.0, min_lr=0.0))
    assert evals(tmp_path / "b")[0]["raw"] == evals(tmp_path / "a")[10]["raw"]
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        run(tiny_config(tmp_path / "c", data_dir, init_from=str(tmp_path / "missing.safetensors")))


def test_entry_script_reports_config_errors_cleanly(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train_small.py", "configs/tiny.py", "--learning_rat=1"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "error: command line: unknown config key 'learning_rat'; did you mean learning_rate" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wandb_logging_offline(tmp_path, data_dir, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tiny_config(tmp_path / "run", data_dir, max_steps=10, wandb_log=True, wandb_mode="offline", wandb_run_name="t")
    run(cfg)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_several_emas_each_equal_a_reference_and_survive_resume(tmp_path, data_dir):
    cfg = tiny_config(tmp_path / "whole", data_dir, max_steps=20, ckpt_interval=1, ema_decays="0.5,0.99")
    run(cfg)
    raw = list_checkpoints(tmp_path / "whole" / "snapshots" / "raw")
    for name, decay in {"ema": 0.9, "ema_0.5": 0.5, "ema_0.99": 0.99}.items():
        ref = load_weights(raw[0])
        for step in range(1, 21):
            ref = {k: decay * v + (1 - decay) * w for (k, v), w in zip(ref.items(), load_weights(raw[step]).values())}
        got = load_weights(list_checkpoints(tmp_path / "whole" / "snapshots" / name)[20])
        assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-6, name
    assert {"raw", "ema", "ema_0.5", "ema_0.99"} <= evals(tmp_path / "whole")[20].keys()
    split = cfg.replace(out_dir=str(tmp_path / "split"), max_steps=10, lr_decay_steps=20)
    run(split)
    run(split.replace(max_steps=20, init_from="resume"))
    run(cfg.replace(out_dir=str(tmp_path / "whole2"), lr_decay_steps=20))
    a, b = final_state(tmp_path / "whole2"), final_state(tmp_path / "split")
    for name in ("ema", "ema_0.5", "ema_0.99"):
        for k, v in a["averagers"][name]["tensors"]["weights"].items():
            assert torch.equal(v, b["averagers"][name]["tensors"]["weights"][k]), (name, k)


def test_ema_decays_are_checked():
    with pytest.raises(ConfigError, match=r"ema_decays='0.9,x': expected comma-separated numbers"):
        tiny_config(Path("out"), Path("data"), ema_decays="0.9,x")
    assert tiny_config(Path("out"), Path("data"), ema_decays="0.9,0.99").emas() == {"ema": 0.9, "ema_0.99": 0.99}
    with pytest.raises(ConfigError, match=r"ema_decays: 0.99999951 and 0.9999995 are both named ema_1; keep one"):
        tiny_config(Path("out"), Path("data"), ema_decays="0.9999995,0.99999951")
    with pytest.raises(ConfigError, match=r"ema_decays: 1.0 must be in \[0, 1\)"):
        tiny_config(Path("out"), Path("data"), ema_decays="1")
