"""Snapshots and resume checkpoints of a run, written in the background.

- **Snapshots** (every ``ckpt_interval`` steps): the rank's share of the raw weights and of
  every average but LAWA's, as fp32 safetensors for offline averaging: one file per kind from a
  single process, a ``step_XXXXXXXX/`` directory of one shard file per rank otherwise
  (``ewa.files``).
- **Resume checkpoints** (every ``resume_interval`` steps, at the SWA start, at the end, and
  when the run is stopped by a signal): the whole state of the run's components (``states``:
  the trainer's counters, the model, the optimizer, the averages; each an object with
  ``state_dict()`` / ``load_state_dict()``, as in torchtitan's checkpointer). Tensors go through
  ``torch.distributed.checkpoint`` (reshardable: any number of processes loads them),
  everything else into ``state.json``. Every rank writes its own shards into
  ``resume/.step_XXXXXXXX.tmp/``, which rank 0 renames to ``resume/step_XXXXXXXX/`` once every
  rank is done: a checkpoint under its final name is complete. A DDP run's replicated tensors
  are split between the ranks by size, so each writes about 1/world of them.

Both copy the rank's tensors once into reusable host buffers (``Background.copy``: the training
thread only starts the copies) and write them on a lane of their own, one write of each kind in
flight. A failed write stops the run at the next step (``check``), naming the file and the last
good resume checkpoint. Rank 0 prunes: ``max_snapshots`` (never a snapshot that a LAWA window
ending now or later needs) and ``keep_resume`` (never the SWA start, which train_swa.py
branches from).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor

from ewa.engine.background import Background, Done, wait_for
from ewa.engine.config import ConfigError, TrainConfig
from ewa.engine.parallel import Layout, Pieces, like
from ewa.engine.runtime import Runtime
from ewa.files import (
    CheckpointError,
    atomic_write_text,
    fsync_path,
    list_checkpoints,
    load_resume_tensors,
    reason,
    resume_dir,
    resume_shapes,
    resume_values,
    save_snapshot,
    save_snapshot_shard,
    snapshot_dir,
    snapshot_name,
)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpointer:
    def __init__(self, cfg: TrainConfig, states: dict[str, Stateful], layout: Layout, background: Background,
                 rt: Runtime, model_config: dict):
        """``states``: the components saved in a resume checkpoint, by name. A component whose
        state is written on a background lane says so in ``lane``; one that may be missing
        from a checkpoint (it restarts then) sets ``optional``."""
        self.cfg, self.states, self.layout, self.background, self.rt = cfg, states, layout, background, rt
        self.run_dir = Path(cfg.out_dir)
        self.model_config = json.dumps(model_config)
        self.group = rt.cpu_group  # the background writes' collectives: a gloo group of their own
        self.snapshot_buffers, self.resume_buffers = background.buffers(), background.buffers()

    def due(self, step: int, force: bool = False, stopping: bool = False) -> tuple[bool, bool]:
        """Whether a snapshot, and a resume checkpoint, are due at ``step``."""
        cfg = self.cfg
        snapshot = force or step % cfg.ckpt_interval == 0 or step == cfg.max_steps
        ends = step % cfg.resume_interval == 0 or step == cfg.max_steps or step == cfg.swa_start_step()
        return snapshot, stopping or (step > 0 and ends)

    # -- snapshots ------------------------------------------------------------------------------

    def save_snapshots(self, step: int, kinds: dict[str, Pieces], lane: str | None = None) -> None:
        """Snapshot each kind's share (a list of pieces, as the layout's): ``raw``, the live
        weights, and averages, whose state is written on ``lane`` when that is set."""
        self.background.wait("snapshots")  # one write in flight: the buffers are free again
        staged = {kind: [self.snapshot_buffers.like(f"{kind}/{i}", t) for i, t in enumerate(pieces)]
                  for kind, pieces in kinds.items()}
        done = [self._copy(staged[kind], pieces, None if kind == "raw" else lane) for kind, pieces in kinds.items()]
        self.background.submit("snapshots", self._write_snapshots, step, staged, done)

    def _copy(self, dst: Pieces, src: Pieces, lane: str | None) -> Done:
        """``dst <- src``: started now, or on ``lane`` after the jobs there that write ``src``."""
        return self.background.copy(dst, src) if lane is None else self.background.copy_after(lane, dst, src)

    def _write_snapshots(self, step: int, staged: dict[str, Pieces], done: list[Done]) -> None:
        for d in done:
            wait_for(d)
        meta = {"step": str(step), "format": "ewa-snapshot-1", "model_config": self.model_config}
        where = self.layout.where()
        for kind, pieces in staged.items():
            path = snapshot_dir(self.run_dir, kind) / snapshot_name(step)
            try:
                if self.layout.world == 1:
                    weights = {name: t.view(shape) for (name, _, shape), t in zip(where, pieces, strict=True)}
                    save_snapshot(path, weights, meta | {"kind": kind})
                else:
                    path = path.with_suffix("")
                    parts = [(*w, t) for w, t in zip(where, pieces, strict=True) if t.numel()]
                    save_snapshot_shard(path, self.rt.rank, self.layout.world, parts, meta | {"kind": kind})
            except OSError as e:
                raise write_error(path, e) from None
        if self.rt.master and self.cfg.max_snapshots:
            self._prune_snapshots(step)

    def _prune_snapshots(self, step: int) -> None:
        """Keep the newest max_snapshots of each kind, and every raw snapshot a LAWA window
        ending at ``step`` or later still needs."""
        needed_from = step - (self.cfg.lawa_k - 1) * self.cfg.lawa_nu
        for folder in (self.run_dir / "snapshots").iterdir():
            snaps = list_checkpoints(folder)
            for old in sorted(snaps)[: -self.cfg.max_snapshots]:
                if folder.name != "raw" or old < needed_from:
                    remove(snaps[old])

    # -- resume checkpoints ---------------------------------------------------------------------

    def save_resume(self, step: int) -> None:
        """Start writing the resume checkpoint of ``step``: every component's state."""
        self.background.wait("resume")  # one write in flight: the buffers are free again
        state = {name: component.state_dict() for name, component in self.states.items()}
        tensors = {".".join(p): t for p, t in leaves(state) if isinstance(t, torch.Tensor)}  # <component>.<...>
        mine = written_by(tensors, self.rt.rank, self.rt.world_size)
        staged = {key: self.resume_buffers.like(key, local(t)) for key, t in mine.items()}
        done = []
        for name, component in self.states.items():
            if keys := [k for k in mine if k.partition(".")[0] == name]:
                src = [local(mine[k]) for k in keys]
                done.append(self._copy([staged[k] for k in keys], src, getattr(component, "lane", None)))
        nested: dict[str, dict] = {}  # by component: DCP names each tensor <component>.<rest>, its key
        for key, t in mine.items():
            head, _, rest = key.partition(".")
            nested.setdefault(head, {})[rest] = like(staged[key], t)
        self.background.submit("resume", self._write_resume, step, nested, without_tensors(state), done)

    def _write_resume(self, step: int, state: dict, values: dict, done: list[Done]) -> None:
        for d in done:
            wait_for(d)
        folder = resume_dir(self.run_dir)
        tmp = folder / f".step_{step:08d}.tmp"
        try:
            if self.rt.master:
                atomic_write_text(tmp / "state.json", json.dumps(values))
            writer = FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True)
            dcp.save(state, storage_writer=writer, process_group=self.group, no_dist=not dist.is_initialized())
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"could not write the resume checkpoint {tmp}: {reason(e)}") from None
        if self.rt.master:
            final = folder / f"step_{step:08d}"
            shutil.rmtree(final, ignore_errors=True)  # a checkpoint of the same step from a run cut short
            os.rename(tmp, final)
            fsync_path(folder)
            self._prune_resume()

    def _prune_resume(self) -> None:
        """Keep the latest keep_resume (0: all) and the SWA start."""
        saved = self.resume_checkpoints()
        if self.cfg.keep_resume:
            keep = set(sorted(saved)[-self.cfg.keep_resume :]) | {self.cfg.swa_start_step()}
            for old in saved.keys() - keep:
                remove(saved[old])

    def resume_checkpoints(self) -> dict[int, Path]:
        folder = resume_dir(self.run_dir)
        return list_checkpoints(folder) if folder.is_dir() else {}

    def load(self, candidates: list[Path]) -> None:
        """Restore every component from the first of ``candidates`` that loads; a damaged one
        is reported and skipped (every rank sees the same failure)."""
        for path in candidates:
            try:
                return self._load(path)
            except CheckpointError as e:
                if len(candidates) == 1:
                    raise
                if self.rt.master:
                    print(f"warning: skipping {e}", file=sys.stderr)
        raise CheckpointError(f"{resume_dir(self.run_dir)}: no resume checkpoint could be read")

    def _load(self, path: Path) -> None:
        stored, values = resume_shapes(path), resume_values(path)
        state = {name: component.state_dict() for name, component in self.states.items()}
        targets = {".".join(p): t for p, t in leaves(state) if isinstance(t, torch.Tensor)}
        shapes = [f"{key.partition('.')[2]}: {stored[key]} vs model {tuple(t.shape)}"
                  for key, t in sorted(targets.items())
                  if key.startswith("model.") and key in stored and stored[key] != tuple(t.shape)]
        if shapes:
            raise ConfigError(f"{path}: the checkpoint's model does not match this config (shapes {shapes[:5]}); "
                              "use the model settings of the run it came from")
        optional = tuple(f"{name}." for name, c in self.states.items() if getattr(c, "optional", False))
        lacking = sorted(k for k in targets.keys() - stored.keys() if not k.startswith(optional))
        if lacking:
            raise CheckpointError(f"{path}: lacks {lacking[:3]}; not a checkpoint of this model and optimizer")
        load_resume_tensors(path, {k: t for k, t in targets.items() if k in stored})
        for name, component in self.states.items():
            loaded = {p[1:]: t for p, t in leaves(state) if p[0] == name and ".".join(p) in stored}
            component.load_state_dict(merged(values.get(name, {}), loaded))

    # -- failures -------------------------------------------------------------------------------

    def check(self, wait: bool = False) -> None:
        """Raise the failure of a background write (waiting for them all with ``wait``),
        naming the file and the last good resume checkpoint."""
        try:
            self.background.wait() if wait else self.background.check()
        except CheckpointError as e:
            saved = self.resume_checkpoints()
            last = f"; the last good resume checkpoint is {saved[max(saved)]}" if saved else ""
            raise CheckpointError(f"{e}{last}") from None

    def remove_temporaries(self) -> None:
        """Remove what writes killed mid-way left (hidden ``.*.tmp*`` files and folders)."""
        for stale in self.run_dir.glob("*/**/.*.tmp*"):
            remove(stale)


