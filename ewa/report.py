"""The comparison report of a run: val loss of Original, EMA, SWA and LAWA at each eval step,
LAWA's gain at 25/50/75/100% of training, the steps LAWA saves, and the paper-style plots.

Works on any run directory of this project; siblings are found by name:
    <run>/metrics.jsonl              Original ("raw"), EMA, online LAWA
    <run>/lawa_k<k>_nu<nu>.jsonl     offline LAWA (lawa.py)
    <run>-swa/metrics.jsonl          SWA (train_swa.py)
    <run>-cooldown-<t>/              LR cooldowns branched at step t (the pipeline)

    python report.py out/small [--assets=assets]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ewa.checkpoint import atomic_write, atomic_write_text
from ewa.logger import read_metrics

Curve = dict[int, float]  # step -> val loss
FRACTIONS = (0.25, 0.5, 0.75, 1.0)


@dataclass
class RunCurves:
    run_dir: Path
    max_steps: int
    tokens_per_step: int
    curves: dict[str, Curve]  # "Original", "EMA", "SWA", "LAWA k=5 nu=200", ...
    cooldowns: dict[int, dict]  # branch step -> {"steps": extra steps, "loss": final val loss}

    def lawa_names(self) -> list[str]:
        return [n for n in self.curves if n.startswith("LAWA")]


def _eval_curves(metrics: Path) -> dict[str, Curve]:
    curves: dict[str, Curve] = {}
    for r in read_metrics(metrics):
        if r.get("kind") == "eval":
            for key, value in r.items():
                if key not in ("kind", "step", "tokens"):
                    curves.setdefault(key, {})[r["step"]] = value
    return curves


def load_run(run_dir: str | Path) -> RunCurves:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl not found: is {run_dir} a run directory of train_*.py?")
    config = json.loads((run_dir / "config.json").read_text())
    own = _eval_curves(run_dir / "metrics.jsonl")
    curves = {"Original": own.get("raw", {})}
    if "ema" in own:
        curves["EMA"] = own["ema"]
    swa = _eval_curves(run_dir.with_name(run_dir.name + "-swa") / "metrics.jsonl").get("swa")
    if swa:
        curves["SWA"] = swa
    for path in sorted(run_dir.glob("lawa_k*_nu*.jsonl"), key=_lawa_order):
        k, nu, weights = _lawa_order(path)
        curve = {r["step"]: r["lawa"] for r in read_metrics(path) if r.get("kind") == "lawa"}
        if curve:
            curves[f"LAWA k={k} nu={nu}" + (f" {weights}" if weights else "")] = curve
    weights = config.get("lawa_weights", "uniform")
    online = f"LAWA k={config['lawa_k']} nu={config['lawa_nu']}" + (
        "" if weights == "uniform" else " " + weights.replace(":", "")
    )
    if "lawa" in own and online not in curves:  # offline figures equal online ones: show one
        curves[online] = own["lawa"]
    return RunCurves(run_dir, config["max_steps"], config["tokens_per_step"], curves, _cooldowns(run_dir))


def _lawa_order(path: Path) -> tuple[int, int, str]:
    """(k, nu, weights) of a lawa.py result (``lawa_k5_nu10.jsonl``, ``lawa_k5_nu10_1-sqrt.jsonl``)."""
    k, nu, weights = re.fullmatch(r"lawa_k(\d+)_nu(\d+)(?:_(.+))?\.jsonl", path.name).groups()
    return int(k), int(nu), weights or ""


def _cooldowns(run_dir: Path) -> dict[int, dict]:
    found = {}
    for branch in run_dir.parent.glob(f"{run_dir.name}-cooldown-*"):
        evals = _eval_curves(branch / "metrics.jsonl").get("raw", {})
        config_file = branch / "config.json"
        if not evals or not config_file.exists():
            continue
        cfg = json.loads(config_file.read_text())
        start = cfg["max_steps"] - cfg["cooldown_steps"]
        if cfg["max_steps"] in evals:
            found[start] = {"steps": cfg["cooldown_steps"], "loss": evals[cfg["max_steps"]]}
    return dict(sorted(found.items()))


# ---------------------------------------------------------------------------------------------
# figures


def nearest_step(curve: Curve, target: float) -> int | None:
    return min(curve, key=lambda s: (abs(s - target), -s)) if curve else None


def gains_at_fractions(original: Curve, lawa: Curve, max_steps: int) -> list[dict]:
    """Original minus LAWA val loss at the eval steps nearest 25/50/75/100% of training."""
    common = {s: original[s] - lawa[s] for s in original.keys() & lawa.keys()}
    rows = []
    for f in FRACTIONS:
        step = nearest_step(common, f * max_steps)
        if step is not None:
            rows.append(
                {"fraction": f, "step": step, "original": original[step], "lawa": lawa[step], "gain": common[step]}
            )
    return rows


def first_step_reaching(curve: Curve, target: float) -> float | None:
    """The (linearly interpolated) first step at which ``curve`` falls to ``target`` or below."""
    points = sorted(curve.items())
    for i, (step, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return float(step)
            s0, l0 = points[i - 1]
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
    return None


def steps_saved(original: Curve, lawa: Curve) -> dict:
    """How many fewer steps LAWA needs to reach the Original's final val loss."""
    final_step = max(original)
    target = original[final_step]
    reached = first_step_reaching(lawa, target)
    saved = None if reached is None else final_step - reached
    return {"target": target, "final_step": final_step, "lawa_step": reached, "saved": saved}


