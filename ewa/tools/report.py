"""The comparison report of a run: val loss of Original, EMA, SWA and LAWA at each eval step,
LAWA's gain at 25/50/75/100% of training, the steps LAWA saves, LAWA against EMA at the
paper's decay and at a matched horizon, and the paper-style plots; also the markdown tables
and PNG files that every tool writes.

**Horizon-matched EMA.** An EMA updated every step with decay d gives the weights of j steps
ago the coefficient (1 - d) d^j: their mean age is d / (1 - d) steps. A LAWA window's members
are (k - i) nu steps old with coefficients c_i (``ewa.tools.merge.merge_weights``): mean age
sum_i c_i (k - i) nu, which is (k - 1) nu / 2 for the uniform window. The horizon-matched EMA
has the window's mean age: d = a / (1 + a) (``horizon_matched_decay``). Why the mean age: on a
trajectory moving at a steady velocity v, any average whose coefficients sum to 1 lags the
newest weights by v times its mean age, so two averages of equal mean age sit at the same point
of the path, and what is left to compare is the shape of their weights: how much noise each
removes. (For the uniform window it is also the classic alpha = 2 / (N + 1) of an N-point moving
average, N = (k - 1) nu + 1 steps.)

Works on any run directory of this project; siblings are found by name:
    <run>/metrics.jsonl              Original ("raw"), EMA, online LAWA
    <run>/lawa_k<k>_nu<nu>.jsonl     offline LAWA (lawa.py)
    <run>-swa/metrics.jsonl          SWA (train_swa.py)
    <run>-cooldown-<t>/              LR cooldowns branched at step t (the pipeline)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from ewa.engine.config import TrainConfig, config_from_dict
from ewa.engine.logger import read_metrics
from ewa.files import atomic_write, atomic_write_text
from ewa.window import merge_weights

Curve = dict[int, float]  # step -> val loss
FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def markdown_table(header: list[str], rows: list[list[str]], left: tuple[int, ...] = (), padded: bool = True) -> str:
    """A markdown table, its columns right-aligned but those in ``left``. ``padded``: each cell
    right-justified to its column's width, so that the table also reads as plain text."""
    widths = [max(map(len, column)) if padded else 0 for column in zip(header, *rows)]
    rule = ["-" * (w + 1 if padded else 3) + ("" if i in left else ":") for i, w in enumerate(widths)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join(rule) + "|", *map(line, rows)])


def save_png(fig: Figure, path: str | Path, **kwargs) -> None:
    """``fig`` as a PNG file, written atomically (``kwargs``: savefig's, e.g. dpi)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", **kwargs))


def mean_age(k: int, nu: int, weights: str = "uniform") -> float:
    """Mean age in steps of a LAWA window's members, weighted by the merge's coefficients."""
    return nu * sum(c * (k - i) for i, c in enumerate(merge_weights(weights, k), 1))


def ema_age(decay: float) -> float:
    """Mean age in steps of an EMA updated every step: sum_j j (1 - d) d^j = d / (1 - d)."""
    return decay / (1 - decay)


def horizon_matched_decay(k: int, nu: int, weights: str = "uniform") -> float:
    """The EMA decay whose mean age equals the LAWA window's: d / (1 - d) = mean_age(k, nu)."""
    age = mean_age(k, nu, weights)
    return age / (1 + age)


@dataclass
class Horizon:
    """The run's LAWA window and the EMA of the same mean age, when the run keeps one."""

    lawa: str  # the LAWA curve, e.g. "LAWA k=5 nu=10"
    age: float  # the mean age of its members, in steps
    decay: float  # the horizon-matched decay
    ema: str | None  # the run's EMA curve within 1% of that mean age


@dataclass
class RunCurves:
    run_dir: Path
    max_steps: int
    tokens_per_step: int
    curves: dict[str, Curve]  # "Original", "EMA", "EMA 0.952381", "SWA", "LAWA k=5 nu=200", ...
    cooldowns: dict[int, dict]  # branch step -> {"steps": extra steps, "loss": final val loss, "curve": its evals}
    ema_decays: dict[str, float]  # EMA curve -> its decay
    horizon: Horizon

    def lawa_names(self) -> list[str]:
        return [n for n in self.curves if n.startswith("LAWA")]

    def ema_names(self) -> list[str]:
        return [n for n in self.curves if n in self.ema_decays]

    def label(self, name: str) -> str:
        """A curve's column header: the horizon-matched EMA says so."""
        return f"{name} (horizon-matched)" if name == self.horizon.ema else name


def read_run_config(run_dir: str | Path) -> TrainConfig:
    return config_from_dict(json.loads((Path(run_dir) / "config.json").read_text()))


