"""Memory plan: the bytes one rank holds, on its GPU and in host memory, before renting GPUs.

The figures come from the project's own allocation code run on the meta device (no memory is
used) under a fake process group of ``--world_size`` ranks: the model built and, with
``--parallel=fsdp``, sharded by ``fully_shard`` as in training; gradients and AdamW's state
created by a real optimizer step; the trainer's averagers (every EMA, SWA, online LAWA) built
by ``build_averagers`` over this rank's share; the pinned host buffers of snapshots and resume
checkpoints, as the checkpointer allocates them for what this rank writes (``written_by``: its
share, or its part of a DDP run's replicated state). Not counted: activations, the block
of gathered weights FSDP holds while it computes, and what evaluating an average holds while it
runs (a backup of the rank's share and, under DDP, the 64 MiB-per-rank gather rounds).

    python bench/memory_plan.py --config=configs/large.py --world_size=8 --lawa_online=True
    python bench/memory_plan.py --config=configs/large.py --world_size=8 --parallel=fsdp --averaging_device=cpu

Any other ``--key=value`` overrides the config (e.g. ``--lawa_k=5 --swa=True``). The last line
printed is one JSON object (``averaging_bytes_per_rank``: the EMA, SWA and LAWA state, host and
device together; ``model_bytes``: one fp32 copy of the parameters; and every row).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ewa.engine.averaging import build_averagers  # noqa: E402
from ewa.engine.background import HostBuffers  # noqa: E402
from ewa.engine.checkpointer import local, written_by  # noqa: E402
from ewa.engine.config import load_config  # noqa: E402
from ewa.engine.parallel import layout_of, wrap  # noqa: E402
from ewa.engine.runtime import Runtime  # noqa: E402
from model import GPT  # noqa: E402

GB = 1e9
HOST_TARGET = 2.5 * GB  # online LAWA, k=5, GPT-2 large, 8 ranks: averaging state in host memory per rank


def nbytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def staged_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """The host buffers the checkpointer allocates to stage ``tensors`` (on meta)."""
    buffers = HostBuffers(pin=False)
    with torch.device("meta"):
        for key, t in tensors.items():
            buffers.like(key, t)
    return nbytes(buffers.buffers.values())


def plan(cfg, world: int, rank: int) -> dict:
    """Bytes per component for ``rank`` of ``world``: {component: (device, host)}."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        rt = Runtime(rank, 0, world, torch.device("meta"), torch.bfloat16)
        with torch.device("meta"):
            model = GPT(cfg.model_config(cfg.vocab_size or 50304))
        names = [n for n, _ in model.named_parameters()]
        if cfg.parallel == "fsdp":
            wrap(model, "fsdp", False, rt)
        params = [p for _, p in model.named_parameters()]
        optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cpu")
        for p in params:
            p.grad = torch.zeros_like(p)  # DDP: its buckets (gradients are views); FSDP: sharded
        optimizer.step()  # AdamW creates its state
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        layout = layout_of(names, params, model, rt)
        share = layout.pieces(params)
        host = cfg.averaging_device == "cpu"
        with torch.device("meta"):  # the trainer's own allocation: the staging buffer, the averagers
            staging = layout.shares.alloc(rt.device) if host else None
            averagers = build_averagers(cfg, layout.shares, share, rt.device, staging)
        rows = {
            "parameters (fp32)": (nbytes(params), 0),
            "gradients (fp32)": (nbytes(p.grad for p in params), 0),
            "optimizer (AdamW)": (nbytes(state), 0),
        }
        buffers_of = {name: {k: t for k, t in a.state_dict().items() if isinstance(t, torch.Tensor)}
                      for name, a in averagers.items()}
        held = {name: nbytes(b.values()) for name, b in buffers_of.items()}
        for name, n in held.items():
            label = name.upper() + (f" (k={cfg.lawa_k})" if name == "lawa" else "")
            rows[label] = (0, n) if host else (n, 0)
        buffers = {}
        if "lawa" in averagers and not host:
            buffers["LAWA output"] = (nbytes([averagers["lawa"].mean]), 0)
        if host:
            buffers["averaging staging (and LAWA output)"] = (0, nbytes([staging]))
        kinds = {"raw": share} | {n: layout.shares.split(a.flat) for n, a in averagers.items() if n != "lawa"}
        pieces = {f"{kind}/{i}": t for kind, views in kinds.items() for i, t in enumerate(views)}
        buffers["snapshot buffers (pinned)"] = (0, staged_bytes(pieces))
        # the model and AdamW: DDP's replicated tensors split between the ranks, FSDP's shards
        entries = {f"model.{n}": p for n, p in zip(names, params)} | {f"optimizer.{i}": t for i, t in enumerate(state)}
        mine = written_by(entries, rank, world)
        mine |= {f"averagers.{n}.{b}": t for n, bufs in buffers_of.items() for b, t in bufs.items()}
        buffers["resume staging (pinned)"] = (0, staged_bytes({k: local(t) for k, t in mine.items()}))
        averaging_state = sum(held.values())
        return {
            "rows": rows,
            "buffers": buffers,
            "averaging_bytes_per_rank": averaging_state,
            "averaging_host_bytes_per_rank": averaging_state if host else 0,
            "model_bytes": sum(p.numel() for p in params) * 4,
            "share_bytes": layout.shares.numel * 4,
        }
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/small.py")
    p.add_argument("--world_size", type=int, default=8)
    p.add_argument("--rank", type=int, default=0, help="the rank to plan (rank 0 holds the largest share)")
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    result = plan(cfg, args.world_size, args.rank)
    print(
        f"{args.config}: {cfg.n_layer} layers x {cfg.n_embd}, {result['model_bytes'] / 4 / 1e6:,.0f}M parameters; "
        f"rank {args.rank} of {args.world_size}, parallel={cfg.parallel}, averaging_device={cfg.averaging_device}"
    )
    print(f"{'':<38} {'device GB':>10} {'host GB':>10}")
    total = [0, 0]
    for section in ("rows", "buffers"):
        for name, (device, host) in result[section].items():
            print(f"{name:<38} {device / GB:>10.3f} {host / GB:>10.3f}")
            total = [total[0] + device, total[1] + host]
    print(f"{'total':<38} {total[0] / GB:>10.3f} {total[1] / GB:>10.3f}")
    host_state = result["averaging_host_bytes_per_rank"]
    print(
        f"{'OK  ' if host_state <= HOST_TARGET else 'MISS'} averaging state in host memory per rank: "
        f"{host_state / GB:.2f} GB (target <= {HOST_TARGET / GB:.1f} GB)"
    )
    out = {
        "config": args.config,
        "world_size": args.world_size,
        "rank": args.rank,
        "parallel": cfg.parallel,
        "averaging_device": cfg.averaging_device,
        "averaging_bytes_per_rank": result["averaging_bytes_per_rank"],
        "averaging_host_bytes_per_rank": host_state,
        "model_bytes": result["model_bytes"],
        "device_bytes_per_rank": total[0],
        "host_bytes_per_rank": total[1],
        "rows": {
            name: {"device": d, "host": h}
            for section in ("rows", "buffers")
            for name, (d, h) in result[section].items()
        },
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
