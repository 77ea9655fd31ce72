"""Weight averages kept during training: EMA, SWA and online LAWA.

Each averager sees the model's parameters after every optimizer step (``update``) and also
the initial weights (``update`` at the run's first step), holds its average in fp32 whatever
the training precision, and saves its counters with its tensors (``state_dict``) so a
resumed run continues the same average. Updates use multi-tensor ``torch._foreach_*`` ops.
"""

from __future__ import annotations

from collections import deque

import torch

Tensors = list[torch.Tensor]


def _fp32(params: Tensors) -> Tensors:
    return [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in params]


class Averager:
    """Interface: ``update(params, step)``, ``averaged(step)`` (fp32 tensors in parameter
    order, or None when there is no average at that step), ``state_dict``/``load_state_dict``."""

    name = ""

    def __init__(self, names: list[str]):
        self.names = list(names)

    def update(self, params: Tensors, step: int) -> None:
        raise NotImplementedError

    def averaged(self, step: int) -> Tensors | None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def _named(self, tensors: Tensors) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, tensors, strict=True))

    def _unnamed(self, named: dict[str, torch.Tensor], like: Tensors | None = None) -> Tensors:
        if list(named) != self.names:
            raise ValueError(f"{self.name} state does not match the model's parameters")
        tensors = list(named.values())
        if like is not None:
            tensors = [t.to(device=x.device, dtype=torch.float32) for t, x in zip(tensors, like, strict=True)]
        return tensors


class EMA(Averager):
    """Exponential moving average: ``ema = decay * ema + (1 - decay) * weights`` every step."""

    name = "ema"

    def __init__(self, names: list[str], params: Tensors, decay: float):
        super().__init__(names)
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in params]
        self.num_updates = 0

    @torch.no_grad()
    def update(self, params: Tensors, step: int) -> None:
        torch._foreach_lerp_(self.shadow, _fp32(params), 1.0 - self.decay)
        self.num_updates += 1

    def averaged(self, step: int) -> Tensors:
        return self.shadow

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "tensors": self._named(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.shadow = self._unnamed(state["tensors"], like=self.shadow)


class SWA(Averager):
    """Stochastic weight averaging: the uniform mean of the weights after steps
    ``start + every``, ``start + 2 * every``, ... (a running mean, as AveragedModel)."""

    name = "swa"

    def __init__(self, names: list[str], start: int, every: int):
        super().__init__(names)
        self.start, self.every = start, every
        self.mean: Tensors = []
        self.num_averaged = 0

    @torch.no_grad()
    def update(self, params: Tensors, step: int) -> None:
        if step <= self.start or (step - self.start) % self.every:
            return
        if not self.mean:
            self.mean = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.num_averaged += 1
        torch._foreach_lerp_(self.mean, _fp32(params), 1.0 / self.num_averaged)

    def averaged(self, step: int) -> Tensors | None:
        return self.mean if self.num_averaged else None

    def state_dict(self) -> dict:
        return {
            "start": self.start,
            "every": self.every,
            "num_averaged": self.num_averaged,
            "tensors": self._named(self.mean) if self.mean else {},
        }

    def load_state_dict(self, state: dict) -> None:
        self.start, self.every, self.num_averaged = state["start"], state["every"], state["num_averaged"]
        self.mean = self._unnamed(state["tensors"]) if state["tensors"] else []


class OnlineLAWA(Averager):
    """LAWA during training: keeps (on the CPU) the weights at the k latest multiples of nu,
    and at a step t that is one of them averages t, t - nu, ..., t - (k-1)*nu in float64:
    the same window, and the same figure, as offline ``lawa.py`` over the run's snapshots."""

    name = "lawa"

    def __init__(self, names: list[str], k: int, nu: int):
        super().__init__(names)
        self.k, self.nu = k, nu
        self.window: deque[tuple[int, Tensors]] = deque(maxlen=k)

    @torch.no_grad()
    def update(self, params: Tensors, step: int) -> None:
        if step % self.nu == 0:
            self.window.append((step, [p.detach().to("cpu", torch.float32, copy=True) for p in params]))

    def window_steps(self) -> list[int]:
        return [s for s, _ in self.window]

    @torch.no_grad()
    def averaged(self, step: int) -> Tensors | None:
        expected = [step - j * self.nu for j in reversed(range(self.k))]
        if self.window_steps() != expected:
            return None
        n = len(self.window)
        return [
            (sum(w[i].double() for _, w in self.window) / n).float() for i in range(len(self.names))
        ]

    def state_dict(self) -> dict:
        return {
            "k": self.k,
            "nu": self.nu,
            "steps": self.window_steps(),
            "tensors": [self._named(w) for _, w in self.window],
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["k"], state["nu"]) != (self.k, self.nu):
            raise ValueError(
                f"online LAWA state has k={state['k']}, nu={state['nu']}, the config k={self.k}, nu={self.nu}"
            )
        self.window = deque(
            ((s, self._unnamed(t)) for s, t in zip(state["steps"], state["tensors"], strict=True)), maxlen=self.k
        )
