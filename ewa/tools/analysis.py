"""The paper's analyses of a run's checkpoints, as functions (``ewa.tools.analyze`` runs them for ``analyze.py``).

- ablation (appendix A.1): LAWA val loss over a grid of (k, nu) at each evaluation step; every
  (k, nu) streams its windows through lawa.py's sliding float64 sum, and the raw model is
  scored once per step, not once per (k, nu);
- linear mode connectivity (appendix A.3): val loss along alpha * theta_a + (1 - alpha) * theta_b,
  and the barrier above the straight line between the endpoints' losses;
- diversity (section 2.2): how often two checkpoints' top-1 next-token predictions differ on
  the same held-out positions;
- loss spikes (section 4.3): steps where the raw val loss jumps above its own recent trend,
  and whether the LAWA curve jumps there too; and recovery (PMA-init, beyond the paper): the
  run restarted before a spike from its raw checkpoint and from the LAWA average there;
- zero-shot (Table 2, for our own runs): the raw, EMA, SWA and LAWA models at a few steps, as
  ``GPT2LMHeadModel`` in memory, through lm-evaluation-harness (``ewa.tools.hf``).

Every model but the zero-shot ones is scored by an ``Evaluator`` over the same fixed held-out
windows.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ewa.engine.evaluate import Evaluator
from ewa.files import Weights, check_compatible, list_checkpoints, load_weights, snapshot_kinds
from ewa.tools.cli import InputError
from ewa.tools.merge import Merger, Model, Tensors, plan_windows, stream_averages, streaming_order
from ewa.tools.report import Curve
from ewa.window import Window, window_members
from model import GPT

Tick = Callable[[], None]  # advances a progress bar by one model evaluation


def snapshot_spacing(steps: Iterable[int]) -> int:
    """The smallest gap between saved steps: the unit ``nu`` and distances are multiples of."""
    steps = sorted(steps)
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    if not gaps:
        raise InputError(f"need at least two checkpoints, found {len(steps)}")
    return min(gaps)


def val_loss(model: GPT, evaluator: Evaluator, weights: Tensors) -> float:
    """The val loss of ``model`` holding ``weights``."""
    model.load_weights(weights)
    return evaluator.loss(model)


@dataclass
class AblationPlan:
    steps: list[int]  # the evaluation steps that have a raw checkpoint
    windows: dict[tuple[int, int], list[Window]]  # (k, nu) -> its complete windows on those steps

    @property
    def evaluations(self) -> int:
        return len(self.steps) + sum(map(len, self.windows.values()))


@dataclass
class Ablation:
    raw: Curve
    lawa: dict[tuple[int, int], Curve]  # (k, nu) -> LAWA val loss by step
    files_read: int  # checkpoint files opened for all the averages together


def plan_ablation(paths: dict[int, Path], settings: list[tuple[int, int]], interval: int, start: int,
                  end: int) -> AblationPlan:
    """The raw model at start, start + interval, ... <= end, and every (k, nu)'s windows there."""
    steps = [s for s in range(start, end + 1, interval) if s in paths]
    windows = {s: [w for w in plan_windows(list(paths), interval, *s, start=start, end=end) if w.complete]
               for s in settings}
    if empty := [f"k={k} nu={nu}" for k, nu in settings if not windows[k, nu]]:
        spacing = snapshot_spacing(paths)
        raise InputError(f"no complete LAWA window for {', '.join(empty)} between steps {start} and {end}: the "
                         f"checkpoints are {spacing} steps apart, so --nu must be a multiple of {spacing}, --interval "
                         f"a multiple of {spacing} and (k-1)*nu at most the last step, {end}")
    return AblationPlan(steps, windows)


def run_ablation(paths: dict[int, Path], plan: AblationPlan, model: GPT, evaluator: Evaluator,
                 tick: Tick = lambda: None) -> Ablation:
    """Raw loss once per step, then each (k, nu)'s windows in streaming order, so that one
    float64 sum slides through them (each checkpoint read about twice per (k, nu))."""
    Merger(paths).check(step for windows in plan.windows.values() for w in windows for step in w.members)
    result = Ablation({}, {}, 0)
    for step in plan.steps:
        result.raw[step] = val_loss(model, evaluator, load_weights(paths[step]))
        tick()
    for (k, nu), windows in plan.windows.items():
        merger = Merger(paths, evaluator.runtime.device)
        curve = {}
        for window, average, _ in stream_averages(streaming_order(windows, nu), merger, with_raw=False):
            curve[window.step] = val_loss(model, evaluator, average)
            tick()
        result.lawa[k, nu] = dict(sorted(curve.items()))
        result.files_read += merger.stats.files_opened
    return result


