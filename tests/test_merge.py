"""The merge engine: the window plan, the strategy chosen by cost, and the two float64 sums
against a direct float64 average, for every kind of checkpoint the project reads."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, random_checkpoints
from hf_models import float64_average, tiny_neox
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from ewa.files import Weights, load_weights
from ewa.tools.merge import (
    Merger,
    WindowPlan,
    plan_strategies,
    plan_windows,
    stream_averages,
    streaming_order,
)
from ewa.window import PlanError, Window, merge_weights
from model import GPT, GPTConfig

SLIDING, TENSORWISE = 10**12, 0  # memory budgets that allow, or rule out, the float64 model sum


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


def test_window_plan_settings_and_chosen_steps():
    plan = WindowPlan(k=2, nu=10, interval=20, start=20, steps=(60, 20))
    assert steps_of(plan.windows(range(0, 101, 10))) == [20, 60]
    with pytest.raises(PlanError, match=r"--steps 30: no such window; with --k=2 --nu=10 --interval=20 --start=20 "
                                        r"the windows are at 20, 40, 60, \.\.\., 100"):
        WindowPlan(k=2, nu=10, interval=20, start=20, steps=(30,)).windows(range(0, 101, 10))
    with pytest.raises(PlanError, match="--k=0 --nu=10 .*: k, nu and interval must be positive"):
        WindowPlan(k=0, nu=10, interval=10)


def test_strategy_by_cost():
    overlapping = plan_windows(range(0, 101, 10), interval=10, k=4, nu=10)  # 2 reads slide a 4-member sum
    assert set(plan_strategies(overlapping, sum_fits=True)) == {"sliding"}
    assert set(plan_strategies(overlapping, sum_fits=False)) == {"tensorwise"}  # a float64 model would not fit
    disjoint = plan_windows(range(0, 101, 10), interval=30, k=2, nu=10)  # nothing shared: k reads either way
    assert set(plan_strategies(disjoint, sum_fits=True)) == {"tensorwise"}
    barely = plan_windows(range(0, 101, 10), interval=20, k=3, nu=10)  # 4 reads to slide 3 members: no gain
    assert set(plan_strategies(barely, sum_fits=True)) == {"tensorwise"}
    # a lane change breaks the slide: the last window of a lane is built fresh only if the next shares enough
    lanes = streaming_order(plan_windows(range(0, 201, 10), interval=10, k=3, nu=20), 20)
    assert plan_strategies(lanes, sum_fits=True) == ["sliding"] * len(lanes)
    assert plan_strategies(lanes[:1] + lanes[-1:], sum_fits=True) == ["tensorwise", "tensorwise"]


@pytest.mark.parametrize("budget", [SLIDING, TENSORWISE])
@pytest.mark.parametrize("interval, k, nu", [(10, 4, 10), (20, 5, 10), (10, 3, 20), (30, 2, 10), (10, 8, 10)])
def test_streaming_equals_the_reference_and_reads_each_file_at_most_twice(tmp_path, interval, k, nu, budget):
    paths = random_checkpoints(tmp_path, range(0, 201, 10))
    windows = streaming_order(plan_windows(list(paths), interval, k, nu), nu)
    merger = Merger(paths, memory_budget=budget)
    seen = 0
    for window, average, raw in stream_averages(windows, merger):
        ref = float64_average([paths[s] for s in window.members])
        assert max((average[n] - ref[n]).abs().max().item() for n in ref) <= 1e-6
        assert all(torch.equal(raw[n], load_weights(paths[window.step])[n]) for n in raw)
        seen += 1
    assert seen == len(windows) > 0
    windows_per_step = {s: sum(s in w.members for w in windows) for s in paths}
    if budget == SLIDING:
        assert max(merger.stats.reads_per_step.values()) <= 2
    else:  # each window reads its members once, and its newest once more for the raw model
        assert merger.stats.reads_per_step == {s: n + (s in steps_of(windows)) for s, n in windows_per_step.items() if n}


def gpt_checkpoints(folder: Path, fmt: str) -> dict[int, Path]:
    """Five GPT-2-shaped checkpoints in one format: our snapshot, nanoGPT's ckpt.pt (compiled-model
    keys, optimizer beside), a GPT-2 or a GPT-NeoX Hugging Face directory."""
    folder.mkdir()
    paths = {}
    for step in range(0, 41, 10):
        torch.manual_seed(step)
        if fmt == "neox":
            paths[step] = folder / f"step{step}"
            tiny_neox(64, seed=step).save_pretrained(paths[step])
        elif fmt == "gpt2":
            paths[step] = folder / f"step{step}"
            GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)).save_pretrained(paths[step])
        else:
            model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
            sd = model.state_dict()
            paths[step] = folder / (f"step_{step:08d}.safetensors" if fmt == "snapshot" else f"ckpt_{step}.pt")
            if fmt == "snapshot":
                save_file({k: v for k, v in sd.items() if k != "lm_head.weight"}, str(paths[step]))
            else:
                optimizer = torch.optim.AdamW(model.parameters()).state_dict()
                torch.save({"model": {f"_orig_mod.{k}": v for k, v in sd.items()}, "optimizer": optimizer}, paths[step])
    return paths


@pytest.mark.parametrize("budget", [SLIDING, TENSORWISE])
@pytest.mark.parametrize("fmt, hf_names", [("snapshot", False), ("nanogpt", False), ("gpt2", False), ("gpt2", True),
                                           ("neox", True)])
def test_every_source_kind_equals_the_float64_reference(tmp_path, fmt, hf_names, budget):
    paths = gpt_checkpoints(tmp_path / fmt, fmt)
    windows = plan_windows(paths, interval=10, k=3, nu=10)
    merger = Merger(paths, hf_names=hf_names, memory_budget=budget)
    merger.check(paths)
    assert set(merger.strategies(windows)) == {"sliding" if budget else "tensorwise"}
    for window, role, tensors in merger.models(windows):
        got = dict(tensors)
        members = [Weights(paths[s], hf_names=hf_names) for s in window.members]
        if role == "newest":
            assert all(torch.equal(got[k], v) for k, v in members[-1].items())
            continue
        want = {k: sum(m.get(k).double() for m in members) / 3 for k in members[-1].keys()}
        assert got.keys() == want.keys() and len(want) > 5
        assert max((got[k].double() - want[k]).abs().max().item() for k in want) <= 1e-6
        assert sum(not torch.equal(got[k], members[-1].get(k)) for k in got) >= 5  # an average, not a copy


@pytest.mark.parametrize("budget", [SLIDING, TENSORWISE])
def test_averages_keep_the_dtype_and_take_exact_tensors_from_the_newest(tmp_path, budget):
    paths = {}
    for step in range(0, 50, 10):
        paths[step] = tmp_path / f"step_{step:08d}.safetensors"
        w = torch.randn(1000, generator=torch.Generator().manual_seed(step)).half()
        save_file({"w": w, "count": torch.tensor([step]), "mask": torch.tensor([step % 20 == 0])}, str(paths[step]))
    windows = plan_windows(paths, interval=10, k=3, nu=10)
    for window, average, _ in stream_averages(windows, Merger(paths, memory_budget=budget), with_raw=False):
        want = sum(load_weights(paths[s])["w"].double() for s in window.members) / 3
        assert average["w"].dtype == torch.float16
        assert (average["w"].double() - want).abs().max().item() <= 1e-3  # float16 rounding of the float64 mean
        assert average["count"].tolist() == [window.step] and average["mask"].tolist() == [window.step % 20 == 0]


# Peak memory during the averaging, sampled every millisecond from /proc: resident memory over its
# value before the loop, and its anonymous part (safetensors are read, not mapped, so what a reader
# holds is anonymous memory). VmHWM would also move with the library pages the kernel drops under load, and
# MALLOC_MMAP_THRESHOLD_ makes glibc hand freed tensors back, so that live memory is what is seen.
MEMORY_PROBE = """
import sys, threading, time
from pathlib import Path
from ewa.files import list_checkpoints
from ewa.tools.merge import Merger, plan_windows, stream_averages, streaming_order
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
paths = list_checkpoints(Path(sys.argv[1]))
k, budget = int(sys.argv[2]), int(sys.argv[3])
windows = streaming_order(plan_windows(list(paths), 1, k, 1), 1)
before, peak, done = status("VmRSS:"), [0, 0], False
def sample():
    while not done:
        peak[:] = max(peak[0], status("VmRSS:") - before), max(peak[1], status("RssAnon:"))
        time.sleep(0.001)
