"""The memory a worker may use on its node, and the half-set layout chosen from it
(params.halfset_layout "auto").

The default layout ("parallel") gives each half-set task to one group of workers, so with no
more workers than tasks (8) a worker holds a whole model's task: its peak grows with the atoms
whatever the number of workers (2.9 GB at a million atoms). The "shared" layout with
whole_model_on_workers off has every worker hold only its boxes (refine.workers_hold_parts), so a
worker's peak falls with the workers; it is slower on a few workers (its halo exchanges). "auto"
keeps the parallel layout while its estimated peak fits in a worker's share of its node's
memory, and takes the shared one when it does not.

The estimates are linear fits to peaks measured with scripts/bench_scale.py and on the 6zu5
ribosome (README, Scale: memory per worker), rounded up.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

MB = 1 << 20
GB = 1 << 30
# the program on a rank: interpreter, numpy, scipy, gemmi, numba and its kernels, MPI (a worker
# peaked at 207-212 MB refining the 1,656-atom adenylate kinase)
PROGRAM_BYTES = 210 * MB
# a worker of the parallel layout holds a whole task: 2,892-2,905 MB at 1,000,020 atoms with a
# 480^3 map, 690-705 MB at 165,175 atoms with a 240^3 map
PARALLEL_PER_ATOM = 2400
# a worker holding boxes: 60 MB undivided, and per atom and per voxel its share (1,015-1,071 MB
# with 2 workers at a million atoms, 432-437 MB with 8)
SHARED_FIXED = 60 * MB
SHARED_PER_ATOM = 1300
# when the workers cannot hold parts of the restraints (NCS, protocol steps, rotamer steps
# between macro-cycles) each also holds the whole set and the model (about 0.9 GB at a million
# atoms: README, Scale)
WHOLE_RESTRAINTS_PER_ATOM = 900
# the master: 4,070-4,192 MB at a million atoms, 779 MB at 165,175
MASTER_FIXED = 300 * MB
MASTER_PER_ATOM = 3900
# a map voxel as a float32 sub-grid (a whole task's sub-grid is the map)
VOXEL_BYTES = 4
# the maps a run writes to its map store (parallel.mapstore, in /dev/shm on one node; it asks
# room for STORE_MAPS there): 9 at a million atoms without NCS (3.4 GB), counted against the
# master's node
STORE_MAPS_WRITTEN = 9
# the fraction of a worker's share an estimate may fill (the fits are within 15 % of the peaks)
HEADROOM = 0.85


@dataclass(frozen=True)
class Estimates:
    """Estimated peak bytes of a rank in each layout."""
    parallel: int           # a worker of the parallel layout
    shared: int             # a worker of the shared layout, whole_model_on_workers off
    master: int


def estimates(n_atoms: int, n_voxels: int, n_workers: int, parts: bool) -> Estimates:
    """Peak bytes of a worker in each layout and of the master, for a model of n_atoms and a
    map of n_voxels; parts: whether the workers would hold parts of the restraints."""
    w = max(1, n_workers)
    shared = (PROGRAM_BYTES + SHARED_FIXED + (SHARED_PER_ATOM * n_atoms + VOXEL_BYTES * n_voxels) // w
              + (0 if parts else WHOLE_RESTRAINTS_PER_ATOM * n_atoms))
    return Estimates(parallel=PROGRAM_BYTES + PARALLEL_PER_ATOM * n_atoms + VOXEL_BYTES * n_voxels,
                     shared=int(shared), master=MASTER_FIXED + MASTER_PER_ATOM * n_atoms)


def meminfo_available(path: str = "/proc/meminfo") -> int | None:
    """The memory the kernel reports available for new work (MemAvailable), None when unknown."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_number(path: str) -> int | None:
    """An integer file of a cgroup (None when absent, unreadable or "max")."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cgroup_room(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes this process's memory cgroup may still grow by (its limit less its usage), or None
    without a limit: cgroup v2 (memory.max, memory.current) or v1 (memory.limit_in_bytes,
    memory.usage_in_bytes). SLURM's task/cgroup plugin puts a job's --mem there."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        hier, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hier == "0" and controllers == "":                              # v2
            d = os.path.join(root, path.lstrip("/"))
            limit = _read_number(os.path.join(d, "memory.max"))
            used = _read_number(os.path.join(d, "memory.current"))
        elif "memory" in controllers.split(","):                           # v1
            d = os.path.join(root, "memory", path.lstrip("/"))
            limit = _read_number(os.path.join(d, "memory.limit_in_bytes"))
            used = _read_number(os.path.join(d, "memory.usage_in_bytes"))
            if limit is not None and limit >= 1 << 60:                     # v1's "no limit"
                limit = None
        else:
            continue
        if limit is not None:
            return max(0, limit - (used or 0))
    return None


def available_bytes() -> int | None:
    """Memory this process's node can still give: MemAvailable, or less when a cgroup limits it."""
    values = [v for v in (meminfo_available(), cgroup_room()) if v is not None]
    return min(values) if values else None


def slurm_node_bytes(environ=None) -> int | None:
    """The memory a SLURM job was given on this node (its --mem, or --mem-per-cpu times the CPUs it
    has here), None outside SLURM or without a memory request. SLURM may kill a job above it
    even where no cgroup enforces it."""
    env = os.environ if environ is None else environ
    per_node = env.get("SLURM_MEM_PER_NODE", "")
    if per_node.isdigit():
        return int(per_node) * MB
    per_cpu, cpus = env.get("SLURM_MEM_PER_CPU", ""), env.get("SLURM_CPUS_ON_NODE", "")
    if per_cpu.isdigit() and cpus.isdigit():
        return int(per_cpu) * int(cpus) * MB
    return None


