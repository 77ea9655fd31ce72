"""LAWA over Hugging Face checkpoints: Pythia's public step revisions (sections 3, 4.2 and 4.4 of
the paper), or any folder of ``save_pretrained`` directories named by step; the commands of
``pythia_lawa.py``.

This module holds what is Pythia's own: hub revisions, the GPU-hour table and the savings, and
the commands. Windows, averages and their evaluation are the shared engine's (``ewa.tools.merge``:
by default with the paper's settings k=5, nu=1000, interval=3000, from step 21000), and the
Hugging Face side is ``ewa.tools.hf``'s: the model under evaluation holds the original weights of a
window's step and its LAWA weights in turn, one model in memory, no disk writes unless asked.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from matplotlib.figure import Figure
from tqdm import tqdm

from ewa.engine.logger import MetricsLogger, read_metrics
from ewa.engine.runtime import resolve_device
from ewa.files import CheckpointError, atomic_write_text, list_checkpoints
from ewa.tools import hf
from ewa.tools.cli import InputError
from ewa.tools.merge import Evaluation, Merger, TensorStream, WindowPlan, score_models
from ewa.window import Window

PYTHIA_LAST_STEP = 143000  # the last revision of every Pythia model
GPU_HOURS_FILE = Path(__file__).resolve().parents[2] / "configs" / "pythia_gpu_hours.json"
HUB_FILES = ["*.json", "*.txt", "*.model"]  # config, tokenizer, shard index: all but the weights
PYTHIA_KINDS = {"newest": "original", "average": "lawa"}  # the merge engine's roles as the paper names them


@dataclass
class Revisions:
    """Checkpoints by step, and the windows planned over them."""

    name: str  # the hub id or folder, as given
    paths: dict[int, Path]  # step -> save_pretrained directory
    windows: list[Window]
    unavailable: dict[int, str] = field(default_factory=dict)  # step -> why it could not be had

    @property
    def complete_windows(self) -> list[Window]:
        return [w for w in self.windows if w.complete]

    def skip_reasons(self) -> list[str]:
        return [f"window at step {w.step} skipped: no checkpoint at step "
                + ", ".join(f"{s} ({self.unavailable[s]})" if s in self.unavailable else str(s) for s in w.missing)
                for w in self.windows if not w.complete]


def open_revisions(model: str, plan: WindowPlan, cache_dir: str | None = None) -> Revisions:
    """A folder of ``step<N>/`` directories, or a hub id whose ``step<N>`` revisions the windows
    need are taken from the local cache or downloaded (``HF_HUB_OFFLINE=1``: the cache only)."""
    folder = Path(model)
    if folder.is_dir():
        paths = {s: p for s, p in list_checkpoints(folder).items() if p.is_dir()}
        if not paths:
            raise CheckpointError(f"{folder}: no save_pretrained directories named by step (step1000/, step2000/, ...)")
        return Revisions(model, paths, plan.windows(paths, plan.end))
    end = plan.end or PYTHIA_LAST_STEP
    needed = sorted({s for w in plan.windows([end], end) for s in w.members})
    paths, unavailable = {}, {}
    for step in tqdm(needed, desc=f"revisions of {model}", unit="rev"):
        try:
            paths[step] = fetch_revision(model, step, cache_dir)
        except LocalEntryNotFoundError:
            unavailable[step] = "not in the local Hugging Face cache, and the hub is out of reach (HF_HUB_OFFLINE=1?)"
        except RevisionNotFoundError:
            unavailable[step] = f"the hub has no revision step{step}"
    if not paths:
        first = needed[0]
        raise CheckpointError(f"{model}: not a local folder, and none of the {len(needed)} revisions the windows need "
                              f"could be had (step{first}: {unavailable[first]}); run `pythia_lawa.py download` online")
    return Revisions(model, paths, plan.windows(paths, end), unavailable)


def fetch_revision(repo_id: str, step: int, cache_dir: str | None = None) -> Path:
    """Revision ``step<N>`` of a hub model as a local directory: its safetensors when it has
    them, else its ``pytorch_model*.bin``, never both."""

    def fetch(weights: str) -> Path:
        patterns = [*HUB_FILES, weights]
        return Path(snapshot_download(repo_id, revision=f"step{step}", cache_dir=cache_dir, allow_patterns=patterns))

    try:
        folder = fetch("*.safetensors")
        return folder if any(folder.glob("*.safetensors")) else fetch("*.bin")
    except HFValidationError:
        raise CheckpointError(f"{repo_id}: no such folder, and not a hub id (owner/name)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: not a local folder, and no model of that id on the hub "
                              "(a gated or private one needs `hf auth login`)") from None


def open_checked(model: str, plan: WindowPlan, cache_dir: str | None = None,
                 device: torch.device | str = "cpu") -> tuple[Revisions, Merger]:
    """The revisions of ``model`` the plan needs, the skipped windows reported, and an engine over
    the complete windows (averaging on ``device``), their members checked to open and to have the
    first one's tensor names and shapes before any work is spent on averages."""
    revisions = open_revisions(model, plan, cache_dir)
    for reason in revisions.skip_reasons():
        print(reason, file=sys.stderr)
    steps = {s for w in revisions.complete_windows for s in w.members}
    if not steps:
        raise CheckpointError(f"{revisions.name}: no complete LAWA window\n" + "\n".join(revisions.skip_reasons()))
    merger = Merger(revisions.paths, device, hf_names=True)
    merger.check(steps)
    print(f"{revisions.name}: {len(revisions.complete_windows)} of {len(revisions.windows)} windows complete "
          f"(k={plan.k}, nu={plan.nu}, interval={plan.interval}, start={plan.start})")
    return revisions, merger


