"""Checkpoints off the training thread: weights-only snapshots and resume checkpoints.

Both copy this rank's tensors once into reusable pinned host buffers (``Stager``: from a GPU
on a side stream that waits for the step's work, from host tensors on a thread of its own, so
the training thread only starts the copies) and write them from a background thread, one write
of each kind in flight at a time:

- ``SnapshotWriter``: the rank's share of the raw, EMA and SWA weights as safetensors: one file
  in a single-process run, the rank's shard file of a ``step_XXXXXXXX/`` directory otherwise
  (formats in ``ewa.files``).
- ``ResumeCheckpointer``: the whole trainer state through ``torch.distributed.checkpoint``
  (``async_save``): every rank writes its own shards into ``resume/.step_XXXXXXXX.tmp/``, which
  rank 0 renames to ``resume/step_XXXXXXXX/`` once every rank is done, so a checkpoint under
  its final name is always complete. Tensors only; the scalars (step, counters, optimizer
  settings, config) go to ``state.json``. A DDP run's replicated model and optimizer state is
  split between the ranks by size, so each stages and writes about 1/world of it. Loading is
  reshardable (any number of processes) and never unpickles code (``SafeReader``).

Nothing may change what is being copied: ``before_params_change`` waits for the copies (makes
the GPU wait for them) before the optimizer, an averager or an evaluation writes the tensors.
A failed background write is raised by the next ``check`` or ``wait``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor

from ewa.engine.averaging import copy_share
from ewa.engine.parallel import Layout
from ewa.files import (
    CheckpointError,
    atomic_write_text,
    fsync_path,
    save_snapshot,
    save_snapshot_shard,
    snapshot_name,
)

# a lone process saves and loads without a process group, as intended
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")

Lane = Callable[[Callable[[], Any]], Future]  # runs a function after the averaging updates in flight


class Stager:
    """Reusable pinned host buffers, and the copies into them, made off the training thread:
    from a GPU on a side stream, from host tensors by a thread of its own (the copy does not
    hold the GIL). ``before_params_change`` waits for them before the live tensors change."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        on_host = device.type == "cpu"  # (meta, for the memory plan: allocated only, copied in place)
        self.copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ewa-staging") if on_host else None
        self.buffers: dict[str, torch.Tensor] = {}
        self._copied: torch.cuda.Event | Future | None = None

    def _buffer(self, key: str, like: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = self.buffers[key] = torch.empty(like.shape, dtype=like.dtype, pin_memory=self.cuda)
        return buf

    def stage(
        self, live: dict[str, torch.Tensor], lane: dict[str, torch.Tensor], run_on_lane: Lane
    ) -> tuple[dict, Callable[[], None]]:
        """Host copies of ``live`` (copied now, asynchronously from a GPU) and of ``lane``
        (state updated in the background, copied by ``run_on_lane`` after its updates);
        returns them and a function that blocks until every copy is done."""
        out = {k: self._buffer(k, t) for k, t in (live | lane).items()}
        keys = list(live)
        copied = self._copy([out[k] for k in keys], [live[k] for k in keys]) if keys else None
        self._copied = copied
        later = run_on_lane(lambda: torch._foreach_copy_([out[k] for k in lane], list(lane.values()))) if lane else None

        def ready() -> None:
            if isinstance(copied, Future):
                copied.result()
            elif copied is not None:
                copied.synchronize()
            if later is not None:
                later.result()

        return out, ready

    def _copy(self, dst: list[torch.Tensor], src: list[torch.Tensor]) -> torch.cuda.Event | Future | None:
        if self.copier is not None:
            return self.copier.submit(self._host_copy, dst, src)
        return copy_share(dst, src, self.stream)

    def _host_copy(self, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        """Byte for byte, by numpy: one thread, without the GIL, and without an OpenMP team of
        its own competing with the training thread's (a torch copy here slowed the training
        steps of the tiny config by about 12% on 2 cores)."""
        for d, t in zip(dst, src, strict=True):
            np.copyto(as_bytes(d), as_bytes(t))

    def before_params_change(self) -> None:
        """The live tensors may change once this returns (from a GPU: once the current
        stream reaches it)."""
        copied, self._copied = self._copied, None
        if isinstance(copied, Future):
            copied.result()
        elif copied is not None:
            torch.cuda.current_stream().wait_event(copied)

    def close(self) -> None:
        if self.copier is not None:
            self.copier.shutdown(wait=True)


INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """``t``'s memory as a numpy array of integers of its element size (any dtype, any strides)."""
    return t.detach().view(INT_OF_SIZE[t.element_size()]).numpy()


class Background:
    """One background thread; its failures are raised on the training thread."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._jobs: list[Future] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        job = self._pool.submit(fn, *args)
        self._jobs.append(job)
        return job

    def check(self) -> None:
        """Raise the error of a finished job, without waiting for the others."""
        for job in [j for j in self._jobs if j.done()]:
            self._jobs.remove(job)
            job.result()

    def wait(self) -> None:
        while self._jobs:
            self._jobs.pop(0).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def reason(e: BaseException) -> str:
    """What went wrong, in a line: the first rank's error of a ``CheckpointException``."""
    if isinstance(e, CheckpointException):
        e = next(iter(e.failures.values()))[0]
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _write_error(path: Path, e: OSError) -> CheckpointError:
    return CheckpointError(f"could not write {path}: {e.strerror or e}")


class SnapshotWriter:
    """Weights-only snapshots of this rank's share of the weights, written in the background."""

    def __init__(self, layout: Layout, device: torch.device, rank: int, after_write: Callable[[int], None]):
        """``after_write(step)`` runs on the writer thread once a snapshot is written (e.g. pruning)."""
        self.layout, self.rank = layout, rank
        self.stager = Stager(device)
        self.background = Background("ewa-snapshots")
        self.after_write = after_write

    def save(
        self,
        folders: dict[str, Path],
        step: int,
        live: dict[str, list],
        lane: dict[str, list],
        run_on_lane: Lane,
        meta: dict[str, str],
    ) -> None:
        """Snapshot each kind's share (a list of pieces, as the layout's) into ``folders[kind]``."""
        self.background.wait()  # one write in flight: the buffers are free again
        flatten = lambda d: {f"{kind}/{i}": t for kind, pieces in d.items() for i, t in enumerate(pieces)}  # noqa: E731
        staged, ready = self.stager.stage(flatten(live), flatten(lane), run_on_lane)
        kinds = list(live) + list(lane)
        self.background.submit(self._write, folders, step, kinds, staged, ready, meta)

    def _write(
        self, folders: dict[str, Path], step: int, kinds: list[str], staged: dict, ready: Callable, meta: dict
    ) -> None:
        ready()
        for kind in kinds:
            pieces = [
                (name, offset, shape, staged[f"{kind}/{i}"])
                for i, (name, offset, shape) in enumerate(self.layout.where())
            ]
            path = folders[kind] / snapshot_name(step)
            try:
                if self.layout.world == 1:
                    save_snapshot(path, {name: t.view(shape) for name, _, shape, t in pieces}, meta | {"kind": kind})
                else:
                    path = path.with_suffix("")
                    save_snapshot_shard(
                        path, self.rank, self.layout.world, [p for p in pieces if p[3].numel()], meta | {"kind": kind}
                    )
            except OSError as e:
                raise _write_error(path, e) from None
        self.after_write(step)

    def before_params_change(self) -> None:
        self.stager.before_params_change()

    def close(self) -> None:
        """Stop the threads, after the write in flight."""
        self.background.close()
        self.stager.close()


class _Staged(AsyncStager):
    """Hands ``async_save`` a state dict that our ``Stager`` is copying: ready when ``ready`` is."""

    _synchronize_after_execute = False

    def __init__(self, ready: Future):
        self.ready = ready

    def stage(self, state_dict: dict, **kwargs: Any) -> Future:
        return self.ready

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def owned_keys(tensors: dict[str, torch.Tensor], world: int) -> list[set[str]]:
    """Split replicated tensors between ``world`` ranks by size (largest first, each to the
    least loaded rank): the keys each rank writes."""
    load, owned = [0] * world, [set() for _ in range(world)]
    for key, t in sorted(tensors.items(), key=lambda kv: (-kv[1].numel(), kv[0])):
        r = load.index(min(load))
        owned[r].add(key)
        load[r] += t.numel() * t.element_size()
    return owned


def written_by(flat: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """The entries of a checkpoint's ``flat`` state that ``rank`` writes: its shards of the
    sharded (DTensor) entries, and its part of the replicated ones (``owned_keys``)."""
    if world == 1:
        return flat
    replicated = {k: t for k, t in flat.items() if not isinstance(t, DTensor)}
    mine = owned_keys(replicated, world)[rank]
    return {k: t for k, t in flat.items() if k not in replicated or k in mine}


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _like(buf: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``buf`` (a host buffer) with ``t``'s sharding, left where it is: ``DTensor.from_local``
    would copy it to the mesh's device (a GPU), racing the copy into it and doubling the
    GPU memory of the state; DCP's own staging wraps host buffers this way."""
    if isinstance(t, DTensor):
        return DTensor(buf.detach(), t._spec, requires_grad=False)
    return buf


class ResumeCheckpointer:
    """Resume checkpoints of the whole trainer state, written with ``async_save``."""

    def __init__(self, folder: Path, device: torch.device, rank: int, world: int, after_save: Callable[[int], None]):
        """``after_save(step)`` runs on rank 0's writer thread once a checkpoint is complete."""
        self.folder, self.rank, self.world = Path(folder), rank, world
        self.grouped = dist.is_initialized()
        # the background writes' collectives get a gloo group of their own
        self.group = dist.new_group(backend="gloo") if self.grouped else None
        self.stager = Stager(device)
        self.background = Background("ewa-resume")
        self.after_save = after_save

    def save(
        self, step: int, flat: dict[str, torch.Tensor], lane_keys: set[str], run_on_lane: Lane, meta: dict
    ) -> None:
        """Write ``flat`` (name -> tensor or DTensor; those in ``lane_keys`` are updated in the
        background) and ``meta`` (JSON) as the checkpoint of ``step``."""
        self.background.wait()
        flat = written_by(flat, self.rank, self.world)
        live = {k: local(t) for k, t in flat.items() if k not in lane_keys}
        lane = {k: local(t) for k, t in flat.items() if k in lane_keys}
        staged, ready = self.stager.stage(live, lane, run_on_lane)
        state: dict[str, dict] = {}  # nested by the first part of the name (DCP saves the same names, faster)
        for k, t in flat.items():
            head, _, rest = k.partition(".")
            state.setdefault(head, {})[rest] = _like(staged[k], t)
        tmp = self.folder / f".step_{step:08d}.tmp"

        def staged_state() -> dict:
            ready()
            if self.rank == 0:
                atomic_write_text(tmp / "state.json", json.dumps(meta))
            return state

        ready_future = self.background.submit(staged_state)
        try:
            response = dcp.async_save(
                state,
                storage_writer=FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True),
                process_group=self.group,
                async_stager=_Staged(ready_future),
                no_dist=not self.grouped,
            )
        except OSError as e:
            raise _write_error(tmp, e) from None
        upload = getattr(response, "upload_completion", response)
        self.background.submit(self._finish, step, tmp, upload)

    def _finish(self, step: int, tmp: Path, upload: Future) -> None:
        try:
            upload.result()
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"could not write the resume checkpoint {tmp}: {reason(e)}") from None
        if self.rank == 0:
            final = self.folder / f"step_{step:08d}"
            shutil.rmtree(final, ignore_errors=True)  # a checkpoint of the same step from a run that was cut short
            os.rename(tmp, final)
            fsync_path(self.folder)
            self.after_save(step)

    def before_params_change(self) -> None:
        self.stager.before_params_change()

    def close(self) -> None:
        """Stop the threads, after the write in flight."""
        self.background.close()
        self.stager.close()


# ---------------------------------------------------------------------------------------------
# reading


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles the ``.metadata`` of a checkpoint: DCP's own record types, torch sizes,
    dtypes and layouts, and paths; anything else (which could run code) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            module == "torch.distributed.checkpoint.metadata"
            or (module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo")
            or (
                module == "torch"
                and (
                    name == "Size"
                    or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
                )
            )
            or (module == "torch.serialization" and name == "_get_layout")
            or (
                module == "pathlib" and name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")
            )
            or (module == "collections" and name == "OrderedDict")
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refused {module}.{name}")
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """A ``FileSystemReader`` that reads ``.metadata`` without executing code."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
                raise CheckpointError(f"{path}: refused or unreadable checkpoint metadata ({e})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_meta(path: Path) -> dict:
    file = Path(path) / "state.json"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a resume checkpoint of this project ({e})") from None


def load_into(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill ``tensors`` (tensors and DTensors, in place) from the checkpoint at ``path``,
    resharding as needed."""
    try:
        dcp.load(tensors, storage_reader=SafeReader(path))
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"{path}: cannot be loaded ({reason(e)})") from None


def read_resume(path: Path) -> dict:
    """A resume checkpoint, whole, in this process (no process group needed), for inspection
    and tests: ``step``, ``model`` (name -> tensor), ``averagers`` (name -> its counters and
    ``tensors``: buffer -> parameter name -> tensor) and ``meta`` (``state.json``)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    meta = read_meta(path)
    nested = _load_state_dict_from_keys(storage_reader=SafeReader(path))
    flat = {f"{head}.{name}": t for head, part in nested.items() for name, t in part.items()}
    model = {name: flat[f"model.{name}"] for name in meta["names"]}
    averagers = {}
    for name, counters in meta["averagers"].items():
        prefix = f"averagers.{name}."
        buffers: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in flat.items():
            if key.startswith(prefix):
                buffer, _, param = key[len(prefix) :].partition(".")
                if param:  # FSDP: one entry per parameter
                    buffers.setdefault(buffer, {})[param] = t
                else:  # DDP: the parameters flattened one after another
                    parts = t.split([model[n].numel() for n in meta["names"]])
                    buffers[buffer] = {n: p.view(model[n].shape) for n, p in zip(meta["names"], parts, strict=True)}
        averagers[name] = {**counters, "tensors": buffers}
    return {"step": meta["step"], "model": model, "averagers": averagers, "meta": meta}