def markdown_table(run: RunCurves) -> str:
    names = list(run.curves)
    steps = sorted(set().union(*(c.keys() for c in run.curves.values())))
    lines = ["| step | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for s in steps:
        cells = [f"{run.curves[n][s]:.4f}" if s in run.curves[n] else "" for n in names]
        best = min((run.curves[n][s], n) for n in names if s in run.curves[n])[1]
        cells = [f"**{c}**" if n == best and c else c for c, n in zip(cells, names)]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(run: RunCurves) -> str:
    original = run.curves["Original"]
    out = []
    for name in run.lawa_names():
        lawa = run.curves[name]
        rows = gains_at_fractions(original, lawa, run.max_steps)
        gains = ", ".join(f"{int(100 * r['fraction'])}% (step {r['step']}): {r['gain']:+.4f}" for r in rows)
        saved = steps_saved(original, lawa)
        if saved["saved"] is None:
            reach = f"does not reach the Original's final {saved['target']:.4f}"
        else:
            pct = 100 * saved["saved"] / saved["final_step"]
            reach = (
                f"reaches the Original's final {saved['target']:.4f} at step {saved['lawa_step']:.0f}: "
                f"{saved['saved']:.0f} steps ({pct:.0f}%) saved"
            )
        out.append(f"- **{name}**: gain over Original at {gains}; {reach}.")
    return "\n".join(out)


def cooldown_table(run: RunCurves) -> str:
    """Beyond the paper: LAWA at t (no extra training) vs an LR cooldown started from the raw
    checkpoint at t (extra steps), the baseline for 'averaging stands in for LR decay'."""
    if not run.cooldowns:
        return ""
    lawa_names = run.lawa_names()
    header = (
        "| t | Original at t | " + " | ".join(f"{n} at t" for n in lawa_names) + " | cooldown from t | cooldown steps |"
    )
    lines = [header, "|---:|---:|" + "---:|" * len(lawa_names) + "---:|---:|"]
    for t, cd in run.cooldowns.items():
        lawa = [f"{run.curves[n][t]:.4f}" if t in run.curves[n] else "" for n in lawa_names]
        orig = run.curves["Original"].get(t)
        lines.append(
            f"| {t} | {'' if orig is None else f'{orig:.4f}'} | "
            + " | ".join(lawa)
            + f" | {cd['loss']:.4f} | +{cd['steps']} |"
        )
    return "\n".join(lines)


def render(run: RunCurves, extra: str = "") -> str:
    parts = [
        f"# Report: {run.run_dir}",
        f"Validation loss on the run's fixed held-out tokens ({run.max_steps} steps of "
        f"{run.tokens_per_step:,} tokens; the best value of each row in bold).",
        markdown_table(run),
        "## Summary",
        summary(run) or "No LAWA curve found (run lawa.py on this run, or train with lawa_online=True).",
    ]
    cooldown = cooldown_table(run)
    if cooldown:
        parts += ["## LAWA vs an LR cooldown from the same checkpoint", cooldown]
    if extra:
        parts.append(extra)
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# plots


def _plot(
    series: dict[str, Curve], path: Path, title: str, tokens_per_step: int, baseline: str | None = "Original"
) -> None:
    """Val loss curves, and below them each curve minus ``baseline`` (small gains are visible)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if baseline in series else 1
    fig, axes = plt.subplots(
        rows,
        1,
        figsize=(7, 3.2 + 2.2 * (rows - 1)),
        dpi=120,
        sharex=True,
        gridspec_kw={"height_ratios": [3, 2][:rows]},
        squeeze=False,
    )
    top = axes[0, 0]
    values = []
    for name, curve in series.items():
        steps = sorted(s for s in curve if s > 0)
        top.plot(steps, [curve[s] for s in steps], label=name, marker="o", ms=3, lw=1.6)
        values += [curve[s] for s in steps]
        if rows == 2:
            shared = [s for s in steps if s in series[baseline]]
            axes[1, 0].plot(shared, [curve[s] - series[baseline][s] for s in shared], marker="o", ms=3, lw=1.6)
    if values:  # leave out the first evals, where every curve is far above the rest
        lo, hi = min(values), sorted(values)[int(0.9 * (len(values) - 1))]
        top.set_ylim(lo - 0.05 * (hi - lo), hi + 0.1 * (hi - lo))
    top.set_ylabel("validation loss")
    top.set_title(title)
    top.legend()
    if rows == 2:
        axes[1, 0].axhline(0, color="gray", lw=0.8)
        axes[1, 0].set_ylabel(f"minus {baseline}")
    axes[-1, 0].set_xlabel(f"training step ({tokens_per_step:,} tokens each)")
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_ema_swa(run: RunCurves, path: Path) -> None:
    keep = {n: run.curves[n] for n in ("Original", "EMA", "SWA") if n in run.curves}
    _plot(keep, path, "Original vs EMA vs SWA", run.tokens_per_step)


def plot_lawa(run: RunCurves, path: Path) -> None:
    keep = {"Original": run.curves["Original"], **{n: run.curves[n] for n in run.lawa_names()}}
    _plot(keep, path, "Original vs LAWA", run.tokens_per_step)


def plot_lr_compare(high: RunCurves, low: RunCurves, path: Path, lawa_name: str) -> None:
    series = {}
    for run, label in ((high, "high LR"), (low, "low LR")):
        series[f"Original, {label}"] = run.curves["Original"]
        if lawa_name in run.curves:
            series[f"LAWA, {label}"] = run.curves[lawa_name]
    _plot(series, path, "LAWA gain at a high and a low learning rate", high.tokens_per_step, baseline=None)


def lr_compare_text(high: RunCurves, low: RunCurves, high_lr: float, low_lr: float, lawa_name: str) -> str:
    lines = [
        "## Learning-rate comparison (the paper's Figure 2)",
        f"| LR | step | Original | {lawa_name} | gain |",
        "|---:|---:|---:|---:|---:|",
    ]
    for run, lr in ((high, high_lr), (low, low_lr)):
        if lawa_name not in run.curves:
            continue
        for r in gains_at_fractions(run.curves["Original"], run.curves[lawa_name], run.max_steps):
            lines.append(f"| {lr:g} | {r['step']} | {r['original']:.4f} | {r['lawa']:.4f} | {r['gain']:+.4f} |")
    return "\n".join(lines)


def write_report(run_dir: str | Path, assets: str | Path | None = None, extra: str = "") -> str:
    """report.md and the two plots in the run directory (and copies of the plots in ``assets``)."""
    run = load_run(run_dir)
    text = render(run, extra)
    atomic_write_text(run.run_dir / "report.md", text)
    for folder in [run.run_dir] + ([Path(assets)] if assets else []):
        plot_ema_swa(run, Path(folder) / "ema_swa.png")
        plot_lawa(run, Path(folder) / "lawa.png")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="report.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir")
    parser.add_argument("--assets", help="also write the plots here (e.g. assets)")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.run_dir, args.assets))
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    print(
        f"wrote {Path(args.run_dir) / 'report.md'}, ema_swa.png and lawa.png"
        + (f" (plots also in {args.assets})" if args.assets else "")
    )
