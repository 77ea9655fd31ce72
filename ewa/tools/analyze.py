"""``analyze.py``: the paper's analyses of a run directory (or any folder of checkpoints), each
writing a table (``.md``), its records (``.jsonl``) and a plot (``.png``) into the run
directory or ``--out_dir``.

    python analyze.py ablation out/tiny --k=2,5,10 --nu=10,20,50      # appendix A.1, Figure 10
    python analyze.py lmc out/tiny --a=100 --b=600                    # appendix A.3, Figure 13
    python analyze.py diversity out/tiny out/tiny-lowlr               # section 2.2
    python analyze.py spikes out/tiny/lawa_k5_nu20.jsonl             # section 4.3
    python analyze.py recover out/spiky                               # restart before a spike: raw vs LAWA
    python analyze.py zeroshot out/tiny --tasks=TASK,... --include_path=DIR   # Table 2, raw/EMA/SWA/LAWA

With ``--wandb_log`` each logs its figures into the run's wandb run, on an axis of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from matplotlib.figure import Figure
from tqdm import tqdm

from ewa.engine.config import ConfigError, TrainConfig, config_from_dict
from ewa.engine.data import DataError, data_meta
from ewa.engine.evaluate import Evaluator
from ewa.engine.logger import log_section, open_wandb, read_metrics
from ewa.engine.runtime import Runtime, init_runtime
from ewa.files import CheckpointError, atomic_write, atomic_write_text, list_checkpoints, resume_dir, snapshot_dir
from ewa.tools import hf
from ewa.tools.analysis import (
    Ablation,
    AnalysisError,
    DiversityRun,
    Series,
    Threshold,
    averaged_snapshots,
    compare_spikes,
    default_anchors,
    default_distances,
    find_spikes,
    interpolation_curve,
    load_pair,
    loss_barrier,
    plan_ablation,
    plan_pairs,
    restart_step,
    run_ablation,
    run_diversity,
    snapshot_spacing,
    spikes_after,
    steps_at_fractions,
    zero_shot_models,
)
from ewa.tools.hf import InputError
from ewa.tools.lawa import Source, add_eval_options, add_window_options, build_evaluator, integer, open_from_args
from ewa.tools.merge import Merger, TensorStream, WindowPlan, score_models
from ewa.tools.pipeline import Stages, branch_config, train_stage
from ewa.tools.plots import plot_ablation, plot_diversity, plot_lmc, plot_recovery, plot_spikes
from ewa.window import PlanError, Window
from model import GPT

# ---------------------------------------------------------------------------------------------
# shared plumbing


def int_list(minimum: int) -> Callable[[str], list[int]]:
    """An argparse type: integers of at least ``minimum`` separated by commas (``2,5,10``)."""
    return lambda text: [integer(minimum)(x) for x in text.split(",")]


def float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas, e.g. 0,0.5,1") from None
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every alpha must lie in [0, 1]")
    return values


def add_analysis_options(p: argparse.ArgumentParser) -> None:
    add_eval_options(p)
    add_output_options(p)


def add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out_dir", help="where the table, records and plot go (default: the run directory)")
    p.add_argument("--wandb_log", action="store_true", help="also log the figures into the run's wandb run")


def open_evaluated(path: str, args: argparse.Namespace) -> Source:
    """A run's checkpoints, with the evaluation settings overridden from the command line."""
    return open_from_args(args, path)


def evaluator_for(source: Source, runtime: Runtime | None = None) -> tuple[GPT, Evaluator, str]:
    runtime = runtime or init_runtime(source.config.device, source.config.dtype)
    return build_evaluator(source, runtime)


def spacing_of(source: Source) -> int:
    if len(source.paths) < 2:
        raise AnalysisError(f"{source.folder}: holds one checkpoint only; this analysis needs a series of them")
    return snapshot_spacing(source.paths)


def out_dir(args: argparse.Namespace, source: Source) -> Path:
    return Path(args.out_dir) if args.out_dir else source.run_dir or source.folder


def progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="model")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(c) for c in column) for column in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|", *map(line, rows)])


def fmt(value: float | None, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


def write_outputs(folder: Path, name: str, table: str, records: list[dict], figure: Figure | None) -> None:
    """``name``.md, .jsonl and (with a figure) .png, each written atomically."""
    atomic_write_text(folder / f"{name}.md", table.rstrip("\n") + "\n")
    atomic_write_text(folder / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    if figure is not None:
        atomic_write(folder / f"{name}.png", lambda t: figure.savefig(t, format="png", dpi=110, bbox_inches="tight"))
    print(f"wrote {folder / name}.md, .jsonl" + (" and .png" if figure is not None else ""))


def log_to_wandb(args: argparse.Namespace, run_dir: Path, section: str, rows: list[dict], x: str = "step") -> None:
    """With --wandb_log: ``rows`` into the wandb run of ``run_dir`` (the training run when it is
    one), under ``section/`` against its own axis ``section/<x>``."""
    if not args.wandb_log:
        return
    saved = run_dir / "config.json"
    cfg = config_from_dict(json.loads(saved.read_text())) if saved.exists() else TrainConfig()
    run = open_wandb(cfg.wandb_project, "", cfg.wandb_mode, None, run_dir, resume=True)
    log_section(run, section, rows, x)
    run.finish()
    print(f"logged {section}/ into the wandb run in {run_dir}")


# ---------------------------------------------------------------------------------------------
# ablation


def cmd_ablation(args: argparse.Namespace) -> None:
    source = open_evaluated(args.path, args)
    spacing = spacing_of(source)
    nus = args.nu or [m * spacing for m in (1, 2, 5)]
    interval = args.interval or (source.config.eval_interval if source.run_dir else spacing)
    end = max(source.paths) if args.end is None else args.end
    settings = [(k, nu) for k in args.k for nu in nus]
    plan = plan_ablation(source.paths, settings, interval, args.start, end)
    model, evaluator, _ = evaluator_for(source)
    print(
        f"LAWA ablation over k={args.k} x nu={nus} at every {interval} steps from {args.start} to {end} "
        f"({len(source.paths)} checkpoints in {source.folder}): {plan.evaluations} models to score"
    )
    with progress(plan.evaluations, "ablation") as bar:
        result = run_ablation(source.paths, plan, model, evaluator, bar.update)
    table = ablation_table(result, settings)
    print(table)
    windows = sum(len(c) for c in result.lawa.values())
    naive = sum(k * len(result.lawa[k, nu]) for k, nu in settings)
    print(f"{windows} averages from {result.files_read} checkpoint reads (averaging each window from scratch: {naive})")
    records = [{"kind": "raw", "step": s, "raw": v} for s, v in result.raw.items()]
    records += [
        {"kind": "ablation", "step": t, "k": k, "nu": nu, "lawa": v}
        for (k, nu), c in result.lawa.items()
        for t, v in c.items()
    ]
    write_outputs(
        out_dir(args, source), "ablation", table, records, plot_ablation(result.raw, result.lawa, args.k, nus)
    )
    steps = sorted(result.raw.keys() | {t for c in result.lawa.values() for t in c})
    rows = [{"step": t, "raw": result.raw.get(t), **{f"k{k}_nu{nu}": c.get(t) for (k, nu), c in result.lawa.items()}}
            for t in steps]
    log_to_wandb(args, source.run_dir or source.folder, "ablation", rows)


def ablation_table(result: Ablation, settings: list[tuple[int, int]]) -> str:
    """A row per step, a column per (k, nu), and a last row with each setting's mean gain
    over the raw model on the steps where every setting has a window."""
    steps = sorted(result.raw.keys() | {s for c in result.lawa.values() for s in c})
    rows = [[str(t), fmt(result.raw.get(t))] + [fmt(result.lawa[s].get(t)) for s in settings] for t in steps]
    header = ["step", "raw"] + [f"k={k} ν={nu}" for k, nu in settings]
    common = [t for t in steps if t in result.raw and all(t in c for c in result.lawa.values())]
    if not common:
        return markdown_table(header, rows)
    gain = {s: sum(result.lawa[s][t] - result.raw[t] for t in common) / len(common) for s in settings}
    best = min(settings, key=gain.get)
    cells = [fmt(gain[s], "+.4f") + ("*" if s == best else "") for s in settings]
    rows.append([f"mean Δ {common[0]}–{common[-1]}", ""] + cells)
    note = (
        f"mean Δ: LAWA − raw over the steps where every setting has a window; * the lowest (k={best[0]}, ν={best[1]})"
    )
    return markdown_table(header, rows) + "\n\n" + note


# ---------------------------------------------------------------------------------------------
# linear mode connectivity


def resolve_checkpoint(source: Source, text: str, flag: str) -> tuple[Path, str]:
    """A step of the source's checkpoints, or a checkpoint file / Hugging Face directory."""
    if text.isdigit() and int(text) in source.paths:
        return source.paths[int(text)], text
    if Path(text).exists():
        return Path(text), Path(text).name.split(".")[0]
    steps = sorted(source.paths)
    raise CheckpointError(
        f"{flag}={text}: neither a step of {source.folder} (it has {len(steps)} checkpoints, steps "
        f"{steps[0]}..{steps[-1]}) nor an existing checkpoint file or directory"
    )


def cmd_lmc(args: argparse.Namespace) -> None:
    source = open_evaluated(args.path, args)
    path_a, label_a = resolve_checkpoint(source, args.a, "--a")
    path_b, label_b = resolve_checkpoint(source, args.b, "--b")
    alphas = sorted(set(args.alphas) | {0.0, 1.0})
    a, b = load_pair(path_a, path_b)
    model, evaluator, _ = evaluator_for(source)
    print(f"interpolating α·θa + (1−α)·θb, θa = {path_a}, θb = {path_b}, at α = {alphas}")
    with progress(len(alphas), "interpolation") as bar:
        curve = interpolation_curve(a, b, alphas, model, evaluator, bar.update)
    height, at = loss_barrier(curve)

    def line(alpha: float) -> float:
        return alpha * curve[1.0] + (1 - alpha) * curve[0.0]

    rows = [[f"{al:g}", fmt(v), fmt(line(al)), fmt(v - line(al), "+.4f")] for al, v in curve.items()]
    table = markdown_table(["α", "val loss", "straight line", "excess"], rows)
    print(table)
    mean_end = (curve[0.0] + curve[1.0]) / 2
    shape = (
        f"at α={at:g}, {100 * height / mean_end:.1f}% of the endpoints' mean loss"
        if height > 0
        else "every interpolated model is at or below the straight line: linearly mode connected on this grid"
    )
    print(
        f"loss barrier {height:.4f} ({shape}); θa={label_a} loss {curve[1.0]:.4f}, θb={label_b} loss {curve[0.0]:.4f}"
    )
    records = [{"kind": "lmc", "alpha": al, "loss": v, "a": str(path_a), "b": str(path_b)} for al, v in curve.items()]
    records.append({"kind": "lmc_barrier", "height": height, "alpha": at, "a": str(path_a), "b": str(path_b)})
    figure = plot_lmc(curve, line, f"θa = {label_a}", f"θb = {label_b}", height, at)
    write_outputs(out_dir(args, source), f"lmc_{label_a}_{label_b}", table, records, figure)
    rows = [{"alpha": al, "loss": v, "straight_line": line(al)} for al, v in curve.items()]
    log_to_wandb(args, source.run_dir or source.folder, f"lmc_{label_a}_{label_b}", rows, x="alpha")


# ---------------------------------------------------------------------------------------------
# diversity


def run_label(source: Source) -> str:
    name = (source.run_dir or source.folder).name
    return f"{name} (lr {source.config.learning_rate:g})" if source.run_dir else name


def diversity_runs(sources: list[Source]) -> list[DiversityRun]:
    """A model and an evaluator per run, refusing runs scored on different held-out tokens."""
    labels = [run_label(s) for s in sources]
    if len(set(labels)) < len(labels):
        labels = [str(s.run_dir or s.folder) for s in sources]
    runtime = init_runtime(sources[0].config.device, sources[0].config.dtype)
    runs, fingerprints = [], {}
    for label, source in zip(labels, sources):
        model, evaluator, fingerprints[label] = evaluator_for(source, runtime)
        runs.append(DiversityRun(label, source.paths, model, evaluator))
    if len(set(fingerprints.values())) > 1:
        raise AnalysisError(
            f"the runs score different held-out tokens (fingerprints {fingerprints}): compare runs on the same "
            "data, or set --data_dir and --eval_tokens for all of them"
        )
    return runs


def cmd_diversity(args: argparse.Namespace) -> None:
    sources = [open_evaluated(p, args) for p in args.paths]
    spacing, first = spacing_of(sources[0]), sorted(sources[0].paths)
    anchors = args.anchors or default_anchors(first)
    distances = args.distances or default_distances(first, anchors)
    pairs = plan_pairs(set().union(*(s.paths for s in sources)), anchors, distances)
    if not pairs:
        raise AnalysisError(
            f"--anchors={anchors} with --distances={distances} give no pair of saved steps "
            f"(steps {first[0]}..{first[-1]} every {spacing} in {sources[0].folder})"
        )
    runs = diversity_runs(sources)
    positions = runs[0].evaluator.local[:, 1:].numel()
    print(
        f"top-1 disagreement on {positions:,} held-out positions, pairs (t, t + d) for t in {anchors}, d in {distances}"
    )
    with progress(sum(len(r.steps_in(pairs)) for r in runs), "predictions") as bar:
        records = run_diversity(runs, pairs, bar.update)
    for run in runs:
        lacking = [p for p in pairs if not set(p) <= run.paths.keys()]
        if lacking:
            print(f"note: {run.label} lacks the checkpoints of {len(lacking)} pair(s), e.g. steps {lacking[0]}")
    table, columns = diversity_table(records, [r.label for r in runs], anchors, distances)
    print("disagreement (%) between the checkpoints at steps t and t + distance:")
    print(table)
    write_outputs(out_dir(args, sources[0]), "diversity", table, records, plot_diversity(records, columns))
    by_distance: dict[int, dict] = {}
    for r in records:
        row = by_distance.setdefault(r["distance"], {"distance": r["distance"]})
        row[f"{r['run']} t={r['a']}"] = 100 * r["disagreement"]
    log_to_wandb(args, sources[0].run_dir or sources[0].folder, "diversity", list(by_distance.values()), x="distance")


def diversity_table(
    records: list[dict], labels: list[str], anchors: list[int], distances: list[int]
) -> tuple[str, list[tuple[str, int]]]:
    """Disagreement (%) with a row per distance and a column per (run, anchor) that has pairs."""
    by = {(r["run"], r["a"], r["distance"]): 100 * r["disagreement"] for r in records}
    columns = [(label, t) for label in labels for t in anchors if any(key[:2] == (label, t) for key in by)]
    rows = [[str(d)] + [fmt(by.get((label, t, d)), ".2f") for label, t in columns] for d in distances]
    return markdown_table(["distance"] + [f"{label} t={t}" for label, t in columns], rows), columns


# ---------------------------------------------------------------------------------------------
# loss spikes


def read_curves(path: Path) -> tuple[Series, Series, str]:
    """Raw and LAWA val loss: from a lawa.py JSONL (both at its window steps), or from a run
    directory's metrics.jsonl (its eval records and their online ``lawa`` column)."""
    if path.is_file():
        records = [r for r in read_metrics(path) if r.get("kind") == "lawa"]
        if not records:
            raise AnalysisError(f"{path}: no LAWA records; pass a JSONL written by lawa.py, or a run directory")
        return {r["step"]: r["raw"] for r in records}, {r["step"]: r["lawa"] for r in records}, f"LAWA ({path.name})"
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        raise AnalysisError(f"{metrics} not found: pass a training run directory or a JSONL written by lawa.py")
    evals = [r for r in read_metrics(metrics) if r.get("kind") == "eval"]
    lawa = {r["step"]: r["lawa"] for r in evals if "lawa" in r}
    if not lawa:
        raise AnalysisError(
            f"{metrics} has no online LAWA column: run `python lawa.py {path}` and pass the "
            f"{path}/lawa_k<k>_nu<nu>.jsonl it writes, or train with --lawa_online=True"
        )
    return {r["step"]: r["raw"] for r in evals}, lawa, "online LAWA"


def cmd_spikes(args: argparse.Namespace) -> None:
    path = Path(args.path)
    raw, lawa, lawa_name = read_curves(path)
    threshold = Threshold.parse(args.threshold)
    rows = compare_spikes(raw, lawa, args.window, threshold)
    verdict = {True: "yes", False: "no", None: "—"}
    table = markdown_table(
        ["step", "raw", "raw trend", "LAWA", "LAWA trend", "LAWA spikes"],
        [
            [
                str(r["step"]),
                fmt(r["raw"]),
                fmt(r["raw_trend"]),
                fmt(r["lawa"]),
                fmt(r["lawa_trend"]),
                verdict[r["lawa_spiked"]],
            ]
            for r in rows
        ],
    )
    print(f"spikes: val loss above the median of the previous {args.window} evals by more than {threshold}")
    print(table)
    spiked = [r["step"] for r in rows if r["lawa_spiked"]]
    unseen = [r["step"] for r in rows if r["lawa_spiked"] is None]
    print(
        f"raw: {len(rows)} spike(s) in {len(raw)} evals; {lawa_name} spikes at {len(spiked)} of them {spiked}"
        + (f", has no value or trend at {unseen}" if unseen else "")
        + f"; LAWA spikes of its own: {len(find_spikes(lawa, args.window, threshold))} in {len(lawa)} evals"
    )
    folder = Path(args.out_dir) if args.out_dir else path if path.is_dir() else path.parent
    write_outputs(folder, "spikes", table, rows, plot_spikes(raw, lawa, rows, args.window, lawa_name))
    log_to_wandb(args, path if path.is_dir() else path.parent, "spikes", rows)


def run_config(run_dir: Path) -> TrainConfig:
    saved = run_dir / "config.json"
    if not saved.exists():
        raise AnalysisError(f"{saved} not found: pass a training run directory")
    return config_from_dict(json.loads(saved.read_text()))


def cmd_recover(args: argparse.Namespace) -> None:
    """Restart the run before a spike from its raw checkpoint and from the LAWA average of the
    window ending there (branches ``<run>-recover-<t>-raw`` and ``-lawa``, reused by a re-run)."""
    run_dir = Path(args.path)
    cfg = run_config(run_dir)
    cfg = cfg.replace(lawa_k=args.k or cfg.lawa_k, lawa_nu=args.nu or cfg.lawa_nu, lawa_weights=args.weights or cfg.lawa_weights)
    raw = {r["step"]: r["raw"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "eval"}
    threshold = Threshold.parse(args.threshold)
    spikes = find_spikes(raw, args.window, threshold)
    if args.spike is None and not spikes:
        raise AnalysisError(f"{run_dir}: no spike above its trend by {threshold}: lower --threshold, or pass --spike=<step>")
    spike = min(spikes) if args.spike is None else args.spike
    start = args.at if args.at is not None else restart_step(
        spike, list_checkpoints(resume_dir(run_dir)), list_checkpoints(snapshot_dir(run_dir)), cfg.lawa_k, cfg.lawa_nu)
    steps = args.steps or min(cfg.max_steps - start, spike - start + 10 * cfg.eval_interval)
    lawa = f"LAWA k={cfg.lawa_k} ν={cfg.lawa_nu}" + ("" if cfg.lawa_weights == "uniform" else f" {cfg.lawa_weights}")
    print(f"restarting {run_dir} at step {start}, before the spike at {spike}, for {steps} steps: from the raw "
          f"checkpoint and from the {lawa} average" + (", with a fresh AdamW state" if args.reset_optimizer else ""))
    stages = Stages(run_dir, fresh=False)
    curves = {"original": {s: v for s, v in raw.items() if start <= s <= start + steps}}
    for weights, label in (("raw", "restart from raw"), ("lawa", f"restart from {lawa}")):
        name = f"recover-{start}-{weights}" + ("-reset" if args.reset_optimizer else "")
        branch = branch_config(cfg, run_dir, start, steps, name, branch_weights=weights,
                               branch_reset_optimizer=args.reset_optimizer, resume_interval=steps)
        evals = {r["step"]: r["raw"] for r in read_metrics(train_stage(stages, name, branch, cfg.to_dict()) / "metrics.jsonl")
                 if r.get("kind") == "eval"}
        curves[label] = {start: raw[start], **evals}  # a raw restart starts from the original's weights at `start`
    table, records = recovery_table(curves, raw, start, spike, args.window, threshold)
    replayed = all(curves["restart from raw"].get(s, v) == v for s, v in curves["original"].items())
    if replayed:  # the restart replays the original's batches from its data position
        table += "\n\nThe restart from raw equals the original at every step: it replays the same batches."
    print(table)
    write_outputs(Path(args.out_dir) if args.out_dir else run_dir, f"recover_{start}", table, records,
                  plot_recovery(curves, start, spike))
    log_to_wandb(args, run_dir, f"recover_{start}", [{"step": r["step"], **r["loss"]} for r in records if r["kind"] == "recover"])


def recovery_table(curves: dict[str, Series], raw: Series, start: int, spike: int, window: int,
                   threshold: Threshold) -> tuple[str, list[dict]]:
    """Val loss of each curve at every eval step from ``start``, then for each the spikes past
    ``start`` (its trend seeded by the original before ``start``) and the worst loss up to
    ``window`` evals past the spike."""
    names, steps = list(curves), sorted(set().union(*curves.values()))
    rows = [[str(s)] + [fmt(curves[n].get(s)) for n in names] for s in steps]
    spiked = {n: spikes_after(raw, c, start, window, threshold) for n, c in curves.items()}
    horizon = sorted(s for s in raw if s > spike)[window - 1 : window] or [max(steps)]
    worst = {n: max(v for s, v in c.items() if start < s <= horizon[0]) for n, c in curves.items()}
    rows += [["spikes"] + [", ".join(map(str, spiked[n])) or "none" for n in names],
             [f"worst ≤ {horizon[0]}"] + [fmt(worst[n]) for n in names],
             ["last"] + [fmt(curves[n][max(curves[n])]) for n in names]]
    records = [{"kind": "recover", "step": s, "loss": {n: curves[n][s] for n in names if s in curves[n]}} for s in steps]
    records += [{"kind": "recover_summary", "curve": n, "start": start, "spike": spike, "spikes": spiked[n],
                 "worst": worst[n], "last": curves[n][max(curves[n])]} for n in names]
    return markdown_table(["step"] + names, rows), records


# ---------------------------------------------------------------------------------------------
# zero-shot


def zero_shot_windows(source: Source, args: argparse.Namespace) -> tuple[WindowPlan, list[Window]]:
    """The LAWA windows at ``--steps`` (default: the complete ones nearest 25, 50, 75 and 100%
    of the run), on the snapshots' grid."""
    cfg = source.config
    plan = WindowPlan(args.k or cfg.lawa_k, args.nu or cfg.lawa_nu, snapshot_spacing(source.paths), min(source.paths),
                      steps=tuple(args.steps or ()), weights=args.weights or cfg.lawa_weights)
    windows = plan.windows(source.paths)
    for w in windows:
        if not w.complete and args.steps:
            print(f"note: no LAWA at step {w.step}: no checkpoint at step(s) {list(w.missing)}", file=sys.stderr)
    complete = [w for w in windows if w.complete]
    if not complete:
        raise AnalysisError(f"{source.folder}: no complete LAWA window with {plan.flags()}")
    if args.steps:
        return plan, complete
    chosen = steps_at_fractions([w.step for w in complete], (0.25, 0.5, 0.75, 1))
    return plan, [w for w in complete if w.step in chosen]


def cmd_zeroshot(args: argparse.Namespace) -> None:
    if args.kind != "raw":
        raise AnalysisError(f"--kind={args.kind}: zeroshot scores raw, LAWA, EMA and SWA side by side on its own; "
                            "drop --kind")
    manager = hf.task_manager(args.include_path, args.tasks)  # refuses unknown tasks before any work
    source = open_evaluated(args.path, args)
    plan, windows = zero_shot_windows(source, args)
    snapshots = averaged_snapshots(source.run_dir)
    runtime = init_runtime(source.config.device, source.config.dtype)
    merger = Merger(source.paths, runtime.device, weights=plan.weights)
    merger.check(s for w in windows for s in w.members)
    tokenizer = hf.tokenizer_for(data_meta(source.config.data_dir)["tokenizer"])
    model = hf.gpt2_model(source.model_config, tokenizer, runtime.device)
    lawa = "LAWA" if plan.weights == "uniform" else f"LAWA {plan.weights}"
    print(f"zero-shot {args.tasks} at steps {[w.step for w in windows]}: raw, {lawa} (k={plan.k}, nu={plan.nu})"
          + "".join(f", {kind.upper()}" for kind in snapshots) + ", as GPT2LMHeadModel in memory")

    def load(tensors: TensorStream, origin: str) -> None:
        hf.load_gpt_into(model, tensors, source.model_config, origin)

    evaluate = hf.zero_shot(model, tokenizer, args.tasks, manager, args.batch_size, args.limit)
    models = zero_shot_models(merger, windows, snapshots)
    name = str(source.run_dir or source.folder)
    records = [{"model": name, **r, **({"weights": plan.weights} if r["kind"] == "lawa" else {})}
               for r in score_models(models, load, evaluate, {"newest": "raw", "average": "lawa"})]
    table = hf.zero_shot_table(records, lawa)
    print(table)
    write_outputs(out_dir(args, source), "zeroshot", table, records, None)
    rows: dict[int, dict] = {}
    for r in records:
        metric = hf.primary_metric(r["metrics"])
        if metric is None:
            continue
        rows.setdefault(r["step"], {"step": r["step"]})[f"{r['task']}/{r['kind']}_{metric}"] = r["metrics"][metric]
    log_to_wandb(args, source.run_dir or source.folder, "zeroshot", list(rows.values()))


# ---------------------------------------------------------------------------------------------
# entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="analyze.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("ablation", help="LAWA val loss over a grid of k and nu (appendix A.1)")
    a.add_argument("path", help="a run directory, or a folder of checkpoints named by step")
    a.add_argument("--k", type=int_list(1), default="2,5,10", help="checkpoints per window, e.g. 2,5,10 (default)")
    a.add_argument(
        "--nu",
        type=int_list(1),
        help="steps between a window's checkpoints (default: 1, 2 and 5 x the snapshot spacing)",
    )
    a.add_argument("--interval", type=integer(1), help="steps between evaluations (default: the run's eval_interval)")
    a.add_argument("--start", type=integer(0), default=0, help="first evaluation step (default 0)")
    a.add_argument("--end", type=integer(0), help="last evaluation step (default: the last checkpoint)")
    add_analysis_options(a)
    a.set_defaults(func=cmd_ablation)

    m = sub.add_parser("lmc", help="val loss along the line between two checkpoints (appendix A.3)")
    m.add_argument("path", help="a run directory, or a folder of checkpoints: the evaluation data and --a/--b steps")
    m.add_argument("--a", required=True, help="θa (alpha = 1): a step of PATH, or a checkpoint file / directory")
    m.add_argument("--b", required=True, help="θb (alpha = 0): a step of PATH, or a checkpoint file / directory")
    m.add_argument(
        "--alphas",
        type=float_list,
        default="0,0.2,0.4,0.6,0.8,1",
        help="weights of θa to evaluate (default 0,0.2,...,1); 0 and 1 are always added",
    )
    add_analysis_options(m)
    m.set_defaults(func=cmd_lmc)

    d = sub.add_parser("diversity", help="top-1 disagreement between checkpoints vs their distance (section 2.2)")
    d.add_argument("paths", nargs="+", help="one or more run directories (e.g. a high-LR and a low-LR run)")
    d.add_argument(
        "--anchors", type=int_list(0), help="steps t of the pairs (t, t + d) (default: a quarter and half of the run)"
    )
    d.add_argument(
        "--distances", type=int_list(1), help="distances d (default: 1, 2, 5, 10, ... x the snapshot spacing)"
    )
    add_analysis_options(d)
    d.set_defaults(func=cmd_diversity)

    s = sub.add_parser(
        "spikes", help="steps where the raw val loss jumps above its trend, and LAWA there (section 4.3)"
    )
    s.add_argument(
        "path", help="a training run directory (raw and online LAWA in its metrics.jsonl) or a JSONL written by lawa.py"
    )
    s.add_argument(
        "--window", type=integer(1), default=5, help="trend: the median of this many previous evals (default 5)"
    )
    s.add_argument(
        "--threshold", default="2%", help="a spike exceeds the trend by more than this: 0.05 (loss) or 2%% (default)"
    )
    add_output_options(s)
    s.set_defaults(func=cmd_spikes)

    r = sub.add_parser("recover", help="restart before a loss spike from the raw checkpoint and from the LAWA average")
    r.add_argument("path", help="a training run directory with resume checkpoints and raw snapshots before the spike")
    r.add_argument("--spike", type=integer(1), help="the spike's eval step (default: the first spike found)")
    r.add_argument("--at", type=integer(0), help="the restart step (default: the latest before the spike with a "
                   "resume checkpoint and a complete LAWA window)")
    r.add_argument("--steps", type=integer(1), help="steps to train each restart (default: to ten evals past the spike)")
    add_window_options(r)
    r.add_argument("--reset_optimizer", action="store_true", help="restart both with a fresh AdamW state")
    r.add_argument("--window", type=integer(1), default=5, help="trend: the median of this many previous evals (default 5)")
    r.add_argument("--threshold", default="2%", help="a spike exceeds the trend by more than this (default 2%%)")
    add_output_options(r)
    r.set_defaults(func=cmd_recover)

    z = sub.add_parser("zeroshot", help="zero-shot lm-eval tasks of raw, EMA, SWA and LAWA models (Table 2)")
    z.add_argument("path", help="a run directory (its EMA snapshots, SWA's of <run>-swa), or a folder of checkpoints")
    z.add_argument("--tasks", type=lambda text: [t for t in text.split(",") if t], required=True,
                   help="lm-eval task names, e.g. shakespeare_word_order,shakespeare_passages")
    z.add_argument("--include_path", help="folder of task YAMLs of your own (e.g. data/shakespeare/tasks)")
    z.add_argument("--steps", type=int_list(0), help="steps to score (default: nearest 25, 50, 75 and 100%% of the run)")
    add_window_options(z)
    z.add_argument("--limit", type=integer(1), help="examples per task (default: all)")
    z.add_argument("--batch_size", type=integer(1), default=8, help="sequences per forward pass (default: 8)")
    add_analysis_options(z)
    z.set_defaults(func=cmd_zeroshot)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (AnalysisError, ConfigError, DataError, CheckpointError, InputError, PlanError) as e:
        sys.exit(f"error: {e}")
