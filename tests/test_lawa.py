import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, random_checkpoints, tiny_config
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from ewa.engine.logger import read_metrics
from ewa.engine.trainer import run as train
from ewa.files import CheckpointError, load_weights, snapshot_name
from ewa.tools.cli import EvalOptions, WindowSettings
from ewa.tools.lawa import evaluate_run
from ewa.tools.merge import Merger
from lawa import main as lawa_main
from model import GPT


def write_gpt_checkpoints(folder: Path, fmt: str, steps) -> dict[int, dict]:
    """GPT-2-shaped checkpoints with random weights, as nanoGPT ``ckpt_N.pt`` or HF ``stepN/``."""
    folder.mkdir()
    written = {}
    for s in steps:
        torch.manual_seed(s)
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2))
        if fmt == "hf":
            hf.save_pretrained(folder / f"step{s}")
            written[s] = load_weights(folder / f"step{s}")
        else:
            model = GPT.from_pretrained(str(_save(hf, folder / ".tmp")))
            sd = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
            args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True, vocab_size=256, dropout=0.0)
            torch.save({"model": sd, "model_args": args, "iter_num": s}, folder / f"ckpt_{s}.pt")
            written[s] = load_weights(folder / f"ckpt_{s}.pt")
    return written


def _save(hf, path: Path) -> Path:
    hf.save_pretrained(path)
    return path


@pytest.mark.parametrize("fmt", ["nanogpt", "hf"])
def test_foreign_checkpoint_folders(tmp_path, data_dir, fmt, capsys):
    weights = write_gpt_checkpoints(tmp_path / "ckpts", fmt, [100, 200, 300, 400])
    results = lawa_main([str(tmp_path / "ckpts"), "--k=2", "--nu=100", "--interval=100", f"--data_dir={data_dir}",
                         "--eval_tokens=1024", "--device=cpu", "--dtype=float32", f"--save_dir={tmp_path / 'avg'}"])
    assert [r["step"] for r in results] == [200, 300, 400]
    saved = load_weights(tmp_path / "avg" / snapshot_name(300))
    for name, value in saved.items():
        want = (weights[200][name].double() + weights[300][name].double()) / 2
        assert (value - want.float()).abs().max() <= 1e-6
    assert GPT.from_pretrained(str(tmp_path / "avg" / snapshot_name(300))).config.n_layer == 2
    assert "     300 |" in capsys.readouterr().out


def test_bad_folders_give_errors_naming_the_file(tmp_path, data_dir):
    paths = random_checkpoints(tmp_path / "ckpts", [0, 10, 20, 30])
    window, options = WindowSettings(k=2, nu=10, interval=10), EvalOptions(data_dir=str(data_dir), device="cpu")
    # no model shape recorded and no config given
    with pytest.raises(CheckpointError, match="records no model shape; pass --config"):
        evaluate_run(tmp_path / "ckpts", window, options)
    with pytest.raises(SystemExit, match="records no model shape; pass --config"):  # the script's message
        lawa_main([str(tmp_path / "ckpts"), "--k=2", "--nu=10", f"--data_dir={data_dir}", "--device=cpu"])
    with pytest.raises(CheckpointError, match=r"every LAWA window lacks checkpoints \(the one at step 20 lacks steps \[5\]\)"):
        evaluate_run(tmp_path / "ckpts", WindowSettings(k=2, nu=15, interval=10, start=20),
                     EvalOptions(data_dir=str(data_dir), device="cpu", config="configs/tiny.py"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: no checkpoints found"):
        evaluate_run(tmp_path / "empty", window, options)
    run_dir = tmp_path / "run"  # a run directory: --kind names a folder of its snapshots
    (run_dir / "snapshots" / "ema_0.99").mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"snapshots/raw: no snapshots; pick --kind among ema_0\.99"):
        evaluate_run(run_dir, window, options)
    data = paths[20].read_bytes()
    paths[20].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="step_00000020.safetensors: not a readable safetensors file"):
        Merger(paths).open(20)

    save_file({"a": torch.zeros(5), "b.weight": torch.zeros(7, 3)}, str(paths[20]))
    with pytest.raises(CheckpointError, match=r"step_00000020.safetensors: does not match .*step_00000000.safetensors \(a: \(5,\) vs \(300,\)\)"):
        Merger(paths).check(paths)


