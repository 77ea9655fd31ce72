"""The process group of a run on several processes, whatever launched them (torchrun, its
restarts, Slurm, a Kubernetes job), and how a failing rank ends the job.

**Restarts.** torchrun keeps its rendezvous store for the whole job and hands it, under the
same address, to the workers of every attempt (``TORCHELASTIC_USE_AGENT_STORE``). The keys
a process group leaves there have the same names in every attempt (``default_pg/0//cpu//0/<rank>``:
a rank's listening address), so a restarted rank could read a dead peer's address and fail
("Connection refused"), or wait for a peer that never connects: gloo's first connection
waits 5 times the group's timeout. So the ranks of an attempt first agree on a fresh
namespace of that store (``attempt_namespace``) and build every group inside it. A start-up
that still takes longer than ``EWA_START_TIMEOUT_MIN`` (default 5) ends the process (status
1) with the stacks of where it waited, through ``faulthandler``'s alarm, so that the launcher
restarts or ends the job.

**Failure.** A rank that fails leaves at once (``exit_after_error``): the first error of the
job is printed once, by the rank that saw it, and a rank that failed only because a peer died
says nothing; no rank waits for a thread or a collective that waits for the dead peer.
torchrun then stops the other ranks.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import sys
import time
import traceback
import uuid
from typing import NoReturn

import torch
import torch.distributed as dist

NAMESPACES = "ewa/attempt"  # the handshake's keys on torchrun's store
# what a rank sees when another rank died: its error is the other rank's to report
PEER_DIED = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket closed",
             "NCCL communicator was aborted", "NCCL Error", "Watchdog caught collective operation timeout")


def start_process_group(backend: str, timeout: datetime.timedelta, device: torch.device | None,
                        lone: bool) -> tuple[dist.Store, dist.ProcessGroup]:
    """Start the default process group (``lone``: a process of its own, e.g. FSDP2 on one
    GPU) and the gloo group for background checkpoint writes; returns the store both are
    built on, and that group."""
    limit = float(os.environ.get("EWA_START_TIMEOUT_MIN", 5)) * 60
    faulthandler.dump_traceback_later(limit, exit=True)  # a C alarm: it fires while C++ waits too
    try:
        rank, world = (0, 1) if lone else (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
        store = dist.HashStore() if lone else attempt_store(rank, world, timeout, time.monotonic() + limit)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, device_id=device)
        return store, dist.new_group(backend="gloo", timeout=timeout)
    finally:
        faulthandler.cancel_dump_traceback_later()


def attempt_store(rank: int, world: int, timeout: datetime.timedelta, deadline: float) -> dist.Store:
    """The store of this attempt: under torchrun, a fresh namespace of the agent's store (which
    earlier attempts filled); otherwise a new store that rank 0 serves at MASTER_ADDR:MASTER_PORT."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        agent = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        return dist.PrefixStore(f"ewa/{attempt_namespace(agent, rank, world, deadline)}/", agent)
    return dist.PrefixStore("ewa/", dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout))


def attempt_namespace(store: dist.Store, rank: int, world: int, deadline: float) -> str:
    """A token that exactly this attempt's ``world`` ranks agree on, though ``store`` holds every
    earlier attempt's keys. Rank 0 draws it, publishes it as ``current`` and waits until the
    ``world - 1`` other ranks have counted themselves in under it; then it writes ``go`` = that
    count. Another rank counts itself in once under each token it reads as ``current``, and takes
    the token whose ``go`` covers its own arrival: an earlier attempt's token has no ``go``, or
    one set before this rank arrived, so the rank reads ``current`` again until rank 0's appears."""
    if world == 1:
        return uuid.uuid4().hex
    pause, arrivals = 0.01, {}
    if rank == 0:
        token = uuid.uuid4().hex
        store.set(f"{NAMESPACES}/current", token)
    while True:
        if rank == 0:
            arrived = store.add(f"{NAMESPACES}/{token}/arrived", 0)
            if arrived == world - 1:
                store.set(f"{NAMESPACES}/{token}/go", str(arrived))
                return token
        elif store.check([f"{NAMESPACES}/current"]):
            token = store.get(f"{NAMESPACES}/current").decode()
            if token not in arrivals:
                arrivals[token] = store.add(f"{NAMESPACES}/{token}/arrived", 1)
            go = f"{NAMESPACES}/{token}/go"
            if store.check([go]) and arrivals[token] <= int(store.get(go)):
                return token
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: the {world} ranks did not all start the process group in time")
        time.sleep(pause)
        pause = min(2 * pause, 0.2)


def exit_after_error(e: BaseException, rank: int | None, store: dist.Store | None, everywhere: bool,
                     named: bool) -> NoReturn:
    """End this rank now, with status 1, waiting for no thread or peer, and say why once: an
    error raised alike on every rank (``everywhere``: a bad setting, missing data) by rank 0,
    as ``error: ...``; any other by the first rank that reports one (one ``add`` on the
    attempt's store decides), with its ``rank`` (None: the only process) and, unless it is
    ``named`` (its message names the file and the fix), its traceback. A rank that failed only
    because a peer died says nothing."""
    if everywhere:
        report = rank in (None, 0)
    else:
        peer = isinstance(e, dist.DistNetworkError) or any(s in str(e) for s in PEER_DIED)
        report = not peer and first_error(store)  # one `add` on the attempt's store decides
    if report:
        if not named:
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(e)  # torchrun's "Root Cause"
            traceback.print_exception(e, file=sys.stderr)
        where = "" if everywhere or rank is None else f" (rank {rank})"
        print(f"error{where}: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def first_error(store: dist.Store | None) -> bool:
    """Whether this rank is the first of the attempt to report an error (yes without a store,
    or when it is gone with its host)."""
    try:
        store.set_timeout(datetime.timedelta(seconds=5))
        return store.add("errors", 1) == 1
    except Exception:
        return True
