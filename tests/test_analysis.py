import json
import math
import runpy
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_config
from hf_models import float64_average

from analyze import main
from ewa.engine.logger import read_metrics
from ewa.engine.runtime import init_runtime
from ewa.engine.trainer import run
from ewa.files import load_weights
from ewa.tools.analysis import (
    DiversityRun,
    Threshold,
    compare_spikes,
    default_anchors,
    default_distances,
    disagreement,
    find_spikes,
    interpolate,
    loss_barrier,
    plan_ablation,
    plan_pairs,
    restart_step,
    run_ablation,
    run_diversity,
    spikes_after,
    trend,
)
from ewa.tools.cli import InputError
from ewa.tools.lawa import build_evaluator, open_checkpoints
from lawa import main as lawa_main


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """A high-LR run with online LAWA (k=3, nu=10), snapshots every 5 steps to step 40, and a
    short low-LR run scored on fewer held-out tokens."""
    root = tmp_path_factory.mktemp("analysis")
    high = tiny_config(root / "high", data_dir, lawa_online=True)
    low = tiny_config(root / "low", data_dir, max_steps=20, learning_rate=1e-3, min_lr=1e-4, eval_tokens=1024)
    run(high)
    run(low)
    return Path(high.out_dir), Path(low.out_dir)


def scorer(path: Path):
    """The CLI's source, model and evaluator for ``path``, to compute figures directly."""
    source = open_checkpoints(path)
    model, evaluator, _ = build_evaluator(source, init_runtime("cpu", "float32"))
    return source, model, evaluator


def loss_of(path: Path, weights: dict) -> float:
    _, model, evaluator = scorer(path)
    model.load_weights(weights)
    return evaluator.loss(model)


def lawa_py(path: Path, *flags: str) -> list[dict]:
    """lawa.py's figures for ``path``."""
    return lawa_main([str(path), *flags])


def records(path: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(path) if r["kind"] == kind]


# -- ablation -----------------------------------------------------------------------------------


def test_ablation_cells_equal_lawa_py_and_raw_equals_the_training_log(runs, tmp_path):
    high, _ = runs
    main(["ablation", str(high), "--k=2,3", "--nu=5,10", "--interval=10", f"--out_dir={tmp_path}"])
    got = records(tmp_path / "ablation.jsonl", "ablation")
    assert {(r["k"], r["nu"]) for r in got} == {(2, 5), (2, 10), (3, 5), (3, 10)}
    for k, nu in [(2, 5), (3, 10)]:
        want = lawa_py(high, f"--k={k}", f"--nu={nu}", "--interval=10", "--start=0", f"--out={tmp_path}/l.jsonl")
        cells = {r["step"]: r["lawa"] for r in got if (r["k"], r["nu"]) == (k, nu)}
        assert cells == {r["step"]: r["lawa"] for r in want}
    raw = {r["step"]: r["raw"] for r in records(tmp_path / "ablation.jsonl", "raw")}
    logged = records(high / "metrics.jsonl", "eval")
    assert raw == pytest.approx({r["step"]: r["raw"] for r in logged}, abs=1e-6)
    online = {r["step"]: r["lawa"] for r in got if (r["k"], r["nu"]) == (3, 10)}
    assert online == pytest.approx({r["step"]: r["lawa"] for r in logged if "lawa" in r}, abs=1e-5)
    assert "k=3 ν=10" in (tmp_path / "ablation.md").read_text() and (tmp_path / "ablation.png").stat().st_size > 0


def test_ablation_streams_each_checkpoint_about_twice(runs):
    source, model, evaluator = scorer(runs[0])
    plan = plan_ablation(source.paths, [(4, 5)], interval=5, start=0, end=40)
    result = run_ablation(source.paths, plan, model, evaluator)
    assert sorted(result.lawa[4, 5]) == [15, 20, 25, 30, 35, 40] and sorted(result.raw) == list(range(0, 41, 5))
    members = set(range(0, 41, 5))
    assert result.files_read <= 2 * len(members) < 4 * len(result.lawa[4, 5])  # not k reads per window
    window = [source.paths[s] for s in (25, 30, 35, 40)]
    assert result.lawa[4, 5][40] == pytest.approx(loss_of(runs[0], float64_average(window)), abs=1e-6)


