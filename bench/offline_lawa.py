"""Offline LAWA I/O: the streaming running sum vs reading every snapshot once and vs the naive
method, for M snapshots and several k.

M fp32 snapshots of a GPT of the given shape are written to a temporary folder (steps
0, 1, ..., M-1; windows of k snapshots nu apart, one every ``interval`` steps). Each variant
runs in a fresh process, so that its peak RSS is its own:

- raw:   read every snapshot once (``safetensors.torch.load_file``, every tensor summed so that
         the lazily mapped file is really read): the physical limit, the baseline;
- read:  read every snapshot once into a buffer (``Path.read_bytes``), for reference;
- naive: for each window, load its k snapshots, sum in float64, divide;
- ours:  ``Merger`` + ``stream_averages(with_raw=False)`` in ``streaming_order``.

Bytes read are the sizes of the files opened. By default every snapshot is read once before
any timing, so all variants see a warm page cache and the figures compare the methods, not the
disk; ``--cold`` (root only) drops the page cache before every timed repeat instead, so that
reads come from the disk as in a real run. Naive and ours report a checksum of all their
averages, which must agree. The default ``--interval=5 --nu=1`` is the paper's nanoGPT setting
in snapshot units (snapshots every 200 steps, windows every 1000).

    python bench/offline_lawa.py                      # M=40 snapshots of 16 MiB, k = 2 5 10 20
    python bench/offline_lawa.py --cold               # the same from the disk (as root)
    python bench/offline_lawa.py --m=80 --n_layer=12 --n_embd=768 --vocab_size=50304 --ks 5 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import MiB, current_rss, median, parse, parser, peak_rss, report, target  # noqa: E402
from ewa.files import list_checkpoints, save_snapshot, snapshot_name  # noqa: E402
from ewa.tools.merge import Merger, plan_windows, stream_averages, streaming_order  # noqa: E402
from ewa.window import Window  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

Tensors = dict[str, torch.Tensor]
Paths = dict[int, Path]

# the table: columns shown, with their format
COLUMNS = {
    "variant": "s",
    "k": "d",
    "windows": "d",
    "wall_s": ".3f",
    "wall_vs_raw": ".2f",
    "bytes_read": ",d",
    "bytes_vs_distinct": ".2f",
    "peak_rss_mib": ".0f",
    "rss_growth_mib": ".0f",
}


def write_snapshots(folder: Path, m: int, shape: GPTConfig) -> int:
    """M snapshots of random weights of the model's shape; returns the parameter count."""
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in GPT(shape).named_parameters()}
    gen = torch.Generator().manual_seed(0)
    for step in range(m):
        weights = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
        save_snapshot(folder / snapshot_name(step), weights, {"step": str(step)})
    return sum(math.prod(s) for s in shapes.values())


def checksum(avg: Tensors) -> float:
    """A sample of every tensor (every 4099th value), to check that two methods agree
    without adding a full pass over the averages to their time."""
    return sum(t.reshape(-1)[::4099].sum(dtype=torch.float64).item() for t in avg.values())


def distinct(windows: list[Window]) -> list[int]:
    return sorted({s for w in windows for s in w.members})


def run_raw(paths: Paths, windows: list[Window], device: torch.device) -> tuple[int, None]:
    for s in distinct(windows):
        for t in load_file(paths[s]).values():
            t.sum()  # the file is mapped lazily: touch every byte once
    return sum(paths[s].stat().st_size for s in distinct(windows)), None


def run_read(paths: Paths, windows: list[Window], device: torch.device) -> tuple[int, None]:
    return sum(len(paths[s].read_bytes()) for s in distinct(windows)), None


def run_naive(paths: Paths, windows: list[Window], device: torch.device) -> tuple[int, float]:
    nbytes, total = 0, 0.0
    for w in windows:
        snaps = [load_file(paths[s], device=str(device)) for s in w.members]
        nbytes += sum(paths[s].stat().st_size for s in w.members)
        total += checksum({n: (sum(sd[n].double() for sd in snaps) / len(snaps)).float() for n in snaps[0]})
    return nbytes, total


def run_ours(paths: Paths, windows: list[Window], device: torch.device) -> tuple[int, float]:
    running, total = Merger(paths, device), 0.0
    for _, avg, _ in stream_averages(windows, running, with_raw=False):
        total += checksum(avg)
    return running.stats.bytes_read, total


VARIANTS = {"raw": run_raw, "read": run_read, "naive": run_naive, "ours": run_ours}


def worker(args: argparse.Namespace) -> None:
    """One variant for one k, in this fresh process: prints its figures as one JSON line."""
    device = torch.device(args.device)
    paths = list_checkpoints(args.dir)
    windows = streaming_order(plan_windows(paths, args.interval, args.k, args.nu), args.nu)
    rss_before, walls = current_rss(), []
    for _ in range(args.repeats):
        if args.cold:
            drop_page_cache()
        start = time.perf_counter()
        nbytes, total = VARIANTS[args.worker](paths, windows, device)  # ends with host values: synced
        walls.append(time.perf_counter() - start)
    figures = {"wall_s": median(walls), "bytes_read": nbytes, "checksum": total, "windows": len(windows)}
    figures |= {"peak_rss": peak_rss(), "rss_before": rss_before}
    if device.type == "cuda":
        figures["peak_device_memory"] = torch.cuda.max_memory_allocated(device)
    print(json.dumps(figures))


