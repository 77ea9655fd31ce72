"""Export weights of this project as a Hugging Face directory that ``AutoModelForCausalLM`` loads as
``GPT2LMHeadModel``, with its tokenizer, so transformers, lm-eval and the hub can use them.

    python export_hf.py out/paper/run out/hf/run-600                       # a run: its latest raw snapshot
    python export_hf.py out/paper/run out/hf/ema-300 --kind=ema --step=300
    python export_hf.py out/paper/run/lawa/step_00000600.safetensors out/hf/lawa-600   # lawa.py --save_dir
    python export_hf.py ckpt.pt out/hf/nanogpt --tokenizer=gpt2             # a nanoGPT / Sophia checkpoint

The tokenizer is the one the model was trained with: ``--tokenizer``, else the ``meta.json`` of
``--data_dir``, else of the data named by the run's config.json (found beside SOURCE or above it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ewa.engine.data import DataError, data_meta
from ewa.files import CheckpointError, is_run_dir, list_checkpoints, snapshot_dir, snapshot_kinds
from ewa.tools.hf import InputError, export


def resolve_source(source: Path, step: int | None, kind: str) -> Path:
    """SOURCE itself, or for a run directory its ``kind`` snapshot at ``step`` (default: the latest)."""
    if not is_run_dir(source):
        if step is not None:
            raise InputError(f"--step={step}: only for a run directory, and {source} is not one")
        return source
    snapshots = list_checkpoints(snapshot_dir(source, kind)) if snapshot_dir(source, kind).is_dir() else {}
    if not snapshots:
        raise InputError(f"{source}/snapshots/{kind}: no snapshots; pick --kind among {', '.join(snapshot_kinds(source))}")
    step = max(snapshots) if step is None else step
    if step not in snapshots:
        raise InputError(f"--step={step}: no such snapshot; {source}/snapshots/{kind} "
                         f"has steps {min(snapshots)}..{max(snapshots)}")
    return snapshots[step]


def run_data_dir(source: Path) -> str | None:
    """The data_dir of the nearest config.json beside SOURCE or above it that names one (a
    relative one is the working directory's, as in training and lawa.py); configs further up
    are not read."""
    for config in (p / "config.json" for p in [source, *source.parents]):
        if not config.is_file():
            continue
        try:
            saved = json.loads(config.read_text())
        except ValueError as e:
            raise InputError(f"{config}: not valid JSON ({e}); fix it, or pass --data_dir or --tokenizer") from None
        if isinstance(saved, dict) and "data_dir" in saved:
            return saved["data_dir"]
    return None


def tokenizer_name(source: Path, data_dir: str | None, tokenizer: str | None) -> str:
    """``--tokenizer``, else the meta.json of ``--data_dir``, else of the run's data."""
    if tokenizer:
        return tokenizer
    data_dir = data_dir or run_data_dir(source)
    if data_dir is None:
        raise InputError(f"{source}: no run config beside it or above it names its data; "
                         "pass --data_dir=<the data it was trained on> or --tokenizer=bytes|gpt2")
    return data_meta(data_dir)["tokenizer"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="export_hf.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("source", help="a snapshot, an average of lawa.py --save_dir, a run directory, or a nanoGPT ckpt.pt")
    p.add_argument("out_dir", help="the Hugging Face directory to write (must not exist)")
    p.add_argument("--step", type=int, help="for a run directory: the snapshot's step (default: the latest)")
    p.add_argument("--kind", default="raw", help="for a run directory: which snapshots: raw (default), ema, ema_<decay>, swa")
    p.add_argument("--data_dir", help="the data the model was trained on: its meta.json names the tokenizer")
    p.add_argument("--tokenizer", choices=["bytes", "gpt2"], help="the tokenizer, instead of --data_dir")
    p.add_argument("--shard_size", type=int, default=5 * 10**9, help="bytes per safetensors shard (default: 5 GB)")
    args = p.parse_args(argv)
    try:
        source = resolve_source(Path(args.source), args.step, args.kind)
        name = tokenizer_name(source, args.data_dir, args.tokenizer)
        out = export(source, args.out_dir, name, {"source": str(source), "tokenizer": name}, args.shard_size)
    except (CheckpointError, DataError, InputError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it as GPT2LMHeadModel")


if __name__ == "__main__":
    main()
