"""LAWA, offline: sliding-window averages of saved checkpoints, evaluated beside the raw model.

The window (our definition of the paper's Algorithm 1): at every evaluation step
``t = start, start + interval, ...`` the LAWA model is the uniform average of the k checkpoints
at steps ``t, t - nu, ..., t - (k-1)*nu``. A window with a checkpoint missing (or before step
0) is reported and skipped, never averaged over fewer models.

Streaming: windows are visited lane by lane (same ``t mod nu``) in increasing t, and one
float64 running sum slides from window to window: the checkpoints entering the window are
added and those leaving it subtracted, tensor by tensor. Memory stays at a few models
whatever k is, and each checkpoint is read about twice in all (once in, once out).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ewa.checkpoint import CheckpointError, Weights, check_compatible

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Window:
    step: int  # t: the newest checkpoint of the window, where LAWA is compared with the raw model
    members: tuple[int, ...]  # oldest first
    missing: tuple[int, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.missing


def window_members(step: int, k: int, nu: int) -> tuple[int, ...]:
    return tuple(step - j * nu for j in reversed(range(k)))


def plan_windows(
    available: list[int] | set[int], interval: int, k: int, nu: int, start: int = 0, end: int | None = None
) -> list[Window]:
    """Every window from ``start`` to ``end`` (default: the last available step), with the
    members each lacks. Windows reaching before step 0 are left out."""
    if min(interval, k, nu) < 1:
        raise ValueError(f"interval, k and nu must be positive (got {interval}, {k}, {nu})")
    have = set(available)
    if not have:
        return []
    end = max(have) if end is None else end
    first = max(start, (k - 1) * nu)
    first += (start - first) % interval  # keep t on the start + m * interval grid
    windows = []
    for t in range(first, end + 1, interval):
        members = window_members(t, k, nu)
        windows.append(Window(t, members, tuple(s for s in members if s not in have)))
    return windows


def streaming_order(windows: list[Window], nu: int) -> list[Window]:
    """Windows grouped by lane (t mod nu), each lane in increasing t: consecutive windows
    of a lane share members, so the running sum slides instead of restarting."""
    return sorted(windows, key=lambda w: (w.step % nu, w.step))


@dataclass
class IOStats:
    files_opened: int = 0
    bytes_read: int = 0
    reads_per_step: dict[int, int] = field(default_factory=dict)


class RunningAverage:
    """A float64 sum over a set of checkpoints that moves from window to window."""

    def __init__(self, paths: dict[int, Path], device: torch.device | str = "cpu"):
        self.paths = paths
        self.device = torch.device(device)
        self.sum: Tensors = {}
        self.members: set[int] = set()
        self.stats = IOStats()
        self._mean: Tensors = {}  # fp32 output buffers, reused from window to window

    def _open(self, step: int) -> Weights:
        w = Weights(self.paths[step])
        self.stats.files_opened += 1
        self.stats.bytes_read += w.nbytes
        self.stats.reads_per_step[step] = self.stats.reads_per_step.get(step, 0) + 1
        return w

    def _add(self, step: int, sign: int, keep: Tensors | None = None) -> None:
        w = self._open(step)
        for name in w.keys():
            t = w.get(name).to(self.device)
            if keep is not None:
                keep[name] = t.float()
            acc = self.sum.get(name)
            if acc is None:
                self.sum[name] = t.double() * sign
            elif sign > 0:
                acc.add_(t)
            else:
                acc.sub_(t)
        del w  # drops the file mapping
        (self.members.add if sign > 0 else self.members.discard)(step)

    def move_to(self, members: tuple[int, ...], newest: Tensors | None = None) -> None:
        """Make the sum cover exactly ``members``; the newest member's fp32 weights go into
        ``newest`` as they stream past (for evaluating the raw model without a re-read)."""
        target = set(members)
        leaving, entering = self.members - target, target - self.members
        if len(leaving) + len(entering) >= len(target):  # cheaper to start over
            self.sum, self.members = {}, set()
            leaving, entering = set(), target
        for step in sorted(leaving):
            self._add(step, -1)
        for step in sorted(entering):
            self._add(step, +1, keep=newest if step == members[-1] else None)
        if newest is not None and not newest:  # the newest was already in the sum
            w = self._open(members[-1])
            newest.update({k: w.get(k).to(self.device).float() for k in w.keys()})

    def mean(self) -> Tensors:
        """The fp32 average of the members, in buffers that the next ``mean`` overwrites."""
        n = len(self.members)
        for k, v in self.sum.items():
            if k not in self._mean:
                self._mean[k] = torch.empty_like(v, dtype=torch.float32)
            torch.div(v, n, out=self._mean[k])
        return self._mean


def check_checkpoints(paths: dict[int, Path]) -> None:
    """Every checkpoint opens and has the first one's tensor names and shapes."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    steps = sorted(paths)
    reference = Weights(paths[steps[0]])
    for step in steps[1:]:
        check_compatible(reference, Weights(paths[step]))


def stream_averages(
    windows: list[Window],
    running: RunningAverage,
    with_raw: bool = True,
    progress: Callable[[Iterator], Iterator] = iter,
) -> Iterator[tuple[Window, Tensors, Tensors | None]]:
    """(window, LAWA weights, raw weights at the window's step) for each window, in the
    order given (use ``streaming_order``); ``running.stats`` counts what was read. The LAWA
    weights live in buffers reused by the next window: copy them to keep them."""
    for window in progress(windows):
        if not window.complete:
            raise ValueError(f"window at step {window.step} lacks steps {list(window.missing)}")
        raw: Tensors | None = {} if with_raw else None
        running.move_to(window.members, newest=raw)
        yield window, running.mean(), raw


def reference_average(files: list[Path]) -> Tensors:
    """The plain definition, for tests: load every file, sum in float64, divide."""
    total: Tensors = {}
    for f in files:
        for k, v in Weights(f).items():
            total[k] = total.get(k, 0) + v.double()
    return {k: (v / len(files)).float() for k, v in total.items()}
