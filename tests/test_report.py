import json
from pathlib import Path

import matplotlib.image
import pytest

from ewa.engine.config import TrainConfig
from ewa.tools.report import (
    ema_age,
    gains_at_fractions,
    horizon_matched_decay,
    interpolated_step_reaching,
    load_run,
    mean_age,
    steps_saved,
    write_report,
)
from ewa.window import merge_weights
from report import main

ORIGINAL = {0: 5.0, 20: 2.6, 40: 2.4, 60: 2.2, 80: 2.1, 100: 2.0}
EMA = {0: 5.0, 20: 2.55, 40: 2.36, 60: 2.18, 80: 2.08, 100: 1.99}
EMA_MATCHED = {0: 5.0, 20: 2.58, 40: 2.33, 60: 2.12, 80: 1.95, 100: 1.9}
LAWA = {20: 2.5, 40: 2.3, 60: 2.1, 80: 1.9, 100: 1.85}
SWA = {80: 2.05, 100: 1.97}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def fake_run(root: Path) -> Path:
    run = root / "run"
    cfg = TrainConfig(max_steps=100, tokens_per_step=4096, block_size=128, micro_batch_size=32, lawa_k=5, lawa_nu=10,
                      ema_decays="0.952381")
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    write_jsonl(run / "metrics.jsonl", [{"kind": "start", "step": 0}]
                + [{"kind": "eval", "step": s, "raw": ORIGINAL[s], "ema": EMA[s], "ema_0.952381": EMA_MATCHED[s]}
                   for s in ORIGINAL]
                + [{"kind": "train", "step": 50, "loss": 2.3}])
    write_jsonl(run / "lawa_k5_nu10.jsonl", [{"kind": "lawa", "step": s, "raw": ORIGINAL[s], "lawa": v} for s, v in LAWA.items()]
                + [{"kind": "lawa_skipped", "step": 10, "missing": [0]}])
    write_jsonl(root / "run-swa" / "metrics.jsonl", [{"kind": "eval", "step": s, "raw": 2.1, "swa": v} for s, v in SWA.items()])
    cooldown = cfg.replace(max_steps=44, cooldown_steps=4)
    (root / "run-cooldown-40").mkdir()
    (root / "run-cooldown-40" / "config.json").write_text(json.dumps(cooldown.to_dict()))
    write_jsonl(root / "run-cooldown-40" / "metrics.jsonl", [{"kind": "eval", "step": 44, "raw": 2.25}])
    return run


def test_figures():
    assert interpolated_step_reaching(LAWA, 2.0) == pytest.approx(70.0)  # between 2.1 at 60 and 1.9 at 80
    assert interpolated_step_reaching(LAWA, 3.0) == 20.0 and interpolated_step_reaching(LAWA, 1.0) is None
    assert steps_saved(ORIGINAL, LAWA) == {"target": 2.0, "final_step": 100, "lawa_step": pytest.approx(70.0), "saved": pytest.approx(30.0)}
    rows = gains_at_fractions(ORIGINAL, LAWA, 100)
    assert [r["step"] for r in rows] == [20, 60, 80, 100]  # nearest eval steps to 25/50/75/100 (ties go up)
    assert [r["gain"] for r in rows] == pytest.approx([0.1, 0.1, 0.2, 0.15])


def test_horizon_matched_decay_has_the_windows_mean_age_and_lag():
    assert mean_age(5, 10) == pytest.approx(20.0) and mean_age(3, 200) == pytest.approx(200.0)
    assert mean_age(1, 10) == 0.0 and horizon_matched_decay(1, 10) == 0.0
    assert horizon_matched_decay(5, 10) == pytest.approx(20 / 21) and ema_age(20 / 21) == pytest.approx(20.0)
    assert horizon_matched_decay(5, 200) == pytest.approx(1 - 2 / (4 * 200 + 2))  # alpha = 2 / (N + 1)
    # on weights moving one unit per step, both averages lag the newest weights by the mean age
    for k, nu, weights in [(5, 10, "uniform"), (5, 10, "1-sqrt"), (4, 7, "ema:0.3")]:
        d, t = horizon_matched_decay(k, nu, weights), 20_000
        ema = 0.0
        for step in range(1, t + 1):
            ema = d * ema + (1 - d) * step
        window = sum(c * (t - (k - i) * nu) for i, c in enumerate(merge_weights(weights, k), 1))
        assert t - ema == pytest.approx(t - window, rel=1e-9) == pytest.approx(mean_age(k, nu, weights))
    assert mean_age(5, 10, "1-sqrt") > mean_age(5, 10)  # 1-sqrt puts most weight on the oldest member


def test_report_and_plots_from_metrics(tmp_path):
    run = fake_run(tmp_path)
    curves = load_run(run)
    assert list(curves.curves) == ["Original", "EMA", "EMA 0.952381", "SWA", "LAWA k=5 nu=10"]
    assert curves.cooldowns == {40: {"steps": 4, "loss": 2.25, "curve": {44: 2.25}}}
    assert (curves.horizon.ema, curves.horizon.age) == ("EMA 0.952381", pytest.approx(20.0))
    text = write_report(run, tmp_path / "assets")
    assert "| step | Original | EMA | EMA 0.952381 (horizon-matched) | SWA | LAWA k=5 nu=10 |" in text
    assert "| 80 | 2.1000 | 2.0800 | 1.9500 | 2.0500 | **1.9000** |" in text
    assert "| EMA 0.952381 (horizon-matched) | 0.952381 | 20.0 | +0.0800 | +0.0200 | +0.0500 | +0.0500 |" in text
    assert "| EMA | 0.9 | 9.0 | +0.0500 | +0.0800 | +0.1800 | +0.1400 |" in text
    assert "mean age 20 steps" in text and "horizon-matched decay is 0.952381 (the run keeps it" in text
    assert "30 steps (30%) saved" in text and "at step 70" in text
    assert "| 40 | 2.4000 | 2.3000 | 2.2500 | +4 |" in text
    assert (run / "report.md").read_text() == text
    for folder in (run, tmp_path / "assets"):
        for name in ("ema_swa.png", "lawa.png"):
            assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert matplotlib.image.imread(folder / name).shape[2] in (3, 4)


def test_report_cli_names_a_missing_run(tmp_path, capsys):
    with pytest.raises(SystemExit, match="metrics.jsonl not found"):
        main([str(tmp_path / "nope")])
    main([str(fake_run(tmp_path))])
    assert "wrote" in capsys.readouterr().out
