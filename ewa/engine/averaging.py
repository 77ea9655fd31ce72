"""Weight averages kept during training: EMA, SWA and online LAWA, over this rank's share.

Each averager holds fp32 state for the rank's share of the parameters only (see
``ewa.engine.parallel``): a flat buffer viewed as the share's pieces. It sees the share after every
optimizer step it ``acts`` on (and at the run's first step, the initial weights), and keeps
its counters with its tensors so a resumed run continues the same average. Updates are
multi-tensor ``torch._foreach_*`` ops.

``Averaging`` runs them. With ``host=True`` their state lives in (pinned) host memory: after
a step the share is copied to a host staging buffer on a side CUDA stream, and a background
thread applies the updates, so the training thread never waits for them; the copy is waited
for on the GPU before the optimizer next changes the weights (``before_params_change``), and
the thread's work before the state is next read (``wait``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from ewa.engine.parallel import Shares
from ewa.window import coefficients, window_mean

if TYPE_CHECKING:
    from ewa.engine.config import TrainConfig

Tensors = list[torch.Tensor]
SUM_BLOCK = 1 << 22  # elements summed in float64 at a time by online LAWA


class Averager:
    """Interface: ``acts(step)``, ``update(share, step)``, ``averaged(step)`` (the flat fp32
    average of the share, or None when there is none at that step), ``tensors()`` (the
    flat state buffers, for checkpoints) and ``counters()`` / ``load_counters``."""

    name = ""

    def __init__(self, shares: Shares, device: torch.device, pin: bool):
        self.shares, self.device, self.pin = shares, device, pin

    def _buffer(self) -> tuple[torch.Tensor, Tensors]:
        flat = self.shares.alloc(self.device, self.pin)
        return flat, self.shares.split(flat)

    def acts(self, step: int) -> bool:
        raise NotImplementedError

    def update(self, share: Tensors, step: int) -> None:
        raise NotImplementedError

    def averaged(self, step: int) -> torch.Tensor | None:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def counters(self) -> dict:
        raise NotImplementedError

    def load_counters(self, counters: dict) -> None:
        raise NotImplementedError


class EMA(Averager):
    """Exponential moving average: ``ema = decay * ema + (1 - decay) * weights`` every step,
    starting from the initial weights."""

    name = "ema"

    def __init__(self, shares: Shares, initial: Tensors, decay: float, device: torch.device, pin: bool = False):
        super().__init__(shares, device, pin)
        self.decay, self.num_updates = decay, 0
        self.flat, self.views = self._buffer()
        torch._foreach_copy_(self.views, initial)

    def acts(self, step: int) -> bool:
        return True

    @torch.no_grad()
    def update(self, share: Tensors, step: int) -> None:
        torch._foreach_lerp_(self.views, share, 1.0 - self.decay)
        self.num_updates += 1

    def averaged(self, step: int) -> torch.Tensor:
        return self.flat

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weights": self.flat}

    def counters(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates}

    def load_counters(self, counters: dict) -> None:
        self.decay, self.num_updates = counters["decay"], counters["num_updates"]


class SWA(Averager):
    """Stochastic weight averaging: the uniform mean of the weights after steps
    ``start + every``, ``start + 2 * every``, ... (a running mean, as AveragedModel)."""

    name = "swa"

    def __init__(self, shares: Shares, start: int, every: int, device: torch.device, pin: bool = False):
        super().__init__(shares, device, pin)
        self.start, self.every, self.num_averaged = start, every, 0
        self.flat, self.views = self._buffer()
        self.flat.zero_()

    def acts(self, step: int) -> bool:
        return step > self.start and (step - self.start) % self.every == 0

    @torch.no_grad()
    def update(self, share: Tensors, step: int) -> None:
        self.num_averaged += 1
        torch._foreach_lerp_(self.views, share, 1.0 / self.num_averaged)

    def averaged(self, step: int) -> torch.Tensor | None:
        return self.flat if self.num_averaged else None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weights": self.flat}

    def counters(self) -> dict:
        return {"start": self.start, "every": self.every, "num_averaged": self.num_averaged}

    def load_counters(self, counters: dict) -> None:
        self.start, self.every, self.num_averaged = counters["start"], counters["every"], counters["num_averaged"]


class OnlineLAWA(Averager):
    """LAWA during training: keeps the share at the k latest multiples of nu in k slots,
    and at a step t that is one of them averages t, t - nu, ..., t - (k-1)*nu in float64
    (uniformly, or with the coefficients of ``ewa.window.merge_weights``) through the window
    kernel: the same window, and the same figure, as offline ``lawa.py`` over the run's snapshots."""

    name = "lawa"

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
        """``out``: where ``averaged`` writes the mean (default: a buffer of its own); valid
        until the next ``update``. ``weights``: the merge's weights (``merge_weights``)."""
        super().__init__(shares, device, pin)
        self.k, self.nu = k, nu
        self.coefficients = coefficients(weights, k)
        self.slots = [self._buffer() for _ in range(k)]
        self.slot_steps = [-1] * k  # the step each slot holds (-1: empty)
        self.mean = out if out is not None else self.shares.alloc(device, pin)

    def acts(self, step: int) -> bool:
        return step % self.nu == 0

    @torch.no_grad()
    def update(self, share: Tensors, step: int) -> None:
        slot = min(range(self.k), key=lambda i: self.slot_steps[i])  # an empty or the oldest slot
        torch._foreach_copy_(self.slots[slot][1], share)
        self.slot_steps[slot] = step

    def window_steps(self) -> list[int]:
        return sorted(s for s in self.slot_steps if s >= 0)

    @torch.no_grad()
    def averaged(self, step: int) -> torch.Tensor | None:
        expected = [step - j * self.nu for j in reversed(range(self.k))]
        if self.window_steps() != expected:
            return None
        members = [self.slots[self.slot_steps.index(s)][0] for s in expected]  # oldest first
        for a in range(0, self.shares.numel, SUM_BLOCK):
            block = slice(a, a + SUM_BLOCK)
            window_mean(self.k, lambda i: members[i][block], self.coefficients, out=self.mean[block])  # noqa: B023
        return self.mean

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"slot{i}": flat for i, (flat, _) in enumerate(self.slots)}

    def counters(self) -> dict:
        return {"k": self.k, "nu": self.nu, "slot_steps": list(self.slot_steps)}

    def load_counters(self, counters: dict) -> None:
        if (counters["k"], counters["nu"]) != (self.k, self.nu):
            raise ValueError(
                f"online LAWA state has k={counters['k']}, nu={counters['nu']}, the config k={self.k}, nu={self.nu}"
            )
        self.slot_steps = list(counters["slot_steps"])


