"""Weight averages kept during training: EMA, SWA and online LAWA, over this rank's share.

An averager is a small object, as timm's ``ModelEmaV3`` and torch's ``AveragedModel``: ``acts``
(whether it averages at a step), ``update`` (folds the weights in, with multi-tensor
``torch._foreach_*`` ops), ``averaged`` (the flat fp32 average, or None when there is none at
that step), ``reset`` (start again from the current weights) and ``state_dict`` /
``load_state_dict`` (its buffers and counters together, so a resumed run continues the same
average). It holds fp32 state for the rank's share of the parameters only
(``ewa.engine.parallel``): a flat buffer viewed as the share's pieces.

``Averaging`` is the trainer's averaging component. It updates the averagers after each step,
swaps each average into the live model for an evaluation (the live weights come back in
``finally``), and hands the checkpointer their snapshots and state. With
``averaging_device=cpu`` their state lives in (pinned) host memory: the share is copied to a
staging buffer off the training thread and the updates run on the background's ``averaging``
lane, so the training thread does not wait for them (a step waits only while the previous
update still reads the staging buffer). There the averagers see the share cut into pieces
below torch's parallel grain size: each op runs on the lane's thread alone, never on torch's
intra-op threads, which training uses.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from ewa.engine.background import Background, Done, wait_for
from ewa.engine.config import ConfigError, TrainConfig
from ewa.engine.parallel import Layout, Pieces, Shares
from ewa.window import coefficients, window_mean

SUM_BLOCK = 1 << 22  # elements summed in float64 at a time by online LAWA
ONE_THREAD = 1 << 14  # elements per piece that torch's CPU ops process on the calling thread (its grain is 32768)


class Averager:
    """An average of the rank's share. Each kind has ``reset(share)`` (start again from the
    current weights), ``acts(step)``, ``update(share, step)``, ``averaged(step)`` (the flat fp32
    average, or None when there is none at that step), ``state_dict()`` (its buffers and
    counters) and ``load_state_dict(state)`` (the counters: the buffers, its own, are loaded in
    place)."""

    def __init__(self, shares: Shares, device: torch.device, pin: bool):
        self.shares, self.device, self.pin = shares, device, pin

    def _buffer(self) -> tuple[torch.Tensor, Pieces]:
        flat = self.shares.alloc(self.device, self.pin)
        return flat, self.shares.split(flat)


class EMA(Averager):
    """Exponential moving average: ``ema = decay * ema + (1 - decay) * weights`` every step,
    starting from the initial weights."""

    def __init__(self, shares: Shares, initial: Pieces, decay: float, device: torch.device, pin: bool = False):
        super().__init__(shares, device, pin)
        self.decay = decay
        self.flat, self.views = self._buffer()
        self.reset(initial)

    def reset(self, share: Pieces) -> None:
        torch._foreach_copy_(self.views, share)
        self.num_updates = 0

    def acts(self, step: int) -> bool:
        return True

    @torch.no_grad()
    def update(self, share: Pieces, step: int) -> None:
        torch._foreach_lerp_(self.views, share, 1.0 - self.decay)
        self.num_updates += 1

    def averaged(self, step: int) -> torch.Tensor:
        return self.flat

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "weights": self.flat}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]


class SWA(Averager):
    """Stochastic weight averaging: the uniform mean of the weights after steps
    ``start + every``, ``start + 2 * every``, ... (a running mean, as AveragedModel)."""

    def __init__(self, shares: Shares, start: int, every: int, device: torch.device, pin: bool = False):
        super().__init__(shares, device, pin)
        self.start, self.every = start, every
        self.flat, self.views = self._buffer()
        self.reset([])

    def reset(self, share: Pieces) -> None:
        self.flat.zero_()
        self.num_averaged = 0

    def acts(self, step: int) -> bool:
        return step > self.start and (step - self.start) % self.every == 0

    @torch.no_grad()
    def update(self, share: Pieces, step: int) -> None:
        self.num_averaged += 1
        torch._foreach_lerp_(self.views, share, 1.0 / self.num_averaged)

    def averaged(self, step: int) -> torch.Tensor | None:
        return self.flat if self.num_averaged else None

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "every": self.every, "num_averaged": self.num_averaged, "weights": self.flat}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start, self.every, self.num_averaged = state["start"], state["every"], state["num_averaged"]


class OnlineLAWA(Averager):
    """LAWA during training: keeps the share at the k latest multiples of nu in k slots, and
    at a step t that is one of them merges t, t - nu, ..., t - (k-1)*nu with the window kernel
    of ``ewa.window`` (uniformly, or with the coefficients of ``merge_weights``): the same
    window, and the same figure, as offline ``lawa.py`` over the run's snapshots."""

    def __init__(
        self,
        shares: Shares,
        k: int,
        nu: int,
        device: torch.device,
        pin: bool = False,
        out: torch.Tensor | None = None,
        weights: str = "uniform",
    ):
        """``out``: where ``averaged`` writes the merge (default: a buffer of its own); valid
        until the next ``update``."""
        super().__init__(shares, device, pin)
        self.k, self.nu = k, nu
        self.coefficients = coefficients(weights, k)
        self.slots = [self._buffer() for _ in range(k)]
        self.mean = out if out is not None else self.shares.alloc(device, pin)
        self.reset([])

    def reset(self, share: Pieces) -> None:
        self.slot_steps = [-1] * self.k  # the step each slot holds (-1: empty)

    def acts(self, step: int) -> bool:
        return step % self.nu == 0

    @torch.no_grad()
    def update(self, share: Pieces, step: int) -> None:
        slot = min(range(self.k), key=lambda i: self.slot_steps[i])  # an empty or the oldest slot
        torch._foreach_copy_(self.slots[slot][1], share)
        self.slot_steps[slot] = step

    @torch.no_grad()
    def averaged(self, step: int) -> torch.Tensor | None:
        expected = [step - j * self.nu for j in reversed(range(self.k))]
        if sorted(s for s in self.slot_steps if s >= 0) != expected:
            return None
        members = [self.slots[self.slot_steps.index(s)][0] for s in expected]  # oldest first
        for a in range(0, self.shares.numel, SUM_BLOCK):
            block = slice(a, a + SUM_BLOCK)
            window_mean(self.k, lambda i: members[i][block], self.coefficients, out=self.mean[block])  # noqa: B023
        return self.mean

    def state_dict(self) -> dict[str, Any]:
        slots = {f"slot{i}": flat for i, (flat, _) in enumerate(self.slots)}
        return {"k": self.k, "nu": self.nu, "slot_steps": list(self.slot_steps), **slots}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["k"], state["nu"]) != (self.k, self.nu):
            raise ValueError(f"online LAWA state has k={state['k']}, nu={state['nu']}, the config k={self.k}, nu={self.nu}")
        self.slot_steps = list(state["slot_steps"])


