"""wandb as its users expect: one wandb run per run directory across resumes, and lawa.py /
analyze.py logging into it on step axes of their own. A fake ``wandb`` module records the real
arguments of ``wandb.init``, ``define_metric`` and ``log``; one test runs wandb itself, offline."""

import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest
from conftest import ROOT, tiny_config, write_config_file

from analyze import main as analyze
from ewa.engine.logger import WANDB_ID_FILE
from ewa.engine.trainer import run as train
from ewa.files import list_checkpoints
from lawa import main as lawa_main


class FakeRun:
    def __init__(self, calls: list, run_id: str):
        self.calls, self.id = calls, run_id

    def log(self, data: dict, step: int | None = None) -> None:
        self.calls.append(("log", self.id, data, step))

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.calls.append(("define_metric", self.id, name, step_metric))

    def finish(self) -> None:
        self.calls.append(("finish", self.id))


@pytest.fixture
def wandb_calls(monkeypatch) -> list:
    calls: list = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or FakeRun(calls, kwargs["id"])
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return calls


def inits(calls: list) -> list[dict]:
    return [c[1] for c in calls if c[0] == "init"]


def logged(calls: list, run_id: str) -> list[tuple[dict, int | None]]:
    return [(c[2], c[3]) for c in calls if c[0] == "log" and c[1] == run_id]


def test_a_resumed_run_keeps_its_wandb_run(tmp_path, data_dir, wandb_calls):
    cfg = tiny_config(tmp_path / "run", data_dir, wandb_log=True, wandb_run_name="tiny", lr_decay_steps=40, max_steps=20)
    train(cfg)
    train(cfg.replace(max_steps=40, init_from="resume"))
    first, second = inits(wandb_calls)
    run_id = (tmp_path / "run" / WANDB_ID_FILE).read_text().strip()
    assert first["id"] == second["id"] == run_id and len(run_id) == 8
    assert (first["resume"], second["resume"]) == (None, "allow")
    assert first["mode"] == "offline" and first["name"] == "tiny" and first["dir"] == str(tmp_path / "run")
    assert second["config"]["max_steps"] == 40
    evals = {step: data for data, step in logged(wandb_calls, run_id) if "eval/raw" in data}
    assert sorted(evals) == [0, 10, 20, 30, 40]
    train(cfg.replace(out_dir=str(tmp_path / "other")))  # another run directory: another wandb run
    assert inits(wandb_calls)[-1]["id"] != run_id and inits(wandb_calls)[-1]["resume"] is None


def test_lawa_and_analyze_log_into_the_training_run_on_axes_of_their_own(tmp_path, data_dir, wandb_calls):
    train(tiny_config(tmp_path / "run", data_dir, wandb_log=True))
    run_id = inits(wandb_calls)[0]["id"]
    results = lawa_main([str(tmp_path / "run"), "--interval=10", "--wandb_log"])
    joined = inits(wandb_calls)[1]
    assert (joined["id"], joined["resume"], joined["config"], joined["dir"]) == (run_id, "allow", None, str(tmp_path / "run"))
    defined = [c[2:] for c in wandb_calls if c[0] == "define_metric"]
    assert ("lawa_k3_nu10/step", None) in defined and ("lawa_k3_nu10/*", "lawa_k3_nu10/step") in defined
    rows = [data for data, step in logged(wandb_calls, run_id) if "lawa_k3_nu10/step" in data]
    after_training = [step for data, step in logged(wandb_calls, run_id) if any(k.startswith(("lawa_", "val_loss/")) for k in data)]
    assert after_training and all(step is None for step in after_training)  # never wandb's step: it is past training's
    assert {r["lawa_k3_nu10/step"]: r["lawa_k3_nu10/lawa"] for r in rows} == {r["step"]: r["lawa"] for r in results}
    # every val loss curve on one axis: raw, EMA and LAWA (this run has no SWA branch)
    val = {data["val_loss/step"]: data for data, _ in logged(wandb_calls, run_id) if "val_loss/step" in data}
    assert {"val_loss/raw", "val_loss/ema", "val_loss/lawa_k3_nu10"} <= val[40].keys()
    assert val[40]["val_loss/lawa_k3_nu10"] == results[-1]["lawa"]
    assert ("val_loss/*", "val_loss/step") in defined

    analyze(["ablation", str(tmp_path / "run"), "--k=2", "--nu=10", "--interval=10", "--wandb_log"])
    assert inits(wandb_calls)[2]["id"] == run_id
    cells = {d["ablation/step"]: d for d, _ in logged(wandb_calls, run_id) if "ablation/step" in d}
    assert sorted(cells) == [0, 10, 20, 30, 40] and "ablation/k2_nu10" in cells[40] and "ablation/raw" in cells[0]


def test_a_killed_run_resumes_into_the_same_offline_wandb_run(tmp_path, data_dir, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tiny_config(tmp_path / "run", data_dir, wandb_log=True, max_steps=100, lr_decay_steps=100, eval_interval=50)
    # no WANDB_* from this process: WANDB_SERVICE would attach the child to this process's wandb service
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "train_small.py", str(write_config_file(tmp_path / "cfg.py", cfg))],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume, deadline = tmp_path / "run" / "resume", time.time() + 120
    while not (resume.is_dir() and list_checkpoints(resume)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # until the first resume checkpoint is complete
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    train(cfg.replace(init_from="resume"))
    lawa_main([str(tmp_path / "run"), "--interval=50", "--wandb_log"])
    run_id = (tmp_path / "run" / WANDB_ID_FILE).read_text().strip()
    offline = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    # killed, resumed, lawa.py; wandb adds "-1" to a directory started in the same second as another
    assert len(offline) == 3 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", d.name) for d in offline)
    assert all(list(d.glob(f"run-{run_id}.wandb")) for d in offline)
