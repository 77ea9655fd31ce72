"""Shared by the benchmarks: arguments, timing, machine description, table and JSON output.

Every benchmark compares the project's code with a baseline measured in the same process
(or the same invocation), prints a table with the ratio and whether its target holds, and
writes the figures with the machine they were taken on to a JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/<name>.py` imports the project from the checkout

if TYPE_CHECKING:
    from ewa.engine.trainer import Trainer

MiB = 2**20
START_LOAD = os.getloadavg()[0]  # how busy the machine was when the benchmark started


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """Options every benchmark takes; ``--out`` defaults to bench/results/<name>.json."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"{name}.json", help="JSON output")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    return p


def parse(
    p: argparse.ArgumentParser, argv: list[str] | None, overrides: bool = False
) -> tuple[argparse.Namespace, list[str]]:
    """Arguments, and with ``overrides`` the config overrides left over; applies --threads."""
    args, rest = p.parse_known_args(argv) if overrides else (p.parse_args(argv), [])
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, rest


def trainer_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """Options of the benchmarks that train: a config file, then any ``--key=value`` of it."""
    p = parser(name, doc)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.py"), help="config file (default: tiny)")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, else float32) | bfloat16 | float32")
    p.add_argument("--compile", action="store_true", help="torch.compile both loops")
    p.epilog = "Any other --key=value overrides the config file (e.g. --n_layer=12 --data_dir=...)."
    return p


@contextlib.contextmanager
def bench_trainer(args: argparse.Namespace, overrides: list[str], **fixed: Any) -> Iterator[Trainer]:
    """A Trainer for ``args.config`` with ``overrides``, writing nothing (no fit(): no eval,
    no checkpoints); its out_dir is a temporary folder."""
    from ewa.engine.config import load_config
    from ewa.engine.runtime import init_runtime
    from ewa.engine.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="ewa-bench-") as out:
        cfg = load_config(
            args.config,
            overrides,
            out_dir=out,
            device=args.device,
            dtype=args.dtype,
            compile=args.compile,
            wandb_log=False,
            **fixed,
        )
        yield Trainer(cfg, init_runtime(cfg.device, cfg.dtype))


def trainer_summary(trainer: Trainer) -> dict[str, Any]:
    """The shapes and settings a training benchmark ran with."""
    c, cfg = trainer.model.config, trainer.cfg
    return {
        **{k: getattr(c, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")},
        "params": trainer.model.get_num_params(),
        "tokens_per_step": cfg.tokens_per_step,
        "micro_batch_size": cfg.micro_batch_size,
        "grad_accum_steps": trainer.accum,
        "autocast_dtype": str(trainer.rt.dtype).removeprefix("torch."),
        "compile": cfg.compile,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``fn()`` takes, the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def _status_bytes(key: str) -> int | None:
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
    return None


def peak_rss() -> int:
    """This process's peak resident set size in bytes (a high-water mark: it never goes down).

    Linux's VmHWM, not ``getrusage``'s ru_maxrss: a process started by ``subprocess``
    inherits its parent's ru_maxrss across exec, so a fresh worker would report at least
    the parent's RSS; VmHWM starts afresh with the new program."""
    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    """This process's resident set size now, in bytes (0 where /proc is not available)."""
    return _status_bytes("VmRSS") or 0


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_at_start": round(START_LOAD, 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
        "device": str(device),
        "device_name": cpu,
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def target(name: str, goal: str, value: float, holds: bool) -> dict[str, Any]:
    return {"name": name, "target": goal, "value": value, "holds": bool(holds)}


def print_table(rows: list[dict[str, Any]], columns: dict[str, str]) -> None:
    """``columns``: the keys of ``rows`` to show, each with its format spec."""
    cells = [list(columns)] + [["-" if r.get(k) is None else format(r[k], f) for k, f in columns.items()] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def report(
    name: str,
    args: argparse.Namespace,
    device: torch.device,
    rows: list[dict[str, Any]],
    columns: dict[str, str],
    targets: list[dict[str, Any]],
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Print the table and the targets, and write everything to ``args.out`` as JSON."""
    print_table(rows, columns)
    for t in targets:
        print(f"{'OK  ' if t['holds'] else 'MISS'} {t['name']}: {t['value']:.3g} (target {t['target']})")
    result = {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | (settings or {}),
        "results": rows,
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result