def eval_curves(metrics: Path) -> dict[str, Curve]:
    """Every figure of the eval records of a metrics.jsonl (raw, ema, lawa, ...), by step."""
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
    cfg = read_run_config(run_dir)
    own = eval_curves(run_dir / "metrics.jsonl")
    decays = {_ema_name(name): d for name, d in cfg.emas().items() if name in own}
    curves = {"Original": own.get("raw", {}), **{_ema_name(name): own[name] for name in cfg.emas() if name in own}}
    if swa := eval_curves(run_dir.with_name(run_dir.name + "-swa") / "metrics.jsonl").get("swa"):
        curves["SWA"] = swa
    for path in sorted(run_dir.glob("lawa_k*_nu*.jsonl"), key=_lawa_order):
        k, nu, weights = _lawa_order(path)
        if curve := {r["step"]: r["lawa"] for r in read_metrics(path) if r.get("kind") == "lawa"}:
            curves[f"LAWA k={k} nu={nu}" + (f" {weights}" if weights else "")] = curve
    weights = "" if cfg.lawa_weights == "uniform" else " " + cfg.lawa_weights.replace(":", "")
    online = f"LAWA k={cfg.lawa_k} nu={cfg.lawa_nu}{weights}"
    if "lawa" in own and online not in curves:  # offline figures equal online ones: show one
        curves[online] = own["lawa"]
    age = mean_age(cfg.lawa_k, cfg.lawa_nu, cfg.lawa_weights)
    matched = [n for n, d in decays.items() if abs(ema_age(d) - age) <= 0.01 * max(age, 1.0)]
    horizon = Horizon(online, age, age / (1 + age), matched[0] if matched else None)
    return RunCurves(run_dir, cfg.max_steps, cfg.tokens_per_step, curves, _cooldowns(run_dir), decays, horizon)


def _ema_name(name: str) -> str:
    """``ema`` (the paper's decay) -> "EMA"; ``ema_0.99`` -> "EMA 0.99"."""
    return "EMA" + name[3:].replace("_", " ")


def _lawa_order(path: Path) -> tuple[int, int, str]:
    """(k, nu, weights) of a lawa.py result (``lawa_k5_nu10.jsonl``, ``lawa_k5_nu10_1-sqrt.jsonl``)."""
    k, nu, weights = re.fullmatch(r"lawa_k(\d+)_nu(\d+)(?:_(.+))?\.jsonl", path.name).groups()
    return int(k), int(nu), weights or ""


def _cooldowns(run_dir: Path) -> dict[int, dict]:
    """The run's cooldown branches (``<run>-cooldown-<t>``) that reached their last step, by branch step."""
    found = {}
    for branch in run_dir.parent.glob(f"{run_dir.name}-cooldown-*"):
        evals = eval_curves(branch / "metrics.jsonl").get("raw", {})
        if evals and (branch / "config.json").exists():
            cfg = read_run_config(branch)
            if cfg.max_steps in evals:
                found[cfg.max_steps - cfg.cooldown_steps] = {"steps": cfg.cooldown_steps, "loss": evals[cfg.max_steps],
                                                             "curve": evals}
    return dict(sorted(found.items()))


def gains_at_fractions(original: Curve, lawa: Curve, max_steps: int) -> list[dict]:
    """Original minus LAWA val loss at the eval steps nearest 25/50/75/100% of training."""
    common = {s: original[s] - lawa[s] for s in original.keys() & lawa.keys()}
    nearest = {f: min(common, key=lambda s: (abs(s - f * max_steps), -s)) for f in FRACTIONS} if common else {}
    return [{"fraction": f, "step": s, "original": original[s], "lawa": lawa[s], "gain": common[s]}
            for f, s in nearest.items()]


def interpolated_step_reaching(curve: Curve, target: float) -> float | None:
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
    reached = interpolated_step_reaching(lawa, target)
    saved = None if reached is None else final_step - reached
    return {"target": target, "final_step": final_step, "lawa_step": reached, "saved": saved}


def curves_table(run: RunCurves) -> str:
    """Every curve's val loss at every eval step, the best of each step in bold."""
    names = list(run.curves)
    rows = []
    for s in sorted(set().union(*run.curves.values())):
        best = min((run.curves[n][s], n) for n in names if s in run.curves[n])[1]
        cells = [f"{run.curves[n][s]:.4f}" if s in run.curves[n] else "" for n in names]
        rows.append([str(s)] + [f"**{c}**" if n == best and c else c for c, n in zip(cells, names)])
    return markdown_table(["step", *map(run.label, names)], rows, padded=False)


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
            reach = (f"reaches the Original's final {saved['target']:.4f} at step {saved['lawa_step']:.0f}: "
                     f"{saved['saved']:.0f} steps ({pct:.0f}%) saved")
        out.append(f"- **{name}**: gain over Original at {gains}; {reach}.")
    return "\n".join(out)