@pytest.fixture(scope="module")
def online_run(tmp_path_factory, data_dir) -> Path:
    cfg = tiny_config(tmp_path_factory.mktemp("online") / "run", data_dir, lawa_online=True, lawa_k=3, lawa_nu=10)
    train(cfg)
    return Path(cfg.out_dir)


def test_online_lawa_equals_offline(online_run):
    online = {r["step"]: r for r in read_metrics(online_run / "metrics.jsonl") if r["kind"] == "eval" and "lawa" in r}
    assert sorted(online) == [20, 30, 40]
    offline = {r["step"]: r for r in lawa_main([str(online_run), "--interval=10"])}
    assert sorted(offline) == [20, 30, 40]
    for step in online:
        assert offline[step]["lawa"] == pytest.approx(online[step]["lawa"], abs=1e-6)
        assert offline[step]["raw"] == pytest.approx(online[step]["raw"], abs=1e-6)
    records = read_metrics(online_run / "lawa_k3_nu10.jsonl")
    assert [r["step"] for r in records if r["kind"] == "lawa"] == [20, 30, 40]


def test_online_lawa_state_survives_resume(tmp_path, data_dir, online_run):
    cfg = tiny_config(tmp_path / "split", data_dir, lawa_online=True, lawa_k=3, lawa_nu=10, lr_decay_steps=40, max_steps=20)
    train(cfg)
    train(cfg.replace(max_steps=40, init_from="resume"))
    split = {r["step"]: r for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if r["kind"] == "eval"}
    whole_cfg = tiny_config(tmp_path / "whole", data_dir, lawa_online=True, lawa_k=3, lawa_nu=10, lr_decay_steps=40)
    train(whole_cfg)
    whole = {r["step"]: r for r in read_metrics(tmp_path / "whole" / "metrics.jsonl") if r["kind"] == "eval"}
    assert split[30]["lawa"] == whole[30]["lawa"] and split[40]["lawa"] == whole[40]["lawa"]


def test_lawa_with_two_ranks_splits_the_windows(online_run, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "lawa.py", str(online_run),
           "--interval=10", f"--out={tmp_path / 'two.jsonl'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = {r["step"]: r["lawa"] for r in read_metrics(tmp_path / "two.jsonl")}
    one = {r["step"]: r["lawa"] for r in read_metrics(online_run / "lawa_k3_nu10.jsonl") if r["kind"] == "lawa"}
    assert two == pytest.approx(one, abs=1e-6) and len(two) == 3
    assert "skipped" not in proc.stdout and "     40 |" in proc.stdout


@pytest.mark.parametrize("weights", ["1-sqrt", "ema:0.5"])
def test_online_weighted_lawa_equals_offline(tmp_path, data_dir, weights):
    cfg = tiny_config(tmp_path / "run", data_dir, lawa_online=True, lawa_k=3, lawa_nu=10, lawa_weights=weights)
    train(cfg)
    online = {r["step"]: r["lawa"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lawa" in r}
    flags = [str(tmp_path / "run"), "--interval=10", f"--weights={weights}"]
    offline = {r["step"]: r["lawa"] for r in lawa_main(flags)}
    assert sorted(online) == sorted(offline) == [20, 30, 40]
    # the same float64 merge in the same order (newest first), scored by the same evaluator: the same figure
    assert offline == online
    name = "lawa_k3_nu10_" + weights.replace(":", "")
    records = read_metrics(tmp_path / "run" / f"{name}.jsonl")
    assert {r["weights"] for r in records} == {weights}
    uniform = {r["step"]: r["lawa"] for r in lawa_main([str(tmp_path / "run"), "--interval=10", "--weights=uniform"])}
    assert all(abs(uniform[s] - offline[s]) > 1e-4 for s in offline)  # the weights change the merge