def test_ablation_names_the_flag_when_nu_misses_the_snapshots(runs):
    with pytest.raises(SystemExit, match="--nu must be a multiple of 5"):
        main(["ablation", str(runs[0]), "--k=2", "--nu=7"])


# -- linear mode connectivity -------------------------------------------------------------------


def test_lmc_endpoints_are_the_checkpoints_losses(runs, tmp_path):
    high, _ = runs
    main(["lmc", str(high), "--a=10", "--b=40", "--alphas=0.5", f"--out_dir={tmp_path}"])
    curve = {r["alpha"]: r["loss"] for r in records(tmp_path / "lmc_10_40.jsonl", "lmc")}
    assert sorted(curve) == [0.0, 0.5, 1.0]  # the endpoints are always evaluated
    snaps = open_checkpoints(high).paths
    assert curve[1.0] == loss_of(high, load_weights(snaps[10]))
    assert curve[0.0] == loss_of(high, load_weights(snaps[40]))
    assert curve[0.5] == pytest.approx(loss_of(high, float64_average([snaps[10], snaps[40]])), abs=1e-6)
    (barrier,) = records(tmp_path / "lmc_10_40.jsonl", "lmc_barrier")
    assert barrier["height"] == pytest.approx(max(0.0, curve[0.5] - (curve[0.0] + curve[1.0]) / 2))


def test_lmc_of_a_checkpoint_with_itself_is_flat(runs, tmp_path):
    high, _ = runs
    file = open_checkpoints(high).paths[20]
    main(["lmc", str(high), f"--a={file}", "--b=20", f"--out_dir={tmp_path}"])
    curve = [r["loss"] for r in records(tmp_path / "lmc_step_00000020_20.jsonl", "lmc")]
    assert len(curve) == 6 and len(set(curve)) == 1
    assert records(tmp_path / "lmc_step_00000020_20.jsonl", "lmc_barrier")[0]["height"] == 0


def test_lmc_rejects_a_step_without_checkpoint(runs):
    with pytest.raises(SystemExit, match=r"--a=999: neither a step of .* steps 0\.\.40"):
        main(["lmc", str(runs[0]), "--a=999", "--b=40"])


def test_interpolation_is_exact_at_the_ends_and_the_barrier_is_measured_from_the_line():
    a, b = {"w": torch.randn(5, 3)}, {"w": torch.randn(5, 3)}
    assert torch.equal(interpolate(a, b, 1.0)["w"], a["w"]) and torch.equal(interpolate(a, b, 0.0)["w"], b["w"])
    assert torch.allclose(interpolate(a, b, 0.25)["w"], 0.25 * a["w"] + 0.75 * b["w"])
    assert loss_barrier({0.0: 1.0, 0.5: 2.0, 1.0: 3.0}) == (0.0, 0.0)  # on the line
    assert loss_barrier({0.0: 3.0, 0.5: 2.5, 1.0: 1.0}) == (0.5, 0.5)  # 2.5 above the line's 2.0
    with pytest.raises(InputError, match="alpha = 0 and alpha = 1"):
        loss_barrier({0.0: 1.0, 0.5: 2.0})


# -- diversity ----------------------------------------------------------------------------------


def test_disagreement_matches_a_direct_count(runs, tmp_path):
    high, _ = runs
    main(["diversity", str(high), "--anchors=0", "--distances=10,40", f"--out_dir={tmp_path}"])
    got = {(r["a"], r["b"]): r["disagreement"] for r in records(tmp_path / "diversity.jsonl", "diversity")}
    assert set(got) == {(0, 10), (0, 40)}
    source, model, evaluator = scorer(high)
    top1 = []
    for step in (0, 10):
        model.load_weights(load_weights(source.paths[step]))
        with torch.no_grad():
            logits = torch.cat([model.logits(w[None, :-1]) for w in evaluator.local])
        top1.append(logits.argmax(-1))
    differ = sum(int(x != y) for x, y in zip(top1[0].flatten().tolist(), top1[1].flatten().tolist()))
    assert got[0, 10] == differ / top1[0].numel() and 0 < differ < top1[0].numel()
    run_ = DiversityRun("same", source.paths, model, evaluator)
    assert run_diversity([run_], [(20, 20)])[0]["disagreement"] == 0.0
    assert disagreement(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 0])) == 0.5


