"""Where a run starts (``init_from``): from scratch, from weights (a file of any format
``ewa.files`` reads, or a released GPT-2), from its own resume checkpoints (``resume``, or
``auto``: those if there are any, else scratch), or branched from another run's resume
checkpoint, with the raw weights there or one of its averages."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ewa.engine.config import ConfigError, TrainConfig
from ewa.files import (
    CheckpointError,
    Weights,
    is_run_dir,
    list_checkpoints,
    load_weights,
    resume_dir,
    resume_values,
    snapshot_dir,
    snapshot_kinds,
)
from ewa.window import coefficients, window_mean, window_members
from model import GPT, GPT2_SIZES

# what a resumed run must share with the run it continues: the model and the data it sees
RUN_SETTINGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "scale_attn_by_inverse_layer_idx",
                "data_dir", "seed")


@dataclass
class Start:
    weights: dict[str, torch.Tensor] | None = None  # initial weights for the model
    checkpoints: list[Path] = field(default_factory=list)  # resume checkpoints to restore the state from, best first
    branch: Path | None = None  # the run this one branches from


def resolve_start(cfg: TrainConfig) -> Start:
    """What ``cfg.init_from`` starts from; a run directory that already holds a run is only
    continued (``resume`` or ``auto``), with the same model and data, never overwritten."""
    source, folder = cfg.init_from, resume_dir(cfg.out_dir)
    existing = list_checkpoints(folder) if folder.is_dir() else {}
    if source == "auto":
        source = "resume" if existing else "scratch"
    if source != "resume" and existing:
        raise ConfigError(
            f"{cfg.out_dir} already holds a run (resume checkpoints up to step {max(existing)}): "
            "continue it with --init_from=resume (or auto), or choose another --out_dir"
        )
    if source == "resume":
        if not existing:
            raise ConfigError(f"init_from=resume: no resume checkpoint in {folder}; use init_from=scratch or auto")
        check_same_run(cfg, existing[max(existing)])
        return Start(checkpoints=[existing[s] for s in sorted(existing, reverse=True)])
    if is_run_dir(source):
        return Start(checkpoints=[branch_checkpoint(cfg, Path(source))], branch=Path(source))
    if source in GPT2_SIZES:
        return Start(weights=dict(GPT.from_pretrained(source).named_parameters()))
    return Start(weights=None if source == "scratch" else load_weights(source))


def check_same_run(cfg: TrainConfig, checkpoint: Path) -> None:
    """Refuse to continue a run with another model or other data (``RUN_SETTINGS``), in one line."""
    try:
        saved = resume_values(checkpoint)["trainer"]["config"]
    except (CheckpointError, KeyError, TypeError):
        return  # a damaged checkpoint: loading falls back to an older one, and checks its shapes
    same = {"data_dir": lambda a, b: os.path.realpath(a) == os.path.realpath(b)}
    differ = [k for k in RUN_SETTINGS if k in saved and not same.get(k, lambda a, b: a == b)(saved[k], getattr(cfg, k))]
    if differ:
        was = ", ".join(f"{k}={saved[k]!r}" for k in differ)
        now = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in differ)
        raise ConfigError(f"{cfg.out_dir} holds a run with {was}, this command has {now}: continue it with "
                          "its settings, or choose another --out_dir")


def branch_checkpoint(cfg: TrainConfig, run: Path) -> Path:
    """The resume checkpoint of ``run`` at branch_step (-1: the SWA start for an SWA run, else the latest)."""
    available = list_checkpoints(resume_dir(run)) if resume_dir(run).is_dir() else {}
    step = cfg.branch_step
    if step < 0:
        step = cfg.swa_start_step() if cfg.swa else max(available, default=-1)
    if step not in available:
        raise ConfigError(
            f"{resume_dir(run)} has no resume checkpoint at step {step} (it has {sorted(available)}); "
            "pass --branch_step=<one of them>, or re-run the original with a resume_interval that divides it"
        )
    return available[step]


def branch_average(run: Path, step: int, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights a branch starts from (``branch_weights``): the run's EMA snapshot at ``step``
    (``ema``, or ``ema_<decay>`` for one of its ema_decays), or the merge of its raw snapshots
    in the LAWA window ending there (lawa_k, lawa_nu, lawa_weights)."""
    ema = cfg.branch_weights.startswith("ema")
    kind = cfg.branch_weights if ema else "raw"
    folder = snapshot_dir(run, kind)
    if not folder.is_dir():
        raise ConfigError(
            f"branch_weights={cfg.branch_weights}: {run} keeps no {kind} snapshots (its kinds: "
            f"{', '.join(snapshot_kinds(run)) or 'none'}); use raw, lawa or one of its ema kinds"
        )
    snaps = list_checkpoints(folder)
    members = (step,) if ema else window_members(step, cfg.lawa_k, cfg.lawa_nu)
    missing = [s for s in members if s not in snaps]
    if missing:
        raise ConfigError(
            f"branch_weights={cfg.branch_weights} at step {step}: {folder} has no snapshot at step(s) {missing}; "
            "choose a branch_step (and lawa_k, lawa_nu) on the run's ckpt_interval grid"
        )
    if ema:
        return load_weights(snaps[step])
    weights = [Weights(snaps[s]) for s in members]
    c = coefficients(cfg.lawa_weights, len(weights))
    return {name: window_mean(len(weights), lambda i: weights[i].get(name), c) for name in weights[-1].keys()}  # noqa: B023
