"""Work off the training thread. ``Background`` is the one owner of the project's background
threads and of its side CUDA stream; every component that works in the background goes
through it.

What leaves the training thread:
- copies of live tensors (the weights, averages kept on the device) into host buffers: from a
  GPU on the side stream, once the work queued on the current stream is done; from host
  tensors on the ``copy`` thread, byte for byte with numpy (one thread, no GIL, and no OpenMP
  team of its own competing with training's, as a torch copy has: it slowed the tiny config's
  steps by about 12% on 2 cores);
- jobs on named lanes, one thread each, run in the order submitted: averaging updates in host
  memory, snapshot writes, resume-checkpoint writes.

**The one rule: nothing writes a tensor while a copy still reads it.** Every writer of the live
weights or averages calls ``fence()`` first: the optimizer step (``guard`` makes it a hook of
the optimizer), an averaging update, and an evaluation that swaps an average into the model.
From a GPU the current stream waits for the copies (the training thread does not); on a CPU the
training thread waits for them. Code that adds a new in-place write to the weights calls
``fence()`` before it.

A job's failure is raised on the training thread: by ``check()`` once the job is done, by
``wait()``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

Done = torch.cuda.Event | Future | None  # a copy or job in flight (None: already done)


def wait_for(done: Done) -> None:
    """Block this thread (any thread) until a copy or job is done, raising its failure."""
    if isinstance(done, Future):
        done.result()
    elif done is not None:
        done.synchronize()


class HostBuffers:
    """Reusable host buffers, one per key (pinned, for copies from a GPU)."""

    def __init__(self, pin: bool):
        self.pin, self.buffers = pin, {}

    def like(self, key: str, t: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self.buffers[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
        return buf


class Background:
    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._lanes: dict[str, ThreadPoolExecutor] = {}
        self._jobs: dict[str, list[Future]] = {}
        self._reading: list[Done] = []  # copies in flight that read live tensors

    def buffers(self) -> HostBuffers:
        return HostBuffers(pin=self.stream is not None)

    def copy(self, dst: list[torch.Tensor], src: list[torch.Tensor]) -> Done:
        """Start ``dst <- src`` (host buffers <- live tensors) off the training thread; ``src``
        is read until the copy is done, so its writers pass ``fence()`` first."""
        if not src or src[0].is_meta:  # (the memory plan allocates on meta: nothing to copy)
            return None
        if src[0].is_cuda:
            self.stream.wait_stream(torch.cuda.current_stream(src[0].device))
            with torch.cuda.stream(self.stream):
                torch._foreach_copy_(dst, src, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.stream)
        else:
            done = self._lane("copy").submit(_copy_bytes, dst, src)
        self._reading.append(done)
        return done

    def copy_after(self, lane: str, dst: list[torch.Tensor], src: list[torch.Tensor]) -> Future:
        """``dst <- src`` for host tensors that the jobs of ``lane`` write: on that lane, after them."""
        return self.submit(lane, _copy_bytes, dst, src)

    def fence(self) -> None:
        """Call before writing tensors that a copy may read: waits for the copies in flight
        (from a GPU, the current stream waits; the training thread goes on)."""
        reading, self._reading = self._reading, []
        for done in reading:
            if isinstance(done, Future):
                done.result()
            else:
                torch.cuda.current_stream().wait_event(done)

    def guard(self, optimizer: torch.optim.Optimizer) -> None:
        """Make every ``optimizer.step()`` pass the fence first."""
        optimizer.register_step_pre_hook(lambda *_: self.fence())

    def submit(self, lane: str, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on the lane's thread, after the lane's earlier jobs."""
        job = self._lane(lane).submit(fn, *args)
        self._jobs.setdefault(lane, []).append(job)
        return job

    def check(self) -> None:
        """Raise the failure of a job that is done, without waiting for the others."""
        for jobs in self._jobs.values():
            for job in [j for j in jobs if j.done()]:
                jobs.remove(job)
                job.result()

    def wait(self, lane: str | None = None) -> None:
        """Until the jobs of ``lane`` (default: of every lane) are done; raises the first failure."""
        for jobs in [self._jobs.get(lane, [])] if lane else list(self._jobs.values()):
            while jobs:
                jobs.pop(0).result()

    def close(self, wait: bool = True) -> None:
        """Stop the threads, after the work queued on them (``wait``), or leave them to end
        with the process (after a failure, a job may wait for a peer that is gone)."""
        for pool in self._lanes.values():
            pool.shutdown(wait=wait, cancel_futures=not wait)
        self._lanes.clear()

    def _lane(self, name: str) -> ThreadPoolExecutor:
        if name not in self._lanes:  # the one place the project starts threads
            self._lanes[name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ewa-{name}")
        return self._lanes[name]


INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _copy_bytes(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    for d, s in zip(dst, src, strict=True):
        np.copyto(_as_bytes(d), _as_bytes(s))


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """``t``'s memory as a numpy array of integers of its element size (any dtype, any strides)."""
    return t.detach().view(INT_OF_SIZE[t.element_size()]).numpy()
