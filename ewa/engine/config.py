"""Run configuration: plain-Python config files loaded into a typed, validated dataclass.

A config file is a list of assignments (``n_layer = 12``). It is run in a namespace of its
own (never into this module's globals), every public name in it must be a field of
``TrainConfig`` with a value of the field's type, and ``--key=value`` arguments override it.
Values that follow from others (gradient accumulation, the SWA start step, ...) are methods.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import runpy
import sys
import types
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ewa.files import atomic_write_text
from ewa.window import merge_weights
from model import ATTENTION_BACKENDS, GPTConfig


class ConfigError(ValueError):
    """A bad config value or file; the message names the key or file and the fix."""


# settings that take one of a few values
CHOICES = {
    "dtype": ("auto", "bfloat16", "float32"),
    "wandb_mode": ("offline", "online", "disabled"),
    "parallel": ("ddp", "fsdp"),
    "averaging_device": ("gpu", "cpu"),
    "attention": ("auto", *ATTENTION_BACKENDS),
}


@dataclass
class TrainConfig:
    # -- run ------------------------------------------------------------------------------------
    out_dir: str = "out/run"
    # scratch | auto (resume if out_dir holds a run, else scratch: the same command continues a
    # preempted run) | resume (continue out_dir) | gpt2, gpt2-medium, ... (Hugging Face weights) |
    # a weights file or HF directory (weights only) | a run directory (branch from its resume
    # checkpoint at branch_step: the whole trainer state, into this out_dir)
    init_from: str = "scratch"
    branch_step: int = -1  # with init_from=<run dir>: -1 = the SWA start step for SWA runs, else the latest
    # with init_from=<run dir>: start from the raw weights at branch_step, its EMA snapshot, or the LAWA
    # average of the window ending there (lawa_k, lawa_nu, lawa_weights); the averages then restart from it
    branch_weights: str = "raw"  # raw | ema | lawa | ema_<decay> (the snapshots of one of its ema_decays)
    branch_reset_optimizer: bool = False  # with init_from=<run dir>: fresh AdamW state, not the checkpoint's
    seed: int = 1337
    # -- data -----------------------------------------------------------------------------------
    data_dir: str = "data/shakespeare"
    # -- model ----------------------------------------------------------------------------------
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 0  # 0: the tokenizer's vocabulary size from data_dir/meta.json
    bias: bool = False
    dropout: float = 0.0
    scale_attn_by_inverse_layer_idx: bool = False
    # -- optimisation -----------------------------------------------------------------------------
    max_steps: int = 70_000
    tokens_per_step: int = 131_072  # global batch, whatever the number of GPUs
    micro_batch_size: int = 16  # sequences per GPU per forward/backward
    learning_rate: float = 6e-3
    min_lr: float = 6e-4
    warmup_steps: int = 2000
    lr_decay_steps: int = 0  # 0: max_steps
    cooldown_steps: int = 0  # >0: the last cooldown_steps decay linearly to 0 (a WSD-style cooldown)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: no clipping
    skip_nonfinite: bool = False  # True: skip a step whose loss is NaN/inf (costs a host sync per step)
    # -- averaging ------------------------------------------------------------------------------
    ema: bool = True
    ema_decay: float = 0.9  # the paper's EMA decay, updated every step
    ema_decays: str = ""  # more EMAs beside it, comma-separated decays ("0.99,0.999"), each named ema_<decay>
    lawa_k: int = 5  # LAWA: average the k latest checkpoints ...
    lawa_nu: int = 1000  # ... spaced nu steps apart ...
    lawa_interval: int = 1000  # ... at every interval steps (offline lawa.py) ...
    lawa_start: int = 0  # ... from this step on
    lawa_online: bool = False  # also evaluate LAWA during training from in-memory snapshots
    lawa_weights: str = "uniform"  # online LAWA's merge: uniform | 1-sqrt | cosine | ema:<a> (see ewa/window.py)
    swa: bool = False  # set by train_swa.py
    swa_start: float = 0.75  # fraction of max_steps at which SWA starts
    swa_lr: float = 6e-4  # SWA learning rate, reached by cosine annealing ...
    swa_anneal_steps: int = 1000  # ... over this many steps after swa_start
    swa_every: int = 10  # average the weights every swa_every steps
    # -- evaluation -----------------------------------------------------------------------------
    eval_interval: int = 1000
    eval_tokens: int = 1_048_576  # fixed held-out tokens, the same for every model compared
    eval_batch_size: int = 16  # sequences per forward pass during evaluation
    # -- checkpoints ----------------------------------------------------------------------------
    ckpt_interval: int = 200  # weights-only snapshots for averaging
    max_snapshots: int = 0  # keep at most this many raw snapshots (0: all); LAWA's window is kept
    resume_interval: int = 1000  # full resume checkpoints ...
    keep_resume: int = 2  # ... keeping the latest few (0: all)
    # -- system ---------------------------------------------------------------------------------
    parallel: str = "ddp"  # ddp (weights and optimizer replicated) | fsdp (FSDP2: sharded across ranks)
    averaging_device: str = "gpu"  # gpu: averages on the training device | cpu: pinned host memory, updated in the background
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 on CUDA, else float32) | bfloat16 | float32
    compile: bool = False
    attention: str = "auto"  # the SDPA kernel: auto (PyTorch's choice) | flash | cudnn | efficient | math
    loss_chunk_rows: int = 0  # >0: the output layer and loss this many rows at a time (no whole-batch logits)
    # -- logging --------------------------------------------------------------------------------
    log_interval: int = 10
    wandb_log: bool = False
    wandb_project: str = "early-weight-averaging"
    wandb_run_name: str = ""
    wandb_mode: str = "offline"  # offline | online | disabled

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), f.type))
        positive = (
            "n_layer n_head n_embd block_size max_steps tokens_per_step micro_batch_size eval_interval "
            "eval_tokens eval_batch_size ckpt_interval resume_interval log_interval lawa_k lawa_nu "
            "lawa_interval swa_every"
        ).split()
        for name in positive:
            self._check(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
        non_negative = ("vocab_size warmup_steps lr_decay_steps cooldown_steps max_snapshots keep_resume loss_chunk_rows "
                        "lawa_start swa_anneal_steps learning_rate min_lr grad_clip").split()
        for name in non_negative:
            self._check(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must not be negative")
        self._check(self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        per_step = self.micro_batch_size * self.block_size
        self._check(
            self.tokens_per_step % per_step == 0,
            f"tokens_per_step={self.tokens_per_step} must be a multiple of micro_batch_size*block_size={per_step}",
        )
        self._check(self.min_lr <= self.learning_rate, "min_lr must not exceed learning_rate")
        self._check(0 <= self.ema_decay < 1, f"ema_decay={self.ema_decay} must be in [0, 1)")
        self.emas()  # checks ema_decays
        try:
            merge_weights(self.lawa_weights, self.lawa_k)
        except ValueError as e:
            raise ConfigError(str(e).replace("--weights", "lawa_weights")) from None
        self._check(0 < self.swa_start < 1, f"swa_start={self.swa_start} is a fraction of max_steps in (0, 1)")
        self._check(self.cooldown_steps <= self.max_steps, "cooldown_steps must not exceed max_steps")
        self._check(0 <= self.dropout < 1, f"dropout={self.dropout} must be in [0, 1)")
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            self._check(value in choices, f"{name}={value!r}: use {', '.join(choices)}")
        self._check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"device={self.device!r}: use auto, cpu, cuda or cuda:N",
        )
        self._check(
            self.branch_weights in ("raw", "ema", "lawa") or _is_ema_kind(self.branch_weights),
            f"branch_weights={self.branch_weights!r}: use raw, ema, lawa or ema_<decay> as the run names its "
            "ema_decays snapshots (e.g. ema_0.99)",
        )
        self._check(
            not self.lawa_online or self.eval_interval % self.lawa_nu == 0,
            f"lawa_online needs eval_interval ({self.eval_interval}) to be a multiple of lawa_nu ({self.lawa_nu}): "
            "the online window ends at each eval step",
        )

    @staticmethod
    def _check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    # -- derived values -----------------------------------------------------------------------

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step so that each step sees tokens_per_step tokens."""
        per_micro = self.micro_batch_size * self.block_size * world_size
        if self.tokens_per_step % per_micro == 0:
            return self.tokens_per_step // per_micro
        lower = self.tokens_per_step // per_micro * per_micro
        steps = " or ".join(f"--tokens_per_step={t}" for t in (lower, lower + per_micro) if t > 0)
        worlds = [w for w in range(1, 65) if self.tokens_per_step % (self.micro_batch_size * self.block_size * w) == 0]
        micro = [m for m in range(self.micro_batch_size, 0, -1) if self.tokens_per_step % (m * self.block_size * world_size) == 0]
        options = [f"{steps} (multiples of micro_batch_size*block_size*processes = {per_micro})"]
        if micro:
            options.append(f"--micro_batch_size={micro[0]}")
        options.append(f"a process count of {'/'.join(map(str, worlds))}" if worlds else "fewer processes")
        raise ConfigError(
            f"tokens_per_step={self.tokens_per_step} cannot be split over {world_size} processes of "
            f"micro_batch_size={self.micro_batch_size} x block_size={self.block_size}: use "
            + ", or ".join(options)
        )

    def emas(self) -> dict[str, float]:
        """The EMAs to keep, by name: ``ema`` (ema_decay; when ema=True) and ``ema_<decay>`` for
        each of ema_decays. A decay given twice (or equal to ema_decay) is one EMA, under its
        first name: ``ema_decays="0.9,0.99"`` with ema_decay=0.9 keeps ``ema`` and ``ema_0.99``."""
        try:
            extra = [float(d) for d in self.ema_decays.split(",") if d.strip()]
        except ValueError:
            raise ConfigError(f"ema_decays={self.ema_decays!r}: expected comma-separated numbers, e.g. 0.99,0.999") from None
        for d in extra:
            self._check(0 <= d < 1, f"ema_decays: {d} must be in [0, 1)")
        emas = {"ema": self.ema_decay} if self.ema else {}
        for d in extra:
            name = f"ema_{d:g}"
            self._check(
                emas.get(name, d) == d, f"ema_decays: {d} and {emas.get(name)} are both named {name}; keep one of them"
            )
            if d not in emas.values():
                emas[name] = d
        return emas

    def sequences_per_step(self) -> int:
        return self.tokens_per_step // self.block_size

    def decay_steps(self) -> int:
        return self.lr_decay_steps or self.max_steps

    def swa_start_step(self) -> int:
        return int(round(self.swa_start * self.max_steps))

    def eval_windows(self) -> int:
        return max(1, self.eval_tokens // self.block_size)

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The model's shape (``vocab_size``: the tokenizer's, unless the config sets one)."""
        return GPTConfig.from_dict({**asdict(self), "vocab_size": self.vocab_size or vocab_size})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _is_ema_kind(name: str) -> bool:
    """``ema_<decay>`` spelled as ``emas`` names it (``ema_0.99``, not ``ema_.99``), with a decay in [0, 1)."""
    head, _, decay = name.partition("_")
    try:
        return head == "ema" and 0 <= float(decay) < 1 and name == f"ema_{float(decay):g}"
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# parsing


def _coerce(name: str, value: Any, type_name: str) -> Any:
    """Check ``value`` against the field's declared type; ints are accepted for floats."""
    expected = {"int": int, "float": float, "bool": bool, "str": str}[type_name]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        if expected is float and not math.isfinite(value):
            raise ConfigError(f"{name}={value} must be a finite number")
        return value
    raise ConfigError(f"{name}={value!r} has type {type(value).__name__}, expected {type_name}")