def horizon_table(run: RunCurves) -> str:
    """LAWA against each EMA of the run, the paper's decay and the horizon-matched one among
    them: EMA minus LAWA val loss at 25/50/75/100% of training (positive: LAWA is lower)."""
    h = run.horizon
    if h.lawa not in run.curves or not run.ema_names():
        return ""
    gains = {n: gains_at_fractions(run.curves[n], run.curves[h.lawa], run.max_steps) for n in run.ema_names()}
    fractions = [f"{int(100 * r['fraction'])}% (step {r['step']})" for r in next(iter(gains.values()))]
    rows = [[run.label(n), f"{run.ema_decays[n]:g}", f"{ema_age(run.ema_decays[n]):.1f}",
             *(f"{r['gain']:+.4f}" for r in g)] for n, g in gains.items()]
    table = markdown_table(["EMA", "decay", "mean age (steps)", *fractions], rows, left=(0,), padded=False)
    kept = f"the run keeps it as {h.ema}" if h.ema else f"train with --ema_decays={h.decay:g} to compare with it"
    note = (f"{h.lawa} averages weights of mean age {h.age:g} steps; an EMA of decay d, d/(1−d) steps. The "
            f"horizon-matched decay is {h.decay:g} ({kept}). Each cell: EMA minus {h.lawa} val loss "
            "(positive: LAWA is lower).")
    return note + "\n\n" + table


def cooldown_table(run: RunCurves) -> str:
    """Beyond the paper: LAWA at t (no extra training) vs an LR cooldown started from the raw
    checkpoint at t (extra steps), the baseline for 'averaging stands in for LR decay'."""
    if not run.cooldowns:
        return ""
    names = ["Original", *run.lawa_names()]
    header = ["t", *(f"{n} at t" for n in names), "cooldown from t", "cooldown steps"]
    rows = [[str(t), *(f"{run.curves[n][t]:.4f}" if t in run.curves[n] else "" for n in names), f"{cd['loss']:.4f}",
             f"+{cd['steps']}"] for t, cd in run.cooldowns.items()]
    return markdown_table(header, rows, padded=False)


def wsd_text(run: RunCurves, lr: float) -> str:
    """Merge versus decay on a constant-LR run: at each cooldown's branch step t, the merges of
    the window ending at t (and the horizon-matched EMA) against the cooldown from t, each with
    the step at which the constant-LR run first reaches its loss."""
    original = run.curves["Original"]
    names = run.lawa_names() + ([run.horizon.ema] if run.horizon.ema else [])
    spans = {cd["steps"] for cd in run.cooldowns.values()}
    rows = []
    for t, cd in run.cooldowns.items():
        later = {s: v for s, v in original.items() if s >= t}
        cells = [_reached(later, run.curves[n][t]) if t in run.curves[n] else "" for n in names]
        rows.append([str(t), f"{original[t]:.4f}", *cells, _reached(later, cd["loss"])])
    header = ["t", "constant LR at t", *(f"{run.label(n)} at t" for n in names), "cooldown from t"]
    note = (f"A run at a constant learning rate of {lr:g} after warmup (min_lr = learning_rate). At each t, the "
            f"merges of the window ending at t cost no extra step; the cooldown decays the LR linearly from {lr:g} "
            f"to 0 over {' / '.join(map(str, sorted(spans)))} more steps (the steps the window spans), from the raw "
            "checkpoint at t. Each cell: val loss, and (≈ step) the step at which the constant-LR run first reaches "
            f"it (> {max(original)}: not within the run).")
    table = markdown_table(header, rows, padded=False)
    return "## Merge versus decay (constant learning rate)\n\n" + note + "\n\n" + table


def _reached(curve: Curve, loss: float) -> str:
    step = interpolated_step_reaching(curve, loss)
    return f"{loss:.4f} ({'> ' + str(max(curve)) if step is None else f'≈ {step:.0f}'})"


def render(run: RunCurves, extra: str = "") -> str:
    parts = [
        f"# Report: {run.run_dir}",
        (f"Validation loss on the run's fixed held-out tokens ({run.max_steps} steps of "
         f"{run.tokens_per_step:,} tokens; the best value of each row in bold)."),
        curves_table(run),
        "## Summary",
        summary(run) or "No LAWA curve found (run lawa.py on this run, or train with lawa_online=True).",
    ]
    if horizon := horizon_table(run):
        parts += ["## LAWA against EMA at the paper's decay and at a matched horizon", horizon]
    if cooldown := cooldown_table(run):
        parts += ["## LAWA vs an LR cooldown from the same checkpoint", cooldown]
    if extra:
        parts.append(extra)
    return "\n\n".join(parts) + "\n"