def build_averagers(
    cfg: TrainConfig, shares: Shares, share: Pieces, device: torch.device, staging: torch.Tensor | None
) -> dict[str, Averager]:
    """The averagers of ``cfg`` over this rank's ``share``, starting from its current values:
    on ``device``, or, given the ``staging`` buffer (host memory, pinned for a GPU), beside it
    and pinned as it is; it then also holds online LAWA's output."""
    where = device if staging is None else staging.device
    pin = staging is not None and staging.is_pinned()
    averagers: dict[str, Averager] = {name: EMA(shares, share, decay, where, pin) for name, decay in cfg.emas().items()}
    if cfg.swa:
        averagers["swa"] = SWA(shares, cfg.swa_start_step(), cfg.swa_every, where, pin)
    if cfg.lawa_online:
        averagers["lawa"] = OnlineLAWA(shares, cfg.lawa_k, cfg.lawa_nu, where, pin, staging, cfg.lawa_weights)
    return averagers


class Averaging:
    """Every averager of a run, over this rank's share of the live parameters."""

    optional = True  # a checkpoint may lack an average (a new one, another `parallel`): it restarts

    def __init__(self, cfg: TrainConfig, layout: Layout, params: list[torch.Tensor], background: Background,
                 master: bool = True):
        self.layout, self.params, self.background, self.master = layout, params, background, master
        self.share = layout.pieces(params)  # views of the live parameters, written by the optimizer
        self.lane = "averaging" if cfg.averaging_device == "cpu" else None  # where the averagers' state is written
        self._updated: Future | None = None
        shares, staging = layout.shares, None
        if self.lane is not None:  # the share is copied into `staging`; the updates read it as `host_share`
            staging = layout.shares.alloc(params[0].device, pin=params[0].is_cuda)
            self.staging = layout.shares.split(staging)
            n = layout.shares.numel  # in pieces that torch's CPU ops process on the calling thread alone
            shares = Shares(tuple(torch.Size([min(ONE_THREAD, n - a)]) for a in range(0, n, ONE_THREAD)))
            self.host_share = shares.split(staging)
            torch._foreach_copy_(self.staging, self.share)
        self.averagers = build_averagers(cfg, shares, self.updated_share(), params[0].device, staging)

    def update(self, step: int) -> None:
        """Fold the weights after ``step`` into every averager acting at ``step``."""
        acting = [a for a in self.averagers.values() if a.acts(step)]
        if not acting:
            return
        self.background.fence()  # copies of the averages may still be reading them
        if self.lane is None:
            for a in acting:
                a.update(self.share, step)
            return
        wait_for(self._updated)  # the staging buffer is free once the last update has read it
        copied = self.background.copy(self.staging, self.share)
        self._updated = self.background.submit(self.lane, self._host_update, acting, step, copied)

    def _host_update(self, acting: list[Averager], step: int, copied: Done) -> None:
        wait_for(copied)
        for a in acting:
            a.update(self.host_share, step)

    def updated_share(self) -> Pieces:
        """The pieces the averagers read: the live share, or in host memory its staged copy."""
        return self.share if self.lane is None else self.host_share

    def wait(self) -> None:
        """Until the updates in the background are done (their state may be read then)."""
        if self.lane is not None:
            self.background.wait(self.lane)

    def averaged(self, name: str, step: int) -> torch.Tensor | None:
        self.wait()
        return self.averagers[name].averaged(step)

    def snapshots(self, step: int) -> dict[str, Pieces]:
        """The averages to snapshot at ``step``, by kind: every one but LAWA's (lawa.py makes
        those offline from the raw snapshots)."""
        flats = {name: self.averaged(name, step) for name in self.averagers if name != "lawa"}
        return {name: self.layout.shares.split(flat) for name, flat in flats.items() if flat is not None}

    @torch.no_grad()
    def evaluate(self, step: int, score: Callable[[], float]) -> dict[str, float]:
        """``score()`` of the model with each average that exists at ``step`` swapped in (this
        rank's share of it; under DDP gathered into every rank's parameters), the live weights
        restored after, whatever happens."""
        averages = {name: self.averaged(name, step) for name in self.averagers}
        averages = {name: flat for name, flat in averages.items() if flat is not None}
        if not averages:
            return {}
        self.background.fence()  # checkpoint copies in flight read the live weights
        results = {}
        with self.layout.swapping(self.params) as load:
            for name, flat in averages.items():
                load(flat)
                results[name] = score()
        return results

    def reset(self, names: list[str] | None = None) -> None:
        """Restart the named averagers (default: all) from the live weights."""
        if self.lane is not None:
            self.wait()
            torch._foreach_copy_(self.staging, self.share)
        for name in self.averagers if names is None else names:
            self.averagers[name].reset(self.updated_share())

    def state_dict(self) -> dict[str, Any]:
        """Each averager's counters, and its buffers as reshardable checkpoint entries."""
        self.wait()  # the counters saved are those of the tensors copied
        return {name: {k: self.layout.global_tensor(v) if isinstance(v, torch.Tensor) else v
                       for k, v in a.state_dict().items()} for name, a in self.averagers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue each average whose state ``state`` holds whole (its buffers were loaded in
        place); the others restart from the loaded weights."""
        mine = self.state_dict()
        for name, averager in self.averagers.items():
            saved = state.get(name, {})
            if _paths(saved) == _paths(mine[name]):
                try:
                    averager.load_state_dict(saved)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
                continue
            self.reset([name])
            if self.master:
                other = " of this layout (it was saved under the other `parallel`)" if saved else ""
                print(f"note: the checkpoint has no {name} state{other}; {name} restarts from the loaded weights")


def _paths(tree: dict, prefix: tuple = ()) -> set[tuple]:
    """The paths of a nested dict's leaves."""
    paths = set()
    for k, v in tree.items():
        paths |= _paths(v, (*prefix, k)) if isinstance(v, dict) else {(*prefix, k)}
    return paths
