"""The LAWA window and the one float64 kernel every average of the project goes through: online
LAWA during training (``ewa.engine.averaging``), and the offline merge engine's sliding and
tensorwise sums (``ewa.tools.merge``).

The window (our definition of the paper's Algorithm 1): the LAWA model at step t is the average
of the k checkpoints at steps ``t, t - nu, ..., t - (k-1)*nu``.

**Weighted windows** (``merge_weights``): the merge is sum_i c_i * theta_i over the members,
oldest first (i = 1..n), with weights from a decay profile p (p(0) = 1), as in WSM:
``w_i = p((i - 1) / n)``, ``w_{n+1} = 0``, ``c_i = w_i - w_{i+1}`` (the merge equals, to first
order, training on with the learning rate multiplied by w over the window). Profiles:
``uniform`` (p(x) = 1 - x: every c_i = 1/n, the paper's LAWA), ``1-sqrt`` (1 - sqrt(x)),
``cosine`` ((1 + cos(pi x)) / 2), and ``ema:<a>``, an EMA over the checkpoints: c_i proportional
to a (1 - a)^(n - i), normalised.

**The kernel.** A sum is folded in float64, one member at a time, each member promoted element
by element (never copied to float64 whole); a window's members are folded newest first, then
oldest to second newest, and the uniform sum is divided by n. Every average is therefore the
same float64 figure, whichever path computed it, cast to the output's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


class PlanError(ValueError):
    """Window settings that cannot work; the message names the flags."""


PROFILES: dict[str, Callable[[float], float]] = {
    "uniform": lambda x: 1.0 - x,
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
    "cosine": lambda x: (1.0 + math.cos(math.pi * x)) / 2.0,
}


def merge_weights(weights: str, n: int) -> list[float]:
    """The coefficients c_1..c_n (oldest member first, summing to 1) of a window of ``n``
    members merged with ``weights``: a profile name or ``ema:<a>`` (see the module docstring)."""
    if weights.startswith("ema:"):
        try:
            a = float(weights[4:])
        except ValueError:
            a = -1.0
        if not 0 < a <= 1:
            raise PlanError(f"--weights={weights}: ema:<a> needs 0 < a <= 1, e.g. ema:0.3")
        raw = [a * (1 - a) ** (n - i) for i in range(1, n + 1)]
        return [c / sum(raw) for c in raw]
    if weights not in PROFILES:
        raise PlanError(f"--weights={weights}: use one of {', '.join(PROFILES)} or ema:<a>")
    if weights == "uniform":  # exactly 1/n: the differences of 1 - x round for most n
        return [1.0 / n] * n
    p = PROFILES[weights]
    w = [p((i - 1) / n) for i in range(1, n + 1)] + [0.0]
    return [w[i] - w[i + 1] for i in range(n)]


def coefficients(weights: str, n: int) -> list[float] | None:
    """``merge_weights``, or None for ``uniform``: a uniform window is summed, then divided by n."""
    return None if weights == "uniform" else merge_weights(weights, n)


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


# ---------------------------------------------------------------------------------------------
# the float64 kernel


def fold(total: torch.Tensor | None, t: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """``total + weight * t`` in float64, in place (a new float64 tensor when ``total`` is None)."""
    if total is None:
        total = t.to(torch.float64, copy=True)
        return total if weight == 1.0 else total.mul_(weight)
    return total.add_(t) if weight == 1.0 else total.add_(t, alpha=weight)


def finish(total: torch.Tensor, n: int, out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``total / n`` (n = 1: a weighted sum, already the merge) into ``out``, or as ``dtype``."""
    if out is not None:
        return torch.div(total, n, out=out) if n != 1 else out.copy_(total)
    return (total.div_(n) if n != 1 else total).to(dtype)


def window_mean(
    n: int, member: Callable[[int], torch.Tensor], c: Sequence[float] | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The merge of one tensor of each of ``n`` members, ``member(i)`` the i-th oldest (read one
    at a time): their mean, or with coefficients ``c`` (``coefficients``) sum c_i * member_i;
    into ``out``, else in the newest member's dtype."""
    weights = [1.0] * n if c is None else list(c)
    newest = member(n - 1)
    total = fold(None, newest, weights[-1])
    for i in range(n - 1):
        fold(total, member(i), weights[i])
    return finish(total, n if c is None else 1, out, newest.dtype)
