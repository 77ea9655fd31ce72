"""LAWA over Hugging Face checkpoints: Pythia's public step revisions (sections 3, 4.2 and 4.4 of
the paper), or any folder of ``save_pretrained`` directories named by step.

    python pythia_lawa.py download   EleutherAI/pythia-1b-deduped --steps 48000 60000 105000 141000
    python pythia_lawa.py average    EleutherAI/pythia-1b-deduped --out_dir out/pythia-1b-deduped/lawa
    python pythia_lawa.py perplexity EleutherAI/pythia-1b-deduped --data philpapers.jsonl
    python pythia_lawa.py zeroshot   EleutherAI/pythia-1b-deduped --steps 48000 60000 105000 141000
    python pythia_lawa.py savings    out/pythia-1b-deduped/perplexity.jsonl --tolerance 0 0.5 1

Windows are ``ewa.lawa.plan_windows``'s, by default with the paper's settings (k=5, nu=1000,
interval=3000, from step 21000): the LAWA model at step t averages the checkpoints at t, t-nu,
..., t-(k-1)nu, and a window lacking one is reported and skipped. An average streams tensor by
tensor (the float64 sum of the k members' tensors over k, cast back to the checkpoint's dtype),
so memory stays near one model whatever k is. It is either written as a Hugging Face directory
or copied into the model under evaluation, which then holds the original weights of the
window's step and its LAWA weights in turn: one model in memory, no disk writes unless asked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file
from tqdm import tqdm

from ewa.checkpoint import CheckpointError, Weights, atomic_dir, atomic_write_text, check_compatible, list_checkpoints
from ewa.config import ConfigError
from ewa.lawa import Window, plan_windows
from ewa.runtime import resolve_device
from ewa.logger import MetricsLogger, read_metrics

if TYPE_CHECKING:  # transformers and lm_eval take seconds to import: only the commands needing them do
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PYTHIA_LAST_STEP = 143000  # the last revision of every Pythia model
SHARD_BYTES = 5 * 10**9  # an average is written in safetensors shards of at most this size
GPU_HOURS_FILE = Path(__file__).resolve().parents[1] / "configs" / "pythia_gpu_hours.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
HUB_FILES = ["*.json", "*.txt", "*.model"]  # config, tokenizer, shard index: all but the weights
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRIMARY_METRICS = ("acc", "word_perplexity", "exact_match", "perplexity")
PERCENT_METRICS = ("acc", "acc_norm", "exact_match")
BOOTSTRAP_ITERS = 1000  # lm-eval's stderr of acc is closed-form; this only bounds the bootstrapped ones


class InputError(Exception):
    """A file or flag that cannot be used; the message names it and the fix."""


# ---------------------------------------------------------------------------------------------
# revisions and windows


@dataclass(frozen=True)
class LawaPlan:
    """The window settings; ``steps`` keeps only the windows at those steps (default: all)."""

    k: int = 5
    nu: int = 1000
    interval: int = 3000
    start: int = 21000
    end: int | None = None
    steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if min(self.k, self.nu, self.interval) < 1 or self.start < 0:
            raise InputError(f"--k {self.k} --nu {self.nu} --interval {self.interval} --start {self.start}: "
                             "k, nu and interval must be positive, start not negative")

    def windows(self, available: Iterable[int], end: int | None) -> list[Window]:
        windows = plan_windows(list(available), self.interval, self.k, self.nu, self.start, end)
        if not self.steps:
            return windows
        by_step = {w.step: w for w in windows}
        wrong = sorted(set(self.steps) - by_step.keys())
        if wrong:
            grid = ", ".join(map(str, list(by_step)[:3])) + (f", ..., {max(by_step)}" if len(by_step) > 3 else "")
            settings = f"--start {self.start} --interval {self.interval} --k {self.k} --nu {self.nu}"
            raise InputError(f"--steps {' '.join(map(str, wrong))}: no such window; "
                             f"with {settings} the windows are at {grid or 'no step'}")
        return [by_step[s] for s in sorted(set(self.steps))]


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


def open_source(model: str, plan: LawaPlan, cache_dir: str | None = None) -> Source:
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
# checkpoints


def check_members(source: Source) -> None:
    """Every checkpoint of a complete window opens and has the first one's tensor names and
    shapes, before any work is spent on averages."""
    steps = sorted({s for w in source.complete for s in w.members})
    if not steps:
        raise CheckpointError(f"{source.name}: no complete LAWA window\n" + "\n".join(source.skip_reasons()))
    reference = Weights(source.paths[steps[0]], hf_names=True)
    for step in tqdm(steps[1:], desc="checking checkpoints", unit="ckpt", leave=False):
        check_compatible(reference, Weights(source.paths[step], hf_names=True))


# ---------------------------------------------------------------------------------------------
# averaging


def average_tensors(
    members: list[Weights], device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, LAWA tensor) for each tensor of the newest member: the float64 sum of the members'
    tensors over their number, cast to the newest member's dtype. Tensors that are not floating
    point (attention masks, counters) are the newest member's."""
    newest = members[-1]
    for name in newest.keys():
        last = newest.get(name)
        if not last.is_floating_point():
            yield name, last.clone()
            continue
        total = last.to(device, torch.float64, copy=True)
        for member in members[:-1]:
            total += member.get(name).to(device)  # promoted to float64 element by element, no float64 copy
        yield name, (total / len(members)).to(last.dtype)


