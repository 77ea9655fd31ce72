"""What the command-line scripts share, defined once: the error a user can fix, argparse types,
the flags that two scripts define alike and the typed records those flags fill for the tools."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from ewa.engine.config import ConfigError, TrainConfig
from ewa.engine.data import DataError
from ewa.files import CheckpointError
from ewa.tools.merge import WindowPlan
from ewa.window import PlanError

T = TypeVar("T")


class InputError(ValueError):
    """A file or flag that cannot be used; the message names it and the fix."""


# errors whose message names the input at fault and the fix: a script prints it and exits
USER_ERRORS = (InputError, ConfigError, DataError, CheckpointError, PlanError)


def exit_on_error(call: Callable[[], T], *also: type[Exception]) -> T:
    """``call()``; on a user's error (``USER_ERRORS``, and ``also``) exit with its message, no traceback."""
    try:
        return call()
    except (*USER_ERRORS, *also) as e:
        sys.exit(f"error: {e}")


def parser(prog: str, doc: str | None, **kwargs) -> argparse.ArgumentParser:
    """A script's parser, with the script's docstring as its description."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   **kwargs)


def integer(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer of at least {minimum}")
        return value

    return parse


def int_list(minimum: int) -> Callable[[str], list[int]]:
    """An argparse type: integers of at least ``minimum`` separated by commas (``2,5,10``)."""
    return lambda text: [integer(minimum)(x) for x in text.split(",")]


def flag(text: str, parse: Callable[[str], Any] | None = None, default: Any = None) -> Any:
    """A record's field that ``add_flags`` defines as the flag ``--<field>``, with ``text`` as its help."""
    return field(default=default, metadata={"help": text, "type": parse})


@dataclass(frozen=True)
class WindowSettings:
    """The LAWA window asked for on the command line; None keeps the run's setting (lawa_k, ...)."""

    k: int | None = flag("checkpoints per window (default: the run's lawa_k)", integer(1))
    nu: int | None = flag("steps between the window's checkpoints (default: the run's lawa_nu)", integer(1))
    weights: str | None = flag("the merge: uniform, 1-sqrt, cosine or ema:<a> (default: the run's lawa_weights)")
    interval: int | None = flag("steps between windows (default: lawa_interval)", int)
    start: int | None = flag("first window step (default: lawa_start)", int)
    end: int | None = flag("last window step (default: the last checkpoint)", int)

    def plan(self, cfg: TrainConfig) -> WindowPlan:
        """The window plan asked for, with the run's settings where none is given."""
        run = {"k": cfg.lawa_k, "nu": cfg.lawa_nu, "weights": cfg.lawa_weights, "interval": cfg.lawa_interval,
               "start": cfg.lawa_start}
        return WindowPlan(**(run | {k: v for k, v in vars(self).items() if v is not None}))


@dataclass(frozen=True)
class EvalOptions:
    """Which snapshots of a run directory to read and how to evaluate them; None keeps the run's setting."""

    kind: str = flag("which snapshots of a run directory: raw (default), ema, ema_<decay>, swa", default="raw")
    config: str | None = flag("config.json of a run, or a config file, for a folder that is not a run")
    data_dir: str | None = flag("evaluation data (default: the run's)")
    eval_tokens: int | None = flag("held-out tokens (default: the run's)", int)
    eval_batch_size: int | None = flag("sequences per forward pass (default: the run's)", int)
    device: str | None = flag("auto, cpu, cuda (default: the run's)")
    dtype: str | None = flag("auto, bfloat16, float32 (default: the run's)")

    def overrides(self) -> dict[str, object]:
        """The evaluation settings given, as changes to the run's config."""
        return {k: v for k, v in vars(self).items() if k not in ("kind", "config") and v is not None}


def add_flags(p: argparse.ArgumentParser, record: type, *only: str) -> None:
    """The flags of ``record``'s fields (``WindowSettings``, ``EvalOptions``), or of those named in ``only``."""
    for f in fields(record):
        if f.name in (only or [f.name]):
            p.add_argument(f"--{f.name}", type=f.metadata["type"], default=f.default, help=f.metadata["help"])


def from_args(record: type[T], args: argparse.Namespace) -> T:
    """``record`` with the flags given for its fields (None for a field the script has no flag of)."""
    return record(**{f.name: getattr(args, f.name, None) for f in fields(record)})
