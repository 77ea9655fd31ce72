"""``lawa.py``: evaluate LAWA over a run's snapshots (or any folder of checkpoints) against the
raw model, on the same fixed held-out tokens the training used.

    python lawa.py out/tiny                               # k, nu, interval, start from the run's config
    python lawa.py out/small --k=5 --nu=200 --interval=1000 --save_dir=out/small/lawa
    torchrun --standalone --nproc_per_node=8 lawa.py out/small     # windows split across ranks
    python lawa.py ckpts/ --config=out/small/config.json  # nanoGPT ckpt_*.pt, HF dirs, ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from ewa.engine.config import ConfigError, TrainConfig, config_from_dict, read_config_file
from ewa.engine.data import DataError, data_meta, eval_windows, fingerprint, open_tokens
from ewa.engine.evaluate import Evaluator
from ewa.engine.logger import MetricsLogger, log_section, open_wandb, read_metrics
from ewa.engine.runtime import Runtime, init_runtime, shutdown
from ewa.files import (
    CheckpointError,
    Weights,
    is_run_dir,
    list_checkpoints,
    model_config_of,
    save_safetensors,
    snapshot_dir,
    snapshot_kinds,
    snapshot_name,
)
from ewa.tools.merge import Evaluation, Merger, TensorStream, WindowPlan, score_models, streaming_order
from ewa.tools.report import load_run
from ewa.window import PlanError, Window
from model import GPT, GPTConfig

KINDS = {"newest": "raw", "average": "lawa"}


@dataclass
class Source:
    """Checkpoints to average and how to evaluate them."""

    folder: Path
    paths: dict[int, Path]
    config: TrainConfig  # evaluation data and LAWA defaults
    model_config: GPTConfig
    block_size: int  # of the evaluation windows: the run's, else the model's
    run_dir: Path | None = None


def load_eval_config(path: str | None, run_dir: Path | None) -> TrainConfig:
    if path:
        p = Path(path)
        if p.suffix == ".json":
            return config_from_dict(json.loads(p.read_text()))
        return TrainConfig(**read_config_file(p))
    if run_dir is not None:
        return config_from_dict(json.loads((run_dir / "config.json").read_text()))
    return TrainConfig()


def open_source(path: str | Path, kind: str = "raw", config: str | None = None, **overrides: object) -> Source:
    """A run directory (its ``snapshots/<kind>``) or any folder of checkpoints; ``overrides``
    (data_dir, eval_tokens, ...) replace the evaluation config's values."""
    path = Path(path)
    run_dir = path if is_run_dir(path) else None
    folder = snapshot_dir(run_dir, kind) if run_dir else path
    if run_dir and not folder.is_dir():
        raise CheckpointError(f"{folder}: no such snapshots; pick --kind among {', '.join(snapshot_kinds(run_dir))}")
    paths = list_checkpoints(folder)
    if not paths:
        raise CheckpointError(f"{folder}: no checkpoints found (expected files named by step, e.g. step_00001000.safetensors)")
    cfg = load_eval_config(config, run_dir).replace(**{k: v for k, v in overrides.items() if v is not None})
    shape = model_config_of(Weights(paths[min(paths)]))
    if shape is None:
        if run_dir is None and config is None:
            raise CheckpointError(
                f"{paths[min(paths)]}: records no model shape; pass --config=<the run's config.json or config file>"
            )
        shape = dataclasses.asdict(cfg.model_config(data_meta(cfg.data_dir)["vocab_size"]))
    block_size = cfg.block_size if (run_dir or config) else shape["block_size"]
    return Source(folder, paths, cfg, GPTConfig.from_dict({**shape, "dropout": 0.0}), block_size, run_dir)


