"""Metrics to stdout, to ``metrics.jsonl`` in the run directory (always) and to wandb (when
asked). Callers log dicts and never branch on whether wandb is on. ``TrainLog`` turns the
training loop's losses and clock into its train and eval records.

A run directory keeps one wandb run for its whole life: its id is stored in the directory
(``wandb_id.txt``), a resumed run reopens it (``resume="allow"``), and the tools that score a
run afterwards (lawa.py, analyze.py) log into it, each against a step axis of its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ewa.files import atomic_write_text

if TYPE_CHECKING:
    from ewa.engine.runtime import Runtime

WANDB_ID_FILE = "wandb_id.txt"


class NullRun:
    """Stands in for a wandb run when wandb logging is off, or on ranks other than 0."""

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    def define_metric(self, *args: Any, **kwargs: Any) -> None:
        pass

    def finish(self) -> None:
        pass


def open_wandb(
    project: str, name: str, mode: str, config: dict | None, run_dir: str | os.PathLike, resume: bool = False
) -> Any:
    """The wandb run of ``run_dir`` (call on rank 0 only). Fresh: a new id, stored in the run
    directory. ``resume``: the stored id, reopened with ``resume="allow"`` (a new one when the
    directory has none yet), so a resumed run, and a tool logging into a finished one, extend
    the same wandb run."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    id_file = Path(run_dir) / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resume and id_file.exists() else ""
    if not run_id:
        run_id = "".join(secrets.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(8))
        atomic_write_text(id_file, run_id + "\n")
    return wandb.init(project=project, name=name or None, mode=mode, config=config, dir=str(run_dir), id=run_id,
                      resume="allow" if resume else None)


def define_axis(run: Any, section: str, x: str = "step") -> None:
    """Plot every ``section/`` metric against ``section/<x>`` rather than wandb's own step
    counter, so the section can be logged after training has finished."""
    run.define_metric(f"{section}/{x}")
    run.define_metric(f"{section}/*", step_metric=f"{section}/{x}")


