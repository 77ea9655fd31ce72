"""The one merge engine: which checkpoints each window averages, how the float64 average is
computed, how each merged model reaches an evaluation, and where it is written. lawa.py,
analyze.py and pythia_lawa.py all go through it, whatever the checkpoints are (this project's
snapshots, nanoGPT ``ckpt.pt``, GPT-2 or GPT-NeoX Hugging Face directories).

The window and the weighted merges are ``ewa.window``'s: at every step
``t = start, start + interval, ...`` a window averages the checkpoints at ``t, t - nu, ...,
t - (k-1)*nu``. A window with a checkpoint missing (or before step 0) is reported and skipped,
never averaged over fewer models.

Two ways to compute an average, chosen per window by cost (``plan_strategies``), both through
the float64 kernel of ``ewa.window`` (so they give the same figure, and online LAWA's):

- **sliding**: one float64 sum over a whole model moves from window to window; checkpoints
  entering the window are added and those leaving it subtracted, tensor by tensor. Windows are
  visited lane by lane (same ``t mod nu``) in increasing t, so overlapping windows read each
  checkpoint about twice in all instead of k times. Uniform windows only.
- **tensorwise**: the k members' tensors are merged one tensor at a time. It reads k checkpoints
  per window but holds one float64 tensor, not a float64 model.

Sliding is used when the sum fits in memory and sliding saves reads; otherwise tensorwise.
Tensors that are not floating point (masks, counters) are the newest member's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ewa.files import CheckpointError, Weights, check_compatible
from ewa.window import PlanError, Window, coefficients, finish, fold, merge_weights, window_mean, window_members

Tensors = dict[str, torch.Tensor]
TensorStream = Iterable[tuple[str, torch.Tensor]]  # (name, tensor) pairs, read as they are needed
# An evaluation scores the model it was built around, as loaded now: one record per held-out set
# (the run's token windows, a text file, an lm-eval task). Token-bin loss (lawa.lawa_losses),
# text perplexity (hf.perplexity_evaluation) and zero-shot tasks (hf.zero_shot_evaluation) have this shape.
Evaluation = Callable[[], list[dict[str, Any]]]
# A merged model: its window, its role ("newest": the window's own checkpoint at t, "average":
# the window's average, or a name of one's own such as "ema") and its tensors.
Model = tuple["Window", str, TensorStream]


def plan_windows(available: Iterable[int], interval: int, k: int, nu: int, start: int = 0,
                 end: int | None = None) -> list[Window]:
    """Every window from ``start`` to ``end`` (default: the last available step), with the
    members each lacks. Windows reaching before step 0 are left out."""
    if min(interval, k, nu) < 1:
        raise PlanError(f"interval, k and nu must be positive (got {interval}, {k}, {nu})")
    have = set(available)
    if not have:
        return []
    end = max(have) if end is None else end
    first = max(start, (k - 1) * nu)
    first += (start - first) % interval  # keep t on the start + m * interval grid
    members = {t: window_members(t, k, nu) for t in range(first, end + 1, interval)}
    return [Window(t, m, tuple(s for s in m if s not in have)) for t, m in members.items()]


@dataclass(frozen=True)
class WindowPlan:
    """The window settings of every command; ``steps`` keeps only the windows at those steps."""

    k: int
    nu: int
    interval: int
    start: int = 0
    end: int | None = None
    steps: tuple[int, ...] = ()
    weights: str = "uniform"  # the merge of each window (merge_weights)

    def __post_init__(self) -> None:
        if min(self.k, self.nu, self.interval) < 1 or self.start < 0:
            raise PlanError(f"{self.flags()}: k, nu and interval must be positive, start not negative")
        merge_weights(self.weights, self.k)

    def flags(self) -> str:
        weights = "" if self.weights == "uniform" else f" --weights={self.weights}"
        return f"--k={self.k} --nu={self.nu} --interval={self.interval} --start={self.start}{weights}"

    def name(self) -> str:
        """``lawa_k<k>_nu<nu>``, with ``_<weights>`` for a weighted merge (file names, wandb sections)."""
        weights = "" if self.weights == "uniform" else "_" + self.weights.replace(":", "")
        return f"lawa_k{self.k}_nu{self.nu}{weights}"

    def windows(self, available: Iterable[int], end: int | None = None) -> list[Window]:
        """The windows up to ``end`` (default: the plan's, else the last available step)."""
        windows = plan_windows(available, self.interval, self.k, self.nu, self.start, end or self.end)
        if not self.steps:
            return windows
        by_step = {w.step: w for w in windows}
        if wrong := sorted(set(self.steps) - by_step.keys()):
            grid = ", ".join(map(str, list(by_step)[:3])) + (f", ..., {max(by_step)}" if len(by_step) > 3 else "")
            raise PlanError(f"--steps {' '.join(map(str, wrong))}: no such window; "
                            f"with {self.flags()} the windows are at {grid or 'no step'}")
        return [by_step[s] for s in sorted(set(self.steps))]


def streaming_order(windows: list[Window], nu: int) -> list[Window]:
    """Windows grouped by lane (t mod nu), each lane in increasing t: consecutive windows
    of a lane share members, so the running sum slides instead of restarting."""
    return sorted(windows, key=lambda w: (w.step % nu, w.step))


def moves(held: Iterable[int], target: Iterable[int]) -> int:
    """Checkpoint reads to slide a sum over ``held`` to one over ``target``."""
    return len(set(held) ^ set(target))


def plan_strategies(windows: list[Window], sum_fits: bool) -> list[str]:
    """Per window, in the order given: "sliding" when the float64 sum fits and sliding saves
    reads (the sum already holds enough of this window, or this window shares enough with the
    next to make building the sum pay off), else "tensorwise" (k reads, one tensor in memory)."""
    strategies, held = [], ()
    for i, window in enumerate(windows):
        slides_now = bool(held) and moves(held, window.members) < len(window.members)
        nxt = windows[i + 1].members if i + 1 < len(windows) else ()
        pays_later = bool(nxt) and moves(window.members, nxt) < len(nxt)
        sliding = sum_fits and (slides_now or pays_later)
        strategies.append("sliding" if sliding else "tensorwise")
        held = window.members if sliding else ()
    return strategies


class SlidingSum:
    """A float64 sum over a set of checkpoints that moves from window to window."""

    def __init__(self, open_step: Callable[[int], Weights], device: torch.device):
        self.open_step, self.device = open_step, device
        self.clear()

    def clear(self) -> None:
        self.sum: Tensors = {}
        self.members: set[int] = set()
        self.dtypes: dict[str, torch.dtype] = {}  # in the checkpoints' tensor order
        self.exact: Tensors = {}  # tensors that are not floating point: the newest member's
        self._mean: Tensors = {}  # output buffers, reused from window to window

    def _add(self, step: int, sign: int, keep: Tensors | None = None) -> None:
        w = self.open_step(step)
        newest = sign > 0 and step >= max(self.members, default=step)
        for name in w.keys():
            t = w.get(name).to(self.device)
            if keep is not None:
                keep[name] = t
            self.dtypes.setdefault(name, t.dtype)
            if t.is_floating_point():
                self.sum[name] = fold(self.sum.get(name), t, sign)
            elif newest:
                self.exact[name] = t
        (self.members.add if sign > 0 else self.members.discard)(step)

    def move_to(self, members: tuple[int, ...], newest: Tensors | None = None) -> None:
        """Make the sum cover exactly ``members``; the newest member's tensors go into
        ``newest`` as they stream past (for evaluating the raw model without a re-read)."""
        target = set(members)
        leaving, entering = self.members - target, target - self.members
        if moves(self.members, target) >= len(target):  # cheaper to start over
            self.clear()
            leaving, entering = set(), target
        for step in sorted(leaving):
            self._add(step, -1)
        for step in sorted(entering):
            self._add(step, +1, keep=newest if step == members[-1] else None)
        if newest is not None and not newest:  # the newest was already in the sum
            newest.update((k, t.to(self.device)) for k, t in self.open_step(members[-1]).items())

    def mean(self) -> Tensors:
        """The average of the members, in buffers that the next ``mean`` overwrites."""
        for k, v in self.sum.items():
            if k not in self._mean:
                self._mean[k] = torch.empty_like(v, dtype=self.dtypes[k])
            finish(v, len(self.members), out=self._mean[k])
        return {k: self._mean[k] if k in self._mean else self.exact[k] for k in self.dtypes}


def tensorwise_mean(members: list[Weights], device: torch.device | str = "cpu",
                    c: list[float] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merge) for each tensor of the newest member, one tensor at a time: the window's
    mean (or, with coefficients ``c``, oldest first, its weighted sum; ``window_mean``), in the
    newest member's dtype."""
    newest = members[-1]
    for name in newest.keys():
        last = newest.get(name)
        if not last.is_floating_point():
            yield name, last
            continue

        def member(i: int) -> torch.Tensor:
            return (last if i == len(members) - 1 else members[i].get(name)).to(device)

        yield name, window_mean(len(members), member, c)


def sliding_bytes(weights: Weights, newest: bool) -> int:
    """What the sliding sum holds for checkpoints like ``weights``: a float64 copy of every
    tensor, the output buffers and, when the newest member is kept, a copy of it."""
    numel = sum(math.prod(shape) for shape in weights.shapes().values())
    return 8 * numel + weights.nbytes * (2 if newest else 1)


def available_memory(device: torch.device) -> int:
    """Free memory of the device: the GPU's, else the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class CountingOpener:
    """Opens the checkpoint of a step, counting the files opened and the bytes read."""

    paths: dict[int, Path]
    hf_names: bool
    files_opened: int = 0
    bytes_read: int = 0
    reads_per_step: dict[int, int] = field(default_factory=dict)

    def __call__(self, step: int) -> Weights:
        w = Weights(self.paths[step], hf_names=self.hf_names)
        self.files_opened += 1
        self.bytes_read += w.nbytes
        self.reads_per_step[step] = self.reads_per_step.get(step, 0) + 1
        return w


class Merger:
    """Averages of windows of checkpoints, each computed the cheaper way, as models to score
    or write.

    ``memory_budget``: bytes the sliding sum may take (default: half of the device's free
    memory, leaving the rest to the model under evaluation). ``hf_names``: keep a Hugging Face
    GPT-2 directory's own tensor names (to write Hugging Face directories). ``weights``: the
    merge's weights (``merge_weights``); a window merged with weights other than ``uniform`` is
    summed tensor by tensor."""

    def __init__(self, paths: dict[int, Path], device: torch.device | str = "cpu", hf_names: bool = False,
                 memory_budget: int | None = None, weights: str = "uniform"):
        self.paths, self.device, self.hf_names = paths, torch.device(device), hf_names
        self.memory_budget, self.weights = memory_budget, weights
        merge_weights(weights, 1)  # a bad name fails here, naming the choices
        self.open = self.stats = CountingOpener(paths, hf_names)  # opens checkpoints; counts the reads
        # the sum holds the opener, not the Merger: no reference cycle, so a Merger's float64
        # sum is freed as soon as the Merger is dropped, not at the next garbage collection
        self.sliding = SlidingSum(self.open, self.device)

    def check(self, steps: Iterable[int]) -> None:
        """Every checkpoint opens and has the first one's tensor names and shapes (read from
        the headers), before any work is spent on averages."""
        steps = sorted(set(steps))
        if not steps:
            raise CheckpointError("no checkpoints to average")
        reference = Weights(self.paths[steps[0]], hf_names=self.hf_names)
        for step in steps[1:]:
            check_compatible(reference, Weights(self.paths[step], hf_names=self.hf_names))

    def strategies(self, windows: list[Window], newest: bool = True) -> list[str]:
        if not windows:
            return []
        budget = available_memory(self.device) // 2 if self.memory_budget is None else self.memory_budget
        like = Weights(next(iter(self.paths.values())), hf_names=self.hf_names)  # one architecture (``check``)
        return plan_strategies(windows, self.weights == "uniform" and sliding_bytes(like, newest) <= budget)

    def models(self, windows: list[Window], newest: bool = True,
               save: Callable[[Window, TensorStream], Path] | None = None,
               progress: Callable[[Iterable], Iterable] = iter) -> Iterator[Model]:
        """For each window in the order given (use ``streaming_order``): its newest checkpoint
        (with ``newest``), then its average. Each model's tensors are valid until the next is
        asked for. ``save(window, average)`` writes an average and returns where: the model
        handed on is then read back from there, so what is scored is what was written."""
        for window, strategy in progress(list(zip(windows, self.strategies(windows, newest), strict=True))):
            if not window.complete:
                raise ValueError(f"window at step {window.step} lacks steps {list(window.missing)}")
            if strategy == "sliding":
                kept: Tensors | None = {} if newest else None
                self.sliding.move_to(window.members, kept)
                if kept is not None:
                    yield window, "newest", kept.items()
                average: TensorStream = self.sliding.mean().items()
            else:
                self.sliding.clear()
                if newest:
                    yield window, "newest", self.open(window.step).items()
                members = [self.open(s) for s in window.members]
                average = tensorwise_mean(members, self.device, coefficients(self.weights, len(members)))
            if save is not None:
                average = Weights(save(window, average), hf_names=self.hf_names).items()
            yield window, "average", average


def stream_averages(windows: list[Window], merger: Merger,
                    with_raw: bool = True) -> Iterator[tuple[Window, Tensors, Tensors | None]]:
    """(window, average, newest checkpoint) as dicts, for models small enough to hold whole.
    The average may live in buffers the next window reuses: copy it to keep it."""
    raw = None
    for window, role, tensors in merger.models(windows, newest=with_raw):
        if role == "newest":
            raw = dict(tensors)
        else:
            yield window, dict(tensors), raw


def score_models(models: Iterable[Model], load: Callable[[TensorStream, str], None], evaluate: Evaluation,
                 kinds: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Load each model (``load(tensors, origin)``) and yield the evaluation's records, each
    with the step, the kind (the role renamed by ``kinds``) and the members it averages."""
    for window, role, tensors in models:
        kind = kinds.get(role, role)
        load(tensors, f"{kind} at step {window.step}")
        for record in evaluate():
            yield {"step": window.step, "kind": kind, "members": list(window.members), **record}
