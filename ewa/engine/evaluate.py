"""Validation loss on a fixed set of held-out windows, sharded across ranks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn

from ewa.engine.runtime import Runtime


class Evaluator:
    """Mean next-token cross-entropy over the same token windows for every model scored.

    Rank r scores windows r, r + world, ...; the sums are all-reduced, so every rank
    takes part and every rank returns the same figure."""

    def __init__(self, windows: torch.Tensor, batch_size: int, runtime: Runtime,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None):
        """``autocast``: the context of the forward passes (default: the runtime's)."""
        self.runtime = runtime
        self.autocast = autocast or runtime.autocast
        self.batch_size = batch_size
        self.total = len(windows)
        self.local = windows[runtime.rank :: runtime.world_size]

    @torch.no_grad()
    def loss(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        device = self.runtime.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        for batch in self.local.split(self.batch_size):
            batch = batch.to(device, non_blocking=True)
            with self.autocast():
                _, loss = model(batch[:, :-1], batch[:, 1:])
            total += loss.double() * len(batch)
        model.train(was_training)
        return self.runtime.all_reduce_sum(total).item() / self.total