def save_window(out_dir: Path, revisions: Revisions, plan: WindowPlan, window: Window, average: TensorStream) -> Path:
    """The window's average as ``out_dir/step<t>`` (``Merger.models``'s ``save``, with the first three
    bound); keeps the average an earlier run left there for the same window, refuses to overwrite another."""
    out = out_dir / f"step{window.step}"
    info = {"step": window.step, "members": list(window.members), "k": plan.k, "nu": plan.nu,
            "source": revisions.name}
    if not out.exists():
        return hf.save_hf_average(out, average, revisions.paths[window.step], info)
    try:
        done = json.loads((out / "lawa.json").read_text())
    except (OSError, ValueError):
        done = {}
    if done.get("members") == info["members"] and done.get("source") == revisions.name:
        return out
    raise CheckpointError(f"{out}: exists and is not this window's average of {revisions.name} "
                          f"(steps {info['members']}); remove it or pick another output folder")


@dataclass(frozen=True)
class Saving:
    """How much earlier LAWA reaches ``target`` (the original's final perplexity + tolerance): the
    steps and GPU hours saved of Figure 6 and Table 3."""

    tolerance: float
    target: float
    original_step: int  # first step at which the original reaches the target
    lawa_step: int | None  # first step at which LAWA does; None: not by the final step
    steps_saved: int | None  # None where LAWA does not reach the target
    gpu_hours_saved: float | None


def first_step_at_or_below(trajectory: dict[int, float], target: float, until: int) -> int | None:
    """The first step (by ``until``) at which the trajectory is at ``target`` or below."""
    return next((s for s in sorted(trajectory) if s <= until and trajectory[s] <= target), None)


def saving(original: dict[int, float], lawa: dict[int, float], tolerance: float = 0.0,
           hours_per_step: float = 0.0, final_step: int | None = None) -> Saving:
    """The steps (and GPU hours) LAWA saves to reach the original's perplexity at ``final_step``
    (default: its last step) plus ``tolerance``; with tolerance 0 this is the step at which LAWA
    first matches the original's final perplexity."""
    if tolerance < 0:
        raise InputError(f"--tolerance {tolerance}: must not be negative")
    final_step = max(original) if final_step is None else final_step
    if final_step not in original:
        raise InputError(f"--final_step {final_step}: the original trajectory has no perplexity there")
    target = original[final_step] + tolerance
    original_step = first_step_at_or_below(original, target, final_step)
    assert original_step is not None  # final_step itself reaches the target
    lawa_step = first_step_at_or_below(lawa, target, final_step)
    saved = None if lawa_step is None else original_step - lawa_step
    return Saving(tolerance, target, original_step, lawa_step, saved, None if saved is None else saved * hours_per_step)


def gpu_hours_per_step(model: str, path: Path = GPU_HOURS_FILE) -> float:
    """A100 hours per training step of a Pythia model (``EleutherAI/pythia-1b-deduped`` and
    ``pythia-1b`` both read the ``pythia-1b`` entry)."""
    table = json.loads(Path(path).read_text())["models"]
    key = Path(model).name.lower().removesuffix("-deduped")
    if key not in table:
        raise InputError(f"{path}: no GPU hours for {model!r} (looked up as {key!r}; entries: {', '.join(table)}); "
                         "name one with --gpu_hours_model")
    return table[key]["gpu_hours"] / table[key]["steps"]


