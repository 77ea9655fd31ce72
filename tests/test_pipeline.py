import json
from pathlib import Path

from conftest import tiny_config, write_config_file

from ewa.engine.logger import read_metrics
from reproduce import main as reproduce


def test_pipeline_end_to_end_then_reuses_finished_stages(tmp_path, data_dir, capsys):
    config = write_config_file(tmp_path / "cfg.py", tiny_config(tmp_path / "unused", data_dir, max_steps=40))
    argv = [f"--config={config}", f"--out={tmp_path / 'paper'}", f"--assets={tmp_path / 'assets'}", "--lawa=3x10,2x20",
            "--cooldown_at=0.5", "--lr_compare", "--wsd", "--wsd_at=0.5"]
    text = reproduce(argv)
    run = tmp_path / "paper" / "run"
    for path in [run / "report.md", run / "lawa_k3_nu10.jsonl", run / "lawa_k2_nu20.jsonl", run / "ema_swa.png",
                 run / "lawa.png", run / "lr_compare.png", tmp_path / "assets" / "lawa.png", tmp_path / "assets" / "ema_swa.png",
                 tmp_path / "paper" / "run-swa" / "snapshots" / "swa" / "step_00000040.safetensors",
                 tmp_path / "paper" / "run-lr0.1x" / "lawa_k3_nu10.jsonl", tmp_path / "assets" / "wsd.png"]:
        assert path.exists(), path
    swa = [r for r in read_metrics(tmp_path / "paper" / "run-swa" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in swa] == [40] and {"raw", "ema", "swa"} <= swa[0].keys()
    cooldown = json.loads((tmp_path / "paper" / "run-cooldown-20" / "config.json").read_text())
    assert (cooldown["max_steps"], cooldown["cooldown_steps"], cooldown["branch_step"]) == (22, 2, 20)
    # the horizon-matched EMA of k=3 nu=10: mean age 10 steps, decay 10/11
    assert json.loads((run / "config.json").read_text())["ema_decays"] == "0.909091"
    assert "| step | Original | EMA | EMA 0.909091 (horizon-matched) | SWA | LAWA k=2 nu=20 | LAWA k=3 nu=10 |" in text
    assert "| EMA 0.909091 (horizon-matched) | 0.909091 | 10.0 |" in text
    assert "## LAWA vs an LR cooldown" in text and "## Learning-rate comparison" in text
    check_wsd(tmp_path / "paper", text)
    stages = json.loads((tmp_path / "paper" / "stages.json").read_text())
    assert set(stages) == {"original", "swa", "run/lawa_k3_nu10", "run/lawa_k2_nu20", "cooldown-20",
                           "original-lr0.1x", "run-lr0.1x/lawa_k3_nu10",
                           "wsd", "wsd/lawa_k3_nu10", "wsd/lawa_k3_nu10_1-sqrt", "wsd-cooldown-20"}
    capsys.readouterr()
    assert reproduce(argv) == text  # a re-run reuses every stage
    out = capsys.readouterr().out
    assert out.count("reusing") == 11 and "eval step" not in out


def check_wsd(out: Path, text: str) -> None:
    """The constant-LR run, its uniform and 1-sqrt merges at t = 20, and the cooldown from 20
    over the window's span (3 - 1) * 10 = 20 steps; the report quotes their figures."""
    wsd = json.loads((out / "wsd" / "config.json").read_text())
    assert wsd["min_lr"] == wsd["learning_rate"]
    lrs = [r["lr"] for r in read_metrics(out / "wsd" / "metrics.jsonl") if r["kind"] == "train"]
    assert lrs[1:] == [wsd["learning_rate"]] * (len(lrs) - 1)  # flat after the 5 warmup steps
    cooldown = json.loads((out / "wsd-cooldown-20" / "config.json").read_text())
    assert (cooldown["branch_step"], cooldown["max_steps"], cooldown["cooldown_steps"]) == (20, 40, 20)
    assert cooldown["init_from"] == str(out / "wsd")
    decay = [r["lr"] for r in read_metrics(out / "wsd-cooldown-20" / "metrics.jsonl") if r["kind"] == "train"]
    assert decay == sorted(decay, reverse=True) and decay[-1] < 0.1 * wsd["learning_rate"]
    final = [r["raw"] for r in read_metrics(out / "wsd-cooldown-20" / "metrics.jsonl") if r["kind"] == "eval" and r["step"] == 40]
    merges = {}
    for name in ("lawa_k3_nu10", "lawa_k3_nu10_1-sqrt"):
        (row,) = [r for r in read_metrics(out / "wsd" / f"{name}.jsonl") if r["kind"] == "lawa" and r["step"] == 20]
        merges[row["weights"]] = row["lawa"]
    assert merges["uniform"] != merges["1-sqrt"]
    evals = {r["step"]: r for r in read_metrics(out / "wsd" / "metrics.jsonl") if r["kind"] == "eval"}
    section = text.split("## Merge versus decay (constant learning rate)")[1]
    row = next(line for line in section.splitlines() if line.startswith("| 20 |"))
    cells = [c.split(" (")[0] for c in row.strip("| ").split(" | ")]
    assert cells == ["20", f"{evals[20]['raw']:.4f}", f"{merges['uniform']:.4f}", f"{merges['1-sqrt']:.4f}",
                     f"{evals[20]['ema_0.909091']:.4f}", f"{final[0]:.4f}"]
