"""The paper's whole story in one command, on a CPU in minutes (``reproduce.py``):

1. the original run at a high learning rate, with online LAWA of the first (k, nu), the EMA of
   the paper's decay and the EMA of the same mean age as that LAWA window (the horizon-matched
   EMA, ``report.horizon_matched_decay``), saving snapshots;
2. SWA branched from the original's resume checkpoint at 75% of training;
3. offline LAWA over the snapshots, for each (k, nu) asked for;
4. beyond the paper: short LR cooldowns branched from the raw checkpoints at a few steps t,
   the baseline for "averaging stands in for learning-rate decay";
5. optionally the same run at a tenth of the learning rate (the paper's Figure 2);
6. optionally (``--wsd``) merge versus decay: a constant-LR run (warmup, then min_lr =
   learning_rate), the uniform and 1-sqrt merges of the first (k, nu)'s window ending at a few
   steps t, against a linear LR cooldown to 0 branched from t over the (k - 1) * nu steps the
   window spans;
7. the report (report.md in the run directory) and the plots (assets/ema_swa.png, assets/lawa.png,
   and assets/wsd.png with --wsd).

Finished stages are recorded in <out>/stages.json with their settings and reused by a re-run
with the same settings; an interrupted training stage resumes from its last checkpoint;
``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import json
import runpy
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ewa.engine import trainer as train
from ewa.engine.config import ConfigError, TrainConfig, load_config
from ewa.engine.data import DataError
from ewa.files import CheckpointError, atomic_write_text, list_checkpoints
from ewa.tools import lawa as lawa_cli
from ewa.tools import report
from ewa.tools.merge import WindowPlan

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Settings:
    config: str = "configs/tiny.py"
    out: str = "out/paper"
    overrides: list[str] = field(default_factory=list)  # --key=value for the training config
    lawa: list[tuple[int, int]] = field(default_factory=lambda: [(5, 10), (5, 20)])  # (k, nu) offline
    cooldown_at: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    cooldown_fraction: float = 0.1  # cooldown length as a fraction of t
    lr_compare: bool = False
    wsd: bool = False
    wsd_at: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # where merges meet cooldowns
    fresh: bool = False
    assets: str = "assets"


class Stages:
    """Which stages finished, with the settings they ran with."""

    def __init__(self, root: Path, fresh: bool):
        if fresh and root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "stages.json"
        self.finished: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def done(self, name: str, settings: dict) -> bool:
        return self.finished.get(name) == _plain(settings)

    def mark(self, name: str, settings: dict) -> None:
        self.finished[name] = _plain(settings)
        atomic_write_text(self.path, json.dumps(self.finished, indent=1) + "\n")


def _plain(settings: dict) -> Any:
    return json.loads(json.dumps(settings))


def _say(message: str) -> None:
    print(f"\n=== {message}", flush=True)


def prepare_data(cfg: TrainConfig) -> None:
    data_dir = Path(cfg.data_dir)
    if (data_dir / "meta.json").exists():
        return
    script = data_dir / "prepare.py"
    if not script.exists():
        raise DataError(f"{data_dir}/meta.json not found and no prepare.py beside it: prepare the data first")
    _say(f"preparing the data: python {script}")
    argv = sys.argv
    try:
        sys.argv = [str(script)]
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv


def train_stage(stages: Stages, name: str, cfg: TrainConfig, source: dict | None = None) -> Path:
    """Train ``cfg`` unless the same stage already finished; continue an interrupted one."""
    run_dir = Path(cfg.out_dir)
    settings = {"config": cfg.to_dict(), "source": source}
    finished = (run_dir / "resume").is_dir() and cfg.max_steps in list_checkpoints(run_dir / "resume")
    if stages.done(name, settings) and finished:
        print(f"reusing {run_dir} (finished)")
        return run_dir
    saved = run_dir / "config.json"
    same = saved.exists() and {**json.loads(saved.read_text()), "init_from": cfg.init_from} == cfg.to_dict()
    if same and (run_dir / "resume").is_dir() and list_checkpoints(run_dir / "resume"):
        print(f"continuing the interrupted run in {run_dir}")
        train.run(cfg.replace(init_from="resume"))
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        train.run(cfg)
    stages.mark(name, settings)
    return run_dir


def lawa_stage(stages: Stages, run_dir: Path, cfg: TrainConfig, k: int, nu: int, weights: str = "uniform") -> None:
    """lawa.py over the run's raw snapshots: ``<run>/lawa_k<k>_nu<nu>[_<weights>].jsonl``."""
    settings = {"k": k, "nu": nu, "interval": cfg.lawa_interval, "weights": weights, "source": cfg.to_dict()}
    name = WindowPlan(k, nu, cfg.lawa_interval, weights=weights).name()
    if stages.done(f"{run_dir.name}/{name}", settings) and (run_dir / f"{name}.jsonl").exists():
        print(f"reusing {run_dir / name}.jsonl")
        return
    wandb = ["--wandb_log"] if cfg.wandb_log else []  # into the training run's wandb run
    flags = [f"--k={k}", f"--nu={nu}", f"--interval={cfg.lawa_interval}", f"--weights={weights}", *wandb]
    lawa_cli.run(lawa_cli.parse_args([str(run_dir), *flags]))
    stages.mark(f"{run_dir.name}/{name}", settings)