def test_diversity_compares_runs_only_on_the_same_tokens(runs, tmp_path):
    high, low = runs
    pairs = ["--anchors=5", "--distances=5,15"]
    with pytest.raises(SystemExit, match="different held-out tokens"):
        main(["diversity", str(high), str(low), *pairs])
    main(["diversity", str(high), str(low), *pairs, "--eval_tokens=1024", f"--out_dir={tmp_path}"])
    got = records(tmp_path / "diversity.jsonl", "diversity")
    labels = ("high (lr 0.01)", "low (lr 0.001)")
    assert {(r["run"], r["distance"]) for r in got} == {(label, d) for label in labels for d in (5, 15)}
    assert "high (lr 0.01) t=5" in (tmp_path / "diversity.md").read_text()


def test_pairs_and_their_defaults():
    steps = list(range(0, 601, 10))
    assert default_anchors(steps) == [150, 300]
    assert default_distances(steps, [150, 300]) == [10, 20, 50, 100, 200]
    assert plan_pairs([0, 10, 20, 40], anchors=[0, 10], distances=[10, 30]) == [(0, 10), (10, 20), (10, 40)]


# -- loss spikes --------------------------------------------------------------------------------

RAW = {0: 5.0, 10: 4.0, 20: 3.5, 30: 3.3, 40: 3.9, 50: 3.1, 60: 3.0}


def test_trend_is_the_median_of_previous_finite_values():
    assert trend(RAW, 3) == {10: 5.0, 20: 4.5, 30: 4.0, 40: 3.5, 50: 3.5, 60: 3.3}
    assert trend({0: 2.0, 1: math.nan, 2: 1.0}, 2) == {1: 2.0, 2: 2.0}


def test_spikes_above_the_trend_by_an_absolute_or_relative_threshold():
    assert find_spikes(RAW, 3, Threshold(0.1)) == {40: 3.5}
    assert find_spikes(RAW, 3, Threshold.parse("10%")) == {40: 3.5}  # 3.9 - 3.5 > 0.35
    assert find_spikes(RAW, 3, Threshold.parse("20%")) == {}  # ... but not > 0.7
    assert find_spikes({**RAW, 50: math.inf}, 3, Threshold(0.1)) == {40: 3.5, 50: 3.5}


def test_each_raw_spike_says_whether_lawa_spikes_there():
    smooth = {0: 5.0, 10: 4.2, 20: 3.7, 30: 3.4, 40: 3.35, 50: 3.2}
    (row,) = compare_spikes(RAW, smooth, 3, Threshold(0.1))
    assert (row["step"], row["lawa"], row["lawa_trend"], row["lawa_spiked"]) == (40, 3.35, 3.7, False)
    (row,) = compare_spikes(RAW, {**smooth, 40: 3.9}, 3, Threshold(0.1))
    assert row["lawa_spiked"] is True
    (row,) = compare_spikes(RAW, {s: v for s, v in smooth.items() if s != 40}, 3, Threshold(0.1))
    assert row["lawa"] is None and row["lawa_spiked"] is None


@pytest.mark.parametrize("text", ["abc", "-1", "0%"])
def test_a_bad_threshold_names_the_flag(text):
    with pytest.raises(InputError, match=f"--threshold={text}"):
        Threshold.parse(text)


