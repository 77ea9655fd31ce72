import json

from conftest import tiny_config, write_config_file
from ewa.logger import read_metrics
from ewa.pipeline import parse_args, run_pipeline


def test_pipeline_end_to_end_then_reuses_finished_stages(tmp_path, data_dir, capsys):
    config = write_config_file(tmp_path / "cfg.py", tiny_config(tmp_path / "unused", data_dir, max_steps=40))
    argv = [f"--config={config}", f"--out={tmp_path / 'paper'}", f"--assets={tmp_path / 'assets'}", "--lawa=3x10,2x20",
            "--cooldown_at=0.5", "--lr_compare"]
    text = run_pipeline(parse_args(argv))
    run = tmp_path / "paper" / "run"
    for path in [run / "report.md", run / "lawa_k3_nu10.jsonl", run / "lawa_k2_nu20.jsonl", run / "ema_swa.png",
                 run / "lawa.png", run / "lr_compare.png", tmp_path / "assets" / "lawa.png", tmp_path / "assets" / "ema_swa.png",
                 tmp_path / "paper" / "run-swa" / "snapshots" / "swa" / "step_00000040.safetensors",
                 tmp_path / "paper" / "run-lr0.1x" / "lawa_k3_nu10.jsonl"]:
        assert path.exists(), path
    swa = [r for r in read_metrics(tmp_path / "paper" / "run-swa" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in swa] == [40] and {"raw", "ema", "swa"} <= swa[0].keys()
    cooldown = json.loads((tmp_path / "paper" / "run-cooldown-20" / "config.json").read_text())
    assert (cooldown["max_steps"], cooldown["cooldown_steps"], cooldown["branch_step"]) == (22, 2, 20)
    assert "| step | Original | EMA | SWA | LAWA k=2 nu=20 | LAWA k=3 nu=10 |" in text
    assert "## LAWA vs an LR cooldown" in text and "## Learning-rate comparison" in text
    stages = json.loads((tmp_path / "paper" / "stages.json").read_text())
    assert set(stages) == {"original", "swa", "run/lawa_k3_nu10", "run/lawa_k2_nu20", "cooldown-20",
                           "original-lr0.1x", "run-lr0.1x/lawa_k3_nu10"}
    capsys.readouterr()
    assert run_pipeline(parse_args(argv)) == text  # a re-run reuses every stage
    out = capsys.readouterr().out
    assert out.count("reusing") == 7 and "eval step" not in out