def build_averagers(
    cfg: TrainConfig, shares: Shares, share: Tensors, device: torch.device, staging: torch.Tensor | None
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


def copy_share(dst: Tensors, src: Tensors, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    """``dst <- src``; from a GPU, asynchronously on ``stream`` once the current stream's work
    is done, returning the event that marks the copy's end (None: the copy is done)."""
    if stream is None or src[0].device.type != "cuda":
        torch._foreach_copy_(dst, src)
        return None
    stream.wait_stream(torch.cuda.current_stream(src[0].device))
    with torch.cuda.stream(stream):
        torch._foreach_copy_(dst, src, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    return done


class Averaging:
    """Every averager of a run over this rank's share of the live parameters."""

    def __init__(self, averagers: dict[str, Averager], share: Tensors, staging: torch.Tensor | None = None):
        """``share``: views of the live parameters (updated in place by the optimizer).
        ``staging``: a host buffer of the share's size (pinned for a GPU); when given, the
        averagers' state is on the host and updated in the background from copies made
        into it (it may also hold online LAWA's output, which is read before the next update)."""
        self.averagers, self.share, self.host = averagers, share, staging is not None
        self._job: Future | None = None
        self._copied: torch.cuda.Event | None = None
        if self.host:
            self.staging = [
                t.view(s.shape) for t, s in zip(staging.split([t.numel() for t in share]), share, strict=True)
            ]
            on_gpu = share[0].device.type == "cuda"
            self._stream = torch.cuda.Stream(share[0].device) if on_gpu else None
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ewa-averaging")

    def update(self, step: int) -> None:
        """Fold the weights after ``step`` into every averager acting at ``step``."""
        acting = [a for a in self.averagers.values() if a.acts(step)]
        if not acting:
            return
        if not self.host:
            for a in acting:
                a.update(self.share, step)
            return
        self.wait()  # the staging buffer is free once the previous job is done
        self._copied = copy_share(self.staging, self.share, self._stream)
        self._job = self._pool.submit(self._host_update, acting, step, self._copied)

    def _host_update(self, acting: list[Averager], step: int, copied: torch.cuda.Event | None) -> None:
        if copied is not None:
            copied.synchronize()
        for a in acting:
            a.update(self.staging, step)

    def before_params_change(self) -> None:
        """Make the GPU wait for the copy of the share before the optimizer writes it."""
        if self._copied is not None:
            torch.cuda.current_stream().wait_event(self._copied)
            self._copied = None

    def wait(self) -> None:
        """Until the background updates are done (re-raising their error, if any)."""
        if self._job is not None:
            job, self._job = self._job, None
            job.result()

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` once the background updates in flight are done (at once on the device)."""
        if self.host:
            return self._pool.submit(fn)
        done: Future = Future()
        done.set_result(fn())
        return done

    def averaged(self, name: str, step: int) -> torch.Tensor | None:
        self.wait()
        return self.averagers[name].averaged(step)

    def close(self) -> None:
        self.wait()
        if self.host:
            self._pool.shutdown()
