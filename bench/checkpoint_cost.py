"""Checkpoint cost: a weights-only snapshot (``save_snapshot``: fp32 safetensors, written
atomically with fsync) vs a full nanoGPT checkpoint (``torch.save`` of model, AdamW state,
model_args, iter_num, ... after one optimizer step, fsynced too), for each model shape.

Size in bytes and median write time over ``--repeats`` writes to fresh files (one untimed
write of each first).

    python bench/checkpoint_cost.py                       # tiny (configs/tiny.py) and GPT-2 small, CPU
    python bench/checkpoint_cost.py --device=cuda --models gpt2 gpt2-medium
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, MiB, median, parse, parser, report, target, timed  # noqa: E402
from ewa.engine.config import TrainConfig, read_config_file  # noqa: E402
from ewa.files import save_snapshot  # noqa: E402
from model import GPT, GPT2_SIZES, GPTConfig  # noqa: E402

TINY = TrainConfig(**read_config_file(ROOT / "configs" / "tiny.py")).model_config(vocab_size=256)  # bytes tokenizer
MODELS = {"tiny": TINY} | {name: GPTConfig(**shape) for name, shape in GPT2_SIZES.items()}

# the table: columns shown, with their format
COLUMNS = {
    "model": "s",
    "params": ",d",
    "checkpoint": "s",
    "bytes": ",d",
    "write_s": ".3f",
    "mib_per_s": ",.0f",
    "size_vs_full": ".3f",
    "time_vs_full": ".3f",
}


def nanogpt_checkpoint(path: Path, model: GPT, optimizer: torch.optim.Optimizer) -> int:
    """nanoGPT's train.py checkpoint, flushed to disk like ours."""
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "model_args": asdict(model.config),
        "iter_num": 1,
        "best_val_loss": float("inf"),
        "config": {},
    }
    with open(path, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


def snapshot(path: Path, model: GPT, optimizer: torch.optim.Optimizer) -> int:
    """What Trainer.save_snapshots writes for the raw weights."""
    meta = {"step": "1", "format": "ewa-snapshot-1", "model_config": json.dumps(asdict(model.config)), "kind": "raw"}
    return save_snapshot(path, dict(model.named_parameters()), meta)


WRITERS: dict[str, Callable[[Path, GPT, torch.optim.Optimizer], int]] = {
    "nanogpt_full": nanogpt_checkpoint,
    "snapshot": snapshot,
}


def main(argv: list[str] | None = None) -> dict:
    p = parser("checkpoint_cost", __doc__)
    p.add_argument("--models", nargs="+", choices=MODELS, default=["tiny", "gpt2"], help="model shapes")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp folder)")
    args, _ = parse(p, argv)
    device = torch.device(args.device)
    rows = []
    for name in args.models:
        model = GPT(MODELS[name]).to(device)
        optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
        optimizer.step()  # creates AdamW's exp_avg and exp_avg_sq
        with tempfile.TemporaryDirectory(prefix="ewa-bench-ckpt-", dir=args.dir) as tmp:
            for kind, write in WRITERS.items():
                path = Path(tmp) / f"{kind}.{'safetensors' if kind == 'snapshot' else 'pt'}"
                write(path, model, optimizer)  # untimed first write
                seconds = []
                for _ in range(args.repeats):
                    path.unlink()
                    seconds.append(timed(functools.partial(write, path, model, optimizer), device))
                size = path.stat().st_size
                rows.append(
                    {
                        "model": name,
                        "params": model.get_num_params(non_embedding=False),
                        "checkpoint": kind,
                        "bytes": size,
                        "write_s": median(seconds),
                        "mib_per_s": size / MiB / median(seconds),
                    }
                )
    for r in rows:
        full = next(f for f in rows if f["model"] == r["model"] and f["checkpoint"] == "nanogpt_full")
        r |= {"size_vs_full": r["bytes"] / full["bytes"], "time_vs_full": r["write_s"] / full["write_s"]}
    targets = [
        target(f"{r['model']} snapshot / full write time", "<= 1", r["time_vs_full"], r["time_vs_full"] <= 1)
        for r in rows
        if r["checkpoint"] == "snapshot"
    ]
    return report("checkpoint_cost", args, device, rows, COLUMNS, targets)


if __name__ == "__main__":
    main()