def interpolate(a: Tensors, b: Tensors, alpha: float) -> Tensors:
    """alpha * a + (1 - alpha) * b, computed in float64 and returned in fp32 (alpha = 1 gives
    exactly a, alpha = 0 exactly b)."""
    return {k: (alpha * a[k].double() + (1 - alpha) * b[k].double()).float() for k in a}


def load_pair(path_a: Path, path_b: Path) -> tuple[Tensors, Tensors]:
    check_compatible(Weights(path_a), Weights(path_b))
    return load_weights(path_a), load_weights(path_b)


def interpolation_curve(a: Tensors, b: Tensors, alphas: list[float], model: GPT, evaluator: Evaluator,
                        tick: Tick = lambda: None) -> dict[float, float]:
    """Val loss of the interpolated model at each alpha."""
    curve = {}
    for alpha in alphas:
        curve[alpha] = val_loss(model, evaluator, interpolate(a, b, alpha))
        tick()
    return curve


def loss_barrier(curve: dict[float, float]) -> tuple[float, float]:
    """(height, alpha): the largest excess of loss(alpha) over the straight line
    alpha * loss(1) + (1 - alpha) * loss(0) between the endpoints' losses. Never negative,
    since the endpoints lie on the line; 0 means linearly mode connected on this grid."""
    if 0.0 not in curve or 1.0 not in curve:
        raise InputError("the barrier needs the losses at alpha = 0 and alpha = 1")
    excess = {alpha: loss - (alpha * curve[1.0] + (1 - alpha) * curve[0.0]) for alpha, loss in curve.items()}
    alpha = max(excess, key=excess.get)
    return excess[alpha], alpha


@torch.no_grad()
def predictions(model: GPT, evaluator: Evaluator) -> torch.Tensor:
    """The top-1 next-token prediction at every position of the evaluator's held-out windows."""
    model.eval()
    out = []
    for batch in evaluator.local.split(evaluator.batch_size):
        batch = batch.to(evaluator.runtime.device)
        with evaluator.runtime.autocast():
            out.append(model.logits(batch[:, :-1]).argmax(-1).cpu())
    return torch.cat(out)


def disagreement(pred_a: torch.Tensor, pred_b: torch.Tensor) -> float:
    """The paper's diversity: (1/N) * sum_i 1[y_i^a != y_i^b] over the same N positions."""
    if pred_a.shape != pred_b.shape:
        raise ValueError(f"predictions over different positions: {tuple(pred_a.shape)} vs {tuple(pred_b.shape)}")
    return (pred_a != pred_b).double().mean().item()


def plan_pairs(available: Iterable[int], anchors: list[int], distances: list[int]) -> list[tuple[int, int]]:
    """(t, t + d) for every anchor t and distance d whose two checkpoints exist."""
    have = set(available)
    return [(t, t + d) for t in anchors for d in distances if t in have and t + d in have]


def steps_at_fractions(steps: Iterable[int], fractions: Iterable[float], last: int | None = None) -> list[int]:
    """The steps nearest each fraction of ``last`` (default: the last step)."""
    steps = list(steps)
    last = max(steps) if last is None else last
    return sorted({min(steps, key=lambda s: abs(s - last * f)) for f in fractions})


def default_anchors(steps: list[int]) -> list[int]:
    """The saved steps nearest a quarter and a half of the run."""
    return steps_at_fractions(steps, (0.25, 0.5))


def default_distances(steps: list[int], anchors: list[int]) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... times the snapshot spacing, as far as every anchor reaches."""
    spacing, reach = snapshot_spacing(steps), max(steps) - max(anchors)
    multiples = (m * 10**e for e in range(12) for m in (1, 2, 5))
    return [d for d in (spacing * m for m in multiples) if d <= reach] or [spacing]


@dataclass
class DiversityRun:
    """One run's checkpoints, and a model and evaluator to score them with."""

    label: str
    paths: dict[int, Path]
    model: GPT
    evaluator: Evaluator

    def steps_in(self, pairs: list[tuple[int, int]]) -> list[int]:
        """The steps of the pairs this run has both checkpoints of."""
        return sorted({s for p in pairs if set(p) <= self.paths.keys() for s in p})


def run_diversity(runs: list[DiversityRun], pairs: list[tuple[int, int]], tick: Tick = lambda: None) -> list[dict]:
    """One record per run and pair the run has: the steps, their distance and the disagreement.
    Each checkpoint's predictions are computed once, whatever the number of pairs it is in."""
    records = []
    for run in runs:
        preds = {}
        for step in run.steps_in(pairs):
            run.model.load_weights(load_weights(run.paths[step]))
            preds[step] = predictions(run.model, run.evaluator)
            tick()
        records += [{"kind": "diversity", "run": run.label, "a": a, "b": b, "distance": b - a,
                     "disagreement": disagreement(preds[a], preds[b])} for a, b in pairs if a in preds and b in preds]
    return records