sampler = threading.Thread(target=sample)
sampler.start()
for _ in stream_averages(windows, Merger(paths, memory_budget=budget)):
    pass
done = True
sampler.join()
print(*peak)
"""


@pytest.mark.parametrize("budget", [SLIDING, TENSORWISE])
def test_peak_memory_does_not_grow_with_k(tmp_path, budget):
    """Sliding: one checkpoint is open at a time. Tensorwise: a window's k checkpoints are open
    together, but only the tensor being summed is read, so what is held stays one tensor's worth."""
    numel = 2_000_000  # 8 MB per checkpoint: holding 16 of them would add 128 MB
    random_checkpoints(tmp_path / "ckpts", range(20), numel=numel)
    script = tmp_path / "probe.py"
    script.write_text(MEMORY_PROBE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": str(2**17)}

    def peak(k: int) -> int:
        cmd = [sys.executable, str(script), str(tmp_path / "ckpts"), str(k), str(budget)]
        resident, anonymous = map(int, subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.split())
        return resident if budget == SLIDING else anonymous

    assert peak(16) - peak(3) < 2 * 4 * numel  # less than two checkpoints' worth (k=2 would not slide)


# ---------------------------------------------------------------------------------------------
# weighted windows

PROFILES_BY_FORMULA = {  # p(x), straight from the definitions, for the references below
    "uniform": lambda x: 1 - x,
    "1-sqrt": lambda x: 1 - x**0.5,
    "cosine": lambda x: (1 + math.cos(math.pi * x)) / 2,
}


def reference_coefficients(weights: str, n: int) -> list[float]:
    if weights.startswith("ema:"):
        a = float(weights[4:])
        raw = [a * (1 - a) ** (n - i) for i in range(1, n + 1)]
        return [r / sum(raw) for r in raw]
    w = [PROFILES_BY_FORMULA[weights]((i - 1) / n) for i in range(1, n + 2)]
    w[n] = 0.0  # w_{n+1} = 0
    return [w[i] - w[i + 1] for i in range(n)]


@pytest.mark.parametrize("weights", ["uniform", "1-sqrt", "cosine", "ema:0.3", "ema:1"])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_merge_weights_sum_to_one_and_follow_the_formulas(weights, n):
    c = merge_weights(weights, n)
    assert len(c) == n and sum(c) == pytest.approx(1.0, abs=1e-12) and all(x >= 0 for x in c)
    assert c == pytest.approx(reference_coefficients(weights, n), abs=1e-15)
    if weights == "uniform":
        assert c == [1 / n] * n


def test_bad_weights_name_the_choices():
    with pytest.raises(PlanError, match=r"--weights=sqrt: use one of uniform, 1-sqrt, cosine or ema:<a>"):
        merge_weights("sqrt", 3)
    with pytest.raises(PlanError, match=r"ema:<a> needs 0 < a <= 1"):
        WindowPlan(k=3, nu=1, interval=1, weights="ema:2")


@pytest.mark.parametrize("weights", ["1-sqrt", "ema:0.4", "cosine"])
def test_weighted_windows_equal_a_float64_reference(tmp_path, weights):
    paths = random_checkpoints(tmp_path, range(0, 50, 10))
    windows = plan_windows(paths, interval=10, k=4, nu=10)
    merger = Merger(paths, memory_budget=SLIDING, weights=weights)
    assert set(merger.strategies(windows)) == {"tensorwise"}  # a weighted window is not slid
    for window, tensors in ((w, t) for w, role, t in merger.models(windows, newest=False) if role == "average"):
        got = dict(tensors)
        c = reference_coefficients(weights, 4)
        members = [load_weights(paths[s]) for s in window.members]  # oldest first
        for name in got:
            want = sum(ci * m[name].double() for ci, m in zip(c, members))
            assert torch.allclose(got[name].double(), want, rtol=2e-7, atol=0), (window.step, name)


@pytest.mark.parametrize("budget, strategy", [(SLIDING, "sliding"), (TENSORWISE, "tensorwise")])
def test_uniform_weights_are_todays_lawa_exactly(tmp_path, budget, strategy):
    """The float64 sum over k, divided by k and cast: bit for bit, whichever sum computes it."""
    paths = random_checkpoints(tmp_path, range(0, 60, 10))
    windows = streaming_order(plan_windows(paths, interval=10, k=3, nu=10), 10)
    merger = Merger(paths, memory_budget=budget, weights="uniform")
    assert strategy in merger.strategies(windows)
    # copies: the sliding sum's output buffers are reused from window to window
    averages = [(w, {k: v.clone() for k, v in t}) for w, _, t in merger.models(windows, newest=False)]
    assert len(averages) == 4
    for window, got in averages:
        members = [load_weights(paths[s]) for s in window.members]
        for name, tensor in got.items():
            want = (sum(m[name].double() for m in members) / 3).to(tensor.dtype)
            assert torch.equal(tensor, want), (window.step, name)