def trajectories(records: list[dict], file: str | None,
                 metric: str) -> tuple[str, str, dict[int, float], dict[int, float]]:
    """(model, file, original, LAWA) perplexity by step from a ``perplexity`` run's records."""
    rows = [r for r in records if r.get("kind") in ("original", "lawa")]
    scored = sorted({r["file"] for r in rows})
    files = [f for f in scored if file in (None, f, Path(f).name)]
    if len(files) != 1:
        raise InputError(f"--file: pick one held-out file of {scored or 'none (no records)'}")
    rows = [r for r in rows if r["file"] == files[0]]
    pick = {kind: {r["step"]: r[metric] for r in rows if r["kind"] == kind} for kind in ("original", "lawa")}
    if not pick["original"] or not pick["lawa"]:
        raise InputError(f"{files[0]}: the records need both original and LAWA perplexities")
    return rows[0]["model"], files[0], pick["original"], pick["lawa"]


def savings_table(rows: list[Saving]) -> str:
    lines = ["tolerance |    target | original at |  LAWA at | steps saved | GPU hours saved"]
    for s in rows:
        lawa_at = "never" if s.lawa_step is None else s.lawa_step
        saved = "-" if s.steps_saved is None else s.steps_saved
        hours = "-" if s.gpu_hours_saved is None else f"{s.gpu_hours_saved:.0f}"
        cells = f"{s.tolerance:9.3g} | {s.target:9.3f} | {s.original_step:>11} | {lawa_at:>8} | {saved:>11}"
        lines.append(f"{cells} | {hours:>15}")
    return "\n".join(lines)


def plot_savings(curves: dict[str, list[Saving]], path: Path) -> None:
    """GPU hours saved against the tolerance, a line per model."""
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for name, savings in curves.items():
        if points := [(s.tolerance, s.gpu_hours_saved) for s in savings if s.gpu_hours_saved is not None]:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xlabel("tolerated increase over the original's final perplexity")
    ax.set_ylabel("A100 GPU hours saved by LAWA")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)


@dataclass(frozen=True)
class Scoring:
    """How ``perplexity`` and ``zeroshot`` score the models, and where they write."""

    device: str = "auto"
    dtype: str = "auto"  # of weights and compute (auto: the checkpoint's on a GPU, float32 on a CPU)
    batch_size: int = 8  # sequences per forward pass
    save_dir: str | None = None  # also write each average there as step<N>/
    out: str | None = None  # results JSONL (default: out/<model>/<command>.jsonl)


def results_path(out: str | None, model: str, name: str) -> Path:
    return Path(out) if out else Path("out") / Path(model).name / name


def score_revisions(model: str, plan: WindowPlan, cache_dir: str | None, scoring: Scoring, name: str,
                    evaluation: Callable) -> list[dict]:
    """Original and LAWA of every complete window, loaded in turn into one model and scored by
    ``evaluation(model, tokenizer)``; the records go to ``out/<model>/<name>.jsonl``."""
    device = resolve_device(scoring.device)
    revisions, merger = open_checked(model, plan, cache_dir, device)  # averages are summed where the model is
    first = revisions.paths[revisions.complete_windows[0].step]
    hf_model, tokenizer = hf.load_pretrained(first, device, scoring.dtype)
    evaluate: Evaluation = evaluation(hf_model, tokenizer)
    save = partial(save_window, Path(scoring.save_dir), revisions, plan) if scoring.save_dir else None
    bar = partial(tqdm, desc="windows", unit="window")
    models = merger.models(revisions.complete_windows, save=save, progress=bar)
    out = results_path(scoring.out, model, f"{name}.jsonl")
    logger = MetricsLogger(out, echo=False, append=False)
    for w in revisions.windows:
        if not w.complete:
            logger.log({"model": revisions.name, "step": w.step, "kind": "skipped", "missing": list(w.missing)})
    records = []
    for record in score_models(models, partial(hf.copy_into_hf_model, hf_model), evaluate, PYTHIA_KINDS):
        records.append({"model": revisions.name, **record})
        logger.log(records[-1])
    logger.close()
    print(f"wrote {out}")
    return records


def download_revisions(model: str, plan: WindowPlan, cache_dir: str | None = None) -> None:
    """Fetch the revisions the windows need into the local Hugging Face cache."""
    revisions, _ = open_checked(model, plan, cache_dir)
    print(f"{len(revisions.paths)} checkpoints ready, {len(revisions.unavailable)} unavailable")


