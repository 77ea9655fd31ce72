"""The training engine behind train_small.py, train_medium.py, train_large.py and train_swa.py.

One ``Trainer`` runs the loop (batch -> forward/backward -> optimizer step) under DDP or FSDP2
(``parallel``), updates the averagers (EMA, SWA, online LAWA: each rank holds its share of
them, see ``ewa.engine.parallel``) after every step, evaluates the raw model and every average on
the same fixed held-out tokens, writes weights-only snapshots for offline averaging and
resume checkpoints in the background (``ewa.engine.checkpointer``), and logs to stdout,
metrics.jsonl and wandb.

Run directory:
    config.json                     the resolved config
    metrics.jsonl                   one JSON record per log / eval
    snapshots/{raw,ema,swa}/step_XXXXXXXX.safetensors   fp32 weights every ckpt_interval
                                    (a step_XXXXXXXX/ directory of shards from several processes)
    resume/step_XXXXXXXX/           full trainer state (latest keep_resume, plus the SWA start)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from ewa.engine.averaging import Averaging, build_averagers
from ewa.engine.checkpointer import ResumeCheckpointer, SafeReader, SnapshotWriter, load_into, read_meta
from ewa.engine.config import ConfigError, TrainConfig, load_config, save_config
from ewa.engine.data import BatchSampler, DataError, data_meta, eval_windows, fingerprint, open_tokens
from ewa.engine.evaluate import Evaluator
from ewa.engine.logger import MetricsLogger, NullRun, open_wandb
from ewa.engine.parallel import accumulating, layout_of, wrap
from ewa.engine.runtime import Runtime, init_runtime, peak_flops, seed_everything, shutdown
from ewa.engine.schedule import lr_at
from ewa.files import (
    CheckpointError,
    is_run_dir,
    list_checkpoints,
    load_weights,
    resume_dir,
    snapshot_dir,
    snapshot_kinds,
)
from ewa.tools.merge import Merger
from ewa.window import Window, window_members
from model import GPT, GPT2_SIZES


class NonFiniteLoss(RuntimeError):
    pass


class Preempted(Exception):
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


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def branch_average(run: Path, step: int, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights a branch starts from (``branch_weights``): the run's EMA snapshot at
    ``step`` (``ema``, or ``ema_<decay>`` for one of its ema_decays), or the LAWA merge of its
    raw snapshots in the window ending there."""
    ema = cfg.branch_weights.startswith("ema")
    kind = cfg.branch_weights if ema else "raw"
    folder = snapshot_dir(run, kind)
    if not folder.is_dir():
        raise ConfigError(
            f"branch_weights={cfg.branch_weights}: {run} keeps no {kind} snapshots (its kinds: "
            f"{', '.join(snapshot_kinds(run)) or 'none'}); use raw, lawa or one of its ema kinds"
        )
    snaps = list_checkpoints(folder)
    members = window_members(step, cfg.lawa_k, cfg.lawa_nu) if cfg.branch_weights == "lawa" else (step,)
    missing = [s for s in members if s not in snaps]
    if missing:
        raise ConfigError(
            f"branch_weights={cfg.branch_weights} at step {step}: {folder} has no snapshot at step(s) {missing}; "
            "choose a branch_step (and lawa_k, lawa_nu) on the run's ckpt_interval grid"
        )
    if ema:
        return load_weights(snaps[step])
    window = Window(step, members)
    (average,) = (dict(t) for _, _, t in Merger(snaps, weights=cfg.lawa_weights).models([window], newest=False))
    return average


