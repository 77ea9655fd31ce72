"""LAWA over a run's snapshots (or any folder of checkpoints) against the raw model, on the same
fixed held-out tokens the training used: what ``lawa.py`` runs, and the checkpoints and evaluator
that ``analyze.py`` scores with."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from ewa.engine.config import TrainConfig, config_from_dict, read_config_file
from ewa.engine.data import data_meta, eval_windows, fingerprint, open_tokens
from ewa.engine.evaluate import Evaluator
from ewa.engine.logger import log_section, open_wandb, read_metrics
from ewa.engine.runtime import Runtime, init_runtime, shutdown
from ewa.files import (
    CheckpointError,
    Weights,
    atomic_write_text,
    is_run_dir,
    list_checkpoints,
    model_config_of,
    run_snapshots,
    save_safetensors,
    snapshot_dir,
    snapshot_name,
)
from ewa.tools.cli import EvalOptions, WindowSettings
from ewa.tools.merge import Merger, TensorStream, WindowPlan, score_models, streaming_order
from ewa.tools.report import load_run, read_run_config
from ewa.window import Window
from model import GPT, GPTConfig

RUN_KINDS = {"newest": "raw", "average": "lawa"}  # the merge engine's roles as a run's records name them


@dataclass
class Checkpoints:
    """Checkpoints to average and how to evaluate them."""

    folder: Path
    paths: dict[int, Path]
    config: TrainConfig  # evaluation data and LAWA defaults
    model_config: GPTConfig
    block_size: int  # of the evaluation windows: the run's, else the model's
    run_dir: Path | None = None

    @property
    def home(self) -> Path:
        """Where results go by default: the run directory, else the folder."""
        return self.run_dir or self.folder


def eval_config(config: str | None, run_dir: Path | None) -> TrainConfig:
    """The config of ``--config`` (a run's config.json or a config file), else the run's, else the defaults."""
    if config:
        path = Path(config)
        if path.suffix == ".json":
            return config_from_dict(json.loads(path.read_text()))
        return TrainConfig(**read_config_file(path))
    return read_run_config(run_dir) if run_dir else TrainConfig()


def open_checkpoints(path: str | Path, options: EvalOptions | None = None) -> Checkpoints:
    """A run directory (its ``snapshots/<kind>``) or any folder of checkpoints, evaluated with the
    run's settings as ``options`` override them."""
    path, options = Path(path), options or EvalOptions()
    run_dir = path if is_run_dir(path) else None
    folder = snapshot_dir(run_dir, options.kind) if run_dir else path
    paths = run_snapshots(run_dir, options.kind) if run_dir else list_checkpoints(folder)
    if not paths:
        raise CheckpointError(f"{folder}: no checkpoints found "
                              "(expected files named by step, e.g. step_00001000.safetensors)")
    cfg = eval_config(options.config, run_dir).replace(**options.overrides())
    shape = model_config_of(Weights(paths[min(paths)]))
    if shape is None:
        if run_dir is None and options.config is None:
            raise CheckpointError(f"{paths[min(paths)]}: records no model shape; "
                                  "pass --config=<the run's config.json or config file>")
        shape = dataclasses.asdict(cfg.model_config(data_meta(cfg.data_dir)["vocab_size"]))
    block_size = cfg.block_size if (run_dir or options.config) else shape["block_size"]
    return Checkpoints(folder, paths, cfg, GPTConfig.from_dict({**shape, "dropout": 0.0}), block_size, run_dir)


def build_evaluator(ckpts: Checkpoints, runtime: Runtime | None = None) -> tuple[GPT, Evaluator, str]:
    """A model for the averaged weights, an evaluator over the run's fixed val windows (each rank
    scores whole windows of LAWA on its own, so evaluation is not sharded) and their fingerprint."""
    cfg = ckpts.config
    runtime = runtime or init_runtime(cfg.device, cfg.dtype)
    tokens = open_tokens(cfg.data_dir, "val", ckpts.block_size + 1)
    windows = eval_windows(tokens, ckpts.block_size, max(1, cfg.eval_tokens // ckpts.block_size))
    local = dataclasses.replace(runtime, rank=0, world_size=1)
    model = GPT(ckpts.model_config).to(runtime.device)
    return model, Evaluator(windows, cfg.eval_batch_size, local), fingerprint(windows)


def save_average(save_dir: str, ckpts: Checkpoints, window: Window, average: TensorStream) -> Path:
    """``Merger.models``'s ``save`` (with save_dir and ckpts bound): ``save_dir/step_<t>.safetensors``,
    which ``--init_from`` and ``GPT.from_pretrained`` load."""
    path = Path(save_dir) / snapshot_name(window.step)
    meta = {"step": str(window.step), "kind": "lawa", "members": json.dumps(list(window.members)),
            "model_config": json.dumps(dataclasses.asdict(ckpts.model_config))}
    save_safetensors(path, average, meta)
    return path


def lawa_losses(windows: list[Window], ckpts: Checkpoints, model: GPT, evaluator: Evaluator, weights: str = "uniform",
                save_dir: str | None = None, show_progress: bool = True) -> list[dict]:
    """Raw and LAWA val loss of each (complete) window, streaming, merged with ``weights``;
    optionally saving each average (and then scoring the file written)."""
    merger = Merger(ckpts.paths, evaluator.runtime.device, weights=weights)
    bar = (lambda it: tqdm(it, desc="LAWA windows", unit="win")) if show_progress else iter
    models = merger.models(windows, save=partial(save_average, save_dir, ckpts) if save_dir else None, progress=bar)
    scored = score_models(models, lambda tensors, origin: model.load_weights(dict(tensors)),
                          lambda: [{"loss": evaluator.loss(model)}], RUN_KINDS)
    rows: dict[int, dict] = {}
    for r in scored:
        rows.setdefault(r["step"], {"kind": "lawa", "step": r["step"], "members": r["members"]})[r["kind"]] = r["loss"]
    return list(rows.values())


def lawa_table(results: list[dict], skipped: list[Window]) -> str:
    cells = {w.step: f"skipped: no checkpoint at step(s) {', '.join(map(str, w.missing))}" for w in skipped}
    cells |= {r["step"]: f"{r['raw']:8.4f} | {r['lawa']:8.4f} | {r['lawa'] - r['raw']:+8.4f}" for r in results}
    header = f"{'step':>8} | {'raw':>8} | {'LAWA':>8} | {'delta':>8}"
    return "\n".join([header, "-" * 41, *(f"{step:>8} | {cells[step]}" for step in sorted(cells))])


def check_fingerprint(ckpts: Checkpoints, eval_fp: str) -> None:
    """Warn when the held-out tokens are not those the training run scored."""
    records = read_metrics(ckpts.run_dir / "metrics.jsonl") if ckpts.run_dir else []
    starts = [r for r in records if r.get("kind") == "start"]
    if starts and starts[-1].get("eval_fingerprint") != eval_fp:
        print(f"warning: evaluating on other tokens than the training run did ({eval_fp} vs "
              f"{starts[-1].get('eval_fingerprint')}): raw figures will not match its metrics.jsonl", file=sys.stderr)


def gather(results: list[dict], runtime: Runtime) -> list[dict]:
    if not runtime.distributed:
        return results
    everyone: list[list[dict]] = [[] for _ in range(runtime.world_size)]
    dist.all_gather_object(everyone, results)
    return [r for part in everyone for r in part]


def lawa_windows(ckpts: Checkpoints, plan: WindowPlan) -> tuple[list[Window], list[Window]]:
    """The plan's windows over the checkpoints, and the complete ones in streaming order, their
    members checked to open and to match before any work is spent."""
    windows = plan.windows(ckpts.paths)
    if not windows:
        raise CheckpointError(f"{ckpts.folder}: no LAWA window fits (k={plan.k}, nu={plan.nu}, start={plan.start})")
    complete = streaming_order([w for w in windows if w.complete], plan.nu)
    if not complete:
        raise CheckpointError(f"{ckpts.folder}: every LAWA window lacks checkpoints (the one at step {windows[0].step} "
                              f"lacks steps {list(windows[0].missing)}); choose nu a multiple of the snapshot interval")
    Merger(ckpts.paths).check(s for w in complete for s in w.members)
    return windows, complete


def evaluate_run(path: str | Path, window: WindowSettings, options: EvalOptions | None = None,
                 save_dir: str | None = None, out: str | None = None, wandb_log: bool = False,
                 wandb_run_name: str = "") -> list[dict]:
    """Raw and LAWA val loss at every window of ``window`` over the checkpoints at ``path``
    (torchrun: the windows split across ranks), written to ``out`` (default:
    ``<run>/lawa_k<k>_nu<nu>.jsonl``), each average also to ``save_dir`` when given."""
    ckpts = open_checkpoints(path, options)
    plan = window.plan(ckpts.config)
    runtime = init_runtime(ckpts.config.device, ckpts.config.dtype)
    try:
        windows, complete = lawa_windows(ckpts, plan)
        model, evaluator, eval_fp = build_evaluator(ckpts, runtime)
        if runtime.master:
            check_fingerprint(ckpts, eval_fp)
            print(f"LAWA {plan.flags()}: {len(complete)} windows of {len(windows)} complete, "
                  f"over {len(ckpts.paths)} checkpoints in {ckpts.folder}")
        mine = _chunk(complete, runtime)
        results = lawa_losses(mine, ckpts, model, evaluator, plan.weights, save_dir, runtime.master)
        results = sorted(gather(results, runtime), key=lambda r: r["step"])
        if runtime.master:
            skipped = [w for w in windows if not w.complete]
            out_path = Path(out) if out else ckpts.home / f"{plan.name()}.jsonl"
            write_results(out_path, plan, results, skipped)
            if wandb_log:  # into the training run, on axes of its own
                sections = {plan.name(): [{"step": r["step"], "raw": r["raw"], "lawa": r["lawa"]} for r in results]}
                if ckpts.run_dir is not None:
                    sections["val_loss"] = val_loss_rows(ckpts.run_dir)
                log_to_wandb(ckpts.home, sections, cfg=ckpts.config, name=wandb_run_name)
            print(lawa_table(results, skipped))
            print(f"wrote {out_path}" + (f" and averaged checkpoints to {save_dir}" if save_dir else ""))
        return results
    finally:
        shutdown(runtime)


def _chunk(windows: list[Window], runtime: Runtime) -> list[Window]:
    """A contiguous share of the streaming order, so each rank's running sum still slides."""
    n, r, w = len(windows), runtime.rank, runtime.world_size
    return windows[r * n // w : (r + 1) * n // w]


def write_results(out: Path, plan: WindowPlan, results: list[dict], skipped: list[Window]) -> None:
    """Each window's record, with the plan's settings, into the JSONL ``out``."""
    settings = {"k": plan.k, "nu": plan.nu, "interval": plan.interval, "start": plan.start, "weights": plan.weights}
    records = [{**r, **settings} for r in results]
    records += [{"kind": "lawa_skipped", "step": w.step, "missing": list(w.missing), **settings} for w in skipped]
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))


def log_to_wandb(folder: Path, sections: dict[str, list[dict]], x: str = "step", cfg: TrainConfig | None = None,
                 name: str = "") -> None:
    """Each section's rows into the wandb run of ``folder`` (the training run when it is one; a new
    one named ``name`` otherwise), under ``<section>/`` against its own axis ``<section>/<x>``;
    ``cfg`` (default: the folder's config.json) names the wandb project and mode."""
    if cfg is None:
        cfg = read_run_config(folder) if (folder / "config.json").exists() else TrainConfig()
    run = open_wandb(cfg.wandb_project, name, cfg.wandb_mode, None, folder, resume=True)
    for section, rows in sections.items():
        log_section(run, section, rows, x)
    run.finish()


def val_loss_rows(run_dir: Path) -> list[dict]:
    """Every val loss curve of a run on one axis, a row per step: raw, EMA, SWA (its ``-swa``
    branch) and each LAWA (online, and every lawa.py result beside the run)."""
    rename = {"Original": "raw", "EMA": "ema", "SWA": "swa"}
    curves = {rename.get(n) or n.lower().replace("=", "").replace(" ", "_"): c
              for n, c in load_run(run_dir).curves.items()}
    steps = sorted({s for c in curves.values() for s in c})
    return [{"step": s, **{n: c[s] for n, c in curves.items() if s in c}} for s in steps]
