import pytest
import torch

from ewa.averaging import EMA, SWA, OnlineLAWA

NAMES = ["a", "b"]


def trajectory(steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Weights after each step 0..steps of a fake training run: a random walk."""
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
    out = [[t.clone() for t in w]]
    for _ in range(steps):
        w = [t + 0.1 * torch.randn(t.shape, generator=g) for t in w]
        out.append([t.clone() for t in w])
    return out


def run(averager, traj, first=0):
    for step in range(first, len(traj)):
        averager.update(traj[step], step)
    return averager


def test_ema_equals_the_recurrence():
    traj = trajectory(30)
    ema = run(EMA(NAMES, traj[0], decay=0.9), traj)
    ref = [t.clone() for t in traj[0]]
    for w in traj[1:]:
        ref = [0.9 * r + 0.1 * x for r, x in zip(ref, w)]
    for got, want in zip(ema.averaged(30), ref):
        assert torch.allclose(got, want, atol=1e-6)
    assert ema.num_updates == 31


def test_ema_of_bf16_weights_is_kept_in_fp32():
    traj = [[t.bfloat16() for t in w] for w in trajectory(5)]
    ema = run(EMA(NAMES, traj[0], decay=0.5), traj)
    assert all(t.dtype == torch.float32 for t in ema.averaged(5))


def test_swa_is_the_uniform_mean_of_the_averaging_steps():
    traj = trajectory(40)
    swa = SWA(NAMES, start=20, every=5)
    assert run(SWA(NAMES, start=20, every=5), traj[:21]).averaged(20) is None
    run(swa, traj)
    steps = [25, 30, 35, 40]
    for i in range(2):
        want = torch.stack([traj[s][i] for s in steps]).double().mean(0).float()
        assert (swa.averaged(40)[i] - want).abs().max() <= 1e-6
    assert swa.num_averaged == 4


def test_online_lawa_window_and_average():
    traj = trajectory(60)
    lawa = OnlineLAWA(NAMES, k=3, nu=10)
    for step in range(0, 41):
        lawa.update(traj[step], step)
        if step in (10, 15):
            assert lawa.averaged(step) is None  # too little history / not a multiple of nu
    assert lawa.window_steps() == [20, 30, 40]
    assert lawa.averaged(35) is None
    for i in range(2):
        want = torch.stack([traj[s][i] for s in (20, 30, 40)]).double().mean(0).float()
        assert torch.equal(lawa.averaged(40)[i], want)


@pytest.mark.parametrize(
    "make",
    [
        lambda w: EMA(NAMES, w, decay=0.8),
        lambda w: SWA(NAMES, start=5, every=3),
        lambda w: OnlineLAWA(NAMES, k=3, nu=4),
    ],
    ids=["ema", "swa", "lawa"],
)
def test_state_dict_round_trip_continues_the_same_average(make):
    traj = trajectory(30)
    whole = run(make(traj[0]), traj)
    first = run(make(traj[0]), traj[:16])
    resumed = make(trajectory(0, seed=9)[0])
    resumed.load_state_dict(first.state_dict())
    run(resumed, traj, first=16)
    final = 28  # the last LAWA window step (a multiple of nu); EMA and SWA ignore it
    for a, b in zip(whole.averaged(final), resumed.averaged(final)):
        assert torch.equal(a, b)
