"""Metrics to stdout, to ``metrics.jsonl`` in the run directory (always) and to wandb (when
asked). Callers log dicts and never branch on whether wandb is on.

A run directory keeps one wandb run for its whole life: its id is stored in the directory
(``wandb_id.txt``), a resumed run reopens it (``resume="allow"``), and the tools that score a
run afterwards (lawa.py, analyze.py) log into it, each against a step axis of its own.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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

    from ewa.files import atomic_write_text

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
        from ewa.files import atomic_write_text

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