def write_safetensors(
    folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], shard_bytes: int = SHARD_BYTES
) -> None:
    """``model.safetensors``, or shards of at most ``shard_bytes`` with the index transformers
    reads; one shard is held in memory at a time."""
    shards: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        save_file(shard, str(folder / f"part{len(shards)}"), metadata={"format": "pt"})
        shards.append(list(shard))

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = tensor.detach().to("cpu").contiguous()
        size, total = size + nbytes, total + nbytes
    flush()
    if len(shards) == 1:
        (folder / "part0").rename(folder / "model.safetensors")
        return
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for i, name in enumerate(names):
        (folder / f"part{i}").rename(folder / name)
    weight_map = {tensor: names[i] for i, part in enumerate(shards) for tensor in part}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_average(out: Path, members: list[Weights], info: dict[str, Any], shard_bytes: int = SHARD_BYTES) -> Path:
    """The LAWA average of ``members`` as the Hugging Face directory ``out``: config and tokenizer
    files of the newest member, safetensors weights, the window in ``lawa.json``; ``out`` is
    either absent or complete, whatever happens."""
    with atomic_dir(out) as tmp:
        for f in sorted(members[-1].path.iterdir()):
            if f.is_file() and not f.name.startswith(".") and not f.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy(f, tmp / f.name)
        write_safetensors(tmp, average_tensors(members), shard_bytes)
        (tmp / "lawa.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def save_window(out_dir: Path, source: Source, window: Window, plan: LawaPlan) -> Path:
    """``out_dir/step<t>``, written unless an earlier run left the same window's average there."""
    out = out_dir / f"step{window.step}"
    info = {"step": window.step, "members": list(window.members), "k": plan.k, "nu": plan.nu, "source": source.name}
    if out.exists():
        try:
            done = json.loads((out / "lawa.json").read_text())
        except (OSError, ValueError):
            done = {}
        if done.get("members") == info["members"] and done.get("source") == source.name:
            return out
        raise CheckpointError(f"{out}: exists and is not this window's average of {source.name} "
                              f"(steps {info['members']}); remove it or pick another output folder")
    return save_average(out, [Weights(source.paths[s], hf_names=True) for s in window.members], info)


# ---------------------------------------------------------------------------------------------
# models under evaluation


def load_model(folder: Path, device: torch.device, dtype: str = "auto") -> PreTrainedModel:
    """The model of a save_pretrained directory, for evaluation. ``auto``: the checkpoint's own
    dtype on a GPU (float16 for Pythia, as lm-eval loads it), float32 on a CPU."""
    from transformers import AutoModelForCausalLM

    torch_dtype = DTYPES.get(dtype) or ("auto" if device.type == "cuda" else torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, device_map=device).eval()


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def load_into(model: PreTrainedModel, tensors: Iterable[tuple[str, torch.Tensor]], origin: str) -> None:
    """Copy checkpoint tensors into ``model``'s weights in place, one tensor at a time.

    Checkpoints name tensors as ``save_pretrained`` stores them, which transformers may rename
    on load (GPT-NeoX's ``embed_out`` is the model's ``lm_head``); its own reverse mapping gives
    the model's tensors under the stored names. Every parameter must be written; stored tensors
    the model does not keep (old attention masks, rotary tables) are passed over."""
    from transformers.core_model_loading import revert_weight_conversion

    targets = revert_weight_conversion(model, model.state_dict())
    written = set()
    for name, tensor in tensors:
        target = targets.get(name)
        if target is None:
            continue
        if target.shape != tensor.shape:
            raise CheckpointError(f"{origin}: {name} has shape {tuple(tensor.shape)}, the model {tuple(target.shape)}")
        target.copy_(tensor)
        written.add(target.untyped_storage().data_ptr())
    missing = [n for n, p in model.named_parameters() if p.untyped_storage().data_ptr() not in written]
    if missing:
        raise CheckpointError(f"{origin}: no weights for {missing[:3]} of the model (another architecture, or "
                              "weights transformers converts on load); evaluate averages written with --save_dir")


def models_per_window(
    source: Source, model: PreTrainedModel, plan: LawaPlan, save_dir: str | None = None
) -> Iterator[tuple[Window, str]]:
    """Load each complete window's original weights (its newest member), then its LAWA weights,
    into ``model``; yields (window, "original" | "lawa") after each load. With ``save_dir`` the
    average is written there first and read back, so what is evaluated is what was saved."""
    for window in tqdm(source.complete, desc="windows", unit="window"):
        members = [Weights(source.paths[s], hf_names=True) for s in window.members]
        load_into(model, members[-1].items(), str(members[-1].path))
        yield window, "original"
        if save_dir:
            saved = save_window(Path(save_dir), source, window, plan)
            load_into(model, Weights(saved, hf_names=True).items(), str(saved))
        else:
            load_into(model, average_tensors(members, model.device), f"LAWA at step {window.step}")
        yield window, "lawa"


# ---------------------------------------------------------------------------------------------
# perplexity


@dataclass(frozen=True)
class HeldOut:
    """A fixed token budget of a held-out file: every model compared is scored on these tokens."""

    name: str
    tokens: torch.Tensor  # every token but the first is scored
    words: int  # whitespace-separated words of the text these tokens cover
    sha256: str


def documents(path: Path) -> Iterator[str]:
    """``.jsonl``: the ``text`` field of each line (PILE subsets); any other file: its whole text."""
    if path.suffix != ".jsonl":
        yield path.read_text(encoding="utf-8")
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{path}:{number}: expected a JSON object with a 'text' field") from None


def read_held_out(path: Path, tokenizer: PreTrainedTokenizerBase, budget: int) -> HeldOut:
    """The first ``budget`` + 1 tokens of ``path``'s documents, each document followed by the
    end-of-text token as in pre-training; the words counted are those of the text covered."""
    if not path.is_file():
        raise InputError(f"--data {path}: no such file")
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids: list[int] = []
    words = 0
    for doc in documents(path):
        encoded = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
        take = min(len(encoded["input_ids"]) + len(eos), budget + 1 - len(ids))
        covered = doc if take >= len(encoded["input_ids"]) else doc[: encoded["offset_mapping"][take - 1][1]]
        ids += (encoded["input_ids"] + eos)[:take]
        words += len(covered.split())
        if len(ids) > budget:
            break
    if len(ids) < 2 or words == 0:
        raise InputError(f"--data {path}: too little text to score ({len(ids)} tokens, {words} words)")
    tokens = torch.tensor(ids, dtype=torch.long)
    return HeldOut(str(path), tokens, words, hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16])


