"""Training throughput: ``Trainer.train_step()`` vs nanoGPT's training loop.

Both train their own copy of the same GPT (same initial weights, AdamW groups, batch,
gradient accumulation, clipping, dtype and learning-rate schedule) in this process. The
reference is nanoGPT's train.py loop: batches from random offsets into train.bin stacked with
``torch.from_numpy``, the next batch fetched while the GPU runs the current one, no host sync
inside the step. Measurements alternate (ref, ours, ours, ref, ...) to cancel drift; each
pair gives a ratio, and the median ratio is reported with tokens/s (and MFU on a GPU).

    python bench/train_throughput.py                                  # CPU, configs/tiny.py
    python bench/train_throughput.py --device=cuda --compile --config=configs/small.py --data_dir=data/shakespeare
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

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
from ewa.engine.config import TrainConfig  # noqa: E402
from ewa.engine.data import data_meta  # noqa: E402
from ewa.engine.runtime import Runtime, peak_flops, seed_everything  # noqa: E402
from ewa.engine.schedule import lr_at  # noqa: E402
from model import GPT  # noqa: E402

# the table: columns shown, with their format
COLUMNS = {
    "loop": "s",
    "tokens_per_s": ",.0f",
    "ms_per_step": ".1f",
    "mfu": ".1%",
    "ratio": ".3f",
    "ratio_min": ".3f",
    "ratio_max": ".3f",
}


class NanoGPTLoop:
    """nanoGPT's train.py inner loop over its own copy of the model."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, like: GPT, dtype: str):
        self.cfg, self.rt = cfg, rt
        seed_everything(cfg.seed)
        self.model = GPT(like.config).to(rt.device)
        self.model.load_state_dict(like.state_dict())
        self.optimizer = self.model.configure_optimizers(
            cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), rt.device_type
        )
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.train_bin, self.token_dtype = Path(cfg.data_dir) / "train.bin", np.dtype(dtype)
        self.accum = cfg.grad_accum_steps(1)
        self.iter_num = 0
        self.x, self.y = self.get_batch()

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.memmap(self.train_bin, dtype=self.token_dtype, mode="r")  # re-opened per batch, as nanoGPT
        bs = self.cfg.block_size
        ix = torch.randint(len(data) - bs, (self.cfg.micro_batch_size,))
        x = torch.stack([torch.from_numpy(data[i : i + bs].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + bs].astype(np.int64)) for i in ix])
        if self.rt.device_type == "cuda":  # pinned, for an asynchronous copy
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.rt.device, non_blocking=True), y.to(self.rt.device, non_blocking=True)

    def train_step(self) -> torch.Tensor:
        lr = lr_at(self.cfg, self.iter_num)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for _ in range(self.accum):
            with self.rt.autocast():
                _, loss = self.forward(self.x, self.y)
                loss = loss / self.accum
            self.x, self.y = self.get_batch()  # prefetch while the device computes
            loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter_num += 1
        return loss


def steps_per_second(step: Callable[[], object], steps: int, device: torch.device) -> float:
    return steps / timed(lambda: [step() for _ in range(steps)], device)


def main(argv: list[str] | None = None) -> dict:
    p = trainer_parser("train_throughput", __doc__)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each loop first")
    p.add_argument("--tolerance", type=float, default=0.02, help="timing noise allowed in 'not slower'")
    p.set_defaults(repeats=6)  # pairs, an even number: as many (ref, ours) as (ours, ref)
    args, overrides = parse(p, argv, overrides=True)
    with bench_trainer(args, overrides, ema=False, swa=False, lawa_online=False) as ours:
        cfg, rt = ours.cfg, ours.rt
        ref = NanoGPTLoop(cfg, rt, ours.model, data_meta(cfg.data_dir)["dtype"])
        peak = peak_flops(rt.device)
        loops = {"nanogpt": ref.train_step, "ours": ours.train_step}
        for step in loops.values():
            for _ in range(args.warmup):
                step()
        rates: dict[str, list[float]] = {name: [] for name in loops}
        for r in range(args.repeats):
            for name in list(loops)[:: 1 if r % 2 == 0 else -1]:  # ref, ours, ours, ref, ...
                rates[name].append(steps_per_second(loops[name], args.steps, rt.device))
        ratios = [o / n for o, n in zip(rates["ours"], rates["nanogpt"], strict=True)]  # one per (ref, ours) pair
        spread = {"nanogpt": (1.0, 1.0, 1.0), "ours": (median(ratios), min(ratios), max(ratios))}
        rows = []
        for name, rate in rates.items():
            tok_s = cfg.tokens_per_step * median(rate)
            mfu = ours.model.estimate_mfu(tok_s, peak) if peak else None
            ratio, lo, hi = spread[name]
            rows.append(
                {
                    "loop": name,
                    "tokens_per_s": tok_s,
                    "ms_per_step": 1000 / median(rate),
                    "mfu": mfu,
                    "ratio": ratio,
                    "ratio_min": lo,
                    "ratio_max": hi,
                }
            )
        ok = median(ratios) >= 1 - args.tolerance
        goal = f">= {1 - args.tolerance:g} (not slower, {args.tolerance:.0%} noise allowed)"
        targets = [target("ours/nanogpt tokens/s", goal, median(ratios), ok)]
        return report("train_throughput", args, rt.device, rows, COLUMNS, targets, trainer_summary(ours))


if __name__ == "__main__":
    main()
