"""What the command-line scripts share, defined once: the error a user can fix, argparse types,
the flags that two scripts define alike and the typed records those flags fill for the tools."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TypeVar

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


@dataclass(frozen=True)
class WindowSettings:
    """The LAWA window asked for on the command line; None keeps the run's setting (lawa_k, ...)."""

    k: int | None = None
    nu: int | None = None
    weights: str | None = None
    interval: int | None = None
    start: int | None = None
    end: int | None = None

    def plan(self, cfg: TrainConfig) -> WindowPlan:
        """The window plan asked for, with the run's settings where none is given."""
        run = {"k": cfg.lawa_k, "nu": cfg.lawa_nu, "weights": cfg.lawa_weights, "interval": cfg.lawa_interval,
               "start": cfg.lawa_start}
        return WindowPlan(**(run | {k: v for k, v in vars(self).items() if v is not None}))


def add_window_flags(p: argparse.ArgumentParser) -> None:
    """The LAWA window (lawa.py and analyze.py), each the run's setting by default."""
    p.add_argument("--k", type=integer(1), help="checkpoints per window (default: the run's lawa_k)")
    p.add_argument("--nu", type=integer(1), help="steps between the window's checkpoints (default: the run's lawa_nu)")
    p.add_argument("--weights", help="the merge: uniform, 1-sqrt, cosine or ema:<a> (default: the run's lawa_weights)")


def window_settings(args: argparse.Namespace) -> WindowSettings:
    """The window flags given (``add_window_flags``; --interval, --start and --end where the script has them)."""
    return WindowSettings(**{f.name: getattr(args, f.name, None) for f in fields(WindowSettings)})


@dataclass(frozen=True)
class EvalOptions:
    """Which snapshots of a run directory to read and how to evaluate them; None keeps the run's setting."""

    kind: str = "raw"
    config: str | None = None  # a run's config.json or a config file, for a folder that is not a run
    data_dir: str | None = None
    eval_tokens: int | None = None
    eval_batch_size: int | None = None
    device: str | None = None
    dtype: str | None = None

    def overrides(self) -> dict[str, object]:
        """The evaluation settings given, as changes to the run's config."""
        return {k: v for k, v in vars(self).items() if k not in ("kind", "config") and v is not None}


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    """Which snapshots to read and how to evaluate them (lawa.py and analyze.py)."""
    p.add_argument("--kind", default="raw", help="which snapshots of a run directory: raw (default), ema, ema_<decay>, swa")
    p.add_argument("--config", help="config.json of a run, or a config file, for a folder that is not a run")
    p.add_argument("--data_dir", help="evaluation data (default: the run's)")
    p.add_argument("--eval_tokens", type=int, help="held-out tokens (default: the run's)")
    p.add_argument("--eval_batch_size", type=int, help="sequences per forward pass (default: the run's)")
    p.add_argument("--device", help="auto, cpu, cuda (default: the run's)")
    p.add_argument("--dtype", help="auto, bfloat16, float32 (default: the run's)")


def eval_options(args: argparse.Namespace) -> EvalOptions:
    """The evaluation flags given (``add_eval_flags``)."""
    return EvalOptions(**{f.name: getattr(args, f.name) for f in fields(EvalOptions)})