def branch_steps(cfg: TrainConfig, fractions: list[float]) -> list[int]:
    """Eval steps nearest each fraction of training (the original keeps a resume checkpoint there)."""
    grid = range(cfg.eval_interval, cfg.max_steps, cfg.eval_interval)
    return sorted({min(grid, key=lambda s: abs(s - f * cfg.max_steps)) for f in fractions})


def branch_config(cfg: TrainConfig, run_dir: Path, t: int, steps: int, name: str, **changes: Any) -> TrainConfig:
    """``cfg`` continued from ``run_dir``'s resume checkpoint at step ``t`` for ``steps`` more
    steps, on the original's LR schedule, into ``<run_dir>-<name>``. The original's cooldown
    is kept only by a branch that ends where the original ends: the cooldown is the last
    cooldown_steps before max_steps, so a shorter branch would cool down where the original
    did not. ``changes`` may set cooldown_steps (a cooldown branch)."""
    cooldown = cfg.cooldown_steps if t + steps == cfg.max_steps else 0
    return cfg.replace(
        init_from=str(run_dir), branch_step=t, max_steps=t + steps, lr_decay_steps=cfg.decay_steps(),
        out_dir=f"{run_dir}-{name}", lawa_online=False, wandb_run_name=name, **{"cooldown_steps": cooldown, **changes},
    )


def cooldown_config(cfg: TrainConfig, run_dir: Path, t: int, steps: int, eval_interval: int) -> TrainConfig:
    """A linear LR cooldown to 0 over ``steps`` steps, branched from the raw checkpoint at ``t``."""
    return branch_config(cfg, run_dir, t, steps, f"cooldown-{t}", cooldown_steps=steps, eval_interval=eval_interval,
                         ckpt_interval=steps, resume_interval=steps)


def with_matched_ema(cfg: TrainConfig, k: int, nu: int) -> str:
    """``ema_decays`` plus the decay of the same mean age as the (k, nu) window, unless kept."""
    decay = float(f"{report.horizon_matched_decay(k, nu, cfg.lawa_weights):g}")
    if decay in cfg.emas().values():
        return cfg.ema_decays
    return ",".join(d for d in (cfg.ema_decays, f"{decay:g}") if d)


def original_config(s: Settings) -> TrainConfig:
    cfg = load_config(ROOT / s.config if not Path(s.config).is_absolute() else s.config, s.overrides)
    # online LAWA and the horizon-matched EMA with the first (k, nu); every eval step keeps a
    # resume checkpoint to branch from
    k, nu = s.lawa[0]
    return cfg.replace(
        out_dir=str(Path(s.out) / "run"), lawa_online=True, lawa_k=k, lawa_nu=nu, ema_decays=with_matched_ema(cfg, k, nu),
        resume_interval=cfg.eval_interval, keep_resume=0, wandb_run_name=cfg.wandb_run_name or "original",
    )


def wsd_stage(stages: Stages, s: Settings, cfg: TrainConfig) -> str:
    """Merge versus decay: the constant-LR run, its uniform and 1-sqrt merges, and a cooldown
    over the window's span from each of the ``wsd_at`` steps; returns the report's section."""
    k, nu = s.lawa[0]
    span = (k - 1) * nu
    constant = cfg.replace(out_dir=str(Path(s.out) / "wsd"), min_lr=cfg.learning_rate, cooldown_steps=0,
                           lawa_online=False, wandb_run_name="wsd")
    run_dir = train_stage(stages, "wsd", constant)
    for weights in ("uniform", "1-sqrt"):
        lawa_stage(stages, run_dir, constant, k, nu, weights)
    for t in branch_steps(constant, s.wsd_at):
        train_stage(stages, f"wsd-cooldown-{t}", cooldown_config(constant, run_dir, t, span, nu), source=constant.to_dict())
    run = report.load_run(run_dir)
    for folder in (run_dir, Path(s.assets)):
        report.plot_wsd(run, folder / "wsd.png")
    return report.wsd_text(run, constant.learning_rate) + "\n\n![Merge versus decay](../wsd/wsd.png)"