def _parse_value(name: str, text: str, type_name: str) -> Any:
    if type_name == "str":
        return text
    if type_name == "bool":
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"--{name}={text}: expected True or False")
    try:
        return int(text) if type_name == "int" else float(text)
    except ValueError:
        raise ConfigError(f"--{name}={text}: expected {'an int' if type_name == 'int' else 'a number'}") from None


def _unknown_key(key: str, where: str) -> ConfigError:
    names = [f.name for f in fields(TrainConfig)]
    close = difflib.get_close_matches(key, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see ewa/engine/config.py for every key"
    return ConfigError(f"{where}: unknown config key {key!r}{hint}")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The public assignments of a config file, each checked to be a TrainConfig field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    namespace = runpy.run_path(str(path))
    types_by_name = {f.name: f.type for f in fields(TrainConfig)}
    values = {}
    for key, value in namespace.items():
        if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue
        if key not in types_by_name:
            raise _unknown_key(key, str(path))
        try:
            values[key] = _coerce(key, value, types_by_name[key])
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return values


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--max_steps=100", "--compile=False"]`` -> typed values, rejecting unknown keys."""
    types_by_name = {f.name: f.type for f in fields(TrainConfig)}
    values = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"argument {arg!r}: overrides are written --key=value")
        key, text = arg[2:].split("=", 1)
        if key not in types_by_name:
            raise _unknown_key(key, "command line")
        values[key] = _parse_value(key, text, types_by_name[key])
    return values


def load_config(default_file: str | os.PathLike, argv: list[str] | None = None, **fixed: Any) -> TrainConfig:
    """Config from ``default_file`` (or a config file given as the first argument), then
    ``--key=value`` overrides, then ``fixed`` values set by the entry script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    config_file = Path(default_file)
    if argv and not argv[0].startswith("--"):
        config_file = Path(argv.pop(0))
    values = read_config_file(config_file)
    values.update(parse_overrides(argv))
    values.update(fixed)
    try:
        return TrainConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"{config_file}: {e}") from None


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    atomic_write_text(path, json.dumps(config.to_dict(), indent=2) + "\n")


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a saved run's config.json, ignoring keys this version lacks."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in names})
