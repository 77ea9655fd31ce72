import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import ROOT, tiny_config
from ewa.checkpoint import CheckpointError, load_weights, snapshot_name
from ewa.lawa import RunningAverage, Window, plan_windows, reference_average, stream_averages, streaming_order
from ewa.lawa_cli import parse_args
from ewa.lawa_cli import run as run_lawa
from ewa.logger import read_metrics
from ewa.train import run as train
from model import GPT


def steps_of(windows: list[Window]) -> list[int]:
    return [w.step for w in windows]


def test_window_plan():
    every10 = range(0, 101, 10)
    w = plan_windows(every10, interval=20, k=3, nu=10)
    assert steps_of(w) == [20, 40, 60, 80, 100] and w[0].members == (0, 10, 20) and all(x.complete for x in w)
    # the first window is the first on the start + m * interval grid with enough history
    assert steps_of(plan_windows(every10, interval=50, k=5, nu=20)) == [100]
    assert steps_of(plan_windows(every10, interval=20, k=2, nu=10, start=30, end=70)) == [30, 50, 70]
    # a window with a missing member is reported, not averaged over fewer checkpoints
    w = plan_windows(set(every10) - {40}, interval=10, k=3, nu=10)
    assert [(x.step, x.missing) for x in w if not x.complete] == [(40, (40,)), (50, (40,)), (60, (40,))]
    # start off the checkpoint grid: the window lacks all its members
    assert plan_windows(every10, interval=20, k=2, nu=10, start=25)[0].missing == (15, 25)
    assert plan_windows([], 10, 2, 10) == []


def test_window_plan_for_the_papers_settings():
    nanogpt = plan_windows(range(0, 70_001, 200), interval=1000, k=5, nu=200)
    assert nanogpt[0].members == (200, 400, 600, 800, 1000) and nanogpt[-1].step == 70_000 and len(nanogpt) == 70
    far = plan_windows(range(0, 70_001, 200), interval=1000, k=5, nu=1000)
    assert far[0].members == (0, 1000, 2000, 3000, 4000)
    pythia = plan_windows(range(1000, 143_001, 1000), interval=3000, k=5, nu=1000, start=21_000)
    assert pythia[0].members == (17_000, 18_000, 19_000, 20_000, 21_000) and pythia[1].step == 24_000


def random_checkpoints(folder: Path, steps, numel: int = 300, seed: int = 0) -> dict[int, Path]:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for s in steps:
        paths[s] = folder / snapshot_name(s)
        save_file({"a": torch.randn(numel, generator=g), "b.weight": torch.randn(7, 3, generator=g) * 100}, str(paths[s]))
    return paths


@pytest.mark.parametrize("interval, k, nu", [(10, 4, 10), (20, 5, 10), (10, 3, 20), (30, 2, 10), (10, 8, 10)])
def test_streaming_equals_the_reference_and_reads_each_file_at_most_twice(tmp_path, interval, k, nu):
    paths = random_checkpoints(tmp_path, range(0, 201, 10))
    windows = streaming_order(plan_windows(list(paths), interval, k, nu), nu)
    running = RunningAverage(paths)
    seen = 0
    for window, average, raw in stream_averages(windows, running):
        ref = reference_average([paths[s] for s in window.members])
        assert max((average[n] - ref[n]).abs().max().item() for n in ref) <= 1e-6
        assert all(torch.equal(raw[n], load_weights(paths[window.step])[n]) for n in raw)
        seen += 1
    assert seen == len(windows) > 0
    assert max(running.stats.reads_per_step.values()) <= 2


# Peak RSS from /proc (VmHWM): getrusage's ru_maxrss in a child carries the parent's across exec.
MEMORY_PROBE = """
import sys
from pathlib import Path
from ewa.checkpoint import list_checkpoints
from ewa.lawa import RunningAverage, plan_windows, stream_averages, streaming_order
paths = list_checkpoints(Path(sys.argv[1]))
k = int(sys.argv[2])
windows = streaming_order(plan_windows(list(paths), 1, k, 1), 1)
running = RunningAverage(paths)
for _ in stream_averages(windows, running):
    pass
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def test_peak_memory_does_not_grow_with_k(tmp_path):
    numel = 2_000_000  # 8 MB per checkpoint: holding 16 of them would add 128 MB
    random_checkpoints(tmp_path / "ckpts", range(20), numel=numel)
    script = tmp_path / "probe.py"
    script.write_text(MEMORY_PROBE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def peak(k: int) -> int:
        out = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpts"), str(k)], env=env, capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    assert peak(16) - peak(2) < 2 * 4 * numel  # less than two checkpoints' worth


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
    args = parse_args([str(tmp_path / "ckpts"), "--k=2", "--nu=100", "--interval=100", f"--data_dir={data_dir}",
                       "--eval_tokens=1024", "--device=cpu", "--dtype=float32", f"--save_dir={tmp_path / 'avg'}"])
    results = run_lawa(args)
    assert [r["step"] for r in results] == [200, 300, 400]
    saved = load_weights(tmp_path / "avg" / snapshot_name(300))
    for name, value in saved.items():
        want = (weights[200][name].double() + weights[300][name].double()) / 2
        assert (value - want.float()).abs().max() <= 1e-6
    assert GPT.from_pretrained(str(tmp_path / "avg" / snapshot_name(300))).config.n_layer == 2
    assert "     300 |" in capsys.readouterr().out


def test_bad_folders_give_errors_naming_the_file(tmp_path, data_dir):
    paths = random_checkpoints(tmp_path / "ckpts", [0, 10, 20, 30])
    opts = ["--k=2", "--nu=10", "--interval=10", f"--data_dir={data_dir}", "--device=cpu"]
    # no model shape recorded and no config given
    with pytest.raises(CheckpointError, match="records no model shape; pass --config"):
        run_lawa(parse_args([str(tmp_path / "ckpts"), *opts]))
    with pytest.raises(CheckpointError, match=r"every LAWA window lacks checkpoints \(the one at step 20 lacks steps \[5\]\)"):
        run_lawa(parse_args([str(tmp_path / "ckpts"), "--k=2", "--nu=15", "--interval=10", "--start=20", f"--data_dir={data_dir}",
                             "--device=cpu", "--config=configs/tiny.py"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: no checkpoints found"):
        run_lawa(parse_args([str(tmp_path / "empty"), *opts]))
    data = paths[20].read_bytes()
    paths[20].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="step_00000020.safetensors: not a readable safetensors file"):
        RunningAverage(paths)._add(20, +1)
    from ewa.lawa import check_checkpoints

    save_file({"a": torch.zeros(5), "b.weight": torch.zeros(7, 3)}, str(paths[20]))
    with pytest.raises(CheckpointError, match=r"step_00000020.safetensors: does not match .*step_00000000.safetensors \(a: \(5,\) vs \(300,\)\)"):
        check_checkpoints(paths)


@pytest.fixture(scope="module")
def online_run(tmp_path_factory, data_dir) -> Path:
    cfg = tiny_config(tmp_path_factory.mktemp("online") / "run", data_dir, lawa_online=True, lawa_k=3, lawa_nu=10)
    train(cfg)
    return Path(cfg.out_dir)


def test_online_lawa_equals_offline(online_run):
    online = {r["step"]: r for r in read_metrics(online_run / "metrics.jsonl") if r["kind"] == "eval" and "lawa" in r}
    assert sorted(online) == [20, 30, 40]
    offline = {r["step"]: r for r in run_lawa(parse_args([str(online_run), "--interval=10"]))}
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