def drop_page_cache() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        sys.exit(f"--cold drops the page cache, which needs root ({e})")


def spawn(args: argparse.Namespace, variant: str, k: int, folder: Path) -> dict:
    """Run one variant in a fresh process; its figures."""
    options = {
        "worker": variant,
        "dir": folder,
        "k": k,
        "nu": args.nu,
        "interval": args.interval,
        "repeats": args.repeats,
        "threads": args.threads,
        "device": args.device,
    }
    cold = "--cold" if args.cold else "--no-cold"
    cmd = [sys.executable, __file__, *(f"--{key}={value}" for key, value in options.items()), cold]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = parser("offline_lawa", __doc__)
    p.add_argument("--m", type=int, default=40, help="number of snapshots")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 5, 10, 20], help="window sizes")
    p.add_argument("--nu", type=int, default=1, help="steps between a window's snapshots")
    p.add_argument("--interval", type=int, default=5, help="steps between windows")
    p.add_argument("--cold", action=argparse.BooleanOptionalAction, default=False,
                   help="drop the page cache before every timed repeat (root only)")
    p.add_argument("--n_layer", type=int, default=5)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--vocab_size", type=int, default=256)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--dir", type=Path, default=None, help="where to write the snapshots (default: a temp folder)")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args, _ = parse(p, argv)
    if args.worker:
        return worker(args)
    if not all(plan_windows(range(args.m), args.interval, k, args.nu) for k in args.ks):
        p.error(f"every k needs a window in the {args.m} snapshots: lower --ks, --nu or --interval, or raise --m")
    shape = GPTConfig(
        block_size=args.block_size,
        vocab_size=args.vocab_size,
        n_layer=args.n_layer,
        n_head=max(1, args.n_embd // 64),
        n_embd=args.n_embd,
        bias=False,
    )
    with tempfile.TemporaryDirectory(prefix="ewa-bench-lawa-", dir=args.dir) as tmp:
        folder = Path(tmp)
        params = write_snapshots(folder, args.m, shape)
        paths = list_checkpoints(folder)
        sizes = {s: f.stat().st_size for s, f in paths.items()}
        print(f"{args.m} snapshots of {sizes[0] / MiB:.1f} MiB ({params:,} parameters) in {folder}")
        if not args.cold:
            for f in paths.values():
                f.read_bytes()  # warm the page cache for every variant alike
        rows = [{"variant": v, "k": None, **spawn(args, v, max(args.ks), folder)} for v in ("raw", "read")]
        raw = rows[0]
        for r in rows:
            r["distinct_bytes"] = r["bytes_read"]
        for k in args.ks:
            used = sum(sizes[s] for s in distinct(plan_windows(paths, args.interval, k, args.nu)))
            for variant in ("naive", "ours"):
                rows.append({"variant": variant, "k": k, **spawn(args, variant, k, folder), "distinct_bytes": used})
    raw_seconds_per_byte = raw["wall_s"] / raw["bytes_read"]
    for r in rows:  # against reading once the distinct snapshots this k needs, at the raw speed
        r |= {
            "wall_vs_raw": r["wall_s"] / (r["distinct_bytes"] * raw_seconds_per_byte),
            "bytes_vs_distinct": r["bytes_read"] / r["distinct_bytes"],
            "peak_rss_mib": r["peak_rss"] / MiB,
            "rss_growth_mib": (r["peak_rss"] - r["rss_before"]) / MiB,
        }
    targets = []
    for k in args.ks:
        naive, ours = (next(r for r in rows if r["variant"] == v and r["k"] == k) for v in ("naive", "ours"))
        difference = abs(ours["checksum"] - naive["checksum"]) / max(abs(naive["checksum"]), 1e-30)
        targets += [
            target(f"k={k} ours bytes / distinct", "<= 2", ours["bytes_vs_distinct"], ours["bytes_vs_distinct"] <= 2),
            target(f"k={k} ours wall / raw read", "<= 1.5", ours["wall_vs_raw"], ours["wall_vs_raw"] <= 1.5),
            target(f"k={k} ours vs naive checksum (relative)", "<= 1e-6", difference, difference <= 1e-6),
        ]
    # extra memory per extra window member, in snapshots (the naive method's, about 1, is in the table)
    lo, hi = (next(r for r in rows if r["variant"] == "ours" and r["k"] == k) for k in (min(args.ks), max(args.ks)))
    slope = (hi["peak_rss"] - lo["peak_rss"]) / max(1, hi["k"] - lo["k"]) / sizes[0]
    targets.append(target("ours peak RSS per extra k, in snapshots", "<= 0.1 (flat in k)", slope, slope <= 0.1))
    settings = {"snapshot_bytes": sizes[0], "params": params}
    return report("offline_lawa", args, torch.device(args.device), rows, COLUMNS, targets, settings)


if __name__ == "__main__":
    main()