@torch.no_grad()
def total_nll(model: PreTrainedModel, tokens: torch.Tensor, seq_len: int, batch_size: int) -> float:
    """Summed next-token negative log-likelihood of ``tokens[1:]``, over non-overlapping windows of
    ``seq_len`` predictions (each window's input starts at the previous window's last target)."""
    full = (len(tokens) - 1) // seq_len
    batches = list(tokens[: full * seq_len + 1].unfold(0, seq_len + 1, seq_len).split(batch_size)) if full else []
    if len(tokens) - 1 > full * seq_len:
        batches.append(tokens[full * seq_len :][None])
    total = torch.zeros((), dtype=torch.float64, device=model.device)
    for batch in tqdm(batches, desc="batches", unit="batch", leave=False):
        batch = batch.to(model.device)
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        nll = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
        total += nll.double().sum()
    return total.item()


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def score(model: PreTrainedModel, data: HeldOut, seq_len: int, batch_size: int) -> dict[str, Any]:
    """Token perplexity exp(NLL / tokens) and word perplexity exp(NLL / words), as lm-eval's."""
    nll = total_nll(model, data.tokens, seq_len, batch_size)
    scored = len(data.tokens) - 1
    return {
        "file": data.name,
        "tokens": scored,
        "words": data.words,
        "nll": nll,
        "token_perplexity": _exp(nll / scored),
        "word_perplexity": _exp(nll / data.words),
        "tokens_sha256": data.sha256,
    }