@dataclass(frozen=True)
class Threshold:
    """How far above its trend a loss must be to count as a spike: in loss units, or as a
    fraction of the trend when ``relative``."""

    amount: float
    relative: bool = False

    @classmethod
    def parse(cls, text: str) -> Threshold:
        """``"0.05"`` (loss units) or ``"2%"`` (relative to the trend)."""
        relative = text.strip().endswith("%")
        try:
            amount = float(text.strip().rstrip("%")) / (100 if relative else 1)
        except ValueError:
            raise InputError(f"--threshold={text}: expected a loss difference (0.05) or a percentage (2%)") from None
        if not amount > 0:
            raise InputError(f"--threshold={text}: must be positive")
        return cls(amount, relative)

    def exceeded(self, value: float, trend: float) -> bool:
        """A non-finite loss always counts as a spike."""
        return not math.isfinite(value) or value - trend > self.amount * (abs(trend) if self.relative else 1)

    def __str__(self) -> str:
        return f"{100 * self.amount:g}%" if self.relative else f"{self.amount:g}"


def trend(series: Curve, window: int) -> dict[int, float]:
    """At each step, the median of up to ``window`` previous finite values (none at the first)."""
    if window < 1:
        raise InputError(f"--window={window}: must be at least 1")
    steps, out = sorted(series), {}
    for i, step in enumerate(steps):
        if previous := [series[s] for s in steps[max(0, i - window) : i] if math.isfinite(series[s])]:
            out[step] = statistics.median(previous)
    return out


def find_spikes(series: Curve, window: int, threshold: Threshold) -> dict[int, float]:
    """Steps where the loss exceeds its trend by more than ``threshold``, with the trend there."""
    return {s: t for s, t in trend(series, window).items() if threshold.exceeded(series[s], t)}


def compare_spikes(raw: Curve, lawa: Curve, window: int, threshold: Threshold) -> list[dict]:
    """For each spike of the raw curve: the LAWA loss there, LAWA's own trend, and whether
    LAWA spikes too (None where LAWA has no value at that step or no trend yet)."""
    lawa_trend = trend(lawa, window)
    rows = []
    for step, raw_trend in find_spikes(raw, window, threshold).items():
        value, own = lawa.get(step), lawa_trend.get(step)
        spiked = None if value is None or own is None else threshold.exceeded(value, own)
        rows.append({"kind": "spike", "step": step, "raw": raw[step], "raw_trend": raw_trend, "lawa": value,
                     "lawa_trend": own, "lawa_spiked": spiked})
    return rows


def restart_step(spike: int, resume_steps: Iterable[int], snapshot_steps: Iterable[int], k: int, nu: int) -> int:
    """The latest step before ``spike`` to restart from: one with a resume checkpoint (the
    optimizer state) and the raw snapshots of its whole LAWA window (k, nu)."""
    snapshots = set(snapshot_steps)
    candidates = [t for t in resume_steps if t < spike and set(window_members(t, k, nu)) <= snapshots]
    if not candidates:
        raise InputError(f"no step before the spike at {spike} has both a resume checkpoint and the raw snapshots of a "
                         f"LAWA window k={k} nu={nu}: train with resume_interval and ckpt_interval that divide nu "
                         "(and keep_resume=0), or pass --at")
    return max(candidates)


def spikes_after(before: Curve, after: Curve, start: int, window: int, threshold: Threshold) -> list[int]:
    """The steps past ``start`` where the curve ``after`` spikes, its trend seeded by ``before``."""
    joined = {**{s: v for s, v in before.items() if s <= start}, **after}
    return [s for s in find_spikes(joined, window, threshold) if s > start]


def averaged_snapshots(run_dir: Path | None) -> dict[str, dict[int, Path]]:
    """The averaged snapshots of a run by kind and step (ema, ema_<decay>, swa): its own, and
    SWA's from its ``-swa`` branch (where train_swa.py writes)."""
    if run_dir is None:
        return {}
    found = {kind: list_checkpoints(run_dir / "snapshots" / kind) for kind in snapshot_kinds(run_dir) if kind != "raw"}
    branch = run_dir.with_name(run_dir.name + "-swa") / "snapshots" / "swa"
    if branch.is_dir():  # at a step in both, the run's own SWA snapshot wins
        found["swa"] = {**list_checkpoints(branch), **found.get("swa", {})}
    return found


def zero_shot_models(merger: Merger, windows: list[Window], snapshots: dict[str, dict[int, Path]]) -> Iterator[Model]:
    """Per window: the raw model at its step and the LAWA average (the engine's), then the EMA and
    SWA snapshots of that step where the run has them."""
    for window, role, tensors in merger.models(windows):
        yield window, role, tensors
        if role == "average":
            for kind, paths in snapshots.items():
                if window.step in paths:
                    yield Window(window.step, (window.step,)), kind, Weights(paths[window.step]).items()