def run_pipeline(s: Settings) -> str:
    t0 = time.perf_counter()
    stages = Stages(Path(s.out), s.fresh)
    cfg = original_config(s)
    prepare_data(cfg)
    n = 4 + bool(s.cooldown_at) + s.lr_compare + s.wsd
    _say(f"[1/{n}] original run: {cfg.n_layer} layers x {cfg.n_embd} wide, lr {cfg.learning_rate:g}, {cfg.max_steps} steps")
    run_dir = train_stage(stages, "original", cfg)
    _say(f"[2/{n}] SWA from step {cfg.swa_start_step()} ({cfg.swa_start:.0%} of training)")
    swa = cfg.replace(swa=True, init_from=str(run_dir), out_dir=f"{run_dir}-swa", lawa_online=False, wandb_run_name="swa")
    train_stage(stages, "swa", swa, source=cfg.to_dict())
    _say(f"[3/{n}] offline LAWA over {run_dir}/snapshots/raw: " + ", ".join(f"k={k} nu={nu}" for k, nu in s.lawa))
    for k, nu in s.lawa:
        lawa_stage(stages, run_dir, cfg, k, nu)
    step = 4
    if s.cooldown_at:
        _say(f"[{step}/{n}] LR cooldowns to 0 over {s.cooldown_fraction:.0%} of t, from the raw checkpoint at t")
        for t in branch_steps(cfg, s.cooldown_at):
            c = max(1, round(s.cooldown_fraction * t))
            train_stage(stages, f"cooldown-{t}", cooldown_config(cfg, run_dir, t, c, c), source=cfg.to_dict())
        step += 1
    extras = []
    if s.lr_compare:
        low = cfg.replace(
            learning_rate=cfg.learning_rate / 10, min_lr=cfg.min_lr / 10, swa_lr=cfg.swa_lr / 10,
            out_dir=str(Path(s.out) / "run-lr0.1x"), wandb_run_name="original-lr0.1x",
        )
        _say(f"[{step}/{n}] the same run at lr {low.learning_rate:g} (the paper's Figure 2)")
        low_dir = train_stage(stages, "original-lr0.1x", low)
        k, nu = s.lawa[0]
        lawa_stage(stages, low_dir, low, k, nu)
        high_run, low_run = report.load_run(run_dir), report.load_run(low_dir)
        name = f"LAWA k={k} nu={nu}"
        extras += [report.lr_compare_text(high_run, low_run, cfg.learning_rate, low.learning_rate, name),
                   "![LR comparison](lr_compare.png)"]
        for folder in (run_dir, Path(s.assets)):
            report.plot_lr_compare(high_run, low_run, folder / "lr_compare.png", name)
        step += 1
    if s.wsd:
        _say(f"[{step}/{n}] merge versus decay: a constant-LR run, its merges, and cooldowns from {s.wsd_at} of it")
        extras.append(wsd_stage(stages, s, cfg))
    _say(f"[{n}/{n}] report")
    text = report.write_report(run_dir, s.assets, "\n\n".join(extras))
    print(text)
    print(f"wrote {run_dir / 'report.md'} and plots in {run_dir} and {s.assets}/ in {time.perf_counter() - t0:.0f} s")
    return text


def _pairs(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(x) for x in item.split("x")) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write (k, nu) pairs as KxNU,KxNU, e.g. 5x10,5x30") from None


def _fractions(text: str) -> list[float]:
    return [float(x) for x in text.split(",")] if text else []


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="reproduce.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other --key=value overrides the training config (e.g. --max_steps=100).")
    d = Settings()
    p.add_argument("--config", default=d.config, help="training config file (default: %(default)s)")
    p.add_argument("--out", default=d.out, help="folder of every run of the pipeline (default: %(default)s)")
    p.add_argument("--lawa", type=_pairs, default=d.lawa, help="offline LAWA variants as KxNU pairs (default: 5x10,5x20)")
    p.add_argument("--cooldown_at", type=_fractions, default=d.cooldown_at, help="fractions of training to branch cooldowns at, or ''")
    p.add_argument("--cooldown_fraction", type=float, default=d.cooldown_fraction, help="cooldown length / t (default: %(default)s)")
    p.add_argument("--lr_compare", action="store_true", help="also run at a tenth of the learning rate (Figure 2)")
    p.add_argument("--wsd", action="store_true",
                   help="also merge versus decay: a constant-LR run, its uniform and 1-sqrt merges against cooldowns")
    p.add_argument("--wsd_at", type=_fractions, default=d.wsd_at,
                   help="fractions of training where --wsd compares merges and cooldowns (default: 0.25,0.5,0.75)")
    p.add_argument("--fresh", action="store_true", help="start over instead of reusing finished stages")
    p.add_argument("--assets", default=d.assets, help="where the plots are copied (default: %(default)s)")
    args, overrides = p.parse_known_args(argv)
    return Settings(args.config, args.out, overrides, args.lawa, args.cooldown_at, args.cooldown_fraction,
                    args.lr_compare, args.wsd, args.wsd_at, args.fresh, args.assets)


def main(argv: list[str] | None = None) -> None:
    try:
        run_pipeline(parse_args(argv))
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