def log_section(run: Any, section: str, rows: Iterable[dict[str, Any]], x: str = "step") -> None:
    """Log ``rows`` (each holding ``x`` and numbers) under ``section/``, against its own axis."""
    define_axis(run, section, x)
    for row in rows:
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        run.log({f"{section}/{k}": v for k, v in numbers.items()})


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl; a last line cut off by a crash is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLogger:
    def __init__(self, path: str | os.PathLike | None, run: Any = None, echo: bool = True, append: bool = True):
        self.path = Path(path) if path else None
        self.run = run or NullRun()
        self.echo = echo
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if append else "w") if self.path else None

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (left by a run that crashed after its last checkpoint),
        so a resumed run's metrics.jsonl has one record per step and kind."""
        if self.path is None or self._file is None:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        self._file.close()
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")

    def log(self, record: dict[str, Any], line: str | None = None) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        metrics = {k: v for k, v in record.items() if k not in ("step", "kind") and isinstance(v, (int, float))}
        self.run.log({f"{record.get('kind', 'train')}/{k}": v for k, v in metrics.items()}, step=record.get("step"))
        if self.echo and line:
            print(line, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.run.finish()
        self.run = NullRun()  # closed once


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class LogWindow:
    """The steps since the last train record: when it started, the seconds spent evaluating
    and checkpointing in it (left out of the throughput), and its losses moved to the host."""

    start: float
    step: int
    eval_s: float = 0.0
    ckpt_s: float = 0.0
    losses: list[float] = field(default_factory=list)


class TrainLog:
    """The train and eval records of a run. Each step's loss stays on the device until a
    record or a checkpoint needs it (one sync then, for all); a record's throughput is over
    training time only: the window's wall time less the seconds spent evaluating and
    checkpointing, which are logged beside it as ``eval_s`` and ``ckpt_s``."""

    def __init__(self, rt: Runtime, tokens_per_step: int, max_steps: int, skip_nonfinite: bool,
                 mfu: Callable[[float], float] | None, last_saved: Callable[[], str]):
        """``mfu(tokens per second)``: the model FLOPs utilisation (None: unknown device);
        ``last_saved()``: the last resume checkpoint, for the error on a non-finite loss."""
        self.rt, self.tokens_per_step, self.max_steps = rt, tokens_per_step, max_steps
        self.skip_nonfinite, self.mfu, self.last_saved = skip_nonfinite, mfu, last_saved
        self.metrics = MetricsLogger(None, echo=False)  # rank 0 opens the run's files (``open``)
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.window = LogWindow(0.0, 0)

    def open(self, metrics: MetricsLogger) -> None:
        self.metrics = metrics

    def add(self, step: int, loss: torch.Tensor) -> None:
        """The mean loss of ``step`` (on the device)."""
        self.pending.append((step, loss))

    def flush(self) -> None:
        """Move the pending losses to the host (one sync) into the window, as the mean over the
        ranks, i.e. over the global batch; stop the run at a NaN/inf, naming its first step."""
        if not self.pending:
            return
        values = self.rt.all_reduce_sum(torch.stack([v for _, v in self.pending])) / self.rt.world_size
        losses = [(s, v) for (s, _), v in zip(self.pending, values.tolist(), strict=True)]
        self.pending.clear()
        bad = [s for s, v in losses if not math.isfinite(v)]
        if bad and not self.skip_nonfinite:  # the same on every rank: the mean is NaN everywhere
            raise NonFiniteLoss(f"non-finite training loss at step {bad[0]}; stopped without saving "
                                f"({self.last_saved()}). Lower learning_rate, or set skip_nonfinite=True to skip such batches")
        self.window.losses += [v for _, v in losses]

    def clock(self) -> float:
        """Wait for the GPU's queued work, then read the clock."""
        if self.rt.device_type == "cuda":
            torch.cuda.synchronize(self.rt.device)
        return time.perf_counter()

    def new_window(self, step: int) -> None:
        self.window = LogWindow(self.clock(), step)

    @contextlib.contextmanager
    def excluded(self, kind: str) -> Iterator[None]:
        """Time spent in the block goes to the window's ``kind`` (``eval_s``, ``ckpt_s``), not
        to training: the training thread's time (queued GPU work before it is waited for)."""
        start = self.clock()
        try:
            yield
        finally:
            setattr(self.window, kind, getattr(self.window, kind) + time.perf_counter() - start)

    def train(self, step: int, lr: float) -> None:
        """A train record of the steps since the last one (``lr``: what the last step used)."""
        self.flush()
        w, steps = self.window, step - self.window.step
        train_s = max(self.clock() - w.start - w.eval_s - w.ckpt_s, 1e-9)
        finite = [v for v in w.losses if math.isfinite(v)]
        loss = sum(finite) / max(1, len(finite))
        tok_s = self.tokens_per_step * steps / train_s
        record = {"kind": "train", "step": step, "loss": loss, "lr": lr, "tokens": step * self.tokens_per_step,
                  "tok_per_s": tok_s, "ms_per_step": 1000 * train_s / max(steps, 1), "eval_s": w.eval_s,
                  "ckpt_s": w.ckpt_s}
        if self.mfu:
            record["mfu"] = self.mfu(tok_s)
        if self.rt.device_type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.rt.device) / 2**30
        line = (f"step {step:>6}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tok_s / 1e3:,.1f}k tok/s | "
                f"{record['ms_per_step']:.0f} ms/step" + (f" | mfu {100 * record['mfu']:.1f}%" if self.mfu else "")
                + (f" | {record['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in record else ""))
        self.metrics.log(record, line)
        self.new_window(step)

    def eval(self, step: int, results: dict[str, float]) -> None:
        record = {"kind": "eval", "step": step, "tokens": step * self.tokens_per_step, **results}
        self.metrics.log(record, f"eval step {step:>6} | " + " | ".join(f"{k} {v:.4f}" for k, v in results.items()))

    def close(self) -> None:
        self.metrics.close()