def test_spikes_cli_reads_a_run_with_online_lawa_or_a_lawa_py_file(runs, tmp_path):
    high, low = runs
    main(["spikes", str(high), "--window=2", "--threshold=0.001", f"--out_dir={tmp_path}"])
    logged = {r["step"]: r["raw"] for r in records(high / "metrics.jsonl", "eval")}
    flagged = [r["step"] for r in records(tmp_path / "spikes.jsonl", "spike")]
    assert flagged == sorted(find_spikes(logged, 2, Threshold(0.001)))
    assert (tmp_path / "spikes.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="no online LAWA column: run `python lawa.py .*--lawa_online=True"):
        main(["spikes", str(low)])
    lawa_file = tmp_path / "lawa.jsonl"
    lawa_py(low, "--k=2", "--nu=5", "--interval=5", f"--out={lawa_file}")
    main(["spikes", str(lawa_file), "--window=1", "--threshold=0.1%"])
    curves = records(lawa_file, "lawa")
    raw, lawa = ({r["step"]: r[key] for r in curves} for key in ("raw", "lawa"))
    rows = records(tmp_path / "spikes.jsonl", "spike")
    assert rows == compare_spikes(raw, lawa, 1, Threshold(0.001, relative=True))


def test_the_restart_step_is_the_latest_before_the_spike_with_optimizer_state_and_a_window():
    snapshots = range(0, 100, 5)
    assert restart_step(60, [10, 20, 30, 40, 50, 60], snapshots, k=3, nu=10) == 50
    assert restart_step(60, [10, 20, 30, 40, 50], [s for s in snapshots if s != 30], k=3, nu=10) == 20
    with pytest.raises(InputError, match="before the spike at 15 .* k=3 nu=10.*--at"):
        restart_step(15, [10, 20], snapshots, k=3, nu=10)


def test_spikes_after_the_restart_are_judged_against_the_original_before_it():
    restarted = {30: 3.4, 40: 3.45, 50: 3.2}  # 40 is no spike: the trend is 3.4
    assert spikes_after(RAW, restarted, 30, 3, Threshold(0.1)) == []
    assert spikes_after(RAW, {**restarted, 40: 3.9}, 30, 3, Threshold(0.1)) == [40]


def test_recover_restarts_from_raw_and_from_the_lawa_average_then_reuses_them(runs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(runs[0], run_dir)
    argv = ["recover", str(run_dir), "--spike=30", "--steps=10", f"--out_dir={tmp_path}"]
    main(argv)
    original = {r["step"]: r for r in records(run_dir / "metrics.jsonl", "eval")}
    raw = {r["step"]: r["raw"] for r in records(tmp_path / "run-recover-20-raw" / "metrics.jsonl", "eval")}
    lawa_dir = tmp_path / "run-recover-20-lawa"
    lawa = {r["step"]: r["raw"] for r in records(lawa_dir / "metrics.jsonl", "eval")}
    assert raw[30] == original[30]["raw"]  # the raw restart replays the original bit for bit
    # the LAWA restart starts from the window (0, 10, 20): its first eval is online LAWA's at 20
    assert lawa[20] == pytest.approx(original[20]["lawa"], rel=1e-6) and lawa[20] != original[20]["raw"]
    (start,) = records(lawa_dir / "metrics.jsonl", "start")
    assert start["branch"]["weights"] == "lawa" and start["branch"]["step"] == 20
    summary = {r["curve"]: r for r in records(tmp_path / "recover_20.jsonl", "recover_summary")}
    assert summary["restart from LAWA k=3 ν=10"]["last"] == lawa[30] and summary["original"]["last"] == raw[30]
    out = capsys.readouterr().out
    assert "it replays the same batches" in out and (tmp_path / "recover_20.png").stat().st_size > 0
    main(argv)
    out = capsys.readouterr().out
    assert out.count("reusing") == 2 and "eval step" not in out
    with pytest.raises(SystemExit, match="no spike above its trend by 50%: lower --threshold, or pass --spike"):
        main(["recover", str(run_dir), "--threshold=50%"])


@pytest.mark.parametrize("command", ["ablation", "lmc", "diversity", "spikes", "recover"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "--out_dir" in capsys.readouterr().out


# -- zero-shot ----------------------------------------------------------------------------------


def test_zero_shot_refuses_a_kind_of_snapshots(tmp_path):
    with pytest.raises(SystemExit, match="--kind=ema: zeroshot scores raw, LAWA, EMA and SWA side by side on its own; "
                                         "drop --kind"):
        main(["zeroshot", str(tmp_path), "--tasks=any", "--kind=ema"])


@pytest.fixture(scope="module")
def long_context_run(tmp_path_factory, data_dir) -> Path:
    """A run with the CPU default's context of 128 bytes, which the Shakespeare tasks fit, and
    a second EMA."""
    cfg = tiny_config(tmp_path_factory.mktemp("zeroshot") / "run", data_dir, block_size=128, micro_batch_size=4,
                      eval_tokens=1024, ema_decays="0.99")
    run(cfg)
    return Path(cfg.out_dir)


def test_zero_shot_of_raw_ema_and_lawa_in_memory_equals_the_exported_models(long_context_run, corpus, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ewa.tools.hf import export, prefix_token_id

    high = long_context_run
    tasks_module = runpy.run_path(str(ROOT / "data" / "shakespeare" / "tasks.py"))
    tasks = tasks_module["write_tasks"](tmp_path / "tasks", corpus["val"], questions=12, texts=4)
    question = json.loads((tmp_path / "tasks" / "word_order.jsonl").read_text().splitlines()[0])
    answer = question["choices"][question["answer"]]
    assert question["context"] + answer + "\n" in corpus["val"] and len(set(question["choices"])) == 4
    assert all(sorted(choice.split()) == sorted(answer.split()) for choice in question["choices"])
    main(["zeroshot", str(high), f"--tasks={','.join(tasks)}", f"--include_path={tmp_path / 'tasks'}", "--steps=20,40",
          "--batch_size=4", f"--out_dir={tmp_path}"])
    kinds = ("raw", "ema", "ema_0.99", "lawa")
    got = {(r["step"], r["kind"], r["task"]): r["metrics"] for k in kinds for r in records(tmp_path / "zeroshot.jsonl", k)}
    assert set(got) == {(s, k, t) for s in (20, 40) for k in kinds for t in tasks}
    assert got[40, "ema", tasks[1]] != got[40, "ema_0.99", tasks[1]]
    table = (tmp_path / "zeroshot.md").read_text().splitlines()
    assert table[0] == "| Model | Step | Task | LAWA | EMA | EMA 0.99 | Original |"
    assert [row.split(" | ")[1:3] for row in table[2:]] == [[str(s), f"{t} ({m})"] for s in (20, 40)
                                                         for t, m in sorted(zip(tasks, ("acc, %", "word_perplexity, lower is better"), strict=True))]

    # the same raw snapshots in a run that merges with 1-sqrt: its LAWA is that merge, and says so
    weighted = tmp_path / "weighted"
    shutil.copytree(high / "snapshots" / "raw", weighted / "snapshots" / "raw")
    (weighted / "config.json").write_text(json.dumps({**json.loads((high / "config.json").read_text()),
                                                      "lawa_weights": "1-sqrt"}))
    main(["zeroshot", str(weighted), f"--tasks={tasks[1]}", f"--include_path={tmp_path / 'tasks'}", "--steps=40",
          "--batch_size=4"])
    raw, lawa = (records(weighted / "zeroshot.jsonl", k) for k in ("raw", "lawa"))
    assert raw[0]["metrics"] == got[40, "raw", tasks[1]] and lawa[0]["weights"] == "1-sqrt"
    assert lawa[0]["metrics"]["word_perplexity"] != got[40, "lawa", tasks[1]]["word_perplexity"]
    assert (weighted / "zeroshot.md").read_text().startswith("| Model | Step | Task | LAWA 1-sqrt | Original |")

    # the same models exported to disk and loaded by transformers score the same
    lawa_py(high, "--k=3", "--nu=10", "--interval=20", f"--save_dir={tmp_path / 'avg'}", f"--out={tmp_path / 'l.jsonl'}")
    files = {"raw": high / "snapshots" / "raw" / "step_00000040.safetensors",
             "ema": high / "snapshots" / "ema" / "step_00000040.safetensors",
             "lawa": tmp_path / "avg" / "step_00000040.safetensors"}
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    for kind, file in files.items():
        out = export(file, tmp_path / f"hf-{kind}", "bytes", {})
        tokenizer = AutoTokenizer.from_pretrained(out)
        lm = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(out), tokenizer=tokenizer, batch_size=4,
                  prefix_token_id=prefix_token_id(tokenizer))
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, task_manager=manager, log_samples=False,
                                          bootstrap_iters=0)["results"]
        for task in tasks:
            for metric, value in got[40, kind, task].items():
                if "stderr" not in metric:
                    assert results[task][f"{metric},none"] == pytest.approx(value, rel=1e-6), (kind, task, metric)