class Trainer:
    def __init__(self, cfg: TrainConfig, runtime: Runtime):
        self.cfg, self.rt = cfg, runtime
        self.run_dir = Path(cfg.out_dir)
        self.meta = data_meta(cfg.data_dir)
        if cfg.vocab_size and cfg.vocab_size < self.meta["vocab_size"]:
            raise ConfigError(f"vocab_size={cfg.vocab_size} is smaller than the tokenizer's {self.meta['vocab_size']}")
        self.accum = cfg.grad_accum_steps(runtime.world_size)
        seed_everything(cfg.seed)  # the same initial weights on every rank, whatever `parallel`
        self.model = GPT(cfg.model_config(self.meta["vocab_size"]))  # the raw handle, for saving and evaluation
        self.names = [n for n, _ in self.model.named_parameters()]
        checkpoints = self.load_initial()
        self.train_module, self.eval_module = wrap(self.model, cfg.parallel, cfg.compile, runtime)
        self.params = [p for _, p in self.model.named_parameters()]
        self.optimizer = self.model.configure_optimizers(
            cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), runtime.device_type
        )
        self.layout = layout_of(self.names, self.params, self.model, runtime)
        self.share = self.layout.pieces(self.params)
        staging = None  # averaging_device=cpu: the averages live in (pinned) host memory, updated in the background
        if cfg.averaging_device == "cpu":
            staging = self.layout.shares.alloc(runtime.device, pin=runtime.device_type == "cuda")
        self.averaging = self.new_averaging(staging)
        self.snapshots = SnapshotWriter(self.layout, runtime.device, runtime.rank, self.after_snapshot)
        self.resumes = ResumeCheckpointer(
            resume_dir(self.run_dir), runtime.device, runtime.rank, runtime.world_size, self.after_resume
        )
        self.step = 0
        self.fresh = True  # False once state is loaded from a resume checkpoint
        if checkpoints:
            self.load_state(checkpoints)
        if is_run_dir(cfg.init_from):
            self.branch(Path(cfg.init_from), staging)
        self.sampler = BatchSampler(
            open_tokens(cfg.data_dir, "train", cfg.block_size + 1),
            cfg.block_size,
            cfg.micro_batch_size,
            cfg.sequences_per_step(),
            runtime.world_size,
            cfg.seed,
        )
        windows = eval_windows(open_tokens(cfg.data_dir, "val", cfg.block_size + 1), cfg.block_size, cfg.eval_windows())
        self.eval_fingerprint = fingerprint(windows)
        self.evaluator = Evaluator(windows, cfg.eval_batch_size, runtime)
        self.peak_flops = peak_flops(runtime.device)
        self.pending_losses: list[tuple[int, torch.Tensor]] = []
        self.stop_signal: int | None = None
        self.logger = MetricsLogger(None, echo=False)
        self.window = LogWindow(0.0, 0)

    # -- set-up ---------------------------------------------------------------------------------

    def new_averaging(self, staging: torch.Tensor | None) -> Averaging:
        """The config's averagers over this rank's share, from the current weights."""
        averagers = build_averagers(self.cfg, self.layout.shares, self.share, self.rt.device, staging)
        return Averaging(averagers, self.share, staging)

    def load_initial(self) -> list[Path]:
        """Load the initial weights named by cfg.init_from into the unwrapped model; for
        resume and branch, return the checkpoints to restore the whole state from, in the
        order to try them."""
        source = self.cfg.init_from
        existing = self.resume_checkpoints()
        if source != "resume" and existing:
            raise ConfigError(
                f"{self.run_dir} already holds a run (resume checkpoints up to step {max(existing)}): "
                "continue it with --init_from=resume, or choose another --out_dir"
            )
        if source == "resume":
            if not existing:
                raise ConfigError(f"init_from=resume: no resume checkpoint in {resume_dir(self.run_dir)}; use init_from=scratch")
            return [existing[s] for s in sorted(existing, reverse=True)]
        if is_run_dir(source):
            return [self.branch_checkpoint(source)]
        if source in GPT2_SIZES:
            self.model.load_weights(dict(GPT.from_pretrained(source).named_parameters()))
        elif source != "scratch":
            self.model.load_weights(load_weights(source))
        return []

    def branch_checkpoint(self, run: str) -> Path:
        available = list_checkpoints(resume_dir(run))
        step = self.cfg.branch_step
        if step < 0:
            step = self.cfg.swa_start_step() if self.cfg.swa else max(available, default=-1)
        if step not in available:
            raise ConfigError(
                f"{resume_dir(run)} has no resume checkpoint at step {step} (it has {sorted(available)}); "
                "pass --branch_step=<one of them>, or re-run the original with a resume_interval that divides it"
            )
        return available[step]

    def branch(self, run: Path, staging: torch.Tensor | None) -> None:
        """A run branched from ``run`` at ``self.step``: from the raw weights there (everything
        continues), or from their EMA or LAWA average (``branch_weights``: the averages then
        restart from it, and this run's first snapshot and eval are of it); with
        ``branch_reset_optimizer``, from a fresh AdamW state."""
        cfg = self.cfg
        if cfg.branch_weights != "raw":
            start = branch_average(run, self.step, cfg)
            self.layout.load(self.params, self.layout.share_of(start).to(self.params[0].device))
            self.averaging.close()
            self.averaging = self.new_averaging(staging)
            self.fresh = True
        if cfg.branch_reset_optimizer:
            self.optimizer = self.model.configure_optimizers(
                cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), self.rt.device_type
            )

    # -- state ----------------------------------------------------------------------------------

    def state_tensors(self, optimizer_state: dict) -> dict[str, torch.Tensor]:
        """Every tensor of the trainer's state, flat, under the names resume checkpoints use:
        DTensors where sharded, so a checkpoint loads into any number of processes."""
        tensors = {f"model.{n}": p for n, p in zip(self.names, self.params, strict=True)}
        for fqn, values in optimizer_state.items():
            tensors |= {f"optimizer.{fqn}.{k}": v for k, v in values.items()}
        for name, averager in self.averaging.averagers.items():
            for buffer, flat in averager.tensors().items():
                tensors |= self.layout.global_tensors(f"averagers.{name}.{buffer}", flat)
        return tensors

    def state_meta(self, param_groups: list) -> dict[str, Any]:
        return {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "world_size": self.rt.world_size,
            "names": self.names,
            "param_groups": param_groups,
            "averagers": {name: a.counters() for name, a in self.averaging.averagers.items()},
        }

    def load_state(self, candidates: list[Path]) -> None:
        """Restore the whole trainer state from the first of ``candidates`` that loads; a
        damaged one is reported and skipped (every rank sees the same failure)."""
        for path in candidates:
            try:
                return self._load_state(path)
            except CheckpointError as e:
                if len(candidates) == 1:
                    raise
                if self.rt.master:
                    print(f"warning: skipping {e}", file=sys.stderr)
        raise CheckpointError(f"{resume_dir(self.run_dir)}: no resume checkpoint could be read")

    def _load_state(self, path: Path) -> None:
        stored = SafeReader(path).read_metadata().state_dict_metadata
        meta, saved = read_meta(path), set(stored)
        self.check_model_shapes(path, stored)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer)  # (creates a fresh optimizer's state)
        tensors = self.state_tensors(optimizer["state"])
        lacking = sorted(k for k in tensors.keys() - saved if not k.startswith("averagers."))
        if lacking:
            raise CheckpointError(f"{path}: lacks {lacking[:3]}; not a checkpoint of this model and optimizer")
        restored = set()
        for name, averager in self.averaging.averagers.items():
            if name in meta["averagers"] and {k for k in tensors if k.startswith(f"averagers.{name}.")} <= saved:
                try:
                    averager.load_counters(meta["averagers"][name])
                except ValueError as e:
                    raise ConfigError(f"{path}: {e}") from None
                restored.add(name)
            elif self.rt.master:
                other = " of this layout (it was saved under the other `parallel`)" if name in meta["averagers"] else ""
                print(f"note: the checkpoint has no {name} state{other}; {name} starts at step {meta['step']}")
        dropped = tuple(f"averagers.{name}." for name in self.averaging.averagers.keys() - restored)
        wanted = {k: t for k, t in tensors.items() if not k.startswith(dropped)}
        load_into(path, wanted)
        optimizer["param_groups"] = meta["param_groups"]
        set_optimizer_state_dict(self.model, self.optimizer, optimizer)
        self.step, self.fresh = meta["step"], False

    def check_model_shapes(self, path: Path, stored: dict) -> None:
        own = dict(zip(self.names, self.params, strict=True))
        shapes = [
            f"{n}: {tuple(stored[f'model.{n}'].size)} vs model {tuple(own[n].shape)}"
            for n in sorted(own)
            if f"model.{n}" in stored and tuple(stored[f"model.{n}"].size) != tuple(own[n].shape)
        ]
        if shapes:
            raise ConfigError(
                f"{path}: the checkpoint's model does not match this config (shapes {shapes[:5]}); "
                "use the model settings of the run it came from"
            )

    # -- the loop -------------------------------------------------------------------------------

    def train_step(self) -> torch.Tensor:
        """One optimizer step over tokens_per_step tokens; returns the mean loss (on device)."""
        cfg, rt = self.cfg, self.rt
        if cfg.dropout > 0:
            seed_everything(cfg.seed, self.step, rt.rank)
        lr = lr_at(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=rt.device)
        for micro in range(self.accum):
            rows = self.sampler.batch(self.step, micro, rt.rank)
            if rt.device_type == "cuda":
                rows = rows.pin_memory().to(rt.device, non_blocking=True)
            x, y = rows[:, :-1], rows[:, 1:]
            with accumulating(self.train_module, micro < self.accum - 1), rt.autocast():
                _, loss = self.train_module(x, y)
            (loss / self.accum).backward()
            total += loss.detach()
        total /= self.accum
        self.before_params_change()  # the optimizer, or the averages (when the step is skipped), change next
        if cfg.skip_nonfinite and rt.any(not torch.isfinite(total).item()):  # every rank skips together
            self.optimizer.zero_grad(set_to_none=True)
            if rt.master:
                print(f"warning: non-finite loss at step {self.step + 1}: batch skipped", file=sys.stderr)
        else:
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    def before_params_change(self) -> None:
        """The GPU waits for the background copies of the weights (and averages) to finish."""
        self.averaging.before_params_change()
        self.snapshots.before_params_change()
        self.resumes.before_params_change()

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        self.start_run()
        if self.fresh:
            self.averaging.update(self.step)  # the initial weights
            self.checkpoint(force=True)
        last = self.evaluate() if self.fresh else {}
        self.new_window()
        while self.step < cfg.max_steps:
            self.check_background()
            self.pending_losses.append((self.step + 1, self.train_step()))
            self.averaging.update(self.step)
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                self.log_train()
            if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                last = self.evaluate()
            if self.step < cfg.max_steps and self.rt.any(self.stop_signal is not None):  # every step: seconds count
                self.stop()
            self.checkpoint()
        self.finish()
        return last

    def stop(self) -> None:
        """On a signal (every rank at the same step): log the steps since the last record,
        wait for the writes in flight, save the resume state, and end the run."""
        if self.window.step < self.step:
            self.log_train()
        self.checkpoint(stopping=True)
        self.check_background(wait=True)
        raise Preempted(f"stopped by a signal at step {self.step}; continue with --init_from=resume")

    def flush_losses(self) -> None:
        """Move the losses since the last flush to the host (one sync) into the log window,
        as the mean over the ranks, i.e. over the global batch; stop the run if any is
        NaN/inf, naming the first such step; nothing is saved after it."""
        if not self.pending_losses:
            return
        values = self.rt.all_reduce_sum(torch.stack([v for _, v in self.pending_losses])) / self.rt.world_size
        losses = [(s, v) for (s, _), v in zip(self.pending_losses, values.tolist(), strict=True)]
        self.pending_losses.clear()
        bad = [s for s, v in losses if not math.isfinite(v)]
        if bad and not self.cfg.skip_nonfinite:  # the same on every rank: the mean is NaN everywhere
            saved = self.resume_checkpoints()
            last = f"the last resume checkpoint is step {max(saved)}" if saved else "no resume checkpoint was written"
            raise NonFiniteLoss(
                f"non-finite training loss at step {bad[0]}; stopped without saving ({last}). "
                "Lower learning_rate, or set skip_nonfinite=True to skip such batches"
            )
        self.window.losses += [v for _, v in losses]

    def sync(self) -> float:
        """Wait for the GPU's queued work, then read the clock."""
        if self.rt.device_type == "cuda":
            torch.cuda.synchronize(self.rt.device)
        return time.perf_counter()

    def new_window(self) -> None:
        self.window = LogWindow(self.sync(), self.step)

    def log_train(self) -> None:
        """A train record: throughput over training time only (the window's wall time less
        its eval and checkpoint seconds, which are logged apart)."""
        self.flush_losses()
        w = self.window
        steps = self.step - w.step
        wall = self.sync() - w.start
        train_s = max(wall - w.eval_s - w.ckpt_s, 1e-9)
        finite = [v for v in w.losses if math.isfinite(v)]
        loss = sum(finite) / max(1, len(finite))
        tok_s = self.cfg.tokens_per_step * steps / train_s
        record = {
            "kind": "train",
            "step": self.step,
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],  # what the last step used
            "tokens": self.step * self.cfg.tokens_per_step,
            "tok_per_s": tok_s,
            "ms_per_step": 1000 * train_s / max(steps, 1),
            "eval_s": w.eval_s,
            "ckpt_s": w.ckpt_s,
        }
        if self.peak_flops:
            record["mfu"] = self.model.estimate_mfu(tok_s / self.rt.world_size, self.peak_flops)
        if self.rt.device_type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.rt.device) / 2**30
        line = (
            f"step {self.step:>6}/{self.cfg.max_steps} | loss {loss:.4f} | lr {record['lr']:.2e} | "
            f"{tok_s / 1e3:,.1f}k tok/s | {record['ms_per_step']:.0f} ms/step"
            + (f" | mfu {100 * record['mfu']:.1f}%" if self.peak_flops else "")
            + (f" | {record['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in record else "")
        )
        self.logger.log(record, line)
        self.new_window()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Val loss of the raw model and of every average that exists at this step. Each
        average is loaded into the live model (this rank's share of it, gathered under DDP)
        and the raw weights restored after, so no second full copy is held."""
        start = self.sync()
        results = {"raw": self.evaluator.loss(self.eval_module)}
        averages = {n: self.averaging.averaged(n, self.step) for n in self.averaging.averagers}
        averages = {n: flat for n, flat in averages.items() if flat is not None}
        if averages:
            self.before_params_change()  # the checkpoint copies in flight read the live weights
            with self.layout.swapping(self.params) as load:
                for name, flat in averages.items():
                    load(flat)
                    results[name] = self.evaluator.loss(self.eval_module)
        record = {"kind": "eval", "step": self.step, "tokens": self.step * self.cfg.tokens_per_step, **results}
        line = f"eval step {self.step:>6} | " + " | ".join(f"{k} {v:.4f}" for k, v in results.items())
        self.logger.log(record, line)
        self.window.eval_s += self.sync() - start
        return results

    # -- files ----------------------------------------------------------------------------------

    def start_run(self) -> None:
        cfg, rt = self.cfg, self.rt
        if rt.master:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.run_dir.glob("*/**/.*.tmp*"):  # left by a write that was killed
                remove(stale)
            save_config(cfg, self.run_dir / "config.json")
            run = (
                open_wandb(cfg.wandb_project, cfg.wandb_run_name, cfg.wandb_mode, cfg.to_dict(), self.run_dir, resume=not self.fresh)
                if cfg.wandb_log
                else NullRun()
            )
            self.logger = MetricsLogger(self.run_dir / "metrics.jsonl", run)
            self.logger.truncate_after(-1 if self.fresh else self.step)
            self.logger.log(
                {
                    "kind": "start",
                    "step": self.step,
                    "params": self.model.get_num_params(),
                    "world_size": rt.world_size,
                    "parallel": cfg.parallel,
                    "grad_accum_steps": self.accum,
                    "eval_fingerprint": self.eval_fingerprint,
                    "init_from": cfg.init_from,
                    **({"branch": self.branch_record()} if is_run_dir(cfg.init_from) else {}),
                },
                f"{self.model.get_num_params() / 1e6:.2f}M parameters | {rt.world_size} process(es) on "
                f"{rt.device_type} ({cfg.parallel}) | {self.accum} micro-steps per step | "
                f"{cfg.tokens_per_step:,} tokens per step | from step {self.step} | "
                f"eval tokens {self.evaluator.total * cfg.block_size:,} (fingerprint {self.eval_fingerprint})",
            )
        rt.barrier()  # stale temporaries are gone before any rank writes
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def branch_record(self) -> dict[str, Any]:
        """Where a branched run started (logged in its start record)."""
        cfg = self.cfg
        return {
            "from": cfg.init_from,
            "step": self.step,
            "weights": cfg.branch_weights,
            "reset_optimizer": cfg.branch_reset_optimizer,
        }

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_signal = signum

    def checkpoint(self, force: bool = False, stopping: bool = False) -> None:
        """Snapshots every ckpt_interval, resume checkpoints every resume_interval, at the
        SWA start (train_swa.py branches from it), at the end and when ``stopping``; the
        time the training thread spends here is logged as ``ckpt_s``."""
        cfg, step = self.cfg, self.step
        snap = force or step % cfg.ckpt_interval == 0 or step == cfg.max_steps
        resume = stopping or (
            step > 0 and (step % cfg.resume_interval == 0 or step == cfg.max_steps or step == cfg.swa_start_step())
        )
        if not (snap or resume):
            return
        start = self.sync()
        self.flush_losses()  # never save weights that a NaN has touched
        if snap:
            self.save_snapshots()
        if resume:
            self.save_resume_checkpoint()
        self.window.ckpt_s += time.perf_counter() - start

    def save_snapshots(self) -> None:
        """The raw weights and every average but LAWA's (lawa.py makes those offline)."""
        self.averaging.wait()  # background updates of this step done: the averages are this step's
        kinds = {"raw": self.share}
        for name, averager in self.averaging.averagers.items():
            flat = averager.averaged(self.step) if name != "lawa" else None
            if flat is not None:
                kinds[name] = self.layout.shares.split(flat)
        lane = {k: v for k, v in kinds.items() if k != "raw" and self.averaging.host}
        live = {k: v for k, v in kinds.items() if k not in lane}
        meta = {"step": str(self.step), "format": "ewa-snapshot-1", "model_config": json.dumps(self.model.config_dict())}
        folders = {kind: snapshot_dir(self.run_dir, kind) for kind in kinds}
        self.snapshots.save(folders, self.step, live, lane, self.averaging.submit, meta)

    def after_snapshot(self, step: int) -> None:
        """On the writer thread, once a snapshot is written: rank 0 prunes old ones."""
        if self.rt.master and self.cfg.max_snapshots:
            self.prune_snapshots()

    def prune_snapshots(self) -> None:
        """Keep the newest max_snapshots of each kind, and every raw snapshot a LAWA window
        ending now or later still needs."""
        cfg = self.cfg
        needed_from = self.step - (cfg.lawa_k - 1) * cfg.lawa_nu
        for folder in (self.run_dir / "snapshots").iterdir():
            kind, snaps = folder.name, list_checkpoints(folder)
            for step in sorted(snaps)[: -cfg.max_snapshots]:
                if kind != "raw" or step < needed_from:
                    remove(snaps[step])

    def save_resume_checkpoint(self) -> None:
        self.averaging.wait()  # the counters saved are those of the tensors copied
        optimizer = get_optimizer_state_dict(self.model, self.optimizer)
        tensors = self.state_tensors(optimizer["state"])
        lane = {k for k in tensors if k.startswith("averagers.")} if self.averaging.host else set()
        self.resumes.save(self.step, tensors, lane, self.averaging.submit, self.state_meta(optimizer["param_groups"]))

    def after_resume(self, step: int) -> None:
        """On rank 0's writer thread, once a resume checkpoint is complete: keep the latest
        keep_resume and the SWA start."""
        if not self.cfg.keep_resume:
            return
        saved = self.resume_checkpoints()
        keep = set(sorted(saved)[-self.cfg.keep_resume :]) | {self.cfg.swa_start_step()}
        for old, path in saved.items():
            if old not in keep:
                remove(path)

    def resume_checkpoints(self) -> dict[int, Path]:
        folder = resume_dir(self.run_dir)
        return list_checkpoints(folder) if folder.is_dir() else {}

    def check_background(self, wait: bool = False) -> None:
        """Raise the failure of a background write (waiting for them all with ``wait``),
        naming the file and the last good resume checkpoint."""
        try:
            for background in (self.snapshots.background, self.resumes.background):
                background.wait() if wait else background.check()
            if wait:
                self.averaging.wait()
        except CheckpointError as e:
            saved = self.resume_checkpoints()
            last = f"; the last good resume checkpoint is {saved[max(saved)]}" if saved else ""
            raise CheckpointError(f"{e}{last}") from None

    def finish(self) -> None:
        self.check_background(wait=True)
        self.rt.barrier()
        self.logger.close()

    def close(self) -> None:
        """Stop the background threads (after their work) and close the logs."""
        self.snapshots.close()
        self.resumes.close()
        self.averaging.close()
        self.logger.close()


def run(cfg: TrainConfig) -> dict[str, float]:
    """Train ``cfg`` in this process (under torchrun: as one rank); returns the last eval."""
    runtime = init_runtime(cfg.device, cfg.dtype, group=cfg.parallel == "fsdp")
    trainer = None
    try:
        trainer = Trainer(cfg, runtime)
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        shutdown(runtime)


def main(default_config: str, argv: list[str] | None = None, swa: bool = False) -> None:
    """Entry point of the train_*.py scripts: ``[config.py] [--key=value ...]``. An error
    is printed once, by rank 0; every rank exits with status 1."""
    argv = sys.argv[1:] if argv is None else argv
    master = os.environ.get("RANK", "0") == "0"
    try:
        cfg = load_config(default_config, argv, **({"swa": True} if swa else {}))
        if swa and not any(a.startswith("--out_dir=") for a in argv):
            cfg = cfg.replace(out_dir=cfg.out_dir.rstrip("/") + "-swa")
        run(cfg)
    except (ConfigError, DataError, CheckpointError, NonFiniteLoss) as e:
        sys.exit(f"error: {e}" if master else 1)
    except Preempted as e:
        if master:
            print(e)
