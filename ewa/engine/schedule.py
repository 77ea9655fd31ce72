"""The learning rate as a pure function of the step.

Base schedule: linear warmup to ``learning_rate``, cosine decay to ``min_lr`` at
``decay_steps()``, then ``min_lr``. Two optional overlays:

- SWA (``swa=True``): after ``swa_start_step()`` the rate anneals from the base schedule's
  value there to ``swa_lr`` along a cosine over ``swa_anneal_steps``, then stays at ``swa_lr``
  (what ``torch.optim.swa_utils.SWALR(anneal_strategy="cos")`` does).
- Cooldown (``cooldown_steps > 0``): the last ``cooldown_steps`` before ``max_steps`` decay
  linearly from the schedule's value to 0, as in warmup-stable-decay schedules.
"""

from __future__ import annotations

import math

from ewa.engine.config import TrainConfig


def base_lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    decay = cfg.decay_steps()
    if step >= decay:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def swa_lr(cfg: TrainConfig, step: int) -> float:
    start = cfg.swa_start_step()
    if step < start:
        return base_lr(cfg, step)
    t = 1.0 if cfg.swa_anneal_steps == 0 else min(1.0, (step - start) / cfg.swa_anneal_steps)
    alpha = 0.5 * (1.0 - math.cos(math.pi * t))
    return cfg.swa_lr * alpha + base_lr(cfg, start) * (1.0 - alpha)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of the optimizer step taken from ``step`` to ``step + 1``."""
    schedule = swa_lr if cfg.swa else base_lr
    cooldown_start = cfg.max_steps - cfg.cooldown_steps
    if cfg.cooldown_steps and step >= cooldown_start:
        remaining = (cfg.max_steps - step) / cfg.cooldown_steps
        return schedule(cfg, cooldown_start) * remaining
    return schedule(cfg, step)