def write_error(path: Path, e: OSError) -> CheckpointError:
    return CheckpointError(f"could not write {path}: {e.strerror or e}")


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


# ---------------------------------------------------------------------------------------------
# state trees: nested dicts of tensors and JSON values


def leaves(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, leaf) of every leaf of a nested dict."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def without_tensors(tree: dict) -> dict:
    """The JSON part of a state tree."""
    return {k: without_tensors(v) if isinstance(v, dict) else v
            for k, v in tree.items() if not isinstance(v, torch.Tensor)}


def merged(values: dict, tensors: dict[tuple[str, ...], torch.Tensor]) -> dict:
    """``values`` (a nested dict) with each tensor put at its path."""
    tree = json.loads(json.dumps(values))
    for path, t in tensors.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = t
    return tree


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def owned_keys(tensors: dict[str, torch.Tensor], world: int) -> list[set[str]]:
    """Split replicated tensors between ``world`` ranks by size (largest first, each to the
    least loaded rank): the keys each rank writes."""
    load, owned = [0] * world, [set() for _ in range(world)]
    for key, t in sorted(tensors.items(), key=lambda kv: (-kv[1].numel(), kv[0])):
        r = load.index(min(load))
        owned[r].add(key)
        load[r] += t.numel() * t.element_size()
    return owned


def written_by(tensors: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """The entries of a checkpoint that ``rank`` writes: its shards of the sharded (DTensor)
    entries, and its part of the replicated ones (``owned_keys``)."""
    if world == 1:
        return tensors
    replicated = {k: t for k, t in tensors.items() if not isinstance(t, DTensor)}
    mine = owned_keys(replicated, world)[rank]
    return {k: t for k, t in tensors.items() if k not in replicated or k in mine}
