"""Rank roles, decided once at start-up (RELION's gold-standard layout).

With N ranks: rank 0 is the master (reads inputs, schedules, gathers, writes; no heavy numerics);
the workers 1..N-1 are split by parity into half set 1 (odd ranks) and half set 2 (even ranks), each
with its own communicator. With N = 1 the single process plays master and both half sets in turn;
with N = 2 the one worker plays both half sets in turn. Nothing here reads MPI.COMM_WORLD: the
world communicator is passed in.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Context:
    world: object                 # the world communicator
    workers: object | None        # all workers (None on a pure master)
    half_comm: object | None      # this rank's half-set communicator (None on a pure master)
    half: int                     # 1 or 2 for a worker of one half set; 0 for the master / a both-halves worker
    is_master: bool
    plays_both_halves: bool       # one worker (or the lone process) refines half 1 then half 2

    @property
    def rank(self) -> int:
        return self.world.Get_rank()

    @property
    def size(self) -> int:
        return self.world.Get_size()

    @property
    def is_worker(self) -> bool:
        return self.workers is not None

    @property
    def n_workers(self) -> int:
        return max(self.size - 1, 1)

    def halves_here(self) -> list[int]:
        """The half sets this rank computes, in order."""
        if not self.is_worker:
            return []
        return [1, 2] if self.plays_both_halves else [self.half]

    def describe(self) -> str:
        if self.size == 1:
            return "1 rank: master and both half sets in one process"
        if self.size == 2:
            return "2 ranks: master (rank 0) and one worker playing both half sets in turn"
        h1 = len(half_members(self.size, 1))
        h2 = len(half_members(self.size, 2))
        return f"{self.size} ranks: master (rank 0), half set 1 on {h1} worker(s), half set 2 on {h2}"


def half_members(size: int, half: int) -> list[int]:
    """World ranks of half set `half` (1: odd ranks, 2: even ranks > 0) for size >= 3."""
    return [r for r in range(1, size) if (r % 2 == 1) == (half == 1)]


def make_context(world) -> Context:
    """Build every rank's role; collective over world."""
    size = world.Get_size()
    rank = world.Get_rank()
    if size == 1:
        return Context(world, world, world, 0, True, True)
    colour_workers = 0 if rank == 0 else 1
    workers = world.Split(colour_workers, rank)
    if size == 2:
        if rank == 0:
            workers.Free()
            return Context(world, None, None, 0, True, False)
        return Context(world, workers, workers, 0, False, True)
    half = 0 if rank == 0 else (1 if rank % 2 == 1 else 2)
    half_comm = world.Split(half, rank)
    if rank == 0:
        workers.Free()
        half_comm.Free()
        return Context(world, None, None, 0, True, False)
    return Context(world, workers, half_comm, half, False, False)


def release_free_memory() -> None:
    """Give the heap's freed pages back to the system (glibc malloc_trim; nothing elsewhere).
    Building the restraints of a million atoms frees about 0.45 GB of temporaries that glibc
    otherwise keeps in the process (RSS 0.97 GB after the build, 0.53 GB after the trim, measured
    on the 7cth assembly); every rank calls it after reading its inputs."""
    trim = _libc_function("malloc_trim")     # glibc only
    if trim is not None:
        trim(0)


def _libc_function(name: str):
    """The C library's function `name` (ctypes), or None when there is no such library or
    function (another C library than glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, name, None)


# glibc's own variable for the size from which malloc maps a block of its own (mallopt
# M_MMAP_THRESHOLD), in bytes
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3


def fixed_mmap_threshold() -> bool:
    """Keep glibc's malloc mapping every block of MMAP_THRESHOLD bytes or more on its own, so
    that a freed array goes back to the system at once, unless $MALLOC_MMAP_THRESHOLD_ is set
    (glibc then applies the user's value itself, from the process's start). Returns whether the
    threshold is fixed (by this call or by that variable).

    By default glibc raises that threshold to the size of each mapped block freed, up to 32 MB:
    after the first arrays of a million atoms are freed (8-24 MB each), later ones come from the
    heap, where a freed block in the middle stays in the process. A worker's resident memory at
    its peak then held, besides its live arrays, pages of arrays freed long before: with the
    threshold fixed, each of 4 workers refining the 1,000,020-atom assembly peaked at 751-765 MB
    against 797-842 MB, the master at 4,162 MB against 4,297 MB (scripts/bench_scale.py, the
    same model to the last digit). The price is time: every array above the threshold is fresh
    pages, which the kernel zeroes, where the heap would have reused freed ones; the 165,175-atom
    ribosome took 91-93 s against 74 s (3 ranks, 2 x 30 iterations). So a run sets it only when
    it is asked to hold as little as it can (whole_model_on_workers off: hpcrefine.refine).
    Nothing elsewhere (another C library): False."""
    if os.environ.get(MMAP_THRESHOLD_ENV, "").strip():
        return True
    mallopt = _libc_function("mallopt")
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


HUGE_PAGES_ENV = "HPCREFINE_HUGE_PAGES"


def small_pages(environ=None) -> bool:
    """Stop numpy asking the kernel for transparent huge pages for its arrays (madvise
    MADV_HUGEPAGE, numpy's default on Linux), unless $HPCREFINE_HUGE_PAGES is 1. Returns whether
    huge pages are now off.

    With the kernel's huge-page defrag set to "madvise" (a common default), the first write into
    a new huge-page array waits for the kernel to find or compact whole 2 MB blocks: on this
    virtual machine the first write into a new 480^3 float32 map (442 MB) took 3.5-4.7 s with
    huge pages and 0.2-0.3 s without, measured each in a fresh process. A refinement makes many
    such arrays (transforms, model maps, gathered buffers) and reads them in long runs, where
    huge pages' fewer TLB misses did not show (see README, Performance)."""
    env = os.environ if environ is None else environ
    if env.get(HUGE_PAGES_ENV, "").strip() == "1":
        return False
    import numpy as np
    setter = getattr(getattr(getattr(np, "_core", None), "multiarray", None), "_set_madvise_hugepage", None)
    if setter is None:
        return False
    setter(False)
    env.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")     # the same for processes this one starts
    return True
