"""Metrics to stdout, to ``metrics.jsonl`` in the run directory (always) and to wandb (when
asked). Callers log dicts and never branch on whether wandb is on."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class NullRun:
    """Stands in for a wandb run when wandb logging is off, or on ranks other than 0."""

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    def finish(self) -> None:
        pass


def open_wandb(project: str, name: str, mode: str, config: dict, run_dir: str | os.PathLike):
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=project, name=name or None, mode=mode, config=config, dir=str(run_dir))


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
        from ewa.checkpoint import atomic_write_text

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
