"""Averaging overhead: EMA, online-LAWA and SWA updates as a percentage of the training step.

One training loop (``Trainer.train_step()`` on the config's shapes) runs ``--steps`` steps;
after each step every averager is updated, as ``Trainer.fit()`` does, and each update is
timed on its own, as is the step itself. The step times are those of the loop with no
averaging; each averager adds its update times to them. All share the same process, steps
and data, so there is no drift between a run with and a run without averaging.

An averager acts every ``every`` steps (EMA 1, SWA ``swa_every``, LAWA ``lawa_nu``, which
copies the weights into one of its k slots); its cost per step is the median time of the
updates that acted divided by ``every``. SWA is started at step 0 so that it averages during
the loop. The last row, ``all, background``, is what ``averaging_device=cpu`` costs the
training thread: the three averagers in pinned host memory, updated on a background lane from
a copy made off the training thread (its time is the thread's blocked time, per step). They are
started after every other step, so the last row compares the steps that run beside a background
update with those that run alone: their updates use one thread, not torch's intra-op threads.

    python bench/averaging_overhead.py                                # CPU, configs/tiny.py
    python bench/averaging_overhead.py --device=cuda --config=configs/small.py --data_dir=data/shakespeare
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    bench_trainer,
    median,
    parse,
    report,
    target,
    timed,
    trainer_parser,
    trainer_summary,
)
from ewa.engine.averaging import EMA, SWA, Averager, Averaging, OnlineLAWA  # noqa: E402

TARGET = 0.03  # the most each averager may add to the step time

# the table: columns shown, with their format
COLUMNS = {
    "averaging": "s",
    "every": "d",
    "updates": "d",
    "ms_per_update": ".3f",
    "ms_per_step": ".3f",
    "overhead": ".2%",
}


def main(argv: list[str] | None = None) -> dict:
    p = trainer_parser("averaging_overhead", __doc__)
    p.add_argument("--steps", type=int, default=60, help="timed steps (at least lawa_nu)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args, overrides = parse(p, argv, overrides=True)
    with bench_trainer(args, overrides, ema=False, swa=False, lawa_online=False) as trainer:
        cfg, device, share, shares = trainer.cfg, trainer.rt.device, trainer.averaging.share, trainer.layout.shares
        if args.steps < max(cfg.swa_every, cfg.lawa_nu):
            p.error(f"--steps={args.steps} must be at least swa_every={cfg.swa_every} and lawa_nu={cfg.lawa_nu}")

        averagers: dict[str, Averager] = {
            "ema": EMA(shares, share, cfg.ema_decay, device),
            "lawa": OnlineLAWA(shares, cfg.lawa_k, cfg.lawa_nu, device),
            "swa": SWA(shares, 0, cfg.swa_every, device),
        }
        every = {"ema": 1, "lawa": cfg.lawa_nu, "swa": cfg.swa_every}
        # the same three in host memory (SWA from step 0), on the trainer's background, whose fence
        # the optimizer step passes
        host = cfg.replace(ema=True, swa=True, swa_start=1e-9, lawa_online=True, averaging_device="cpu")
        background = Averaging(host, trainer.layout, trainer.params, trainer.background)
        # steps alone, and steps beside the background updates (started after every other step)
        step_times: dict[str, list[float]] = {"alone": [], "beside": []}
        update_times: dict[str, list[float]] = {name: [] for name in [*averagers, "all, background"]}
        for i in range(args.warmup + args.steps):
            seconds = timed(trainer.train_step, device)
            timed_step = i >= args.warmup
            if timed_step:
                step_times["beside" if i % 2 else "alone"].append(seconds)
            for name, averager in averagers.items():
                if averager.acts(trainer.step):
                    seconds = timed(functools.partial(averager.update, share, trainer.step), device)
                    if timed_step:
                        update_times[name].append(seconds)
            if i % 2 == 0:
                start = time.perf_counter()  # blocked time only: the GPU and the lane work on
                background.update(trainer.step)
                if timed_step:
                    update_times["all, background"].append(time.perf_counter() - start)
        trainer.background.wait()
        every["all, background"] = 1
        step = median(step_times["alone"])
        rows = [
            {
                "averaging": "none",
                "every": None,
                "updates": 0,
                "ms_per_update": None,
                "ms_per_step": 1000 * step,
                "overhead": 0.0,
            }
        ]
        for name, times in update_times.items():
            cost = median(times) / every[name]
            rows.append(
                {
                    "averaging": name,
                    "every": every[name],
                    "updates": len(times),
                    "ms_per_update": 1000 * median(times),
                    "ms_per_step": 1000 * cost,
                    "overhead": cost / step,
                }
            )
        beside = median(step_times["beside"])
        rows.append({"averaging": "step beside the background", "every": None, "updates": len(step_times["beside"]),
                     "ms_per_update": None, "ms_per_step": 1000 * beside, "overhead": beside / step - 1})
        targets = [
            target(f"{r['averaging']} overhead", f"<= {TARGET:.0%} of the step", r["overhead"], r["overhead"] <= TARGET)
            for r in rows[1:]
        ]
        return report("averaging_overhead", args, device, rows, COLUMNS, targets, trainer_summary(trainer))


if __name__ == "__main__":
    main()
