"""The figures of ``analyze.py``: one function per analysis, returning a matplotlib ``Figure``
(built without pyplot, so no global state and no display backend is involved), and the helpers
they share."""

from __future__ import annotations

import math
from collections.abc import Callable

from matplotlib.figure import Figure

from ewa.tools.analysis import trend
from ewa.tools.report import Curve


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


def plot_lmc(
    curve: dict[float, float], line: Callable[[float], float], a: str, b: str, height: float, at: float
) -> Figure:
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
        own = trend(series, window)
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