def _plot(series: dict[str, Curve], path: Path, title: str, tokens_per_step: int,
          baseline: str | None = "Original") -> None:
    """Val loss curves, and below them each curve minus ``baseline`` (small gains are visible)."""
    rows = 2 if baseline in series else 1
    fig = Figure(figsize=(7, 3.2 + 2.2 * (rows - 1)), dpi=120)
    axes = fig.subplots(rows, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2][:rows]}, squeeze=False)
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
    save_png(fig, path)


def plot_wsd(run: RunCurves, path: Path) -> None:
    """Left: the constant-LR run, its merges and each cooldown over steps. Right: at each
    cooldown's branch step t, every candidate minus the constant-LR run at t."""
    original, ts = run.curves["Original"], list(run.cooldowns)
    names = run.lawa_names() + ([run.horizon.ema] if run.horizon.ema else [])
    fig = Figure(figsize=(11, 4), dpi=120)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    steps = sorted(s for s in original if s > 0)
    left.plot(steps, [original[s] for s in steps], color="black", lw=1.6, label="constant LR")
    for i, name in enumerate(names):
        curve = run.curves[name]
        left.plot(sorted(curve), [curve[s] for s in sorted(curve)], marker="o", ms=3, lw=1.2, color=f"C{i}", label=name)
    cooldown = f"C{len(names)}"
    for t, cd in run.cooldowns.items():
        left.plot(*zip(*sorted({t: original[t], **cd["curve"]}.items())), color=cooldown, lw=2,
                  label="cooldown from t" if t == ts[0] else None)
    shown = [v for c in (original, *(run.curves[n] for n in names)) for s, v in c.items() if s >= min(ts, default=0)]
    shown += [cd["loss"] for cd in run.cooldowns.values()]
    low, high = min(shown), max(shown)
    left.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    left.set_xlabel(f"training step ({run.tokens_per_step:,} tokens each)")
    left.set_ylabel("validation loss")
    left.set_title("Merge versus decay at a constant learning rate")
    left.legend(fontsize=8)
    deltas = {n: {t: run.curves[n][t] - original[t] for t in ts if t in run.curves[n]} for n in names}
    deltas["cooldown from t"] = {t: cd["loss"] - original[t] for t, cd in run.cooldowns.items()}
    width = 0.8 / len(deltas)
    for i, (name, delta) in enumerate(deltas.items()):
        x = [ts.index(t) + (i - (len(deltas) - 1) / 2) * width for t in delta]
        right.bar(x, list(delta.values()), width, color=f"C{i}", label=name)
    right.set_xticks(range(len(ts)), [str(t) for t in ts])
    right.axhline(0, color="gray", lw=0.8)
    right.set_xlabel("t")
    right.set_ylabel("val loss minus constant LR at t")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def plot_lr_compare(high: RunCurves, low: RunCurves, path: Path, lawa_name: str) -> None:
    series = {}
    for run, label in ((high, "high LR"), (low, "low LR")):
        series[f"Original, {label}"] = run.curves["Original"]
        if lawa_name in run.curves:
            series[f"LAWA, {label}"] = run.curves[lawa_name]
    _plot(series, path, "LAWA gain at a high and a low learning rate", high.tokens_per_step, baseline=None)


def lr_compare_text(high: RunCurves, low: RunCurves, high_lr: float, low_lr: float, lawa_name: str) -> str:
    """LAWA's gain at 25/50/75/100% of training, at a high and a low learning rate."""
    rows = [[f"{lr:g}", str(r["step"]), f"{r['original']:.4f}", f"{r['lawa']:.4f}", f"{r['gain']:+.4f}"]
            for run, lr in ((high, high_lr), (low, low_lr)) if lawa_name in run.curves
            for r in gains_at_fractions(run.curves["Original"], run.curves[lawa_name], run.max_steps)]
    table = markdown_table(["LR", "step", "Original", lawa_name, "gain"], rows, padded=False)
    return "## Learning-rate comparison (the paper's Figure 2)\n" + table


def write_report(run_dir: str | Path, assets: str | Path | None = None, extra: str = "") -> str:
    """report.md and the two plots in the run directory (and copies of the plots in ``assets``)."""
    run = load_run(run_dir)
    text = render(run, extra)
    atomic_write_text(run.run_dir / "report.md", text)
    ema_swa = {n: run.curves[n] for n in ("Original", *run.ema_names(), "SWA") if n in run.curves}
    lawa = {"Original": run.curves["Original"], **{n: run.curves[n] for n in run.lawa_names()}}
    for folder in [run.run_dir] + ([Path(assets)] if assets else []):
        _plot(ema_swa, folder / "ema_swa.png", "Original vs EMA vs SWA", run.tokens_per_step)
        _plot(lawa, folder / "lawa.png", "Original vs LAWA", run.tokens_per_step)
    return text

