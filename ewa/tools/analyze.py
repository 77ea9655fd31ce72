"""The commands of ``analyze.py``: each runs one of the paper's analyses (``ewa.tools.analysis``)
on a run directory or a folder of checkpoints, prints its table and writes the table (``.md``),
its records (``.jsonl``) and its plot (``.png``)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from matplotlib.figure import Figure
from tqdm import tqdm

from ewa.engine.data import data_meta
from ewa.engine.logger import read_metrics
from ewa.engine.runtime import init_runtime
from ewa.files import CheckpointError, atomic_write_text, list_checkpoints, resume_dir, snapshot_dir
from ewa.tools import analysis, hf
from ewa.tools.cli import EvalOptions, InputError, WindowSettings
from ewa.tools.lawa import RUN_KINDS, Checkpoints, build_evaluator, log_to_wandb, open_checkpoints
from ewa.tools.merge import Merger, WindowPlan, score_models
from ewa.tools.report import Curve, eval_curves, markdown_table, read_run_config, save_png
from ewa.tools.stages import Stages, branch_config, train_stage
from ewa.window import Window


@dataclass(frozen=True)
class Output:
    """Where an analysis writes its table, records and plot (default: the run directory), and
    whether it also logs its figures into the run's wandb run."""

    out_dir: str | None = None
    wandb_log: bool = False

    def write(self, home: Path, name: str, table: str, records: list[dict], figure: Figure | None,
              wandb_rows: list[dict], x: str = "step") -> None:
        """``name``.md, .jsonl and (with a figure) .png in ``out_dir`` (default: ``home``), each
        written atomically; with wandb_log, ``wandb_rows`` into the wandb run of ``home`` under
        ``name/``, against its own axis ``name/<x>``."""
        folder = Path(self.out_dir) if self.out_dir else home
        atomic_write_text(folder / f"{name}.md", table.rstrip("\n") + "\n")
        atomic_write_text(folder / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        if figure is not None:
            save_png(figure, folder / f"{name}.png", dpi=110, bbox_inches="tight")
        print(f"wrote {folder / name}.md, .jsonl" + (" and .png" if figure is not None else ""))
        if self.wandb_log:
            log_to_wandb(home, {name: wandb_rows}, x)
            print(f"logged {name}/ into the wandb run in {home}")


def spacing_of(ckpts: Checkpoints) -> int:
    if len(ckpts.paths) < 2:
        raise InputError(f"{ckpts.folder}: holds one checkpoint only; this analysis needs a series of them")
    return analysis.snapshot_spacing(ckpts.paths)


def fmt(value: float | None, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


def analyze_ablation(path: str, ks: list[int], nus: list[int] | None, interval: int | None, start: int, end: int | None,
                     options: EvalOptions, output: Output) -> None:
    """LAWA val loss over a grid of k and nu (appendix A.1, Figure 10); nu defaults to 1, 2 and 5
    times the snapshot spacing, interval to the run's eval_interval."""
    ckpts = open_checkpoints(path, options)
    spacing = spacing_of(ckpts)
    nus = nus or [m * spacing for m in (1, 2, 5)]
    interval = interval or (ckpts.config.eval_interval if ckpts.run_dir else spacing)
    end = max(ckpts.paths) if end is None else end
    settings = [(k, nu) for k in ks for nu in nus]
    plan = analysis.plan_ablation(ckpts.paths, settings, interval, start, end)
    model, evaluator, _ = build_evaluator(ckpts)
    print(f"LAWA ablation over k={ks} x nu={nus} at every {interval} steps from {start} to {end} "
          f"({len(ckpts.paths)} checkpoints in {ckpts.folder}): {plan.evaluations} models to score")
    with tqdm(total=plan.evaluations, desc="ablation", unit="model") as bar:
        result = analysis.run_ablation(ckpts.paths, plan, model, evaluator, bar.update)
    table = ablation_table(result, settings)
    print(table)
    windows = sum(len(c) for c in result.lawa.values())
    naive = sum(k * len(result.lawa[k, nu]) for k, nu in settings)
    print(f"{windows} averages from {result.files_read} checkpoint reads (averaging each window from scratch: {naive})")
    records = [{"kind": "raw", "step": s, "raw": v} for s, v in result.raw.items()]
    records += [{"kind": "ablation", "step": t, "k": k, "nu": nu, "lawa": v}
                for (k, nu), c in result.lawa.items() for t, v in c.items()]
    steps = sorted(result.raw.keys() | {t for c in result.lawa.values() for t in c})
    rows = [{"step": t, "raw": result.raw.get(t), **{f"k{k}_nu{nu}": c.get(t) for (k, nu), c in result.lawa.items()}}
            for t in steps]
    output.write(ckpts.home, "ablation", table, records, plot_ablation(result.raw, result.lawa, ks, nus), rows)


def ablation_table(result: analysis.Ablation, settings: list[tuple[int, int]]) -> str:
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
    rows.append([f"mean Δ {common[0]}–{common[-1]}", ""] + [fmt(gain[s], "+.4f") + "*" * (s == best) for s in settings])
    note = ("mean Δ: LAWA − raw over the steps where every setting has a window; "
            f"* the lowest (k={best[0]}, ν={best[1]})")
    return markdown_table(header, rows) + "\n\n" + note


def resolve_checkpoint(ckpts: Checkpoints, text: str, flag: str) -> tuple[Path, str]:
    """A step of the checkpoints, or a checkpoint file / Hugging Face directory."""
    if text.isdigit() and int(text) in ckpts.paths:
        return ckpts.paths[int(text)], text
    if Path(text).exists():
        return Path(text), Path(text).name.split(".")[0]
    steps = sorted(ckpts.paths)
    raise CheckpointError(f"{flag}={text}: neither a step of {ckpts.folder} (it has {len(steps)} checkpoints, steps "
                          f"{steps[0]}..{steps[-1]}) nor an existing checkpoint file or directory")


def analyze_lmc(path: str, a: str, b: str, alphas: list[float], options: EvalOptions, output: Output) -> None:
    """Val loss along alpha * theta_a + (1 - alpha) * theta_b (appendix A.3, Figure 13), ``a`` and
    ``b`` steps of ``path`` or checkpoint files, and the barrier above the straight line."""
    ckpts = open_checkpoints(path, options)
    path_a, label_a = resolve_checkpoint(ckpts, a, "--a")
    path_b, label_b = resolve_checkpoint(ckpts, b, "--b")
    alphas = sorted(set(alphas) | {0.0, 1.0})
    theta_a, theta_b = analysis.load_pair(path_a, path_b)
    model, evaluator, _ = build_evaluator(ckpts)
    print(f"interpolating α·θa + (1−α)·θb, θa = {path_a}, θb = {path_b}, at α = {alphas}")
    with tqdm(total=len(alphas), desc="interpolation", unit="model") as bar:
        curve = analysis.interpolation_curve(theta_a, theta_b, alphas, model, evaluator, bar.update)
    height, at = analysis.loss_barrier(curve)

    def line(alpha: float) -> float:
        return alpha * curve[1.0] + (1 - alpha) * curve[0.0]

    rows = [[f"{al:g}", fmt(v), fmt(line(al)), fmt(v - line(al), "+.4f")] for al, v in curve.items()]
    table = markdown_table(["α", "val loss", "straight line", "excess"], rows)
    print(table)
    mean_end = (curve[0.0] + curve[1.0]) / 2
    shape = (f"at α={at:g}, {100 * height / mean_end:.1f}% of the endpoints' mean loss" if height > 0
             else "every interpolated model is at or below the straight line: linearly mode connected on this grid")
    print(f"loss barrier {height:.4f} ({shape}); θa={label_a} loss {curve[1.0]:.4f}, "
          f"θb={label_b} loss {curve[0.0]:.4f}")
    pair = {"a": str(path_a), "b": str(path_b)}
    records = [{"kind": "lmc", "alpha": al, "loss": v, **pair} for al, v in curve.items()]
    records.append({"kind": "lmc_barrier", "height": height, "alpha": at, **pair})
    figure = plot_lmc(curve, line, f"θa = {label_a}", f"θb = {label_b}", height, at)
    rows = [{"alpha": al, "loss": v, "straight_line": line(al)} for al, v in curve.items()]
    output.write(ckpts.home, f"lmc_{label_a}_{label_b}", table, records, figure, rows, x="alpha")


def diversity_runs(sources: list[Checkpoints]) -> list[analysis.DiversityRun]:
    """A model and an evaluator per run, refusing runs scored on different held-out tokens."""
    labels = [f"{s.home.name} (lr {s.config.learning_rate:g})" if s.run_dir else s.home.name for s in sources]
    if len(set(labels)) < len(labels):
        labels = [str(s.home) for s in sources]
    runtime = init_runtime(sources[0].config.device, sources[0].config.dtype)
    runs, fingerprints = [], {}
    for label, ckpts in zip(labels, sources):
        model, evaluator, fingerprints[label] = build_evaluator(ckpts, runtime)
        runs.append(analysis.DiversityRun(label, ckpts.paths, model, evaluator))
    if len(set(fingerprints.values())) > 1:
        raise InputError(f"the runs score different held-out tokens (fingerprints {fingerprints}): compare runs on the "
                         "same data, or set --data_dir and --eval_tokens for all of them")
    return runs


def analyze_diversity(paths: list[str], anchors: list[int] | None, distances: list[int] | None, options: EvalOptions,
                      output: Output) -> None:
    """Top-1 disagreement between the checkpoints at steps t and t + d of each run (section 2.2);
    anchors t default to a quarter and half of the run, distances d to 1, 2, 5, 10, ... x the spacing."""
    sources = [open_checkpoints(p, options) for p in paths]
    spacing, first = spacing_of(sources[0]), sorted(sources[0].paths)
    anchors = anchors or analysis.default_anchors(first)
    distances = distances or analysis.default_distances(first, anchors)
    pairs = analysis.plan_pairs(set().union(*(s.paths for s in sources)), anchors, distances)
    if not pairs:
        raise InputError(f"--anchors={anchors} with --distances={distances} give no pair of saved steps "
                         f"(steps {first[0]}..{first[-1]} every {spacing} in {sources[0].folder})")
    runs = diversity_runs(sources)
    positions = runs[0].evaluator.local[:, 1:].numel()
    print(f"top-1 disagreement on {positions:,} held-out positions, pairs (t, t + d) for t in {anchors}, "
          f"d in {distances}")
    with tqdm(total=sum(len(r.steps_in(pairs)) for r in runs), desc="predictions", unit="model") as bar:
        records = analysis.run_diversity(runs, pairs, bar.update)
    for run in runs:
        if lacking := [p for p in pairs if not set(p) <= run.paths.keys()]:
            print(f"note: {run.label} lacks the checkpoints of {len(lacking)} pair(s), e.g. steps {lacking[0]}")
    table, columns = diversity_table(records, [r.label for r in runs], anchors, distances)
    print("disagreement (%) between the checkpoints at steps t and t + distance:")
    print(table)
    rows = [{"distance": d} | {f"{r['run']} t={r['a']}": 100 * r["disagreement"] for r in records if r["distance"] == d}
            for d in dict.fromkeys(r["distance"] for r in records)]
    output.write(sources[0].home, "diversity", table, records, plot_diversity(records, columns), rows, x="distance")


def diversity_table(records: list[dict], labels: list[str], anchors: list[int],
                    distances: list[int]) -> tuple[str, list[tuple[str, int]]]:
    """Disagreement (%) with a row per distance and a column per (run, anchor) that has pairs."""
    by = {(r["run"], r["a"], r["distance"]): 100 * r["disagreement"] for r in records}
    columns = [(label, t) for label in labels for t in anchors if any(key[:2] == (label, t) for key in by)]
    rows = [[str(d)] + [fmt(by.get((label, t, d)), ".2f") for label, t in columns] for d in distances]
    return markdown_table(["distance"] + [f"{label} t={t}" for label, t in columns], rows), columns


def read_curves(path: Path) -> tuple[Curve, Curve, str]:
    """Raw and LAWA val loss: from a lawa.py JSONL (both at its window steps), or from a run
    directory's metrics.jsonl (its eval records and their online ``lawa`` column)."""
    if path.is_file():
        records = [r for r in read_metrics(path) if r.get("kind") == "lawa"]
        if not records:
            raise InputError(f"{path}: no LAWA records; pass a JSONL written by lawa.py, or a run directory")
        return {r["step"]: r["raw"] for r in records}, {r["step"]: r["lawa"] for r in records}, f"LAWA ({path.name})"
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        raise InputError(f"{metrics} not found: pass a training run directory or a JSONL written by lawa.py")
    evals = eval_curves(metrics)
    lawa = evals.get("lawa", {})
    if not lawa:
        raise InputError(f"{metrics} has no online LAWA column: run `python lawa.py {path}` and pass the "
                         f"{path}/lawa_k<k>_nu<nu>.jsonl it writes, or train with --lawa_online=True")
    return evals.get("raw", {}), lawa, "online LAWA"


def analyze_spikes(path: str, window: int, threshold: analysis.Threshold, output: Output) -> None:
    """Steps where the raw val loss exceeds the median of the previous ``window`` evals by more
    than ``threshold``, and whether LAWA spikes there too (section 4.3)."""
    path = Path(path)
    raw, lawa, lawa_name = read_curves(path)
    rows = analysis.compare_spikes(raw, lawa, window, threshold)
    verdict = {True: "yes", False: "no", None: "—"}
    cells = [[str(r["step"]), fmt(r["raw"]), fmt(r["raw_trend"]), fmt(r["lawa"]), fmt(r["lawa_trend"]),
              verdict[r["lawa_spiked"]]] for r in rows]
    table = markdown_table(["step", "raw", "raw trend", "LAWA", "LAWA trend", "LAWA spikes"], cells)
    print(f"spikes: val loss above the median of the previous {window} evals by more than {threshold}")
    print(table)
    spiked = [r["step"] for r in rows if r["lawa_spiked"]]
    unseen = [r["step"] for r in rows if r["lawa_spiked"] is None]
    print(f"raw: {len(rows)} spike(s) in {len(raw)} evals; {lawa_name} spikes at {len(spiked)} of them {spiked}"
          + (f", has no value or trend at {unseen}" if unseen else "")
          + f"; LAWA spikes of its own: {len(analysis.find_spikes(lawa, window, threshold))} in {len(lawa)} evals")
    folder = path if path.is_dir() else path.parent
    output.write(folder, "spikes", table, rows, plot_spikes(raw, lawa, rows, window, lawa_name), rows)


def analyze_recovery(path: str, spike: int | None, at: int | None, steps: int | None, lawa: WindowSettings,
                     reset_optimizer: bool, window: int, threshold: analysis.Threshold, output: Output) -> None:
    """Restart the run before a spike from its raw checkpoint and from the LAWA average of the
    window ending there (branches ``<run>-recover-<t>-raw`` and ``-lawa``, reused by a re-run)."""
    run_dir = Path(path)
    if not (run_dir / "config.json").exists():
        raise InputError(f"{run_dir / 'config.json'} not found: pass a training run directory")
    cfg = read_run_config(run_dir)
    plan = lawa.plan(cfg)
    cfg = cfg.replace(lawa_k=plan.k, lawa_nu=plan.nu, lawa_weights=plan.weights)
    raw = eval_curves(run_dir / "metrics.jsonl").get("raw", {})
    spikes = analysis.find_spikes(raw, window, threshold)
    if spike is None and not spikes:
        raise InputError(f"{run_dir}: no spike above its trend by {threshold}: lower --threshold, "
                         "or pass --spike=<step>")
    spike = min(spikes) if spike is None else spike
    start = at if at is not None else analysis.restart_step(
        spike, list_checkpoints(resume_dir(run_dir)), list_checkpoints(snapshot_dir(run_dir)), cfg.lawa_k, cfg.lawa_nu)
    steps = steps or min(cfg.max_steps - start, spike - start + 10 * cfg.eval_interval)
    name = f"LAWA k={cfg.lawa_k} ν={cfg.lawa_nu}" + ("" if cfg.lawa_weights == "uniform" else f" {cfg.lawa_weights}")
    print(f"restarting {run_dir} at step {start}, before the spike at {spike}, for {steps} steps: from the raw "
          f"checkpoint and from the {name} average" + (", with a fresh AdamW state" if reset_optimizer else ""))
    stages = Stages(run_dir, fresh=False)
    curves = {"original": {s: v for s, v in raw.items() if start <= s <= start + steps}}
    for weights, label in (("raw", "restart from raw"), ("lawa", f"restart from {name}")):
        branch_name = f"recover-{start}-{weights}" + ("-reset" if reset_optimizer else "")
        branch = branch_config(cfg, run_dir, start, steps, branch_name, branch_weights=weights,
                               branch_reset_optimizer=reset_optimizer, resume_interval=steps)
        evals = eval_curves(train_stage(stages, branch_name, branch, cfg.to_dict()) / "metrics.jsonl").get("raw", {})
        curves[label] = {start: raw[start], **evals}  # a raw restart starts from the original's weights at `start`
    table, records = recovery_table(curves, raw, start, spike, window, threshold)
    if all(curves["restart from raw"].get(s, v) == v for s, v in curves["original"].items()):
        table += "\n\nThe restart from raw equals the original at every step: it replays the same batches."
    print(table)
    rows = [{"step": r["step"], **r["loss"]} for r in records if r["kind"] == "recover"]
    output.write(run_dir, f"recover_{start}", table, records, plot_recovery(curves, start, spike), rows)


def recovery_table(curves: dict[str, Curve], raw: Curve, start: int, spike: int, window: int,
                   threshold: analysis.Threshold) -> tuple[str, list[dict]]:
    """Val loss of each curve at every eval step from ``start``, then for each the spikes past
    ``start`` (its trend seeded by the original before ``start``) and the worst loss up to
    ``window`` evals past the spike."""
    names, steps = list(curves), sorted(set().union(*curves.values()))
    rows = [[str(s)] + [fmt(curves[n].get(s)) for n in names] for s in steps]
    spiked = {n: analysis.spikes_after(raw, c, start, window, threshold) for n, c in curves.items()}
    horizon = sorted(s for s in raw if s > spike)[window - 1 : window] or [max(steps)]
    worst = {n: max(v for s, v in c.items() if start < s <= horizon[0]) for n, c in curves.items()}
    rows += [["spikes"] + [", ".join(map(str, spiked[n])) or "none" for n in names],
             [f"worst ≤ {horizon[0]}"] + [fmt(worst[n]) for n in names],
             ["last"] + [fmt(curves[n][max(curves[n])]) for n in names]]
    records = [{"kind": "recover", "step": s, "loss": {n: c[s] for n, c in curves.items() if s in c}} for s in steps]
    records += [{"kind": "recover_summary", "curve": n, "start": start, "spike": spike, "spikes": spiked[n],
                 "worst": worst[n], "last": curves[n][max(curves[n])]} for n in names]
    return markdown_table(["step"] + names, rows), records


def zero_shot_windows(ckpts: Checkpoints, lawa: WindowSettings,
                      steps: list[int] | None) -> tuple[WindowPlan, list[Window]]:
    """The LAWA windows at ``steps`` (default: the complete ones nearest 25, 50, 75 and 100% of
    the run), on the snapshots' grid."""
    grid = replace(lawa, interval=analysis.snapshot_spacing(ckpts.paths), start=min(ckpts.paths))
    plan = replace(grid.plan(ckpts.config), steps=tuple(steps or ()))
    windows = plan.windows(ckpts.paths)
    for w in windows:
        if not w.complete and steps:
            print(f"note: no LAWA at step {w.step}: no checkpoint at step(s) {list(w.missing)}", file=sys.stderr)
    complete = [w for w in windows if w.complete]
    if not complete:
        raise InputError(f"{ckpts.folder}: no complete LAWA window with {plan.flags()}")
    chosen = steps or analysis.steps_at_fractions([w.step for w in complete], (0.25, 0.5, 0.75, 1))
    return plan, [w for w in complete if w.step in chosen]


def analyze_zero_shot(path: str, tasks: list[str], include_path: str | None, steps: list[int] | None,
                      lawa: WindowSettings, limit: int | None, batch_size: int, options: EvalOptions,
                      output: Output) -> None:
    """Zero-shot lm-eval tasks of the raw, LAWA, EMA and SWA models at a few steps (Table 2), each
    as ``GPT2LMHeadModel`` in memory."""
    if options.kind != "raw":
        raise InputError(f"--kind={options.kind}: zeroshot scores raw, LAWA, EMA and SWA side by side on its own; "
                         "drop --kind")
    manager = hf.task_manager(include_path, tasks)  # refuses unknown tasks before any work
    ckpts = open_checkpoints(path, options)
    plan, windows = zero_shot_windows(ckpts, lawa, steps)
    snapshots = analysis.averaged_snapshots(ckpts.run_dir)
    runtime = init_runtime(ckpts.config.device, ckpts.config.dtype)
    merger = Merger(ckpts.paths, runtime.device, weights=plan.weights)
    merger.check(s for w in windows for s in w.members)
    tokenizer = hf.tokenizer_for(data_meta(ckpts.config.data_dir)["tokenizer"])
    model = hf.gpt2_model(ckpts.model_config, tokenizer, runtime.device)
    name = "LAWA" if plan.weights == "uniform" else f"LAWA {plan.weights}"
    print(f"zero-shot {tasks} at steps {[w.step for w in windows]}: raw, {name} (k={plan.k}, nu={plan.nu})"
          + "".join(f", {kind.upper()}" for kind in snapshots) + ", as GPT2LMHeadModel in memory")
    load = partial(hf.copy_gpt_into_hf_model, model, ckpts.model_config)
    evaluate = hf.zero_shot_evaluation(model, tokenizer, tasks, manager, batch_size, limit)
    scored = score_models(analysis.zero_shot_models(merger, windows, snapshots), load, evaluate, RUN_KINDS)
    records = [{"model": str(ckpts.home), **r, **({"weights": plan.weights} if r["kind"] == "lawa" else {})}
               for r in scored]
    table = hf.zero_shot_table(records, name)
    print(table)
    rows: dict[int, dict] = {}
    for r in records:
        metric = hf.primary_metric(r["metrics"])
        if metric is not None:
            rows.setdefault(r["step"], {"step": r["step"]})[f"{r['task']}/{r['kind']}_{metric}"] = r["metrics"][metric]
    output.write(ckpts.home, "zeroshot", table, records, None, list(rows.values()))


# -- figures: each a matplotlib ``Figure`` built without pyplot (no global state, no display backend)


def finish_figure(fig: Figure, ax, xlabel: str, ylabel: str, title: str) -> Figure:
    """Labels, a light grid, a small legend and a tight layout."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def loss_limits(values: list[float], below: float = 0.05, above: float = 0.1) -> tuple[float, float]:
    """Y limits around the finite ``values`` (0..1 when there are none), with margins below and above."""
    shown = [v for v in values if math.isfinite(v)] or [0.0, 1.0]
    low, high = min(shown), max(shown)
    return low - below * (high - low), high + above * (high - low)


def plot_ablation(raw: Curve, lawa: dict[tuple[int, int], Curve], ks: list[int], nus: list[int]) -> Figure:
    """Per k: val loss of the raw model and of LAWA for each nu (top), and LAWA − raw (bottom)."""
    fig = Figure(figsize=(4.2 * len(ks), 6.4))
    axes = fig.subplots(2, len(ks), sharex=True, sharey="row", squeeze=False)
    first = min(min(c) for c in lawa.values())  # the loss's early fall, before any window, stays off the top row
    limits = loss_limits([v for c in (raw, *lawa.values()) for s, v in c.items() if s >= first], 0.02, 0.05)
    for col, k in enumerate(ks):
        top, bottom = axes[0, col], axes[1, col]
        top.plot(list(raw), list(raw.values()), color="black", lw=1.5, label="raw")
        for nu in nus:
            curve = lawa[k, nu]
            top.plot(list(curve), list(curve.values()), marker=".", label=f"ν={nu}")
            bottom.plot(list(curve), [v - raw[s] for s, v in curve.items()], marker=".", label=f"ν={nu}")
        bottom.axhline(0, color="black", lw=1)
        top.set_title(f"LAWA k={k}")
        top.set_ylim(*limits)
        bottom.set_xlabel("step")
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
    axes[0, 0].set_ylabel("val loss")
    axes[1, 0].set_ylabel("LAWA − raw val loss")
    axes[0, -1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_lmc(curve: dict[float, float], line: Callable[[float], float], a: str, b: str, height: float,
             at: float) -> Figure:
    """Loss along the interpolation, the straight line between the endpoints, and the barrier."""
    fig = Figure(figsize=(5.2, 3.8))
    ax = fig.subplots()
    ax.plot(list(curve), list(curve.values()), marker="o", label="α·θa + (1−α)·θb")
    ax.plot([0, 1], [line(0), line(1)], ls="--", color="gray", label="straight line between endpoints")
    if height > 0:
        ax.vlines(at, line(at), curve[at], color="red", label=f"barrier at α={at:g}")
    title = f"Linear mode connectivity: loss barrier {height:.4f}"
    return finish_figure(fig, ax, f"α   (0: {b}, 1: {a})", "val loss", title)


def plot_diversity(records: list[dict], columns: list[tuple[str, int]]) -> Figure:
    """Disagreement against distance: a colour per run, a line style per anchor."""
    fig = Figure(figsize=(5.8, 4.0))
    ax = fig.subplots()
    colors = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(label for label, _ in columns))}
    styles = {t: s for t, s in zip(sorted({t for _, t in columns}), ["-", "--", ":", "-."] * 8)}
    for label, t in columns:
        points = sorted((r["distance"], 100 * r["disagreement"]) for r in records if r["run"] == label and r["a"] == t)
        ax.plot(*zip(*points), marker="o", color=colors[label], ls=styles[t], label=f"{label}, t={t}")
    distances = sorted({r["distance"] for r in records})
    ax.set_xscale("log")
    ax.set_xticks(distances, [str(d) for d in distances])
    ax.minorticks_off()
    return finish_figure(fig, ax, "distance d between the checkpoints (steps)", "top-1 disagreement (%)",
                         "Checkpoint diversity: steps t and t + d")


def plot_spikes(raw: Curve, lawa: Curve, rows: list[dict], window: int, lawa_name: str) -> Figure:
    """Both curves and their trends, a circle at each raw spike and a cross where LAWA spikes too.
    The y range is that of the steps LAWA covers, so the loss's early fall does not flatten the rest."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for series, name, color in ((raw, "raw", "C0"), (lawa, lawa_name, "C1")):
        ax.plot(list(series), list(series.values()), color=color, marker=".", label=name)
        own = analysis.trend(series, window)
        ax.plot(list(own), list(own.values()), color=color, ls=":", lw=1, label=f"{name} trend")
    low, high = loss_limits([v for s, v in (*raw.items(), *lawa.items()) if s >= min(lawa)], 0, 0)
    for r in rows:
        ax.plot(r["step"], min(r["raw"], high), "o", mfc="none", mec="red", ms=10)
        if r["lawa_spiked"]:
            ax.plot(r["step"], min(r["lawa"], high), "x", color="red", ms=8)
    ax.plot([], [], "o", mfc="none", mec="red", label="raw spike")
    ax.set_ylim(low - 0.05 * (high - low), high + 0.1 * (high - low))
    return finish_figure(fig, ax, "step", "val loss", "Loss spikes: raw vs LAWA")


def plot_recovery(curves: dict[str, Curve], start: int, spike: int) -> Figure:
    """Val loss of the original run and of each restart from step ``start``, with the spike."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for i, (name, series) in enumerate(curves.items()):
        ax.plot(list(series), list(series.values()), color=f"C{i}", marker=".", label=name,
                lw=2.5 if i == 0 else 1.5, alpha=0.6 if i == 0 else 1.0)
    ax.axvline(start, color="gray", ls=":", lw=1, label=f"restart at {start}")
    ax.axvline(spike, color="red", ls=":", lw=1, label=f"spike at {spike}")
    ax.set_ylim(*loss_limits([v for c in curves.values() for v in c.values()]))
    return finish_figure(fig, ax, "step", "val loss", "Restarting before a loss spike: raw vs LAWA")