def _own_rss() -> int:
    """This process's resident bytes now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def worker_budget(world, master_bytes: int, per_worker_gb: float = 0.0) -> int | None:
    """Bytes a worker may use: per_worker_gb when it is > 0; else, on each node, the memory
    available (available_bytes, read by the node's first rank; under SLURM no more than the
    job's memory there less what its ranks hold, slurm_node_bytes) less master_bytes (the
    master's estimate and its map store) where the master runs, divided among that node's
    workers; the least over the nodes. None when no node could tell. Collective over world."""
    from mpi4py import MPI

    if per_worker_gb > 0:
        return int(per_worker_gb * GB)
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    try:
        here = node.bcast(available_bytes() if node.Get_rank() == 0 else None, root=0)
        # a SLURM job's memory on this node, less what its ranks here hold already
        used_here = node.allreduce(_own_rss())
        job = slurm_node_bytes()
        if job is not None:
            here = max(0, job - used_here) if here is None else min(here, max(0, job - used_here))
        master_here = node.allreduce(1 if world.Get_rank() == 0 else 0)
        workers_here = node.Get_size() - master_here
    finally:
        node.Free()
    # this node's share a worker (the same on each of its ranks); None when it cannot tell or
    # holds no worker
    share = None
    if here is not None and workers_here > 0:
        share = max(0, here - master_here * master_bytes) // workers_here
    shares = [s for s in world.allgather(share) if s is not None]
    return min(shares) if shares else None


@dataclass(frozen=True)
class LayoutChoice:
    """The half-set layout a run uses and why (report.json "memory", the checkpoint's layout)."""
    halfset_layout: str
    whole_model_on_workers: bool
    reason: str
    budget_bytes: int | None = None
    estimates: Estimates | None = None
    warning: str | None = None          # logged by the run when the choice may not fit

    def to_dict(self) -> dict:
        out = {"halfset_layout": self.halfset_layout,
               "whole_model_on_workers": self.whole_model_on_workers, "reason": self.reason}
        if self.budget_bytes is not None:
            out["worker_budget_mb"] = round(self.budget_bytes / MB)
        if self.estimates is not None:
            out["estimated_peak_mb"] = {k: round(v / MB) for k, v in vars(self.estimates).items()}
        return out


def choose_layout(params, n_atoms: int, n_voxels: int, world, parts_possible: bool,
                  stored: dict | None = None) -> LayoutChoice:
    """The layout of this run (the same on every rank; collective over world when it measures).

    params.halfset_layout "parallel" or "shared" is kept (with a warning when the parallel
    layout's estimate exceeds a worker's share); "auto" is the parallel layout when its estimate
    fits in HEADROOM of a worker's share of its node's memory (worker_budget), else the shared
    layout with whole_model_on_workers off. With fewer than 3 ranks the layouts are one (a
    single worker). stored: the choice a checkpoint recorded, which a continued run of "auto"
    keeps (its node may differ, and a different layout would not continue the same trajectory)."""
    requested = params.halfset_layout
    if requested == "auto" and stored and stored.get("halfset_layout") in ("parallel", "shared"):
        return LayoutChoice(stored["halfset_layout"], bool(stored["whole_model_on_workers"]),
                            "as chosen when the run began (checkpoint)")
    size = 1 if world is None else world.Get_size()
    if size < 3:
        return LayoutChoice("parallel" if requested == "auto" else requested,
                            params.whole_model_on_workers, "one worker: the layouts are the same")
    est = estimates(n_atoms, n_voxels, size - 1, parts_possible)
    store = STORE_MAPS_WRITTEN * VOXEL_BYTES * n_voxels
    budget = worker_budget(world, est.master + store, params.worker_memory_gb)
    fits = budget is None or est.parallel <= HEADROOM * budget
    if requested != "auto":
        warning = None
        if not fits and requested == "parallel":
            warning = (f"memory: a worker of the parallel half-set layout may need "
                       f"{est.parallel / GB:.1f} GB and has about {budget / GB:.2f} GB; "
                       f"halfset_layout = \"auto\" would share the tasks ({est.shared / GB:.1f} GB "
                       "a worker)")
        return LayoutChoice(requested, params.whole_model_on_workers, "as given", budget, est, warning)
    if fits:
        why = ("no node reported its memory" if budget is None else
               f"a worker's estimated peak {est.parallel / MB:,.0f} MB fits in its "
               f"{budget / MB:,.0f} MB")
        return LayoutChoice("parallel", params.whole_model_on_workers, why, budget, est)
    why = (f"a worker of the parallel layout would peak near {est.parallel / MB:,.0f} MB, more "
           f"than {HEADROOM:.0%} of its {budget / MB:,.0f} MB; sharing every task, about "
           f"{est.shared / MB:,.0f} MB")
    warning = None
    if est.shared > HEADROOM * budget:
        warning = (f"memory: even sharing every task a worker may need {est.shared / GB:.2f} GB and "
                   f"has about {budget / GB:.2f} GB: run with more workers (more nodes), or fewer "
                   "ranks per node")
    return LayoutChoice("shared", False, why, budget, est, warning)
