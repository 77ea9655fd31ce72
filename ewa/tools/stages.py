"""Training stages that a re-run reuses: which finished, with which settings (``stages.json``),
and the branch configs of the pipeline (``reproduce.py``) and of ``analyze.py recover``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ewa.engine import trainer
from ewa.engine.config import TrainConfig
from ewa.files import atomic_write_text, list_checkpoints


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
        trainer.run(cfg.replace(init_from="resume"))
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        trainer.run(cfg)
    stages.mark(name, settings)
    return run_dir


def branch_config(cfg: TrainConfig, run_dir: Path, t: int, steps: int, name: str, **changes: Any) -> TrainConfig:
    """``cfg`` continued from ``run_dir``'s resume checkpoint at step ``t`` for ``steps`` more
    steps, on the original's LR schedule, into ``<run_dir>-<name>``. The original's cooldown
    is kept only by a branch that ends where the original ends: the cooldown is the last
    cooldown_steps before max_steps, so a shorter branch would cool down where the original
    did not. ``changes`` may set cooldown_steps (a cooldown branch)."""
    cooldown = cfg.cooldown_steps if t + steps == cfg.max_steps else 0
    return cfg.replace(init_from=str(run_dir), branch_step=t, max_steps=t + steps, lr_decay_steps=cfg.decay_steps(),
                       out_dir=f"{run_dir}-{name}", lawa_online=False, wandb_run_name=name,
                       **{"cooldown_steps": cooldown, **changes})


def cooldown_config(cfg: TrainConfig, run_dir: Path, t: int, steps: int, eval_interval: int) -> TrainConfig:
    """A linear LR cooldown to 0 over ``steps`` steps, branched from the raw checkpoint at ``t``."""
    return branch_config(cfg, run_dir, t, steps, f"cooldown-{t}", cooldown_steps=steps, eval_interval=eval_interval,
                         ckpt_interval=steps, resume_interval=steps)
