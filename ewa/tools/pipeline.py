"""The paper's whole story in one run of ``reproduce.py``, on a CPU in minutes:

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

import runpy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ewa.engine.config import TrainConfig, load_config
from ewa.engine.data import DataError
from ewa.tools import report
from ewa.tools.analysis import steps_at_fractions
from ewa.tools.cli import WindowSettings
from ewa.tools.lawa import evaluate_run
from ewa.tools.merge import WindowPlan
from ewa.tools.stages import Stages, cooldown_config, train_stage

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


def lawa_stage(stages: Stages, run_dir: Path, cfg: TrainConfig, k: int, nu: int, weights: str = "uniform") -> None:
    """lawa.py over the run's raw snapshots: ``<run>/lawa_k<k>_nu<nu>[_<weights>].jsonl``."""
    settings = {"k": k, "nu": nu, "interval": cfg.lawa_interval, "weights": weights, "source": cfg.to_dict()}
    name = WindowPlan(k, nu, cfg.lawa_interval, weights=weights).name()
    if stages.done(f"{run_dir.name}/{name}", settings) and (run_dir / f"{name}.jsonl").exists():
        print(f"reusing {run_dir / name}.jsonl")
        return
    # with wandb, into the training run's wandb run
    evaluate_run(run_dir, WindowSettings(k, nu, weights, interval=cfg.lawa_interval), wandb_log=cfg.wandb_log)
    stages.mark(f"{run_dir.name}/{name}", settings)


def branch_steps(cfg: TrainConfig, fractions: list[float]) -> list[int]:
    """Eval steps nearest each fraction of training (the original keeps a resume checkpoint there)."""
    return steps_at_fractions(range(cfg.eval_interval, cfg.max_steps, cfg.eval_interval), fractions, cfg.max_steps)


def with_matched_ema(cfg: TrainConfig, k: int, nu: int) -> str:
    """``ema_decays`` plus the decay of the same mean age as the (k, nu) window, unless kept."""
    decay = f"{report.horizon_matched_decay(k, nu, cfg.lawa_weights):g}"
    kept = float(decay) in cfg.emas().values()
    return cfg.ema_decays if kept else ",".join(d for d in (cfg.ema_decays, decay) if d)


def original_config(s: Settings) -> TrainConfig:
    cfg = load_config(ROOT / s.config, s.overrides)  # relative to the repository; an absolute path stays as given
    # online LAWA and the horizon-matched EMA with the first (k, nu); every eval step keeps a
    # resume checkpoint to branch from
    k, nu = s.lawa[0]
    return cfg.replace(out_dir=str(Path(s.out) / "run"), lawa_online=True, lawa_k=k, lawa_nu=nu,
                       ema_decays=with_matched_ema(cfg, k, nu), resume_interval=cfg.eval_interval, keep_resume=0,
                       wandb_run_name=cfg.wandb_run_name or "original")


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
        cooldown = cooldown_config(constant, run_dir, t, span, nu)
        train_stage(stages, f"wsd-cooldown-{t}", cooldown, source=constant.to_dict())
    run = report.load_run(run_dir)
    for folder in (run_dir, Path(s.assets)):
        report.plot_wsd(run, folder / "wsd.png")
    return report.wsd_text(run, constant.learning_rate) + "\n\n![Merge versus decay](../wsd/wsd.png)"


def lr_compare_stage(stages: Stages, s: Settings, cfg: TrainConfig, run_dir: Path) -> str:
    """The same run at a tenth of the learning rate, its LAWA of the first (k, nu), and the
    comparison with the original (the paper's Figure 2); returns the report's section."""
    low = cfg.replace(learning_rate=cfg.learning_rate / 10, min_lr=cfg.min_lr / 10, swa_lr=cfg.swa_lr / 10,
                      out_dir=str(Path(s.out) / "run-lr0.1x"), wandb_run_name="original-lr0.1x")
    low_dir = train_stage(stages, "original-lr0.1x", low)
    k, nu = s.lawa[0]
    lawa_stage(stages, low_dir, low, k, nu)
    high_run, low_run = report.load_run(run_dir), report.load_run(low_dir)
    name = f"LAWA k={k} nu={nu}"
    for folder in (run_dir, Path(s.assets)):
        report.plot_lr_compare(high_run, low_run, folder / "lr_compare.png", name)
    text = report.lr_compare_text(high_run, low_run, cfg.learning_rate, low.learning_rate, name)
    return text + "\n\n![LR comparison](lr_compare.png)"


def run_pipeline(s: Settings) -> str:
    """Every stage, each reused when it finished with the same settings; returns the report."""
    t0 = time.perf_counter()
    stages = Stages(Path(s.out), s.fresh)
    cfg = original_config(s)
    prepare_data(cfg)
    n = 4 + bool(s.cooldown_at) + s.lr_compare + s.wsd
    _say(f"[1/{n}] original run: {cfg.n_layer} layers x {cfg.n_embd} wide, lr {cfg.learning_rate:g}, "
         f"{cfg.max_steps} steps")
    run_dir = train_stage(stages, "original", cfg)
    _say(f"[2/{n}] SWA from step {cfg.swa_start_step()} ({cfg.swa_start:.0%} of training)")
    swa = cfg.replace(swa=True, init_from=str(run_dir), out_dir=f"{run_dir}-swa", lawa_online=False,
                      wandb_run_name="swa")
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
        _say(f"[{step}/{n}] the same run at lr {cfg.learning_rate / 10:g} (the paper's Figure 2)")
        extras.append(lr_compare_stage(stages, s, cfg, run_dir))
        step += 1
    if s.wsd:
        _say(f"[{step}/{n}] merge versus decay: a constant-LR run, its merges, and cooldowns from {s.wsd_at} of it")
        extras.append(wsd_stage(stages, s, cfg))
    _say(f"[{n}/{n}] report")
    text = report.write_report(run_dir, s.assets, "\n\n".join(extras))
    print(text)
    print(f"wrote {run_dir / 'report.md'} and plots in {run_dir} and {s.assets}/ in {time.perf_counter() - t0:.0f} s")
    return text
