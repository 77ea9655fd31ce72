"""The training loop behind train_small.py, train_medium.py, train_large.py and train_swa.py.

``Trainer.fit`` is the loop, in plain view: a step (forward, backward and the optimizer, under
DDP or FSDP2), then the averages, the records, the evaluations and the checkpoints. Around it,
each component owns one job:

- ``Averaging`` (``ewa.engine.averaging``): EMA, SWA and online LAWA over this rank's share;
- ``Checkpointer`` (``ewa.engine.checkpointer``): snapshots and resume checkpoints, written in
  the background, from the ``states`` below;
- ``Background`` (``ewa.engine.background``): the threads, the side CUDA stream and the fence
  that every writer of the weights passes;
- ``TrainLog`` (``ewa.engine.logger``): losses, throughput, and the records.

Run directory:
    config.json                     the resolved config
    metrics.jsonl                   one JSON record per log / eval
    snapshots/{raw,ema,swa}/step_XXXXXXXX.safetensors   fp32 weights every ckpt_interval
                                    (a step_XXXXXXXX/ directory of shards from several processes)
    resume/step_XXXXXXXX/           the whole state (latest keep_resume, plus the SWA start)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from ewa.engine.averaging import Averaging
from ewa.engine.background import Background
from ewa.engine.checkpointer import Checkpointer
from ewa.engine.config import ConfigError, TrainConfig, load_config, save_config
from ewa.engine.data import BatchSampler, DataError, data_meta, eval_windows, fingerprint, open_tokens
from ewa.engine.distributed import exit_after_error
from ewa.engine.evaluate import Evaluator
from ewa.engine.logger import MetricsLogger, NonFiniteLoss, NullRun, TrainLog, open_wandb
from ewa.engine.parallel import layout_of, wrap
from ewa.engine.runtime import (
    Runtime,
    StopSignal,
    check_shared_dir,
    init_runtime,
    peak_flops,
    seed_everything,
    shutdown,
)
from ewa.engine.schedule import lr_at
from ewa.engine.start import branch_average, resolve_start
from ewa.files import CheckpointError
from model import GPT


class Preempted(Exception):
    pass


class Trainer:
    def __init__(self, cfg: TrainConfig, runtime: Runtime):
        self.cfg, self.rt = cfg, runtime
        self.run_dir = Path(cfg.out_dir)
        check_shared_dir(self.run_dir, runtime)  # before any rank reads or writes the run's files
        vocab_size = data_meta(cfg.data_dir)["vocab_size"]
        if cfg.vocab_size and cfg.vocab_size < vocab_size:
            raise ConfigError(f"vocab_size={cfg.vocab_size} is smaller than the tokenizer's {vocab_size}")
        self.accum = cfg.grad_accum_steps(runtime.world_size)
        # -- the model, wrapped for training (the same initial weights on every rank) --------------
        seed_everything(cfg.seed)
        self.model = GPT(cfg.model_config(vocab_size))  # the raw handle, for saving and evaluation
        self.model.attention_backend, self.model.loss_chunk_rows = cfg.attention, cfg.loss_chunk_rows
        self.names = [n for n, _ in self.model.named_parameters()]
        start = resolve_start(cfg)
        if start.weights is not None:
            self.model.load_weights(start.weights)
        self.wrapped = wrap(self.model, cfg.parallel, cfg.compile, runtime)
        self.params = [p for _, p in self.model.named_parameters()]
        self.optimizer = self.new_optimizer()
        # -- the components around the loop --------------------------------------------------------
        self.background = Background(runtime.device)
        self.background.guard(self.optimizer)  # the optimizer step passes the fence
        self.layout = layout_of(self.names, self.params, self.model, runtime)
        self.averaging = Averaging(cfg, self.layout, self.params, self.background, runtime.master)
        states = {"trainer": self, "model": ModelState(self.names, self.params),
                  "optimizer": OptimizerState(self.model, self.optimizer), "averagers": self.averaging}
        self.checkpointer = Checkpointer(cfg, states, self.layout, self.background, runtime, self.model.config_dict())
        self.step, self.fresh = 0, True  # fresh: no state was loaded from a resume checkpoint
        if start.checkpoints:
            self.checkpointer.load(start.checkpoints)
        self.branched_from = start.branch
        if start.branch is not None:
            self.branch(start.branch)
        # -- data, evaluation, records ---------------------------------------------------------------
        train = open_tokens(cfg.data_dir, "train", cfg.block_size + 1)
        self.sampler = BatchSampler(train, cfg.block_size, cfg.micro_batch_size, cfg.sequences_per_step(),
                                    runtime.world_size, cfg.seed)
        windows = eval_windows(open_tokens(cfg.data_dir, "val", cfg.block_size + 1), cfg.block_size, cfg.eval_windows())
        self.eval_fingerprint = fingerprint(windows)
        self.evaluator = Evaluator(windows, cfg.eval_batch_size, runtime, self.wrapped.autocast)
        peak = peak_flops(runtime.device)
        mfu = (lambda tok_s: self.model.estimate_mfu(tok_s / runtime.world_size, peak)) if peak else None
        self.log = TrainLog(runtime, cfg.tokens_per_step, cfg.max_steps, cfg.skip_nonfinite, mfu, self.last_saved)
        self.signal = StopSignal()

    def new_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        return self.model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                               self.rt.device_type)

    def branch(self, run: Path) -> None:
        """A run branched from ``run`` at ``self.step``: from the raw weights there (everything
        continues), or from their EMA or LAWA average (``branch_weights``: the averages then
        restart from it, and this run's first snapshot and eval are of it); with
        ``branch_reset_optimizer``, from a fresh AdamW state."""
        if self.cfg.branch_weights != "raw":
            start = branch_average(run, self.step, self.cfg)
            self.background.fence()
            self.layout.load(self.params, self.layout.share_of(start).to(self.params[0].device))
            self.averaging.reset()
            self.fresh = True
        if self.cfg.branch_reset_optimizer:
            self.optimizer.load_state_dict(self.new_optimizer().state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "config": self.cfg.to_dict(), "world_size": self.rt.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.fresh = state["step"], False

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Train to max_steps; returns the last evaluation."""
        cfg, last = self.cfg, {}
        self.start_run()
        if self.fresh:  # the initial weights: the averages' first member, a snapshot, an evaluation
            self.averaging.update(self.step)
            self.checkpoint(force=True)
            last = self.evaluate()
        self.log.new_window(self.step)
        while self.step < cfg.max_steps:
            # a failed background write stops the run here, naming the file
            self.checkpointer.check()
            # one optimizer step over tokens_per_step tokens; the averages take the new weights
            self.log.add(self.step + 1, self.train_step())
            self.averaging.update(self.step)
            # a train record; the raw model and every average scored on the same held-out tokens
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                self.log.train(self.step, self.optimizer.param_groups[0]["lr"])
            if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                last = self.evaluate()
            # a signal stops every rank at this same step, with a resume checkpoint
            if self.step < cfg.max_steps and self.signal.seen(self.rt):
                self.stop()
            # snapshots and resume checkpoints, written in the background
            self.checkpoint()
        self.finish()
        return last

    def train_step(self) -> torch.Tensor:
        """One optimizer step over tokens_per_step tokens; returns the mean loss (on the device)."""
        cfg, rt = self.cfg, self.rt
        if cfg.dropout > 0:
            seed_everything(cfg.seed, self.step, rt.rank)  # dropout: a function of (seed, step, rank)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, self.step)
        total = torch.zeros((), device=rt.device)
        for micro in range(self.accum):
            rows = self.sampler.batch(self.step, micro, rt.rank)
            if rt.device_type == "cuda":
                rows = rows.pin_memory().to(rt.device, non_blocking=True)
            with self.wrapped.accumulating(micro < self.accum - 1), self.wrapped.autocast():
                _, loss = self.wrapped.train(rows[:, :-1], rows[:, 1:])
            (loss / self.accum).backward()
            total += loss.detach()
        total /= self.accum
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

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Val loss of the raw model and of every average that exists at this step."""
        with self.log.excluded("eval_s"):
            score = lambda: self.evaluator.loss(self.wrapped.eval)  # noqa: E731
            results = {"raw": score(), **self.averaging.evaluate(self.step, score)}
            self.layout.reshard()  # the parameters are the optimizer's again (FSDP2 gathers some for eval)
            self.log.eval(self.step, results)
        return results

    def checkpoint(self, force: bool = False, stopping: bool = False) -> None:
        """The snapshots and resume checkpoint due at this step (``Checkpointer.due``); the time
        the training thread spends here is logged as ``ckpt_s``."""
        snapshot, resume = self.checkpointer.due(self.step, force, stopping)
        if not (snapshot or resume):
            return
        with self.log.excluded("ckpt_s"):
            self.log.flush()  # never save weights that a NaN has touched
            if snapshot:
                kinds = {"raw": self.averaging.share, **self.averaging.snapshots(self.step)}
                self.checkpointer.save_snapshots(self.step, kinds, self.averaging.lane)
            if resume:
                self.checkpointer.save_resume(self.step)

    def stop(self) -> None:
        """On a signal: log the steps since the last record, write the snapshot due now and a
        resume checkpoint, wait for the writes, and end the run."""
        if self.log.window.step < self.step:
            self.log.train(self.step, self.optimizer.param_groups[0]["lr"])
        self.checkpoint(stopping=True)
        self.checkpointer.check(wait=True)
        raise Preempted(f"stopped by a signal at step {self.step}; the same command continues it with "
                        "--init_from=auto (or --init_from=resume)")

    # -- the run's files -----------------------------------------------------------------------------

    def start_run(self) -> None:
        """Rank 0 writes config.json, opens the logs and records the start; then signals stop the run cleanly."""
        cfg, rt = self.cfg, self.rt
        if rt.master:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.checkpointer.remove_temporaries()  # left by writes that were killed
            save_config(cfg, self.run_dir / "config.json")
            run = NullRun()
            if cfg.wandb_log:
                run = open_wandb(cfg.wandb_project, cfg.wandb_run_name, cfg.wandb_mode, cfg.to_dict(), self.run_dir,
                                 resume=not self.fresh)
            metrics = MetricsLogger(self.run_dir / "metrics.jsonl", run)
            metrics.truncate_after(-1 if self.fresh else self.step)  # records past the checkpoint resumed from
            self.log.open(metrics)
            self.log.metrics.log(*self.start_record())
        rt.barrier()  # stale temporaries are gone before any rank writes
        self.signal.install()

    def start_record(self) -> tuple[dict[str, Any], str]:
        cfg, rt, params = self.cfg, self.rt, self.model.get_num_params()
        branch = {"from": cfg.init_from, "step": self.step, "weights": cfg.branch_weights,
                  "reset_optimizer": cfg.branch_reset_optimizer}
        record = {"kind": "start", "step": self.step, "params": params, "world_size": rt.world_size,
                  "parallel": cfg.parallel, "grad_accum_steps": self.accum, "eval_fingerprint": self.eval_fingerprint,
                  "init_from": cfg.init_from, **({"branch": branch} if self.branched_from else {})}
        line = (f"{params / 1e6:.2f}M parameters | {rt.world_size} process(es) on {rt.device_type} ({cfg.parallel}) | "
                f"{self.accum} micro-steps per step | {cfg.tokens_per_step:,} tokens per step | from step {self.step} | "
                f"eval tokens {self.evaluator.total * cfg.block_size:,} (fingerprint {self.eval_fingerprint})")
        return record, line

    def last_saved(self) -> str:
        """The newest resume checkpoint, once the writes in flight are done (for an error)."""
        self.background.wait()
        saved = self.checkpointer.resume_checkpoints()
        return f"the last resume checkpoint is step {max(saved)}" if saved else "no resume checkpoint was written"

    def finish(self) -> None:
        self.checkpointer.check(wait=True)
        self.rt.barrier()
        self.log.close()

    def close(self, wait: bool = True) -> None:
        """Stop the background threads (after their work, with ``wait``) and close the logs."""
        self.background.close(wait)
        self.log.close()


class ModelState:
    """The model's parameters under their names (DTensors under FSDP2), for the checkpointer."""

    def __init__(self, names: list[str], params: list[torch.Tensor]):
        self.names, self.params = names, params

    def state_dict(self) -> dict[str, Any]:
        return {"names": self.names, **dict(zip(self.names, self.params, strict=True))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing left to do: the parameters themselves were loaded, in place."""


class OptimizerState:
    """AdamW's state under the parameters' names, sharded as they are, for the checkpointer."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)  # (creates a fresh optimizer's state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


def run(cfg: TrainConfig, runtime: Runtime | None = None) -> dict[str, float]:
    """Train ``cfg`` in this process (under torchrun: as one rank); returns the last eval.
    Without ``runtime``, starts the process's own and ends it."""
    rt = runtime or init_runtime(cfg.device, cfg.dtype, group=cfg.parallel == "fsdp")
    trainer = None
    try:
        trainer = Trainer(cfg, rt)
        if not trainer.fresh and trainer.step >= cfg.max_steps:
            if rt.master:
                print(f"{cfg.out_dir} is complete (step {trainer.step} of max_steps={cfg.max_steps}): nothing to train")
            return {}
        return trainer.fit()
    finally:
        error = sys.exc_info()[1]
        if trainer is not None:  # a failed rank does not wait for threads that may wait for a dead peer
            trainer.close(wait=error is None or isinstance(error, Preempted) or not rt.distributed)
        if runtime is None and (error is None or not rt.distributed):
            shutdown(rt)


def main(default_config: str, argv: list[str] | None = None, swa: bool = False) -> None:
    """Entry point of the train_*.py scripts: ``[config.py] [--key=value ...]``. An error is
    printed once (``exit_after_error``); every rank exits with status 1."""
    argv = sys.argv[1:] if argv is None else argv
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    runtime = None
    try:
        cfg = load_config(default_config, argv, **({"swa": True} if swa else {}))
        if swa and not any(a.startswith("--out_dir=") for a in argv):
            cfg = cfg.replace(out_dir=cfg.out_dir.rstrip("/") + "-swa")
        runtime = init_runtime(cfg.device, cfg.dtype, group=cfg.parallel == "fsdp")
        run(cfg, runtime)
    except Preempted as e:
        if rank == 0:
            print(e)
    except BaseException as e:
        everywhere = isinstance(e, (ConfigError, DataError, NonFiniteLoss))  # raised alike on every rank
        named = everywhere or isinstance(e, (CheckpointError, TimeoutError))
        exit_after_error(e, rank if world > 1 else None, runtime and runtime.store, everywhere, named)
    shutdown(runtime)
