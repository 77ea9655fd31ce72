import math

import pytest
import torch
from torch.optim.swa_utils import SWALR

from ewa.engine.config import TrainConfig
from ewa.engine.schedule import base_lr, lr_at


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(max_steps=1000, learning_rate=1.0, min_lr=0.1, warmup_steps=100), **kw})


def test_warmup_then_cosine_to_min_lr():
    c = cfg()
    assert lr_at(c, 0) == pytest.approx(0.01)
    assert lr_at(c, 99) == pytest.approx(1.0)
    assert lr_at(c, 550) == pytest.approx(0.1 + 0.5 * 0.9)  # half-way through the decay
    assert lr_at(c, 1000) == pytest.approx(0.1)
    assert lr_at(cfg(lr_decay_steps=500), 700) == pytest.approx(0.1)
    values = [lr_at(c, s) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_swa_schedule_follows_torch_swalr():
    c = cfg(swa=True, swa_start=0.5, swa_lr=0.05, swa_anneal_steps=10)
    start = c.swa_start_step()
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr(c, start))
    scheduler = SWALR(opt, swa_lr=0.05, anneal_epochs=10, anneal_strategy="cos")
    for j in range(15):
        assert lr_at(c, start + j) == pytest.approx(opt.param_groups[0]["lr"]), j
        opt.step()
        scheduler.step()
    assert lr_at(c, start - 1) == pytest.approx(base_lr(c, start - 1))
    assert lr_at(c, 999) == pytest.approx(0.05)


def test_cooldown_decays_linearly_to_zero_from_the_schedule():
    c = cfg(max_steps=600, cooldown_steps=100, lr_decay_steps=1000)
    start_value = base_lr(c, 500)
    assert lr_at(c, 499) == pytest.approx(base_lr(c, 499))
    assert lr_at(c, 500) == pytest.approx(start_value)
    assert lr_at(c, 550) == pytest.approx(start_value / 2)
    assert lr_at(c, 599) == pytest.approx(start_value / 100)
    assert math.isclose(lr_at(c, 600), 0.0, abs_tol=1e-12)