def write_averages(model: str, plan: WindowPlan, out_dir: str, cache_dir: str | None = None) -> None:
    """Each complete window's LAWA average as a Hugging Face directory ``out_dir/step<t>``."""
    revisions, merger = open_checked(model, plan, cache_dir)
    bar = partial(tqdm, desc="LAWA windows", unit="window")
    for window, _, average in merger.models(revisions.complete_windows, newest=False, progress=bar):
        save_window(Path(out_dir), revisions, plan, window, average)
    print(f"the averages of {len(revisions.complete_windows)} windows are in {out_dir}/step<N>")


def score_perplexity(model: str, plan: WindowPlan, data: list[str], tokens: int = 1_000_000, seq_len: int | None = None,
                     scoring: Scoring = Scoring(), cache_dir: str | None = None) -> None:
    """Token and word perplexity of original vs LAWA on the first ``tokens`` tokens of each held-out
    file, in windows of ``seq_len`` (default: the model's context)."""

    def evaluation(hf_model, tokenizer) -> Evaluation:
        context = hf_model.config.max_position_embeddings
        length = seq_len or context
        if not 1 <= length <= context:
            raise InputError(f"--seq_len {length}: must be between 1 and the model's context, {context}")
        held_out = [hf.read_held_out(Path(f), tokenizer, tokens) for f in data]
        scores = hf.perplexity_evaluation(hf_model, held_out, length, scoring.batch_size)
        dtype = str(hf_model.dtype).removeprefix("torch.")
        return lambda: [{**r, "seq_len": length, "dtype": dtype} for r in scores()]

    print(perplexity_table(score_revisions(model, plan, cache_dir, scoring, "perplexity", evaluation)))


def score_zero_shot(model: str, plan: WindowPlan, tasks: list[str], include_path: str | None = None,
                    limit: int | None = None, scoring: Scoring = Scoring(), cache_dir: str | None = None) -> None:
    """Zero-shot lm-evaluation-harness tasks, original vs LAWA (Table 2), and their table."""
    manager = hf.task_manager(include_path, tasks)  # refuses unknown tasks before any work
    evaluation = partial(hf.zero_shot_evaluation, tasks=tasks, manager=manager, batch_size=scoring.batch_size,
                         limit=limit)
    records = score_revisions(model, plan, cache_dir, scoring, "zeroshot", evaluation)
    out = results_path(scoring.out, model, "zeroshot.jsonl").with_suffix(".md")
    table = hf.zero_shot_table(records)
    atomic_write_text(out, table)
    print(table)
    print(f"wrote {out}")


def perplexity_table(records: list[dict]) -> str:
    rows = {(r["file"], r["step"], r["kind"]): r for r in records}
    lines = [f"{'file':<24} {'step':>7} | {'token ppl':>10} {'LAWA':>10} | {'word ppl':>10} {'LAWA':>10}"]
    for file, step in sorted({(f, s) for f, s, _ in rows}):
        o, lawa = rows[file, step, "original"], rows[file, step, "lawa"]
        cells = [f"{r[m]:10.3f}" for m in ("token_perplexity", "word_perplexity") for r in (o, lawa)]
        lines.append(f"{Path(file).name[:24]:<24} {step:>7} | {cells[0]} {cells[1]} | {cells[2]} {cells[3]}")
    return "\n".join(lines)


def report_savings(results: list[str], tolerances: Iterable[float] = (0.0,), file: str | None = None,
                   metric: str = "word_perplexity", final_step: int | None = None,
                   gpu_hours: str | Path = GPU_HOURS_FILE, gpu_hours_model: str | None = None,
                   plot: str | None = None) -> None:
    """GPU hours LAWA saves to reach the original's final perplexity (plus each tolerance) in each
    ``perplexity`` run's results (Figure 6), optionally plotted."""
    curves: dict[str, list[Saving]] = {}
    for path in results:
        records = read_metrics(path)
        if not records:
            raise InputError(f"{path}: missing or empty; it should be the JSONL a `perplexity` run wrote")
        model, held_out, original, lawa = trajectories(records, file, metric)
        per_step = gpu_hours_per_step(gpu_hours_model or model, Path(gpu_hours))
        rows = [saving(original, lawa, t, per_step, final_step) for t in tolerances]
        final = final_step or max(original)
        print(f"{model}, {Path(held_out).name}, {metric}: original {original[final]:.3f} at step {final}")
        print(savings_table(rows))
        curves[Path(model).name] = rows
    if plot:
        plot_savings(curves, Path(plot))
        print(f"wrote {plot}")