def build_evaluator(source: Source, runtime: Runtime) -> tuple[GPT, Evaluator, str]:
    """A model for the averaged weights and an evaluator over the run's fixed val windows
    (each rank scores whole windows of LAWA on its own, so evaluation is not sharded)."""
    cfg = source.config
    tokens = open_tokens(cfg.data_dir, "val", source.block_size + 1)
    windows = eval_windows(tokens, source.block_size, max(1, cfg.eval_tokens // source.block_size))
    local = dataclasses.replace(runtime, rank=0, world_size=1)
    model = GPT(source.model_config).to(runtime.device)
    return model, Evaluator(windows, cfg.eval_batch_size, local), fingerprint(windows)


def token_loss(model: GPT, evaluator: Evaluator) -> Evaluation:
    """The token-bin evaluation: val loss on the run's fixed held-out windows."""
    return lambda: [{"loss": evaluator.loss(model)}]


def gpt_loader(model: GPT) -> Callable[[TensorStream, str], None]:
    """``load(tensors, origin)`` for ``score_models``: weights into our GPT."""
    return lambda tensors, origin: model.load_weights(dict(tensors))


def saver(save_dir: str, source: Source) -> Callable[[Window, TensorStream], Path]:
    """``save(window, average)`` for ``Merger.models``: ``save_dir/step_<t>.safetensors``, which
    ``--init_from`` and ``GPT.from_pretrained`` load."""

    def save(window: Window, average: TensorStream) -> Path:
        path = Path(save_dir) / snapshot_name(window.step)
        meta = {
            "step": str(window.step),
            "kind": "lawa",
            "members": json.dumps(list(window.members)),
            "model_config": json.dumps(dataclasses.asdict(source.model_config)),
        }
        save_safetensors(path, average, meta)
        return path

    return save


def evaluate_lawa(
    windows: list[Window],
    source: Source,
    model: GPT,
    evaluator: Evaluator,
    save_dir: str | None = None,
    progress: bool = True,
    weights: str = "uniform",
) -> tuple[list[dict], Merger]:
    """Raw and LAWA val loss of each (complete) window, streaming, merged with ``weights``;
    optionally saving each average (and then scoring the file written)."""
    merger = Merger(source.paths, evaluator.runtime.device, weights=weights)
    bar = (lambda it: tqdm(it, desc="LAWA windows", unit="win")) if progress else iter
    models = merger.models(windows, save=saver(save_dir, source) if save_dir else None, progress=bar)
    rows: dict[int, dict] = {}
    for r in score_models(models, gpt_loader(model), token_loss(model, evaluator), KINDS):
        rows.setdefault(r["step"], {"kind": "lawa", "step": r["step"], "members": r["members"]})[r["kind"]] = r["loss"]
    return list(rows.values()), merger


def format_table(results: list[dict], skipped: list[Window]) -> str:
    lines = [f"{'step':>8} | {'raw':>8} | {'LAWA':>8} | {'delta':>8}", "-" * 41]
    rows = {r["step"]: r for r in results}
    for step in sorted(rows.keys() | {w.step for w in skipped}):
        if step in rows:
            r = rows[step]
            lines.append(f"{step:>8} | {r['raw']:8.4f} | {r['lawa']:8.4f} | {r['lawa'] - r['raw']:+8.4f}")
        else:
            w = next(w for w in skipped if w.step == step)
            lines.append(f"{step:>8} | skipped: no checkpoint at step(s) {', '.join(map(str, w.missing))}")
    return "\n".join(lines)


EVAL_OVERRIDES = ("data_dir", "eval_tokens", "eval_batch_size", "device", "dtype")


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


def add_window_options(p: argparse.ArgumentParser) -> None:
    """The LAWA window (lawa.py and analyze.py), each the run's setting by default."""
    p.add_argument("--k", type=integer(1), help="checkpoints per window (default: the run's lawa_k)")
    p.add_argument("--nu", type=integer(1), help="steps between the window's checkpoints (default: the run's lawa_nu)")
    p.add_argument("--weights", help="the merge: uniform, 1-sqrt, cosine or ema:<a> (default: the run's lawa_weights)")


def add_eval_options(p: argparse.ArgumentParser) -> None:
    """Which snapshots to read and how to evaluate them (lawa.py and analyze.py)."""
    p.add_argument("--kind", default="raw", help="which snapshots of a run directory: raw (default), ema, ema_<decay>, swa")
    p.add_argument("--config", help="config.json of a run, or a config file, for a folder that is not a run")
    p.add_argument("--data_dir", help="evaluation data (default: the run's)")
    p.add_argument("--eval_tokens", type=int, help="held-out tokens (default: the run's)")
    p.add_argument("--eval_batch_size", type=int, help="sequences per forward pass (default: the run's)")
    p.add_argument("--device", help="auto, cpu, cuda (default: the run's)")
    p.add_argument("--dtype", help="auto, bfloat16, float32 (default: the run's)")


def open_from_args(args: argparse.Namespace, path: str | Path | None = None) -> Source:
    """The checkpoints at ``path`` (default: args.path) with the evaluation options applied."""
    overrides = {k: getattr(args, k) for k in EVAL_OVERRIDES}
    return open_source(args.path if path is None else path, args.kind, args.config, **overrides)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lawa.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a run directory, or a folder of checkpoints named by step")
    add_window_options(p)
    p.add_argument("--interval", type=int, help="steps between windows (default: lawa_interval)")
    p.add_argument("--start", type=int, help="first window step (default: lawa_start)")
    p.add_argument("--end", type=int, help="last window step (default: the last checkpoint)")
    add_eval_options(p)
    p.add_argument("--save_dir", help="also write each averaged checkpoint here (safetensors)")
    p.add_argument("--out", help="JSONL of the results (default: <run>/lawa_k<k>_nu<nu>.jsonl)")
    p.add_argument("--wandb_log", action="store_true", help="log into the run's wandb run (a new one for a folder)")
    p.add_argument("--wandb_run_name", default="", help="name of a new wandb run (default: wandb's)")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[Source, WindowPlan]:
    source = open_from_args(args)
    cfg = source.config
    plan = WindowPlan(
        k=cfg.lawa_k if args.k is None else args.k,
        nu=cfg.lawa_nu if args.nu is None else args.nu,
        interval=cfg.lawa_interval if args.interval is None else args.interval,
        start=cfg.lawa_start if args.start is None else args.start,
        end=args.end,
        weights=cfg.lawa_weights if args.weights is None else args.weights,
    )
    return source, plan


def check_fingerprint(source: Source, eval_fp: str) -> None:
    if source.run_dir is None:
        return
    starts = [r for r in read_metrics(source.run_dir / "metrics.jsonl") if r.get("kind") == "start"]
    if starts and starts[-1].get("eval_fingerprint") != eval_fp:
        print(
            f"warning: evaluating on other tokens than the training run did ({eval_fp} vs "
            f"{starts[-1].get('eval_fingerprint')}): raw figures will not match its metrics.jsonl",
            file=sys.stderr,
        )


def gather(results: list[dict], runtime: Runtime) -> list[dict]:
    if not runtime.distributed:
        return results
    everyone: list[list[dict]] = [[] for _ in range(runtime.world_size)]
    dist.all_gather_object(everyone, results)
    return [r for part in everyone for r in part]


def run(args: argparse.Namespace) -> list[dict]:
    source, plan = resolve(args)
    cfg = source.config
    runtime = init_runtime(cfg.device, cfg.dtype)
    try:
        windows = plan.windows(source.paths)
        if not windows:
            raise CheckpointError(f"{source.folder}: no LAWA window fits (k={plan.k}, nu={plan.nu}, start={plan.start})")
        complete = streaming_order([w for w in windows if w.complete], plan.nu)
        if not complete:
            w = windows[0]
            raise CheckpointError(f"{source.folder}: every LAWA window lacks checkpoints (the one at step {w.step} "
                                  f"lacks steps {list(w.missing)}); choose nu a multiple of the snapshot interval")
        Merger(source.paths).check(s for w in complete for s in w.members)
        mine = _chunk(complete, runtime)
        model, evaluator, eval_fp = build_evaluator(source, runtime)
        if runtime.master:
            check_fingerprint(source, eval_fp)
            print(f"LAWA {plan.flags()}: "
                  f"{len(complete)} windows of {len(windows)} complete, over {len(source.paths)} checkpoints in {source.folder}")
        results, _ = evaluate_lawa(mine, source, model, evaluator, args.save_dir, runtime.master, plan.weights)
        results = sorted(gather(results, runtime), key=lambda r: r["step"])
        if runtime.master:
            report(args, source, plan, results, [w for w in windows if not w.complete])
        return results
    finally:
        shutdown(runtime)


def _chunk(windows: list[Window], runtime: Runtime) -> list[Window]:
    """A contiguous share of the streaming order, so each rank's running sum still slides."""
    n, r, w = len(windows), runtime.rank, runtime.world_size
    return windows[r * n // w : (r + 1) * n // w]


def report(
    args: argparse.Namespace, source: Source, plan: WindowPlan, results: list[dict], skipped: list[Window]
) -> None:
    default_dir = source.run_dir or source.folder
    name = plan.name()
    out = Path(args.out) if args.out else default_dir / f"{name}.jsonl"
    settings = {"k": plan.k, "nu": plan.nu, "interval": plan.interval, "start": plan.start, "weights": plan.weights}
    logger = MetricsLogger(out, echo=False, append=False)
    for r in results:
        logger.log({**r, **settings})
    for w in skipped:
        logger.log({"kind": "lawa_skipped", "step": w.step, "missing": list(w.missing), **settings})
    logger.close()
    if args.wandb_log:  # into the training run, on axes of its own
        cfg = source.config
        run = open_wandb(cfg.wandb_project, args.wandb_run_name, cfg.wandb_mode, None, default_dir, resume=True)
        log_section(run, name, [{"step": r["step"], "raw": r["raw"], "lawa": r["lawa"]} for r in results])
        if source.run_dir is not None:
            log_section(run, "val_loss", val_loss_rows(source.run_dir))
        run.finish()
    print(format_table(results, skipped))
    print(f"wrote {out}" + (f" and averaged checkpoints to {args.save_dir}" if args.save_dir else ""))


def val_loss_rows(run_dir: Path) -> list[dict]:
    """Every val loss curve of a run on one axis, a row per step: raw, EMA, SWA (its ``-swa``
    branch) and each LAWA (online, and every lawa.py result beside the run)."""
    rename = {"Original": "raw", "EMA": "ema", "SWA": "swa"}
    curves = {rename.get(n) or n.lower().replace("=", "").replace(" ", "_"): c
              for n, c in load_run(run_dir).curves.items()}
    steps = sorted({s for c in curves.values() for s in c})
    return [{"step": s, **{n: c[s] for n, c in curves.items() if s in c}} for s in steps]


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    except (ConfigError, DataError, CheckpointError, PlanError) as e:
        sys.exit(f"error: {e}")