def perplexity_table(records: list[dict]) -> str:
    rows = {(r["file"], r["step"], r["kind"]): r for r in records}
    lines = [f"{'file':<24} {'step':>7} | {'token ppl':>10} {'LAWA':>10} | {'word ppl':>10} {'LAWA':>10}"]
    for file, step in sorted({(f, s) for f, s, _ in rows}):
        o, lawa = rows[file, step, "original"], rows[file, step, "lawa"]
        cells = [f"{r[m]:10.3f}" for m in ("token_perplexity", "word_perplexity") for r in (o, lawa)]
        lines.append(f"{Path(file).name[:24]:<24} {step:>7} | {cells[0]} {cells[1]} | {cells[2]} {cells[3]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# zero-shot through lm-evaluation-harness


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """Per task, lm-eval's numeric metrics under plain names (``acc``, ``acc_stderr``, ...)."""
    return {
        task: {key.removesuffix(",none"): v for key, v in values.items() if "," in key and isinstance(v, (int, float))}
        for task, values in results["results"].items()
    }


def primary_metric(metrics: dict[str, float]) -> str:
    """The figure the paper's Table 2 reports: accuracy, or word perplexity for wikitext."""
    return next((m for m in PRIMARY_METRICS if m in metrics), None) or next(m for m in metrics if "stderr" not in m)


def _step_label(step: int) -> str:
    return f"{step // 1000}K" if step % 1000 == 0 else str(step)


def zero_shot_table(records: list[dict]) -> str:
    """Markdown in the shape of the paper's Table 2; the better value of each row in bold."""
    pairs: dict[tuple[str, int, str], dict[str, dict]] = {}
    for r in records:
        pairs.setdefault((r["model"], r["step"], r["task"]), {})[r["kind"]] = r
    lines = ["| Model | Step | Task | LAWA | Original |", "|---|---:|---|---:|---:|"]
    for (model, step, task), pair in sorted(pairs.items()):
        metric = primary_metric(pair["original"]["metrics"])
        higher = pair["original"]["higher_is_better"].get(metric, True)
        scale = 100 if metric in PERCENT_METRICS else 1
        lawa, original = (pair[k]["metrics"][metric] * scale for k in ("lawa", "original"))
        cells = [f"{v:.2f}" for v in (lawa, original)]
        if lawa != original:
            best = 0 if (lawa > original) == higher else 1
            cells[best] = f"**{cells[best]}**"
        label = f"{task} ({metric}{', %' if scale == 100 else ''}{'' if higher else ', lower is better'})"
        lines.append(f"| {Path(model).name} | {_step_label(step)} | {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


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


def _plan(args: argparse.Namespace) -> LawaPlan:
    return LawaPlan(args.k, args.nu, args.interval, args.start, args.end, tuple(args.steps or ()))


def _open(args: argparse.Namespace) -> tuple[Source, LawaPlan]:
    plan = _plan(args)
    source = open_source(args.model, plan, args.cache_dir)
    for reason in source.skip_reasons():
        print(reason, file=sys.stderr)
    check_members(source)
    print(f"{source.name}: {len(source.complete)} of {len(source.windows)} windows complete "
          f"(k={plan.k}, nu={plan.nu}, interval={plan.interval}, start={plan.start})")
    return source, plan


def _default_out(args: argparse.Namespace, name: str) -> Path:
    return Path(args.out) if args.out else Path("out") / Path(args.model).name / name


def _evaluation_setup(args: argparse.Namespace, source: Source) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    first = source.paths[source.complete[0].step]
    return load_model(first, resolve_device(args.device), args.dtype), load_tokenizer(first)


def _log_skipped(logger: MetricsLogger, source: Source) -> None:
    for w in source.windows:
        if not w.complete:
            logger.log({"model": source.name, "step": w.step, "kind": "skipped", "missing": list(w.missing)})


def cmd_download(args: argparse.Namespace) -> None:
    source, _ = _open(args)
    print(f"{len(source.paths)} checkpoints ready, {len(source.unavailable)} unavailable")


def cmd_average(args: argparse.Namespace) -> None:
    source, plan = _open(args)
    out_dir = Path(args.out_dir)
    for window in tqdm(source.complete, desc="LAWA windows", unit="window"):
        save_window(out_dir, source, window, plan)
    print(f"the averages of {len(source.complete)} windows are in {out_dir}/step<N>")


def cmd_perplexity(args: argparse.Namespace) -> None:
    source, plan = _open(args)
    model, tokenizer = _evaluation_setup(args, source)
    context = model.config.max_position_embeddings
    seq_len = args.seq_len or context
    if not 1 <= seq_len <= context:
        raise InputError(f"--seq_len {seq_len}: must be between 1 and the model's context, {context}")
    data = [read_held_out(Path(f), tokenizer, args.tokens) for f in args.data]
    out = _default_out(args, "perplexity.jsonl")
    logger = MetricsLogger(out, echo=False, append=False)
    _log_skipped(logger, source)
    records = []
    for window, kind in models_per_window(source, model, plan, args.save_dir):
        for held_out in data:
            record = {"model": source.name, "step": window.step, "kind": kind, "members": list(window.members),
                      "seq_len": seq_len, "dtype": str(model.dtype).removeprefix("torch."),
                      **score(model, held_out, seq_len, args.batch_size)}
            logger.log(record)
            records.append(record)
    logger.close()
    print(perplexity_table(records))
    print(f"wrote {out}")


def cmd_zeroshot(args: argparse.Namespace) -> None:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in args.tasks if t not in task_manager.all_tasks]
    if unknown:
        raise InputError(f"--tasks {' '.join(unknown)}: unknown to lm-eval (list them with `lm_eval ls tasks`; "
                         "tasks of your own need --include_path)")
    source, plan = _open(args)
    model, tokenizer = _evaluation_setup(args, source)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    out = _default_out(args, "zeroshot.jsonl")
    logger = MetricsLogger(out, echo=False, append=False)
    _log_skipped(logger, source)
    records = []
    for window, kind in models_per_window(source, model, plan, args.save_dir):
        results = lm_eval.simple_evaluate(model=lm, tasks=args.tasks, num_fewshot=0, task_manager=task_manager,
                                          limit=args.limit, log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS)
        for task, metrics in task_metrics(results).items():
            record = {"model": source.name, "step": window.step, "kind": kind, "task": task,
                      "members": list(window.members), "metrics": metrics,
                      "higher_is_better": results["higher_is_better"].get(task, {})}
            logger.log(record)
            records.append(record)
    logger.close()
    table = zero_shot_table(records)
    atomic_write_text(out.with_suffix(".md"), table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")


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
    evaluation.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
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
    except (CheckpointError, ConfigError, InputError) as e:
        sys.exit(f"error: {e}")
