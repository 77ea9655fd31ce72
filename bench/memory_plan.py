"""Memory plan: the bytes one rank holds, on its GPU and in host memory, before renting GPUs.

The figures come from the project's own allocation code run on the meta device (no memory is
used) under a fake process group of ``--world_size`` ranks: the model built and, with
``--parallel=fsdp``, sharded by ``fully_shard`` as in training; AdamW's state created by a real
optimizer step; the EMA, SWA and online-LAWA averagers built over this rank's share; the
snapshot and resume-checkpoint staging buffers sized from the same shares and the same split
of a DDP run's replicated state. Not counted: activations, and the block of gathered weights
FSDP holds while it computes.

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

from ewa.averaging import EMA, SWA, OnlineLAWA  # noqa: E402
from ewa.checkpointing import owned_keys  # noqa: E402
from ewa.config import load_config  # noqa: E402
from ewa.parallel import layout_of, wrap  # noqa: E402
from ewa.runtime import Runtime  # noqa: E402
from model import GPT  # noqa: E402

GB = 1e9
HOST_TARGET = 2.5 * GB  # online LAWA, k=5, GPT-2 large, 8 ranks: averaging state in host memory per rank


def nbytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


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
            p.grad = torch.zeros_like(p)
        optimizer.step()  # AdamW creates its state
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        layout = layout_of(names, params, model, rt)
        share = layout.pieces(params)
        host = cfg.averaging_device == "cpu"
        averagers = {}
        if cfg.ema:
            averagers["EMA"] = EMA(layout.shares, share, cfg.ema_decay, rt.device)
        if cfg.swa:
            averagers["SWA"] = SWA(layout.shares, 0, cfg.swa_every, rt.device)
        if cfg.lawa_online:
            averagers[f"LAWA (k={cfg.lawa_k})"] = OnlineLAWA(layout.shares, cfg.lawa_k, cfg.lawa_nu, rt.device)
        share_bytes = layout.shares.numel * 4
        rows = {
            "parameters (fp32)": (nbytes(params), 0),
            "gradients (fp32)": (nbytes(params), 0),  # DDP: its buckets (gradients are views); FSDP: sharded
            "optimizer (AdamW)": (nbytes(state), 0),
        }
        for name, averager in averagers.items():
            held = nbytes(averager.tensors().values())
            rows[name] = (0, held) if host else (held, 0)
        buffers = {}
        if cfg.lawa_online and not host:
            buffers["LAWA output"] = (share_bytes, 0)
        if host and averagers:
            buffers["averaging staging (and LAWA output)"] = (0, share_bytes)
        kinds = 1 + cfg.ema + cfg.swa
        buffers["snapshot buffers (pinned)"] = (0, kinds * share_bytes)
        replicated = {f"model.{n}": p for n, p in zip(names, params)}
        replicated |= {f"optimizer.{i}": t for i, t in enumerate(state)}
        mine = owned_keys(replicated, world)[rank] if cfg.parallel == "ddp" and world > 1 else set(replicated)
        averaging_state = sum(sum(rows[n]) for n in averagers)
        resume = nbytes(t for k, t in replicated.items() if k in mine) + averaging_state
        buffers["resume staging (pinned)"] = (0, resume)
        return {
            "rows": rows,
            "buffers": buffers,
            "averaging_bytes_per_rank": averaging_state,
            "averaging_host_bytes_per_rank": averaging_state if host else 0,
            "model_bytes": sum(p.numel() for p in params) * 4,
            "share_bytes": share_bytes,
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
