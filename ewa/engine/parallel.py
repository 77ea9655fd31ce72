"""Parallelism: how the model is wrapped (DDP or FSDP2), which share of the parameters each
rank owns for averaging and snapshots, and how shares are put back into the live model.

A rank's *share* is a list of pieces, each a view into one parameter:
- under FSDP2, the rank's local shard of every parameter (``DTensor.to_local()``: whole
  rows, ``Shard(0)``);
- under DDP (and in a single process), a fixed contiguous slice of the parameters
  flattened one after another in ``named_parameters`` order, split as ``torch.chunk``
  splits: rank r owns elements ``[r * c, (r + 1) * c)`` with ``c = ceil(numel / world)``.

Averagers keep fp32 state for their share only (``Shares.alloc``), so a rank holds
``1 / world`` of every average. The trainer calls this module and never branches on
``parallel`` itself.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel as DDP

if TYPE_CHECKING:
    from ewa.engine.runtime import Runtime

Pieces = list[torch.Tensor]  # views into parameters (a rank's share), or into a flat buffer
GATHER_ELEMENTS = 1 << 24  # elements per rank per all-gather round when assembling a model (64 MiB fp32)


@dataclass
class Wrapped:
    """The model as the loop uses it: ``train`` (DDP, FSDP2 or the model itself), ``eval`` (what
    evaluation calls) and ``autocast``, the context of their forward passes (none under FSDP2 on
    a GPU, whose mixed-precision policy computes in bf16 already)."""

    train: nn.Module
    eval: nn.Module
    autocast: Callable[[], contextlib.AbstractContextManager]

    def accumulating(self, more_to_come: bool) -> contextlib.AbstractContextManager:
        """Gradients are synchronised (DDP's all-reduce, FSDP2's reduce-scatter) on the last
        micro-step of a step only."""
        if isinstance(self.train, FSDPModule):
            self.train.set_requires_gradient_sync(not more_to_come)
        elif isinstance(self.train, DDP) and more_to_come:
            return self.train.no_sync()
        return contextlib.nullcontext()


def wrap(model: nn.Module, parallel: str, compile: bool, rt: Runtime) -> Wrapped:
    """``model`` (which stays the raw handle) wrapped for training, as torchtitan does.

    ``ddp``: the model compiled as a whole; in DDP when there are several processes.
    ``fsdp``: each transformer block compiled (one graph for every block), then sharded with
    ``fully_shard``, then the root (embeddings, final norm and the head tied to them), the
    parameters becoming DTensors; the output layer and loss compiled on their own. On CUDA the
    blocks compute in bf16 (``rt.dtype``) with fp32 master weights and fp32 gradient reduction."""
    if parallel == "fsdp":
        half = rt.device_type == "cuda" and rt.dtype != torch.float32
        policy = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32) if half else MixedPrecisionPolicy()
        blocks = model.transformer.h
        for i, block in enumerate(blocks):
            if compile:
                block.compile(dynamic=False)
            # the last block's weights would be gathered again at once for the backward
            fully_shard(block, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
        if compile:
            model.loss = torch.compile(model.loss, dynamic=False)
        fully_shard(model, mp_policy=policy)
        return Wrapped(model, model, contextlib.nullcontext if half else rt.autocast)
    model.to(rt.device)
    compiled = torch.compile(model, dynamic=False) if compile else model
    if rt.world_size == 1:  # DDP of one process only splits the compiled graph and adds collectives
        return Wrapped(compiled, compiled, rt.autocast)
    ids = [rt.device.index] if rt.device_type == "cuda" else None
    with warnings.catch_warnings():  # torch 2.13 renames the setting; the GPU machines' 2.11 knows this name only
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
        ddp = DDP(compiled, device_ids=ids, gradient_as_bucket_view=True, broadcast_buffers=False)  # buffers: constants
    return Wrapped(ddp, compiled, rt.autocast)


@dataclass(frozen=True)
class Shares:
    """This rank's pieces of the parameters: shapes, and how to view a flat buffer as them."""

    shapes: tuple[torch.Size, ...]

    @property
    def numel(self) -> int:
        return sum(s.numel() for s in self.shapes)

    def split(self, flat: torch.Tensor) -> Pieces:
        """Views of a flat buffer of ``numel`` elements, one per piece."""
        return [t.view(s) for t, s in zip(flat.split([s.numel() for s in self.shapes]), self.shapes, strict=True)]

    def alloc(self, device: torch.device, pin: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A flat buffer for the pieces: on ``device``, or in pinned host memory with ``pin``."""
        if pin:
            return torch.empty(self.numel, dtype=dtype, pin_memory=True)
        return torch.empty(self.numel, dtype=dtype, device=device)


class Layout:
    """Which pieces of the parameters this rank owns, and how to move them around."""

    world: int
    shares: Shares

    def pieces(self, params: list[torch.Tensor]) -> Pieces:
        """The rank's pieces of the live parameters (views: writing to them writes the model)."""
        raise NotImplementedError

    def load(self, params: list[torch.Tensor], flat: torch.Tensor) -> None:
        """Make every rank's live parameters hold the values whose share on each rank is
        that rank's ``flat`` (all ranks call this together)."""
        raise NotImplementedError

    def global_tensor(self, flat: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """The share ``flat`` as a reshardable checkpoint entry, or one per parameter (DTensors
        under a process group, viewing ``flat``: a checkpoint loads into them in place)."""
        raise NotImplementedError

    def reshard(self) -> None:
        """Drop the whole weights a forward pass without backward left gathered (FSDP2)."""

    def share_of(self, full: dict[str, torch.Tensor]) -> torch.Tensor:
        """This rank's share of whole tensors (name -> tensor), as a flat fp32 buffer for ``load``."""
        pieces = [
            full[name].reshape(-1)[offset : offset + shape.numel()]
            for (name, offset, _), shape in zip(self.where(), self.shares.shapes, strict=True)
        ]
        return torch.cat([p.float() for p in pieces]) if pieces else torch.empty(0)

    @contextlib.contextmanager
    def swapping(self, params: list[torch.Tensor]) -> Iterator[Callable[[torch.Tensor], None]]:
        """Yields ``load(flat)``, which puts a share (e.g. an average) into the live model;
        the live weights come back afterwards. Only this rank's share is backed up."""
        backup = torch.cat([p.reshape(-1) for p in self.pieces(params)]) if self.shares.numel else None
        try:
            yield lambda flat: self.load(params, flat)
        finally:
            self.load(params, backup if backup is not None else torch.empty(0, device=params[0].device))

    def where(self) -> list[tuple[str, int, torch.Size]]:
        """For each piece: its parameter's name, the piece's offset in that parameter's
        flattened elements, and the parameter's shape (what a shard file records)."""
        raise NotImplementedError


class FlatLayout(Layout):
    """A contiguous slice of the flattened parameters (DDP, or one process)."""

    def __init__(self, names: list[str], shapes: list[torch.Size], world: int, rank: int):
        self.names, self.shapes = names, [torch.Size(s) for s in shapes]
        self.world, self.rank = world, rank
        self.total = sum(s.numel() for s in self.shapes)
        self.chunk = math.ceil(self.total / world)
        self.lo = min(self.total, rank * self.chunk)
        self.hi = min(self.total, self.lo + self.chunk)
        # (parameter index, start, stop) in that parameter's flattened elements
        self.owned = list(self._overlaps(self.lo, self.hi))
        self.shares = Shares(tuple(torch.Size([b - a]) for _, a, b in self.owned))

    def _overlaps(self, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """(parameter index, start, stop) of the parameters' elements in global ``[lo, hi)``."""
        offset = 0
        for i, shape in enumerate(self.shapes):
            n = shape.numel()
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                yield i, a - offset, b - offset
            offset += n

    def pieces(self, params: list[torch.Tensor]) -> Pieces:
        return [params[i].detach().view(-1)[a:b] for i, a, b in self.owned]

    def where(self) -> list[tuple[str, int, torch.Size]]:
        return [(self.names[i], a, self.shapes[i]) for i, a, _ in self.owned]

    @torch.no_grad()
    def load(self, params: list[torch.Tensor], flat: torch.Tensor) -> None:
        if self.world == 1:
            torch._foreach_copy_(self.pieces(params), self.shares.split(flat))
            return
        # all-gather in rounds of GATHER_ELEMENTS per rank: no full-model buffer is needed
        device, dtype = params[0].device, params[0].dtype
        for start in range(0, self.chunk, GATHER_ELEMENTS):
            size = min(GATHER_ELEMENTS, self.chunk - start)
            mine = torch.zeros(size, device=device, dtype=dtype)
            part = flat[start : start + size]
            mine[: len(part)].copy_(part)
            everyone = torch.empty(size * self.world, device=device, dtype=dtype)
            dist.all_gather_into_tensor(everyone, mine)
            for rank, got in enumerate(everyone.split(size)):
                lo = rank * self.chunk + start
                done = 0
                for i, a, b in self._overlaps(lo, min(lo + size, self.total)):
                    params[i].view(-1)[a:b].copy_(got[done : done + b - a])
                    done += b - a

    def global_tensor(self, flat: torch.Tensor) -> torch.Tensor:
        if not dist.is_initialized():
            return flat
        mesh = world_mesh(flat.device.type)
        return DTensor.from_local(flat, mesh, [Shard(0)], run_check=False, shape=(self.total,), stride=(1,))


class ShardLayout(Layout):
    """The local shards of FSDP2's DTensor parameters."""

    def __init__(self, names: list[str], params: list[torch.Tensor], modules: list[nn.Module]):
        """``modules``: the FSDP modules, told to drop gathered weights after a load."""
        self.names, self.modules = names, modules
        self.world = params[0].device_mesh.size()
        self.params = params
        self.shares = Shares(tuple(p.to_local().shape for p in params))
        self.offsets = [row_offset(p) * p.stride(0) for p in params]

    def pieces(self, params: list[torch.Tensor]) -> Pieces:
        return [p.detach().to_local() for p in params]

    def where(self) -> list[tuple[str, int, torch.Size]]:
        return [(n, o, p.shape) for n, o, p in zip(self.names, self.offsets, self.params, strict=True)]

    @torch.no_grad()
    def load(self, params: list[torch.Tensor], flat: torch.Tensor) -> None:
        torch._foreach_copy_(self.pieces(params), self.shares.split(flat))
        self.reshard()  # the next forward gathers what was loaded

    def reshard(self) -> None:
        for module in self.modules:  # the root and the last block keep their weights after forward
            module.reshard()

    def global_tensor(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            n: like(t, spec) for n, t, spec in zip(self.names, self.shares.split(flat), self.params, strict=True)
        }


def layout_of(names: list[str], params: list[torch.Tensor], model: nn.Module, rt: Runtime) -> Layout:
    if isinstance(params[0], DTensor):
        return ShardLayout(names, params, [m for m in model.modules() if isinstance(m, FSDPModule)])
    return FlatLayout(names, [p.shape for p in params], rt.world_size, rt.rank)


def row_offset(p: DTensor) -> int:
    """The first row of this rank's local shard of an FSDP2 parameter: ``Shard(0)`` splits
    rows as ``torch.chunk`` does (``torch.distributed.tensor.Shard``'s documented semantics)."""
    if tuple(p.placements) != (Shard(0),):
        raise ValueError(f"expected FSDP2's Shard(0) placement, got {p.placements}")
    rows, world = p.shape[0], p.device_mesh.size()
    first = min(rows, p.device_mesh.get_coordinate()[0] * math.ceil(rows / world))
    assert p.to_local().shape[0] == min(math.ceil(rows / world), rows - first), "not torch.chunk's split"
    return first


def like(local: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's part of ``t``, e.g. a host buffer) as a DTensor sharded as ``t``
    is, left on its device (a mesh of its device type: no copy is made)."""
    if not isinstance(t, DTensor):
        return local
    mesh = world_mesh(local.device.type)
    return DTensor.from_local(local, mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())


@functools.cache
def world_mesh(device_type: str):
    """A 1-D device mesh over every rank, for checkpoint entries held on that type of device."""
    return init_device_mesh(device_type, (dist.get_world_size(),))
