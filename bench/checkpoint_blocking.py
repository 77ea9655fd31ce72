"""Checkpoint blocking: how long a snapshot and a resume checkpoint hold the training thread,
written synchronously (the baseline: safetensors / ``torch.save`` on the training thread, with
fsync) against in the background (the trainer's ``Checkpointer``: a copy into pinned host
buffers, on a side stream from a GPU, then a background writer), on a model of the config's
shapes (GPT-2 small by default).

The yardstick is one in-memory copy of the model: the rank's share copied into a
preallocated (pinned) host buffer. Target: the background paths block the training thread for
at most twice that. ``written_s`` is when the files are complete (not on the training thread
in the background paths). Each figure is the median of ``--repeats``.

    python bench/checkpoint_blocking.py --data_dir=data/shakespeare            # CPU, GPT-2 small
    python bench/checkpoint_blocking.py --device=cuda --data_dir=data/shakespeare --lawa_online=True
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, bench_trainer, median, parse, report, sync, target, trainer_parser, trainer_summary  # noqa: E402
from ewa.files import atomic_write, save_snapshot  # noqa: E402

TARGET = 2.0  # background blocking, in in-memory copies of the model

COLUMNS = {"checkpoint": "s", "mode": "s", "blocked_ms": ",.1f", "written_s": ".3f", "vs_copy": ".2f"}


def main(argv: list[str] | None = None) -> dict:
    p = trainer_parser("checkpoint_blocking", __doc__)
    p.set_defaults(config=str(ROOT / "configs" / "small.py"))
    args, overrides = parse(p, argv, overrides=True)
    with bench_trainer(args, overrides) as trainer:
        device = trainer.rt.device
        for p in trainer.params:  # AdamW's state, from one step on zero gradients (no batch is needed)
            p.grad = torch.zeros_like(p)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.step += 1
        trainer.averaging.update(trainer.step)
        run_dir, averaging, checkpointer = trainer.run_dir, trainer.averaging, trainer.checkpointer
        share, shares = averaging.share, trainer.layout.shares
        buffer = shares.split(shares.alloc(device, pin=device.type == "cuda"))

        def one_copy() -> float:
            sync(device)
            start = time.perf_counter()
            torch._foreach_copy_(buffer, share)
            sync(device)
            return time.perf_counter() - start

        copy_s = median([one_copy() for _ in range(args.repeats + 1)][1:])
        rows = [
            {"checkpoint": "model", "mode": "one copy", "blocked_ms": 1000 * copy_s, "written_s": None, "vs_copy": 1.0}
        ]

        def measure(name: str, mode: str, save, wait) -> None:
            blocked, written = [], []
            for i in range(args.repeats + 1):  # the first allocates buffers: not timed
                trainer.step += 1
                sync(device)
                start = time.perf_counter()
                save()
                blocked.append(time.perf_counter() - start)
                wait()
                sync(device)
                written.append(time.perf_counter() - start)
            b = median(blocked[1:])
            rows.append(
                {
                    "checkpoint": name,
                    "mode": mode,
                    "blocked_ms": 1000 * b,
                    "written_s": median(written[1:]),
                    "vs_copy": b / copy_s,
                }
            )

        def sync_snapshot() -> None:
            for kind, pieces in ({"raw": share} | averaging.snapshots(trainer.step)).items():
                tensors = {
                    name: t.view(shape) for (name, _, shape), t in zip(trainer.layout.where(), pieces, strict=True)
                }
                save_snapshot(run_dir / "sync" / kind / f"{trainer.step}.safetensors", tensors, {"kind": kind})

        def sync_resume() -> None:
            state = {
                "model": dict(zip(trainer.names, trainer.params, strict=True)),
                "optimizer": trainer.optimizer.state_dict(),
                "averagers": {n: a.state_dict() for n, a in averaging.averagers.items()},
            }
            atomic_write(run_dir / "sync" / f"resume_{trainer.step}.pt", lambda tmp: torch.save(state, tmp))

        def snapshot() -> None:
            checkpointer.save_snapshots(trainer.step, {"raw": share, **averaging.snapshots(trainer.step)}, averaging.lane)

        nothing = lambda: None  # noqa: E731
        measure("snapshot", "synchronous", sync_snapshot, nothing)
        measure("snapshot", "background", snapshot, lambda: trainer.background.wait("snapshots"))
        measure("resume", "synchronous", sync_resume, nothing)
        measure("resume", "background", lambda: checkpointer.save_resume(trainer.step),
                lambda: trainer.background.wait("resume"))
        trainer.close()
    targets = [
        target(
            f"{r['checkpoint']} background blocking",
            f"<= {TARGET:g} copies of the model",
            r["vs_copy"],
            r["vs_copy"] <= TARGET,
        )
        for r in rows
        if r["mode"] == "background"
    ]
    return report("checkpoint_blocking", args, device, rows, COLUMNS, targets, trainer_summary(trainer))


if __name__ == "__main__":
    main()
