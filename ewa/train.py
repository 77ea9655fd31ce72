"""The training engine behind train_small.py, train_medium.py, train_large.py and train_swa.py.

One ``Trainer`` runs the loop (batch -> forward/backward -> optimizer step), updates the
averagers (EMA, SWA, online LAWA) after every step, evaluates the raw model and every
average on the same fixed held-out tokens, writes weights-only snapshots for offline
averaging and resume checkpoints, and logs to stdout, metrics.jsonl and wandb.

Run directory:
    config.json                     the resolved config
    metrics.jsonl                   one JSON record per log / eval
    snapshots/{raw,ema,swa}/step_XXXXXXXX.safetensors   fp32 weights every ckpt_interval
    resume/step_XXXXXXXX.pt         full trainer state (latest keep_resume, plus the SWA start)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ewa.averaging import EMA, SWA, Averager, OnlineLAWA
from ewa.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_resume,
    load_weights,
    save_resume,
    save_snapshot,
    snapshot_name,
)
from ewa.config import ConfigError, TrainConfig, load_config, save_config
from ewa.data import BatchSampler, DataError, eval_windows, fingerprint, open_tokens, read_meta
from ewa.evaluate import Evaluator, swapped_weights
from ewa.logger import MetricsLogger, NullRun, open_wandb
from ewa.runtime import Runtime, init_runtime, seed_everything, shutdown
from ewa.schedule import lr_at
from model import GPT, GPT2_SIZES

# bf16 dense peak of known GPUs, for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


class NonFiniteLoss(RuntimeError):
    pass


class Preempted(Exception):
    pass


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def is_run_dir(path: str) -> bool:
    return (Path(path) / "resume").is_dir()


def resume_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "resume"


def snapshot_dir(run_dir: str | Path, kind: str = "raw") -> Path:
    return Path(run_dir) / "snapshots" / kind


class Trainer:
    def __init__(self, cfg: TrainConfig, runtime: Runtime):
        self.cfg, self.rt = cfg, runtime
        self.run_dir = Path(cfg.out_dir)
        self.meta = read_meta(cfg.data_dir)
        if cfg.vocab_size and cfg.vocab_size < self.meta["vocab_size"]:
            raise ConfigError(f"vocab_size={cfg.vocab_size} is smaller than the tokenizer's {self.meta['vocab_size']}")
        self.accum = cfg.grad_accum_steps(runtime.world_size)
        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.model = GPT(cfg.model_config(self.meta["vocab_size"])).to(runtime.device)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.params = [p for _, p in self.model.named_parameters()]
        self.optimizer = self.model.configure_optimizers(
            cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), runtime.device_type
        )
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
        self.step = 0
        self.fresh = True  # False once state is loaded from a resume checkpoint
        state = self.load_initial()
        self.averagers = self.build_averagers()  # from the initial weights
        if state is not None:
            self.load_state_dict(state)
        self.peak_flops = peak_flops(runtime.device)
        self.compiled = torch.compile(self.model) if cfg.compile else self.model  # raw handle kept
        self.ddp = (
            DDP(self.compiled, device_ids=[runtime.device.index] if runtime.device_type == "cuda" else None)
            if runtime.distributed
            else self.compiled
        )
        self.pending_losses: list[tuple[int, torch.Tensor]] = []
        self.stop_signal: int | None = None
        self.logger = MetricsLogger(None, echo=False)

    # -- set-up ---------------------------------------------------------------------------------

    def build_averagers(self) -> dict[str, Averager]:
        cfg, averagers = self.cfg, {}
        if cfg.ema:
            averagers["ema"] = EMA(self.names, self.params, cfg.ema_decay)
        if cfg.swa:
            averagers["swa"] = SWA(self.names, cfg.swa_start_step(), cfg.swa_every)
        if cfg.lawa_online:
            averagers["lawa"] = OnlineLAWA(self.names, cfg.lawa_k, cfg.lawa_nu)
        return averagers

    def load_initial(self) -> dict[str, Any] | None:
        """Load the initial weights named by cfg.init_from; for resume and branch, also
        return the whole trainer state to restore once the averagers exist."""
        source = self.cfg.init_from
        existing = self.resume_checkpoints()
        if source != "resume" and existing:
            raise ConfigError(
                f"{self.run_dir} already holds a run (resume checkpoints up to step {max(existing)}): "
                "continue it with --init_from=resume, or choose another --out_dir"
            )
        state = None
        if source == "resume":
            if not existing:
                raise ConfigError(f"init_from=resume: no resume checkpoint in {resume_dir(self.run_dir)}; use init_from=scratch")
            state = self.read_latest_resume(existing)
        elif is_run_dir(source):
            state = load_resume(self.branch_checkpoint(source))
        elif source in GPT2_SIZES:
            self.model.load_weights(dict(GPT.from_pretrained(source).named_parameters()))
        elif source != "scratch":
            self.model.load_weights(load_weights(source))
        if state is not None:
            self.load_model(state)
        return state

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

    def read_latest_resume(self, available: dict[int, Path]) -> dict:
        """The newest resume checkpoint that loads; a damaged newer one is reported and skipped."""
        for step in sorted(available, reverse=True):
            try:
                return load_resume(available[step])
            except CheckpointError as e:
                if self.rt.master:
                    print(f"warning: skipping {e}", file=sys.stderr)
        raise CheckpointError(f"{resume_dir(self.run_dir)}: no resume checkpoint could be read")

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": dict(zip(self.names, (p.detach() for p in self.params), strict=True)),
            "optimizer": self.optimizer.state_dict(),
            "averagers": {name: a.state_dict() for name, a in self.averagers.items()},
            "config": self.cfg.to_dict(),
        }

    def load_model(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_weights(state["model"])
        except ValueError as e:
            raise CheckpointError(
                f"the checkpoint's model does not match this config ({e}); "
                "use the model settings of the run it came from"
            ) from None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_model(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.fresh = False
        saved = state.get("averagers", {})
        for name, averager in self.averagers.items():
            if name in saved:
                averager.load_state_dict(saved[name])
            elif self.rt.master:
                print(f"note: the checkpoint has no {name} state; {name} starts at step {self.step}")

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
            last = micro == self.accum - 1
            grad_sync = contextlib.nullcontext() if last or not rt.distributed else self.ddp.no_sync()
            with grad_sync, rt.autocast():
                _, loss = self.ddp(x, y)
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

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        self.start_run()
        if self.fresh:
            for averager in self.averagers.values():
                averager.update(self.params, self.step)
            self.checkpoint(force=True)
        last = self.evaluate() if self.fresh else {}
        t0, step0 = time.perf_counter(), self.step
        while self.step < cfg.max_steps:
            self.pending_losses.append((self.step + 1, self.train_step()))
            for averager in self.averagers.values():
                averager.update(self.params, self.step)
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                self.log_train(time.perf_counter() - t0, self.step - step0)
                t0, step0 = time.perf_counter(), self.step
                if self.rt.any(self.stop_signal is not None):
                    if self.rt.master:
                        self.save_resume_checkpoint()
                    raise Preempted(f"stopped by a signal at step {self.step}; continue with --init_from=resume")
            if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                last = self.evaluate()
            self.checkpoint()
        self.finish()
        return last

    def flush_losses(self) -> list[tuple[int, float]]:
        """Move the losses since the last flush to the host (one sync) and stop the run if
        any is NaN/inf, naming the first such step; nothing is saved after it."""
        if not self.pending_losses:
            return []
        values = torch.stack([v for _, v in self.pending_losses]).tolist()
        losses = [(s, v) for (s, _), v in zip(self.pending_losses, values)]
        self.pending_losses.clear()
        bad = [s for s, v in losses if not math.isfinite(v)]
        if not self.cfg.skip_nonfinite and self.rt.any(bool(bad)):  # all ranks stop at the same step
            saved = self.resume_checkpoints()
            last = f"the last resume checkpoint is step {max(saved)}" if saved else "no resume checkpoint was written"
            where = f"at step {bad[0]}" if bad else "on another rank"
            raise NonFiniteLoss(
                f"non-finite training loss {where}; stopped without saving ({last}). "
                "Lower learning_rate, or set skip_nonfinite=True to skip such batches"
            )
        return losses

    def log_train(self, elapsed: float, steps: int) -> None:
        losses = self.flush_losses()
        finite = [v for _, v in losses if math.isfinite(v)]
        loss = sum(finite) / max(1, len(finite))
        tok_s = self.cfg.tokens_per_step * steps / max(elapsed, 1e-9)
        record = {
            "kind": "train",
            "step": self.step,
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],  # what the last step used
            "tokens": self.step * self.cfg.tokens_per_step,
            "tok_per_s": tok_s,
            "ms_per_step": 1000 * elapsed / max(steps, 1),
        }
        peak = self.peak_flops
        if peak:
            record["mfu"] = self.model.estimate_mfu(tok_s / self.rt.world_size, peak)
        line = (
            f"step {self.step:>6}/{self.cfg.max_steps} | loss {loss:.4f} | lr {record['lr']:.2e} | "
            f"{tok_s / 1e3:,.1f}k tok/s | {record['ms_per_step']:.0f} ms/step"
            + (f" | mfu {100 * record['mfu']:.1f}%" if peak else "")
        )
        self.logger.log(record, line)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Val loss of the raw model and of every average that exists at this step."""
        results = {"raw": self.evaluator.loss(self.compiled)}
        for name, averager in self.averagers.items():
            weights = averager.averaged(self.step)
            if weights is not None:
                with swapped_weights(self.params, weights):
                    results[name] = self.evaluator.loss(self.compiled)
        record = {"kind": "eval", "step": self.step, "tokens": self.step * self.cfg.tokens_per_step, **results}
        line = f"eval step {self.step:>6} | " + " | ".join(f"{k} {v:.4f}" for k, v in results.items())
        self.logger.log(record, line)
        return results

    # -- files ----------------------------------------------------------------------------------

    def start_run(self) -> None:
        cfg, rt = self.cfg, self.rt
        if rt.master:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.run_dir.glob("*/**/.*.tmp*"):  # left by a write that was killed
                stale.unlink()
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
                    "grad_accum_steps": self.accum,
                    "eval_fingerprint": self.eval_fingerprint,
                    "init_from": cfg.init_from,
                },
                f"{self.model.get_num_params() / 1e6:.2f}M parameters | {rt.world_size} process(es) on "
                f"{rt.device_type} | {self.accum} micro-steps per step | {cfg.tokens_per_step:,} tokens per step | "
                f"from step {self.step} | eval tokens {self.evaluator.total * cfg.block_size:,} "
                f"(fingerprint {self.eval_fingerprint})",
            )
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_signal = signum

    def checkpoint(self, force: bool = False) -> None:
        """Snapshots every ckpt_interval, resume checkpoints every resume_interval, at the
        SWA start (train_swa.py branches from it) and at the end."""
        cfg, step = self.cfg, self.step
        snap = force or step % cfg.ckpt_interval == 0 or step == cfg.max_steps
        resume = step % cfg.resume_interval == 0 or step == cfg.max_steps or step == cfg.swa_start_step()
        if not (snap or resume):
            return
        self.flush_losses()  # never save weights that a NaN has touched
        if self.rt.master:
            if snap:
                self.save_snapshots()
            if resume and step > 0:
                self.save_resume_checkpoint()

    def save_snapshots(self) -> None:
        meta = {"step": str(self.step), "format": "ewa-snapshot-1", "model_config": json.dumps(self.model.config_dict())}
        weights = {"raw": self.params} | {n: a.averaged(self.step) for n, a in self.averagers.items() if n != "lawa"}
        for kind, tensors in weights.items():
            if tensors is None:
                continue
            path = snapshot_dir(self.run_dir, kind) / snapshot_name(self.step)
            self.guarded_write(save_snapshot, path, dict(zip(self.names, tensors, strict=True)), meta | {"kind": kind})
            if self.step == 0 and kind == "raw":
                print(f"snapshot size {path.stat().st_size / 2**20:.1f} MiB ({path.parent})")
        if self.cfg.max_snapshots:
            self.prune_snapshots()

    def prune_snapshots(self) -> None:
        """Keep the newest max_snapshots of each kind, and every raw snapshot a LAWA window
        ending now or later still needs."""
        cfg = self.cfg
        needed_from = self.step - (cfg.lawa_k - 1) * cfg.lawa_nu
        for kind in ("raw", "ema", "swa"):
            folder = snapshot_dir(self.run_dir, kind)
            if not folder.is_dir():
                continue
            snaps = list_checkpoints(folder)
            for step in sorted(snaps)[: -cfg.max_snapshots]:
                if kind != "raw" or step < needed_from:
                    snaps[step].unlink()

    def save_resume_checkpoint(self) -> None:
        path = resume_dir(self.run_dir) / f"step_{self.step:08d}.pt"
        self.guarded_write(save_resume, path, self.state_dict())
        if self.cfg.keep_resume:
            keep = set(sorted(list_checkpoints(path.parent))[-self.cfg.keep_resume :]) | {self.cfg.swa_start_step()}
            for step, old in list_checkpoints(path.parent).items():
                if step not in keep:
                    old.unlink()

    def guarded_write(self, write: Callable[..., Any], path: Path, *args: Any) -> None:
        """``write(path, *args)``; a failure (disk full, read-only) stops the run naming the
        file and the last good resume checkpoint."""
        try:
            write(path, *args)
        except OSError as e:
            saved = self.resume_checkpoints()
            last = f"; the last good resume checkpoint is {saved[max(saved)]}" if saved else ""
            raise CheckpointError(f"could not write {path}: {e.strerror or e}{last}") from None

    def resume_checkpoints(self) -> dict[int, Path]:
        folder = resume_dir(self.run_dir)
        return list_checkpoints(folder) if folder.is_dir() else {}

    def finish(self) -> None:
        self.rt.barrier()
        self.logger.close()


def run(cfg: TrainConfig) -> dict[str, float]:
    """Train ``cfg`` in this process (under torchrun: as one rank); returns the last eval."""
    runtime = init_runtime(cfg.device, cfg.dtype)
    try:
        return Trainer(cfg, runtime).fit()
    finally:
        shutdown(runtime)


def main(default_config: str, argv: list[str] | None = None, swa: bool = False) -> None:
    """Entry point of the train_*.py scripts: ``[config.py] [--key=value ...]``."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = load_config(default_config, argv, **({"swa": True} if swa else {}))
        if swa and not any(a.startswith("--out_dir=") for a in argv):
            cfg = cfg.replace(out_dir=cfg.out_dir.rstrip("/") + "-swa")
        run(cfg)
    except (ConfigError, DataError, CheckpointError, NonFiniteLoss) as e:
        sys.exit(f"error: {e}")
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":
            print(e)
