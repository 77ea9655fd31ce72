import pytest
import torch

from ewa.engine.averaging import EMA, SWA, Averaging, OnlineLAWA
from ewa.engine.background import Background
from ewa.engine.config import TrainConfig
from ewa.engine.parallel import FlatLayout

SHAPES = [torch.Size([4, 3]), torch.Size([5])]
CPU = torch.device("cpu")


def trajectory(steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Weights after each step 0..steps of a fake training run: a random walk."""
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(s, generator=g) for s in SHAPES]
    out = [[t.clone() for t in w]]
    for _ in range(steps):
        w = [t + 0.1 * torch.randn(t.shape, generator=g) for t in w]
        out.append([t.clone() for t in w])
    return out


def whole() -> FlatLayout:
    return FlatLayout(["a", "b"], SHAPES, world=1, rank=0)


def run(averager, traj, first=0, layout=None):
    layout = layout or whole()
    for step in range(first, len(traj)):
        if averager.acts(step):
            averager.update(layout.pieces(traj[step]), step)
    return averager


def unflat(flat: torch.Tensor) -> list[torch.Tensor]:
    return [t.view(s) for t, s in zip(flat.split([s.numel() for s in SHAPES]), SHAPES)]


def test_ema_equals_the_recurrence():
    traj = trajectory(30)
    layout = whole()
    ema = run(EMA(layout.shares, layout.pieces(traj[0]), decay=0.9, device=CPU), traj)
    ref = [t.clone() for t in traj[0]]
    for w in traj[1:]:
        ref = [0.9 * r + 0.1 * x for r, x in zip(ref, w)]
    for got, want in zip(unflat(ema.averaged(30)), ref):
        assert torch.allclose(got, want, atol=1e-6)
    assert ema.num_updates == 31 and ema.averaged(30).dtype == torch.float32


def test_swa_is_the_uniform_mean_of_the_averaging_steps():
    traj = trajectory(40)
    shares = whole().shares
    assert run(SWA(shares, start=20, every=5, device=CPU), traj[:21]).averaged(20) is None
    swa = run(SWA(shares, start=20, every=5, device=CPU), traj)
    steps = [25, 30, 35, 40]
    for i, got in enumerate(unflat(swa.averaged(40))):
        want = torch.stack([traj[s][i] for s in steps]).double().mean(0).float()
        assert (got - want).abs().max() <= 1e-6
    assert swa.num_averaged == 4


def test_online_lawa_window_and_average():
    traj = trajectory(60)
    lawa = OnlineLAWA(whole().shares, k=3, nu=10, device=CPU)
    for step in range(0, 41):
        run(lawa, traj[: step + 1], first=step)
        if step in (10, 15):
            assert lawa.averaged(step) is None  # too little history / not a multiple of nu
    assert sorted(lawa.slot_steps) == [20, 30, 40]
    assert lawa.averaged(35) is None
    for i, got in enumerate(unflat(lawa.averaged(40))):
        want = torch.stack([traj[s][i] for s in (20, 30, 40)]).double().mean(0).float()
        assert torch.equal(got, want)


MAKERS = {
    "ema": lambda layout, w: EMA(layout.shares, layout.pieces(w), decay=0.8, device=CPU),
    "swa": lambda layout, w: SWA(layout.shares, start=5, every=3, device=CPU),
    "lawa": lambda layout, w: OnlineLAWA(layout.shares, k=3, nu=4, device=CPU),
}


@pytest.mark.parametrize("kind", MAKERS)
def test_tensors_and_counters_continue_the_same_average(kind):
    traj, make, final = trajectory(30), MAKERS[kind], 28  # a LAWA window step; EMA and SWA ignore it
    uninterrupted = run(make(whole(), traj[0]), traj)
    first = run(make(whole(), traj[0]), traj[:16])
    resumed = make(whole(), trajectory(0, seed=9)[0])
    saved = first.state_dict()
    for name, t in resumed.state_dict().items():
        if isinstance(t, torch.Tensor):
            t.copy_(saved[name])  # what a resume checkpoint restores in place
    resumed.load_state_dict(saved)
    run(resumed, traj, first=16)
    assert torch.equal(uninterrupted.averaged(final), resumed.averaged(final))


@pytest.mark.parametrize("kind", MAKERS)
def test_shares_of_three_ranks_make_up_the_whole_average(kind):
    traj, make, final = trajectory(30), MAKERS[kind], 28
    reference = run(make(whole(), traj[0]), traj).averaged(final)
    layouts = [FlatLayout(["a", "b"], SHAPES, world=3, rank=r) for r in range(3)]
    shares = [run(make(layout, traj[0]), traj, layout=layout).averaged(final) for layout in layouts]
    assert [s.numel() for s in shares] == [6, 6, 5]  # torch.chunk's split of 17 elements
    assert torch.equal(torch.cat(shares), reference)


def test_background_updates_equal_direct_ones():
    """averaging_device=cpu: the updates run on a background lane from a staging copy."""
    traj = trajectory(20)
    results = []
    for device in ("gpu", "cpu"):
        cfg = TrainConfig(ema_decay=0.8, swa=True, max_steps=20, swa_start=0.25, swa_every=3, lawa_online=True,
                          lawa_k=3, lawa_nu=4, eval_interval=4, averaging_device=device)
        live = [t.clone() for t in traj[0]]
        background = Background(CPU)
        averaging = Averaging(cfg, whole(), live, background)
        for step in range(len(traj)):
            background.fence()  # the optimizer's fence, then its in-place step
            torch._foreach_copy_(live, traj[step])
            averaging.update(step)
        results.append({n: averaging.averaged(n, 20).clone() for n in averaging.averagers})
        background.close()
    assert results[0].keys() == results[1].keys() == {"ema", "swa", "lawa"}
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_each_rank_holds_its_share_of_the_state():
    """(1 EMA + 1 SWA + k LAWA slots) / world of the model, plus LAWA's output buffer."""
    numel, world, k = 1001, 8, 5
    for rank in range(world):
        layout = FlatLayout(["w"], [torch.Size([numel])], world=world, rank=rank)
        live = layout.pieces([torch.zeros(numel)])
        averagers = [
            EMA(layout.shares, live, 0.9, CPU),
            SWA(layout.shares, 0, 1, CPU),
            OnlineLAWA(layout.shares, k, 1, CPU),
        ]
        held = sum(t.numel() for a in averagers for t in a.state_dict().values() if isinstance(t, torch.Tensor))
        assert held == (2 + k) * layout.shares.numel <= (2 + k) * -(-numel // world)
        assert averagers[2].mean.numel() == layout.shares.numel  # the named output buffer
