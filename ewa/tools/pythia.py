"""LAWA over Hugging Face checkpoints: Pythia's public step revisions (sections 3, 4.2 and 4.4 of
the paper), or any folder of ``save_pretrained`` directories named by step.

    python pythia_lawa.py download   EleutherAI/pythia-1b-deduped --steps 48000 60000 105000 141000
    python pythia_lawa.py average    EleutherAI/pythia-1b-deduped --out_dir out/pythia-1b-deduped/lawa
    python pythia_lawa.py perplexity EleutherAI/pythia-1b-deduped --data philpapers.jsonl
    python pythia_lawa.py zeroshot   EleutherAI/pythia-1b-deduped --steps 48000 60000 105000 141000
    python pythia_lawa.py savings    out/pythia-1b-deduped/perplexity.jsonl --tolerance 0 0.5 1

This module holds what is Pythia's own: hub revisions, the GPU-hour table and the savings, and
the commands. Windows, averages and their evaluation are the shared engine's (``ewa.tools.merge``:
by default with the paper's settings k=5, nu=1000, interval=3000, from step 21000), and the
Hugging Face side is ``ewa.tools.hf``'s: the model under evaluation holds the original weights of a
window's step and its LAWA weights in turn, one model in memory, no disk writes unless asked.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
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
from tqdm import tqdm

from ewa.engine.config import ConfigError
from ewa.engine.logger import MetricsLogger, read_metrics
from ewa.engine.runtime import resolve_device
from ewa.files import CheckpointError, atomic_write_text, list_checkpoints
from ewa.tools import hf
from ewa.tools.hf import InputError
from ewa.tools.merge import Evaluation, Merger, TensorStream, WindowPlan, score_models
from ewa.window import PlanError, Window

PYTHIA_LAST_STEP = 143000  # the last revision of every Pythia model
GPU_HOURS_FILE = Path(__file__).resolve().parents[2] / "configs" / "pythia_gpu_hours.json"
HUB_FILES = ["*.json", "*.txt", "*.model"]  # config, tokenizer, shard index: all but the weights
KINDS = {"newest": "original", "average": "lawa"}


# ---------------------------------------------------------------------------------------------
# revisions


@dataclass
class Source:
    """Checkpoints by step, and the windows planned over them."""

    name: str  # the hub id or folder, as given
    paths: dict[int, Path]  # step -> save_pretrained directory
    windows: list[Window]
    unavailable: dict[int, str] = field(default_factory=dict)  # step -> why it could not be had

    @property
    def complete(self) -> list[Window]:
        return [w for w in self.windows if w.complete]

    def skip_reasons(self) -> list[str]:
        return [
            f"window at step {w.step} skipped: no checkpoint at step "
            + ", ".join(f"{s} ({self.unavailable[s]})" if s in self.unavailable else str(s) for s in w.missing)
            for w in self.windows
            if not w.complete
        ]


def open_source(model: str, plan: WindowPlan, cache_dir: str | None = None) -> Source:
    """A folder of ``step<N>/`` directories, or a hub id whose ``step<N>`` revisions the windows
    need are taken from the local cache or downloaded (``HF_HUB_OFFLINE=1``: the cache only)."""
    folder = Path(model)
    if folder.is_dir():
        paths = {s: p for s, p in list_checkpoints(folder).items() if p.is_dir()}
        if not paths:
            raise CheckpointError(f"{folder}: no save_pretrained directories named by step (step1000/, step2000/, ...)")
        return Source(model, paths, plan.windows(paths, plan.end))
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
    return Source(model, paths, plan.windows(paths, end), unavailable)


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


# ---------------------------------------------------------------------------------------------
# averages


def check_members(source: Source, device: torch.device | str = "cpu") -> Merger:
    """An engine over the checkpoints of the complete windows (averaging on ``device``), each
    checked to open and to have the first one's tensor names and shapes before any work is
    spent on averages."""
    steps = {s for w in source.complete for s in w.members}
    if not steps:
        raise CheckpointError(f"{source.name}: no complete LAWA window\n" + "\n".join(source.skip_reasons()))
    merger = Merger(source.paths, device, hf_names=True)
    merger.check(steps)
    return merger


def save_window(out_dir: Path, source: Source, plan: WindowPlan) -> Callable[[Window, TensorStream], Path]:
    """The writer of ``out_dir/step<t>``, which keeps the average an earlier run left there for
    the same window and refuses to overwrite another."""

    def save(window: Window, average: TensorStream) -> Path:
        out = out_dir / f"step{window.step}"
        info = {"step": window.step, "members": list(window.members), "k": plan.k, "nu": plan.nu, "source": source.name}
        if not out.exists():
            return hf.save_hf_average(out, average, source.paths[window.step], info)
        try:
            done = json.loads((out / "lawa.json").read_text())
        except (OSError, ValueError):
            done = {}
        if done.get("members") == info["members"] and done.get("source") == source.name:
            return out
        raise CheckpointError(f"{out}: exists and is not this window's average of {source.name} "
                              f"(steps {info['members']}); remove it or pick another output folder")

    return save


# ---------------------------------------------------------------------------------------------
# GPU hours saved (Figure 6, Table 3)


@dataclass(frozen=True)
class Saving:
    """How much earlier LAWA reaches ``target`` (the original's final perplexity + tolerance)."""

    tolerance: float
    target: float
    original_step: int  # first step at which the original reaches the target
    lawa_step: int | None  # first step at which LAWA does; None: not by the final step
    hours_per_step: float

    @property
    def steps_saved(self) -> int | None:
        return None if self.lawa_step is None else self.original_step - self.lawa_step

    @property
    def gpu_hours_saved(self) -> float | None:
        return None if self.steps_saved is None else self.steps_saved * self.hours_per_step


def first_step_reaching(trajectory: dict[int, float], target: float, until: int) -> int | None:
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
    original_step = first_step_reaching(original, target, final_step)
    assert original_step is not None  # final_step itself reaches the target
    return Saving(tolerance, target, original_step, first_step_reaching(lawa, target, final_step), hours_per_step)


def gpu_hours_per_step(model: str, path: Path = GPU_HOURS_FILE) -> float:
    """A100 hours per training step of a Pythia model (``EleutherAI/pythia-1b-deduped`` and
    ``pythia-1b`` both read the ``pythia-1b`` entry)."""
    table = json.loads(Path(path).read_text())["models"]
    key = Path(model).name.lower().removesuffix("-deduped")
    if key not in table:
        raise InputError(f"{path}: no GPU hours for {model!r} (looked up as {key!r}; entries: {', '.join(table)}); "
                         "name one with --gpu_hours_model")
    return table[key]["gpu_hours"] / table[key]["steps"]


def trajectories(
    records: list[dict], file: str | None, metric: str
) -> tuple[str, str, dict[int, float], dict[int, float]]:
    """(model, file, original, LAWA) perplexity by step from a ``perplexity`` run's records."""
    rows = [r for r in records if r.get("kind") in ("original", "lawa")]
    files = sorted({r["file"] for r in rows})
    if file is not None:
        files = [f for f in files if file in (f, Path(f).name)]
    if len(files) != 1:
        scored = sorted({r["file"] for r in rows}) or "none (no records)"
        raise InputError(f"--file: pick one held-out file of {scored}")
    rows = [r for r in rows if r["file"] == files[0]]
    pick = {kind: {r["step"]: r[metric] for r in rows if r["kind"] == kind} for kind in ("original", "lawa")}
    if not pick["original"] or not pick["lawa"]:
        raise InputError(f"{files[0]}: the records need both original and LAWA perplexities")
    return rows[0]["model"], files[0], pick["original"], pick["lawa"]


def savings_table(rows: list[Saving]) -> str:
    lines = [" | ".join(["tolerance", "   target", "original at", " LAWA at", "steps saved", "GPU hours saved"])]
    for s in rows:
        lawa_at = "never" if s.lawa_step is None else s.lawa_step
        saved = "-" if s.steps_saved is None else s.steps_saved
        hours = "-" if s.gpu_hours_saved is None else f"{s.gpu_hours_saved:.0f}"
        cells = f"{s.tolerance:9.3g} | {s.target:9.3f} | {s.original_step:>11} | {lawa_at:>8} | {saved:>11}"
        lines.append(f"{cells} | {hours:>15}")
    return "\n".join(lines)


def plot_savings(curves: dict[str, list[Saving]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, savings in curves.items():
        points = [(s.tolerance, s.gpu_hours_saved) for s in savings if s.gpu_hours_saved is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xlabel("tolerated increase over the original's final perplexity")
    ax.set_ylabel("A100 GPU hours saved by LAWA")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# commands


def _plan(args: argparse.Namespace) -> WindowPlan:
    return WindowPlan(args.k, args.nu, args.interval, args.start, args.end, tuple(args.steps or ()))


def _open(args: argparse.Namespace, device: torch.device | str = "cpu") -> tuple[Source, WindowPlan, Merger]:
    plan = _plan(args)
    source = open_source(args.model, plan, args.cache_dir)
    for reason in source.skip_reasons():
        print(reason, file=sys.stderr)
    merger = check_members(source, device)
    print(f"{source.name}: {len(source.complete)} of {len(source.windows)} windows complete "
          f"(k={plan.k}, nu={plan.nu}, interval={plan.interval}, start={plan.start})")
    return source, plan, merger


def _default_out(args: argparse.Namespace, name: str) -> Path:
    return Path(args.out) if args.out else Path("out") / Path(args.model).name / name


def _log_skipped(logger: MetricsLogger, source: Source) -> None:
    for w in source.windows:
        if not w.complete:
            logger.log({"model": source.name, "step": w.step, "kind": "skipped", "missing": list(w.missing)})


def _score(args: argparse.Namespace, name: str, evaluation: Callable) -> list[dict]:
    """Original and LAWA of every complete window, loaded in turn into one model and scored by
    ``evaluation(model, tokenizer)``; the records go to ``out/<model>/<name>.jsonl``."""
    device = resolve_device(args.device)
    source, plan, merger = _open(args, device)  # averages are summed where the model is
    first = source.paths[source.complete[0].step]
    model, tokenizer = hf.load_model(first, device, args.dtype), hf.load_tokenizer(first)
    evaluate: Evaluation = evaluation(model, tokenizer)
    save = save_window(Path(args.save_dir), source, plan) if args.save_dir else None
    models = merger.models(source.complete, save=save, progress=partial(tqdm, desc="windows", unit="window"))
    out = _default_out(args, f"{name}.jsonl")
    logger = MetricsLogger(out, echo=False, append=False)
    _log_skipped(logger, source)
    records = []

    def load(tensors: TensorStream, origin: str) -> None:
        hf.load_into(model, tensors, origin)

    for record in score_models(models, load, evaluate, KINDS):
        record = {"model": source.name, **record}
        logger.log(record)
        records.append(record)
    logger.close()
    print(f"wrote {out}")
    return records


def cmd_download(args: argparse.Namespace) -> None:
    source, _, _ = _open(args)
    print(f"{len(source.paths)} checkpoints ready, {len(source.unavailable)} unavailable")


def cmd_average(args: argparse.Namespace) -> None:
    source, plan, merger = _open(args)
    out_dir = Path(args.out_dir)
    save = save_window(out_dir, source, plan)
    bar = partial(tqdm, desc="LAWA windows", unit="window")
    for window, _, average in merger.models(source.complete, newest=False, progress=bar):
        save(window, average)
    print(f"the averages of {len(source.complete)} windows are in {out_dir}/step<N>")


def cmd_perplexity(args: argparse.Namespace) -> None:
    def evaluation(model, tokenizer) -> Evaluation:
        context = model.config.max_position_embeddings
        seq_len = args.seq_len or context
        if not 1 <= seq_len <= context:
            raise InputError(f"--seq_len {seq_len}: must be between 1 and the model's context, {context}")
        data = [hf.read_held_out(Path(f), tokenizer, args.tokens) for f in args.data]
        scores = hf.text_perplexity(model, data, seq_len, args.batch_size)
        dtype = str(model.dtype).removeprefix("torch.")
        return lambda: [{**r, "seq_len": seq_len, "dtype": dtype} for r in scores()]

    print(perplexity_table(_score(args, "perplexity", evaluation)))


def cmd_zeroshot(args: argparse.Namespace) -> None:
    manager = hf.task_manager(args.include_path, args.tasks)  # refuses unknown tasks before any work
    records = _score(args, "zeroshot", lambda model, tokenizer: hf.zero_shot(
        model, tokenizer, args.tasks, manager, args.batch_size, args.limit))
    out = _default_out(args, "zeroshot.jsonl").with_suffix(".md")
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


def cmd_savings(args: argparse.Namespace) -> None:
    curves: dict[str, list[Saving]] = {}
    for results in args.results:
        records = read_metrics(results)
        if not records:
            raise InputError(f"{results}: missing or empty; it should be the JSONL a `perplexity` run wrote")
        model, file, original, lawa = trajectories(records, args.file, args.metric)
        per_step = gpu_hours_per_step(args.gpu_hours_model or model, Path(args.gpu_hours))
        rows = [saving(original, lawa, t, per_step, args.final_step) for t in args.tolerance]
        final = args.final_step or max(original)
        print(f"{model}, {Path(file).name}, {args.metric}: original {original[final]:.3f} at step {final}")
        print(savings_table(rows))
        curves[Path(model).name] = rows
    if args.plot:
        plot_savings(curves, Path(args.plot))
        print(f"wrote {args.plot}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pythia_lawa.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    source = argparse.ArgumentParser(add_help=False)
    source.add_argument("model", help="hub id (EleutherAI/pythia-1b-deduped), or a folder of save_pretrained "
                        "directories named by step (step21000/, step22000/, ...)")
    source.add_argument("--k", type=int, default=5, help="checkpoints per window (default: 5)")
    source.add_argument("--nu", type=int, default=1000, help="steps between a window's checkpoints (default: 1000)")
    source.add_argument("--interval", type=int, default=3000, help="steps between windows (default: 3000)")
    source.add_argument("--start", type=int, default=21000, help="first window step (default: 21000)")
    source.add_argument("--end", type=int,
                        help=f"last window step (default: the last checkpoint; {PYTHIA_LAST_STEP} for a hub id)")
    source.add_argument("--steps", type=int, nargs="+",
                        help="only the windows at these steps (e.g. Table 2's 48000 60000 105000 141000)")
    source.add_argument("--cache_dir", help="Hugging Face cache for hub revisions (default: HF_HUB_CACHE)")

    evaluation = argparse.ArgumentParser(add_help=False)
    evaluation.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    evaluation.add_argument("--dtype", default="auto", choices=["auto", *hf.DTYPES],
                            help="of weights and compute (default: the checkpoint's on a GPU, float32 on a CPU)")
    evaluation.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass (default: 8)")
    evaluation.add_argument("--save_dir", help="also write each average there as step<N>/ (default: memory only)")
    evaluation.add_argument("--out", help="results JSONL (default: out/<model>/<command>.jsonl)")

    def add(name: str, parents: list, summary: str, run) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=parents, help=summary, description=summary)
        sub.set_defaults(run=run)
        return sub

    add("download", [source], "fetch the revisions the windows need into the local Hugging Face cache", cmd_download)
    average = add("average", [source], "write each window's LAWA average as a Hugging Face directory", cmd_average)
    average.add_argument("--out_dir", required=True, help="folder for step<N>/ directories")

    ppl = add("perplexity", [source, evaluation], "token and word perplexity of original vs LAWA on held-out files",
              cmd_perplexity)
    ppl.add_argument("--data", nargs="+", required=True,
                     help="held-out files: .jsonl with a 'text' field per line, or plain text")
    ppl.add_argument("--tokens", type=int, default=1_000_000, help="tokens scored per file (default: 1,000,000)")
    ppl.add_argument("--seq_len", type=int, help="tokens per window (default: the model's context)")

    zs = add("zeroshot", [source, evaluation], "zero-shot lm-evaluation-harness tasks, original vs LAWA (Table 2)",
             cmd_zeroshot)
    zs.add_argument("--tasks", nargs="+", default=["lambada_openai", "sciq", "arc_easy", "wikitext"],
                    help="lm-eval task names (default: the paper's)")
    zs.add_argument("--include_path", help="folder of task YAMLs of your own")
    zs.add_argument("--limit", type=int, help="examples per task (default: all)")

    sv = add("savings", [], "GPU hours LAWA saves to reach the original's final perplexity (Figure 6)", cmd_savings)
    sv.add_argument("results", nargs="+", help="perplexity.jsonl of one or more models")
    sv.add_argument("--file", help="held-out file to use, when the runs scored several")
    sv.add_argument("--metric", default="word_perplexity", choices=["word_perplexity", "token_perplexity"])
    sv.add_argument("--tolerance", type=float, nargs="+", default=[0.0],
                    help="tolerated increases over the original's final perplexity (default: 0)")
    sv.add_argument("--final_step", type=int,
                    help="the original's step whose perplexity is the target (default: its last)")
    sv.add_argument("--gpu_hours", default=str(GPU_HOURS_FILE),
                    help="GPU hours per model (default: configs/pythia_gpu_hours.json)")
    sv.add_argument("--gpu_hours_model", help="entry of that file to use (default: from the model id)")
    sv.add_argument("--plot", help="PNG of GPU hours saved against the tolerance")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (CheckpointError, ConfigError, InputError, PlanError) as e:
        sys.exit(f"error: {e}")
