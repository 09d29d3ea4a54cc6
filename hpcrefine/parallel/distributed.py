"""The refinement target evaluated by the ranks of one communicator, and how ranks wait and fail.

Each rank of `comm` owns a block of atoms (decompose.atom_blocks) and evaluates its share of
T = weight * T_data + T_restraints + nonbonded_weight * T_repulsion: the data term on its owned
atoms, the restraint terms whose first atom it owns, the non-bonded pairs whose first atom it owns.
Its gradient is full-size (zero except on the atoms its terms touch). A rank that owns a box
instead (decompose.spatial_parts: BoxTarget) exchanges halos and keeps only the rows of its box
and halo, numbered in the model's order.

Two forms of the same target:
  * called with the whole coordinate vector, gradient and energy go into one float64 buffer of
    3n + 1 values that a single buffer-based Allreduce sums in place; every rank then holds the
    same f and g (the parametrised steps of hpcrefine.protocol use this form);
  * owned_call, the coordinate minimisation's form: each rank passes only the coordinates of its
    own atoms, an Allgatherv assembles the whole model, and a Reduce_scatter of the gradients
    gives each rank the gradient of its own atoms. The L-BFGS vectors and history are then split
    between the ranks (core.lbfgs with comm: inner products and maxima reduced over comm), so each
    rank holds and updates 1/ranks of them, and all ranks take the same steps.
Either way the iterations are a pure function of the reduced values, so a run is reproducible
bit for bit with the same number of ranks.

Rank coordination:
  * wait_quietly(comm, request): complete a nonblocking request by testing it and sleeping in
    between, because MPICH busy-polls in blocking calls; master_wait_for(world) is the master's
    side of the rendezvous that the workers enter with notify_master(world) when their work is done.
  * install_abort_on_error(world): an uncaught exception on any rank prints its traceback and
    aborts the whole job, so no rank is left waiting in a collective.
"""
from __future__ import annotations

import math
import sys
import time
import traceback
import zlib

import numpy as np
from mpi4py import MPI

from ..core import geometry, nonbonded
from ..core.common import sorted_members
from ..core.density import owned_target
from ..core.lbfgs import lbfgs
from ..engine import MinimiseResult
from ..params import RefineParams
from ..restraints import Restraints
from .decompose import (PairShare, PartRestraints, atom_blocks, held_in_boxes, owner_of_atoms,
                        restraints_share, spatial_parts)
from .halo import HaloExchange, halo_buffer

POLL_SECONDS = 0.02
NEIGHBOUR_SKIN = 1.0     # A, the skin of the workers' neighbour lists (nonbonded.NeighbourList)
# decomposition "auto": boxes when atoms x (workers - 1)^2 reaches this. The halo exchange costs a
# few ms of fixed overhead per evaluation (two Alltoallv and the row copies) where gathering the
# whole model costs 48 bytes per atom; on this 2-core machine (scripts/bench_halo.py,
# scripts/bench_ncs.py, scripts/bench_scale.py) boxes were slower at 83,335 atoms on 2 workers
# (21 against 17-18 ms per evaluation) and 100,002 on 2 (12.3 against 9.1 ms), faster at a million
# on 2 (exchange 14 against 24 s in a run), at 50,001-300,006 on 4 (18-24 against 64-268 ms), and
# slower at 16,667 on 4 (13 against 11 ms).
BOXES_FROM = 400_000
# A rank's data term reads the map within SUBGRID_MARGIN A of its atoms' interpolation stencils
# into memory of its own (LocalRealSpaceTerm). The margin is what the atoms may move before the
# rank reads again (a few voxels: a sub-grid of a quarter of a 480^3 map takes about 0.1 s to
# read from the page cache).
SUBGRID_MARGIN = 3.0


class EvaluationTotals:
    """What this process's DistributedTargets did, summed over every minimisation of a run (the
    run report's per-rank resources): evaluations, seconds in its own terms and in the exchanges,
    atom-evaluations of its data term, the bytes it sent (the Allreduce buffers it contributed,
    or its halo rows) in the evaluations on communicators of more than one rank (on a one-rank
    communicator nothing is exchanged; shared_evaluations counts the others), its neighbour-list
    builds with their seconds (part of its own terms' time), and, for halo exchanges, the summed
    halo size (halo_atoms / halo_evaluations is the mean halo) and the halo list builds."""

    def __init__(self):
        self.evaluations = 0
        self.seconds_local = 0.0
        self.seconds_reduce = 0.0
        self.atom_evaluations = 0
        self.reduce_bytes = 0
        self.nbl_builds = 0
        self.seconds_nbl = 0.0
        self.shared_evaluations = 0
        self.halo_evaluations = 0
        self.halo_atoms = 0
        self.halo_builds = 0
        self.subgrid_reads = 0          # map sub-grids read by the data terms (LocalRealSpaceTerm)
        self.subgrid_bytes = 0          # the largest of them

    def add(self, seconds_local: float, seconds_reduce: float, atoms: int, buffer_bytes: int,
            shared: bool = True) -> None:
        self.evaluations += 1
        self.seconds_local += seconds_local
        self.seconds_reduce += seconds_reduce
        self.atom_evaluations += atoms
        self.reduce_bytes += buffer_bytes
        self.shared_evaluations += int(shared)

    def as_dict(self) -> dict:
        return {"evaluations": self.evaluations, "seconds_local": round(self.seconds_local, 2),
                "seconds_reduce": round(self.seconds_reduce, 2), "atom_evaluations": self.atom_evaluations,
                "reduce_bytes": self.reduce_bytes, "nbl_builds": self.nbl_builds,
                "seconds_nbl": round(self.seconds_nbl, 2), "shared_evaluations": self.shared_evaluations,
                "halo_evaluations": self.halo_evaluations, "halo_atoms": self.halo_atoms,
                "halo_builds": self.halo_builds, "subgrid_reads": self.subgrid_reads,
                "subgrid_mb": round(self.subgrid_bytes / 2**20, 1)}


EVALUATION_TOTALS = EvaluationTotals()     # this process's totals, read by the run report


# ------------------------------------------------------------------------------------- target

class LocalRealSpaceTerm:
    """The fast real-space target of a RealSpaceTerm restricted to a rank's atoms (a slice, or
    an index array for a box of decompose.spatial_parts).

    accumulate(xyz, grad_out, scale) reads only xyz[atoms] and adds only into grad_out[atoms]:
    its cost is proportional to the rank's atoms, not to the model. When the term's map comes
    from a file every rank reads (a parallel MapStore: the term has `box_reader`), the rank
    reads only the sub-grid around its atoms into memory of its own: the box of their stencils
    plus SUBGRID_MARGIN A on every side, read from the file, not mapped (the pages of the file
    stay in the node's page cache, shared, and out of this process). While every stencil stays
    inside, the values are bitwise those of the whole map; an atom that leaves it makes the rank
    read the sub-grid again around the atoms' new positions. Even a rank whose atoms span the
    whole map reads it (about 0.3 s for 480^3 from the page cache): the pages of a mapping would
    stay in the process for every map it ever read, where the store keeps one sub-grid, the last
    read, which the next minimisations of the same map use again while their atoms lie inside it
    (MapStore.sub_grid)."""

    reads_own_atoms_only = True

    def __init__(self, term, atoms):
        self.data = term.data
        self.origin = term.origin
        self.voxel = term.voxel
        self.atoms = atoms
        self.index = (np.arange(atoms.start or 0, atoms.stop, dtype=np.int64) if isinstance(atoms, slice)
                      else np.ascontiguousarray(atoms, dtype=np.int64))
        self.atom_weight = np.ascontiguousarray(term.atom_weight[atoms], dtype=np.float64)
        reader = getattr(term, "box_reader", None)
        self.read_box = reader() if reader is not None else None
        self.sub = None                  # the sub-grid in use, from voxel self.lo (x, y, z) on
        self.lo = np.zeros(3, dtype=np.int64)

    def renumber(self, rows: np.ndarray) -> None:
        """Read the atoms from these rows of the coordinates it is given from now on (a rank
        that keeps the rows of its box and halo only: BoxTarget). Their positions are the same:
        the sub-grid in use stays."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if len(rows) != len(self.index):
            raise ValueError(f"{len(rows)} rows for {len(self.index)} atoms")
        self.index = rows

    def _cut(self, xyz: np.ndarray) -> None:
        """Read the sub-grid around the current positions of the atoms (or take the whole map)."""
        nz, ny, nx = self.data.shape
        full = np.array([nx, ny, nz], dtype=np.int64)
        p = xyz[self.index]
        p = p[np.all(np.isfinite(p), axis=1)]
        self.sub, self.lo = self.data, np.zeros(3, dtype=np.int64)
        if self.read_box is None or not len(p):
            return
        margin = np.ceil(SUBGRID_MARGIN / self.voxel).astype(np.int64)
        u = (p - self.origin) / self.voxel
        # the stencils' box (a voxel more each side than they reach, for rounding), and with
        # the margin; a kept sub-grid that holds the stencils is used again
        need_lo = np.clip(np.floor(u.min(axis=0)).astype(np.int64) - 2, 0, full)
        need_hi = np.clip(np.floor(u.max(axis=0)).astype(np.int64) + 4, 0, full)
        if np.any(need_hi <= need_lo):
            return
        lo, hi = np.maximum(need_lo - margin, 0), np.minimum(need_hi + margin, full)
        self.sub = None                  # let go of the one in use before reading another
        self.lo, self.sub, read = self.read_box(lo, hi, need_lo, need_hi)
        EVALUATION_TOTALS.subgrid_reads += int(read)
        EVALUATION_TOTALS.subgrid_bytes = max(EVALUATION_TOTALS.subgrid_bytes, self.sub.nbytes)

    def accumulate(self, xyz: np.ndarray, grad_out: np.ndarray, scale: float) -> float:
        """scale * T_data of the owned atoms; the gradient is added into grad_out (n, 3)."""
        if self.sub is None:
            self._cut(xyz)
        f, outside = owned_target(self.sub, self.lo, self.data.shape, self.origin, self.voxel, xyz,
                                  self.index, self.atom_weight, grad_out, scale)
        if outside >= 0:         # an atom left the sub-grid: read it again where the atoms are
            self._cut(xyz)
            f, outside = owned_target(self.sub, self.lo, self.data.shape, self.origin, self.voxel,
                                      xyz, self.index, self.atom_weight, grad_out, scale)
            if outside >= 0:
                raise RuntimeError(f"atom {self.index[outside]} is outside the map sub-grid read "
                                   "around it")
        return f


def _local_term(data_term, atoms):
    """The block-restricted form of a data term: its own `local(atoms)` when it has one (any data
    term can plug in), else the fast real-space target."""
    if hasattr(data_term, "local"):
        return data_term.local(atoms)
    return LocalRealSpaceTerm(data_term, atoms)


def reads_own_atoms_only(data_term) -> bool:
    """True when the rank-restricted form of data_term reads only the coordinates of the rank's
    own atoms, and accepts them as an index array: then the ranks can own boxes and exchange
    only halos. The fast real-space target does; a term that declares `reads_own_atoms_only`
    does; any other (a model map built from every atom, the NCS restraint) does not."""
    return not hasattr(data_term, "local") or bool(getattr(data_term, "reads_own_atoms_only", False))


_KEPT_LIST = nonbonded.ListKeeper()     # the last minimisation's neighbour list of this process


def kept_neighbour_list(xyz, restraints: Restraints, owned: np.ndarray) -> nonbonded.NeighbourList:
    """A neighbour list valid at xyz of the pairs whose lower atom is owned: the list of the
    process's previous minimisation refreshed (NeighbourList.refresh: rebuilt in place when many
    atoms moved far, else searched again around those that did), when it was made from the same
    restraints object and the same owned atoms; otherwise a new one, which is kept instead.
    A minimisation that continues the previous one's coordinates (a half-set task's second
    macro-cycle, a trial continued) so skips the whole search and the exclusion tables: 150 ms
    a build at 165,000 atoms on one rank. Energies are bitwise those of a fresh list (refresh)."""
    owned = np.asarray(owned, dtype=bool)
    nbl = _KEPT_LIST.get(restraints, owned)     # (a list kept for others is let go of here)
    if nbl is not None:
        nbl.refresh(xyz)
        return nbl
    nbl = nonbonded.NeighbourList(xyz, restraints, cutoff_extra=NEIGHBOUR_SKIN, owned=owned)
    _KEPT_LIST.keep(restraints, (owned,), nbl)
    return nbl


def release_kept_list() -> None:
    """Let go of the kept neighbour list (kept_neighbour_list)."""
    _KEPT_LIST.clear()


def _part_layout(owner: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts, displacements) of the ranks' parts of a flat coordinate vector, rank p's part the
    coordinates of the atoms with owner p, the parts in rank order (Allgatherv, Gatherv)."""
    counts = np.bincount(owner, minlength=size).astype(np.int64)
    return 3 * counts, 3 * (np.cumsum(counts) - counts)


def _in_model_order(received: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """The whole coordinates (n, 3), in a new array, from the ranks' parts in rank order."""
    whole = np.empty((len(owner), 3), dtype=np.float64)
    whole[np.argsort(owner, kind="stable")] = received.reshape(-1, 3)
    return whole


class BoxedCoordinates:
    """A model's coordinates held in parts by the ranks of comm (the workers holding the
    restraints in boxes: decompose.PartRestraints.owner), a start or a minimisation's result
    (distributed_minimise with keep_parts): each rank keeps only its own atoms' rows (24 MB /
    workers at a million atoms, where every worker held the whole model), and whole() makes the
    whole coordinates again, in a new array, for the step that needs them (collective,
    Allgatherv): a half-set task's start (halfset.half_start), a macro-cycle's chiral centres
    (refine._put_back_chirals). len() is the model's atoms."""

    def __init__(self, comm, xyz: np.ndarray | None, owner: np.ndarray,
                 rows: np.ndarray | None = None):
        self.comm = comm
        self.owner = owner
        if rows is None:
            rows = np.asarray(xyz, dtype=np.float64)[owner == comm.Get_rank()]
        self.rows = np.ascontiguousarray(rows, dtype=np.float64).reshape(-1, 3)
        self.counts, self.starts = _part_layout(owner, comm.Get_size())

    def __len__(self) -> int:
        return len(self.owner)

    def whole(self) -> np.ndarray:
        received = np.empty(3 * len(self.owner), dtype=np.float64)
        self.comm.Allgatherv([self.rows, MPI.DOUBLE],
                             [received, (self.counts, self.starts), MPI.DOUBLE])
        return _in_model_order(received, self.owner)

    def gather_to(self, root: int) -> np.ndarray | None:
        """whole() on rank `root` of comm only, None on the others (collective, Gatherv)."""
        here = self.comm.Get_rank() == root
        received = np.empty(3 * len(self.owner), dtype=np.float64) if here else None
        self.comm.Gatherv([self.rows, MPI.DOUBLE],
                          [received, (self.counts, self.starts), MPI.DOUBLE] if here else None,
                          root=root)
        return _in_model_order(received, self.owner) if here else None

    def held_by(self, comm, restraints) -> bool:
        """Whether these are the parts of comm's ranks holding `restraints` in boxes."""
        return (held_in_boxes(restraints) and comm.Get_size() == self.comm.Get_size()
                and comm.Get_rank() == self.comm.Get_rank()
                and (restraints.owner is self.owner or np.array_equal(restraints.owner, self.owner)))


class _RankTerms:
    """What the two forms of a rank's share of the target have in common: its terms (data,
    restraints, non-bonded pairs) at coordinates in the numbering of its own arrays, its
    neighbour list (each form makes it with its _new_list(xyz)) and its counters."""

    def __init__(self, comm, n: int, data_term, share: Restraints, params: RefineParams,
                 weight: float):
        self.comm = comm
        self.part = comm.Get_rank()
        self.shape = (int(n), 3)
        self.data_term = data_term
        self.share = share
        self.weight = float(weight)
        self.nb_sigma = params.nonbonded_sigma
        self.nb_weight = params.nonbonded_weight
        self.nbl: nonbonded.NeighbourList | None = None
        self.pairs: PairShare | None = None
        self.n_nbl_builds = 0
        self.n_evals = 0
        self.seconds_local = 0.0          # this rank's own terms
        self.seconds_reduce = 0.0         # the exchanges, including waiting for slower ranks

    def local_pairs(self, xyz: np.ndarray) -> PairShare:
        """This rank's non-bonded pairs, the neighbour list refreshed around the atoms that moved too far.
        The decision depends only on xyz, so all ranks rebuild at the same evaluations."""
        t0 = time.perf_counter()
        if self.nbl is None:
            # only this rank's pairs are searched for: the build costs ~1/ranks of the whole list
            self.nbl = self._new_list(xyz)
        elif not self.nbl.refresh(xyz) and self.pairs is not None and self.pairs.i is self.nbl.i:
            return self.pairs           # (the list is kept: another target may have refreshed it)
        # the list holds only the pairs whose lower atom this rank owns (owned=), which is what
        # pairs_share would select: its arrays are this rank's share as they are (a filtered copy
        # took 3-5 ms of every refresh at 165,000 atoms)
        nbl = self.nbl
        self.pairs = PairShare(i=nbl.i, j=nbl.j, kind=nbl.kind, radius=nbl.radius, hbond=nbl.hbond)
        self.n_nbl_builds += 1
        EVALUATION_TOTALS.nbl_builds += 1
        EVALUATION_TOTALS.seconds_nbl += time.perf_counter() - t0
        return self.pairs

    def _terms(self, xyz: np.ndarray, g: np.ndarray) -> float:
        """This rank's terms at xyz; the gradient is added into g."""
        f = self.data_term.accumulate(xyz, g, self.weight)
        f += geometry.restraint_energy(xyz, self.share, grad_out=g)[0]
        if self.nb_weight > 0:
            f += nonbonded.repulsion(xyz, self.local_pairs(xyz), sigma=self.nb_sigma, grad_out=g,
                                     weight=self.nb_weight)[0]
        return f

    def own_part(self, xyz: np.ndarray) -> np.ndarray:
        """This rank's part of the flat vector (owned_call's x_part) from the whole coordinates."""
        return np.ascontiguousarray(np.asarray(xyz, dtype=np.float64).reshape(self.shape)[self.owned]).ravel()

    def _own_parts(self, owner: np.ndarray) -> None:
        """The split form's parts (owned_call): rank p's part of the flat vector is the
        coordinates of the atoms it owns, in increasing order; gathered, the parts follow each
        other in rank order."""
        self.owned = np.flatnonzero(owner == self.part).astype(np.int64)
        self.n_owned = len(self.owned)
        self.part_counts, self.part_starts = _part_layout(owner, self.comm.Get_size())

    def _gathered(self, x_part: np.ndarray, into: np.ndarray) -> np.ndarray:
        """Every rank's part of the flat vector into `into`, in rank order (collective,
        Allgatherv)."""
        self.comm.Allgatherv([np.ascontiguousarray(x_part, dtype=np.float64), MPI.DOUBLE],
                             [into, (self.part_counts, self.part_starts), MPI.DOUBLE])
        return into

    def _counted(self, local: float, exchange: float, sent: int) -> None:
        self.seconds_reduce += exchange
        self.seconds_local += local
        self.n_evals += 1
        shared = self.comm.Get_size() > 1
        EVALUATION_TOTALS.add(local, exchange, self.n_owned, sent if shared else 0, shared)


class DistributedTarget(_RankTerms):
    """f, g of weight * T_data + T_restraints + T_repulsion summed over the ranks of comm, each
    rank owning a contiguous block of atoms (in rank order) and reading the whole model.

    comm: the ranks sharing the work (a half set's communicator, or all workers); shape: (n, 3)
    of the coordinates; data_term: this rank's LocalRealSpaceTerm (or anything with
    accumulate(xyz, grad_out, scale) -> f); share: this rank's restraints (decompose.
    restraints_share); restraints: the full set, whose radii and exclusions build the neighbour
    list; atom_owner: (n,) owning rank of every atom in comm, non-decreasing (owned_call's part
    of the flat vector is the coordinates of this rank's atoms). Ranks owning boxes exchange
    halos instead: BoxTarget.

    Calling it is collective over comm: every rank must call it with the same x.
    """

    def __init__(self, comm, shape, data_term, share: Restraints, restraints: Restraints,
                 params: RefineParams, weight: float, atom_owner: np.ndarray):
        n = int(shape[0])
        if tuple(shape) != (n, 3):
            raise ValueError(f"coordinates must have shape (n, 3), got {tuple(shape)}")
        if len(atom_owner) != n:
            raise ValueError(f"atom_owner has {len(atom_owner)} entries for {n} atoms")
        super().__init__(comm, n, data_term, share, params, weight)
        self.restraints = restraints
        self.atom_owner = np.asarray(atom_owner)
        if np.any(np.diff(self.atom_owner) < 0):
            raise ValueError("the atoms a rank owns must form one contiguous block, in rank "
                             "order (boxes exchange halos: BoxTarget)")
        self._own_parts(self.atom_owner)
        # g (3n values) and f in one buffer: one Allreduce per evaluation
        self._buf = np.zeros(3 * n + 1, dtype=np.float64)
        self._grad = self._buf[:3 * n].reshape(n, 3)
        self.halo = None
        self._xfull: np.ndarray | None = None

    def _new_list(self, xyz: np.ndarray) -> nonbonded.NeighbourList:
        return kept_neighbour_list(xyz, self.restraints, self.atom_owner == self.part)

    def __call__(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        xyz = np.ascontiguousarray(x, dtype=np.float64).reshape(self.shape)
        buf = self._buf
        buf[-1] = self._local(xyz)
        t1 = time.perf_counter()
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        self._counted(t1 - t0, time.perf_counter() - t1, buf.nbytes)
        # the buffer is reused by the next call: the optimiser keeps a copy
        return float(buf[-1]), buf[:-1].copy()

    def _local(self, xyz: np.ndarray) -> float:
        """This rank's terms at xyz: f returned, the gradient left in self._grad (zeroed first)."""
        self._buf[:] = 0.0
        return self._terms(xyz, self._grad)

    def gather(self, x_part: np.ndarray) -> np.ndarray:
        """The whole flat coordinate vector from every rank's part (collective, Allgatherv),
        received into a buffer kept for the next gather (every evaluation)."""
        if self._xfull is None:
            self._xfull = np.empty(3 * self.shape[0], dtype=np.float64)
        return self._gathered(x_part, self._xfull)

    def owned_call(self, x_part: np.ndarray) -> tuple[float, np.ndarray]:
        """f and this rank's part of g from this rank's part of x (the split form, for an L-BFGS
        whose vectors are split between the ranks: core.lbfgs with comm). Collective: the parts
        are gathered into the whole coordinates (Allgatherv), each rank evaluates its terms, and
        a Reduce_scatter sums the gradients and gives each rank its own part; f is summed with
        one more scalar Allreduce. The same data go over the wire as with one Allreduce of the
        whole gradient, but nothing of the optimiser is held or computed for the whole vector."""
        t0 = time.perf_counter()
        xyz = self.gather(x_part).reshape(self.shape)
        t1 = time.perf_counter()
        f = self._local(xyz)
        t2 = time.perf_counter()
        g_part = np.empty(int(self.part_counts[self.part]), dtype=np.float64)
        self.comm.Reduce_scatter([self._buf[:-1], MPI.DOUBLE], [g_part, MPI.DOUBLE],
                                 self.part_counts, op=MPI.SUM)
        fbuf = np.array([f])
        self.comm.Allreduce(MPI.IN_PLACE, fbuf, op=MPI.SUM)
        # counted as in __call__: the reduction's buffer (3n gradient values and f); the
        # Allgatherv adds this rank's own 3 n_owned coordinates
        self._counted(t2 - t1, (t1 - t0) + (time.perf_counter() - t2), 8 * len(self._buf))
        return float(fbuf[0]), g_part

    def statistics(self, xyz: np.ndarray) -> dict:
        """Geometry statistics of the whole model (collective): see gather_statistics."""
        xyz = np.ascontiguousarray(xyz, dtype=np.float64)
        return gather_statistics(self.comm, xyz, self.share, self.local_pairs(xyz))


# A box rank's arrays hold its atoms, its halo and the atoms up to HALO_SPARE A beyond the
# farthest its halo can reach (BoxTarget): the halo of the next build, or of the next
# minimisation, then usually still lies within them, and the numbering and neighbour list are
# kept rather than made again.
HALO_SPARE = 2.0
_BOX_KEY = np.array([-1])          # (a box rank's kept list, told apart from a block rank's)


class BoxTarget(_RankTerms):
    """owned_call of the rank of comm that owns the box `owner == rank` (decompose.spatial_parts)
    and exchanges halos with the others (halo.HaloExchange), in a numbering of its own: row k
    of every array it keeps is atom local[k], local the sorted global indices of its own atoms,
    its halo and the atoms up to HALO_SPARE A beyond its halo's reach (those rows are not
    exchanged; they hold the positions at the last build, too far from the rank's atoms to enter
    a term while the halo is valid). Its coordinates, gradient, neighbour list and terms so grow
    with its box, not with the model. Sorted, the local numbering keeps the model's order: the
    energies and gradients are bitwise those of the same terms in the model's numbering.

    xyz0: the whole start, the same on every rank (or None and x_owned: this rank's own atoms'
    coordinates, in increasing order, the start of a minimisation that continues the last one on
    its part: chained_minimise); data_term: the data term over all atoms,
    whose form restricted to this rank's atoms (_local_term) reads only them, by the rows
    renumber() gives it; part: this rank's decompose.PartRestraints, made for comm (checked by
    distributed_target; its owner is the ranks' boxes), whose terms it numbers by its rows
    (PartRestraints.numbered); key: the restraints object the neighbour list is kept for
    (ListKeeper: the next minimisation of the same restraints and boxes takes over numbering and
    list when its halo lies within them).

    The halo is valid while no atom has moved buffer / 2 from the last build; when one has, the
    lists are made again from the ranks' own atoms (halo.HaloExchange.build) and, if the halo
    left the local atoms, the rank numbered again (and its neighbour list made again). Only the
    start (xyz0) and the result (gather) are whole models, and in a chain (chained_minimise)
    neither is."""

    def __init__(self, comm, xyz0, data_term, part: PartRestraints, key, params: RefineParams,
                 weight: float, x_owned: np.ndarray | None = None):
        n = part.n_atoms if xyz0 is None else len(xyz0)
        super().__init__(comm, n, None, None, params, weight)
        owner = part.owner
        self.terms = part
        self.key = key
        self.owner = owner
        self._own_parts(owner)
        self.data_term = _local_term(data_term, self.owned)
        if not hasattr(self.data_term, "renumber"):
            raise ValueError("a rank owning a box needs a data term that reads only its own "
                             "atoms, by rows (LocalRealSpaceTerm)")
        buffer = halo_buffer(params.max_step)
        self.radius = 2.0 * part.max_radius + NEIGHBOUR_SKIN + buffer
        self.halo = HaloExchange(comm, owner, part.reads, self.radius, buffer)
        self.local: np.ndarray | None = None     # global index of every row
        self.own_rows: np.ndarray | None = None  # rows of the owned atoms
        self._xyz: np.ndarray | None = None
        self._grad: np.ndarray | None = None
        kept = _KEPT_LIST.get(key, self.owned, _BOX_KEY)
        if kept is not None:                     # the previous minimisation's numbering and list
            self.local, self.nbl = kept
        if x_owned is None:
            x_owned = np.asarray(xyz0, dtype=np.float64).reshape(n, 3)[self.owned]
        self._build(x_owned)

    def _build(self, x_owned: np.ndarray) -> None:
        """The halo lists made at this rank's own coordinates x_owned (collective: halo.build),
        this rank numbered again when its halo is not within its rows, and its rows set: its own
        from x_owned, the others' from their owners (halo.fetch)."""
        halo = self.halo
        x_owned = np.asarray(x_owned, dtype=np.float64).reshape(-1, 3)
        # the halo is found on a grid (near_atoms): it may hold atoms up to 1.5 sqrt(3) = 2.6
        # radii from the rank's own; the rows reach that far and HALO_SPARE more, so that the
        # halo of a later build, or of the next minimisation, still lies within them (with rows
        # reaching only HALO_SPARE beyond the radius, a million atoms on 2 workers were numbered
        # again at almost every build, each time with a new neighbour list)
        wide = halo.build(x_owned, (1.5 * math.sqrt(3.0) - 1.0) * self.radius + HALO_SPARE)
        EVALUATION_TOTALS.halo_builds += 1
        need = np.union1d(self.owned, halo.need)
        if self.local is None or not np.all(sorted_members(self.local, need)):
            self.local = np.union1d(need, wide)
            self.nbl = self.pairs = None
            _KEPT_LIST.clear()     # (a list of the old numbering goes before the new is made)
        if self.own_rows is None or self.nbl is None:
            self.own_rows = np.searchsorted(self.local, self.owned)
            self.share = self.terms.numbered(self.local)
            self.data_term.renumber(self.own_rows)
            self._grad = np.zeros((len(self.local), 3), dtype=np.float64)
        halo.localise(self.local)
        others = np.ones(len(self.local), dtype=bool)
        others[self.own_rows] = False
        xyz = np.empty((len(self.local), 3), dtype=np.float64)
        xyz[self.own_rows] = x_owned
        xyz[others] = halo.fetch(self.local[others], x_owned)
        self._xyz = xyz

    def _new_list(self, xyz: np.ndarray) -> nonbonded.NeighbourList:
        owned = np.zeros(len(self.local), dtype=bool)
        owned[self.own_rows] = True
        nbl = nonbonded.NeighbourList(xyz, self.share, cutoff_extra=NEIGHBOUR_SKIN, owned=owned)
        _KEPT_LIST.keep(self.key, (self.owned, _BOX_KEY), (self.local, nbl))
        return nbl

    def gather(self, x_part: np.ndarray) -> np.ndarray:
        """The whole flat coordinate vector from every rank's part (collective, Allgatherv), in
        a new array."""
        return BoxedCoordinates(self.comm, None, self.owner, rows=x_part).whole().ravel()

    def _local(self) -> float:
        """This rank's terms at its rows: f returned, the gradient left in self._grad."""
        self._grad[:] = 0.0
        return self._terms(self._xyz, self._grad)

    def owned_call(self, x_part: np.ndarray) -> tuple[float, np.ndarray]:
        """f and this rank's part of g from this rank's part of x (collective): the own rows
        set from x_part, the halo rows from their owners, the halo rows of the gradient sent back
        to their owners, and one Allreduce summing f and the number of ranks with an atom moved
        beyond the halo's buffer. When there is one, the evaluation may have missed a contact:
        the lists are made again (_build) and the evaluation done again."""
        halo = self.halo
        t0 = time.perf_counter()
        mine = np.asarray(x_part, dtype=np.float64).reshape(-1, 3)
        far = halo.moved_far(mine)
        self._xyz[self.own_rows] = mine
        halo.coords(self._xyz)
        t1 = time.perf_counter()
        f = self._local()
        local = time.perf_counter() - t1
        halo.gradients(self._grad)
        fbuf = np.array([f, float(far)])
        self.comm.Allreduce(MPI.IN_PLACE, fbuf, op=MPI.SUM)
        sent = halo.bytes_per_evaluation()
        if fbuf[1] > 0:
            built = halo.build_bytes
            self._build(mine)
            t1 = time.perf_counter()
            f = self._local()
            local += time.perf_counter() - t1
            halo.gradients(self._grad)
            fbuf = np.array([f])
            self.comm.Allreduce(MPI.IN_PLACE, fbuf, op=MPI.SUM)
            sent += halo.build_bytes - built + halo.bytes_per_evaluation()
        self._counted(local, time.perf_counter() - t0 - local, sent)
        EVALUATION_TOTALS.halo_evaluations += 1
        EVALUATION_TOTALS.halo_atoms += len(halo.need)
        return float(fbuf[0]), np.ascontiguousarray(self._grad[self.own_rows]).ravel()

    def statistics(self, xyz: np.ndarray) -> dict:
        """Geometry statistics of the whole model xyz (collective): see gather_statistics. The
        lists are made again first when an atom has moved beyond the halo's buffer."""
        xyz = np.ascontiguousarray(xyz, dtype=np.float64).reshape(self.shape)
        far = np.array([float(self.halo.moved_far(xyz[self.owned]))])
        self.comm.Allreduce(MPI.IN_PLACE, far, op=MPI.SUM)
        if far[0] > 0:
            self._build(xyz[self.owned])
        rows = np.ascontiguousarray(xyz[self.local])
        return gather_statistics(self.comm, rows, self.share, self.local_pairs(rows))

    def part_statistics(self, x_part: np.ndarray) -> dict:
        """statistics() from this rank's part of the coordinates (collective), no whole model
        anywhere: the own rows set, the halo rows from their owners. The rows beyond the halo
        keep their positions of the last build, as in every evaluation: while the halo is valid
        no term or pair reaches them, so the numbers are those of statistics(whole)."""
        mine = np.asarray(x_part, dtype=np.float64).reshape(-1, 3)
        far = np.array([float(self.halo.moved_far(mine))])
        self.comm.Allreduce(MPI.IN_PLACE, far, op=MPI.SUM)
        if far[0] > 0:
            self._build(mine)
        else:
            self._xyz[self.own_rows] = mine
            self.halo.coords(self._xyz)
        return gather_statistics(self.comm, self._xyz, self.share, self.local_pairs(self._xyz))


def _rms(sum_sq: float, count: float) -> float:
    return math.sqrt(sum_sq / count) if count > 0 else float("nan")


def gather_statistics(comm, xyz: np.ndarray, share: Restraints, pairs) -> dict:
    """Geometry statistics of the whole model from each rank's share (collective over comm).

    Keys as GeometryTerm.statistics: bond_rmsd, bond_rmsz, bond_max_dev (A), angle_rmsd,
    angle_rmsz, angle_max_dev (deg), torsion_rmsd (deg, periodic), chiral_rmsd (A^3),
    chiral_inversions, planarity_rmsd (A, plane atoms from their weighted least-squares plane) and
    clashes (pairs closer than their contact distance - 0.4 A). An rmsd over no terms is NaN.
    Chirality terms flagged 'both' (share.chir_both) use |V| - |target| and are never inversions.
    Two buffer-based Allreduce calls (sums, maxima).
    """
    xyz = np.ascontiguousarray(xyz, dtype=np.float64)
    db = geometry.bond_lengths(xyz, share.bond_idx) - share.bond_target
    da = geometry.angle_values(xyz, share.angle_idx) - share.angle_target
    dt = geometry.torsion_deviations(xyz, share.tors_idx, share.tors_target, share.tors_period)
    vol = geometry.chiral_volumes(xyz, share.chir_idx)
    dc = vol - share.chir_target
    inverted = np.sign(vol) * np.sign(share.chir_target) < 0
    both = getattr(share, "chir_both", None)
    if both is not None and len(both):
        both = np.asarray(both, dtype=bool)
        dc[both] = np.abs(vol[both]) - np.abs(share.chir_target[both])
        inverted &= ~both
    dp = geometry.plane_distances(xyz, share.plane_atoms, share.plane_start, share.plane_sigma)
    sums = np.array([
        len(db), db @ db, np.sum((db / share.bond_sigma) ** 2),
        len(da), da @ da, np.sum((da / share.angle_sigma) ** 2),
        len(dt), dt @ dt,
        len(dc), dc @ dc, np.count_nonzero(inverted),
        len(dp), dp @ dp,
        nonbonded.clashes(xyz, pairs)], dtype=np.float64)
    maxes = np.array([np.max(np.abs(db), initial=0.0), np.max(np.abs(da), initial=0.0)])
    comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
    comm.Allreduce(MPI.IN_PLACE, maxes, op=MPI.MAX)
    (nb, ssb, szb, na, ssa, sza, nt, sst, nc, ssc, n_inv, npl, ssp, n_clash) = sums
    return {"bond_rmsd": _rms(ssb, nb), "bond_rmsz": _rms(szb, nb), "bond_max_dev": float(maxes[0]),
            "angle_rmsd": _rms(ssa, na), "angle_rmsz": _rms(sza, na), "angle_max_dev": float(maxes[1]),
            "torsion_rmsd": _rms(sst, nt), "chiral_rmsd": _rms(ssc, nc),
            "chiral_inversions": int(n_inv), "planarity_rmsd": _rms(ssp, npl),
            "clashes": int(n_clash)}


def same_on_all_ranks(comm, a: np.ndarray) -> bool:
    """True when a holds the same bytes on every rank of comm (a CRC-32 compared with one
    Allreduce; collective)."""
    crc = zlib.crc32(np.ascontiguousarray(a).tobytes())
    buf = np.array([crc, -crc], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
    return int(buf[0]) == -int(buf[1])


def distributed_target(comm, xyz0: np.ndarray, data_term, restraints: Restraints, res_first_atom,
                       weight: float, params: RefineParams, boxes: bool = False):
    """The DistributedTarget (or BoxTarget) of this rank: the data term restricted to the rank's
    atoms, the restraints to their share. data_term: an engine.RealSpaceTerm over all atoms (or
    any term with local(atoms)).

    The atoms are cut into comm.Get_size() blocks of whole residues in file order (rank p owns
    block p) unless `boxes`, the data term reads only the rank's own atoms (reads_own_atoms_only),
    comm has more than one rank and params.decomposition is "boxes" (or "auto" and atoms x
    (ranks - 1)^2 >= BOXES_FROM): then rank p owns box p of decompose.spatial_parts at xyz0,
    holds only the rows of its box and halo, and its owned_call exchanges halos (BoxTarget).
    xyz0 must then be the same on every rank.

    restraints may be this rank's decompose.PartRestraints instead of the whole set (comm's
    rank `part` of its n_parts): its fixed parts are the ranks' atoms then (blocks or boxes, as
    it was cut), and only its own terms and exclusions are read."""
    n = len(xyz0)
    part = comm.Get_rank()
    size = comm.Get_size()
    if isinstance(restraints, PartRestraints):
        _check_part(comm, restraints, n)
        if restraints.blocks is not None:
            share = restraints.share
            local = _local_term(data_term, slice(*restraints.blocks))
            return DistributedTarget(comm, (n, 3), local, share, share, params, weight,
                                     restraints.owner)
        _check_box_term(data_term)
        return BoxTarget(comm, xyz0, data_term, restraints, restraints, params, weight)
    bounds = atom_blocks(res_first_atom, comm.Get_size())
    if bounds[-1] != n:
        raise ValueError(f"res_first_atom describes {bounds[-1]} atoms, the coordinates have {n}")
    use_boxes = boxes and boxes_wanted(n, size, params) and reads_own_atoms_only(data_term)
    if not use_boxes:
        owner = owner_of_atoms(bounds, n)
        local = _local_term(data_term, slice(int(bounds[part]), int(bounds[part + 1])))
        return DistributedTarget(comm, (n, 3), local, restraints_share(restraints, owner, part),
                                 restraints, params, weight, owner)
    owner = spatial_parts(xyz0, res_first_atom, comm.Get_size())
    return BoxTarget(comm, xyz0, data_term, PartRestraints(restraints, owner, part, size, comm),
                     restraints, params, weight)


def _check_part(comm, restraints: PartRestraints, n: int) -> None:
    """That restraints is this rank's part, for comm's ranks and n atoms."""
    part, size = comm.Get_rank(), comm.Get_size()
    if restraints.n_parts != size or restraints.part != part or restraints.n_atoms != n:
        raise ValueError(f"rank {part} of {size} holds part {restraints.part} of "
                         f"{restraints.n_parts} of {restraints.n_atoms} atoms' restraints, "
                         f"for {n} atoms")


def _check_box_term(data_term) -> None:
    if not reads_own_atoms_only(data_term):
        raise ValueError("restraints held in boxes need a data term that reads only the "
                         "rank's own atoms")


def boxes_wanted(n_atoms: int, ranks: int, params: RefineParams) -> bool:
    """Whether `ranks` ranks sharing n_atoms own boxes and exchange halos (params.decomposition
    "boxes", or "auto" and atoms x (ranks - 1)^2 >= BOXES_FROM) rather than blocks in file order."""
    return ranks > 1 and (params.decomposition == "boxes"
                          or (params.decomposition == "auto" and n_atoms * (ranks - 1) ** 2 >= BOXES_FROM))


def correct_inversions(xyz: np.ndarray, r) -> tuple[np.ndarray, int, int]:
    """core.geometry.correct_inversions of the whole model: with the whole restraints, at once;
    with a decompose.PartRestraints, collectively over its comm, each rank reflecting the
    centres of its own chiral terms and every pass's moved atoms exchanged, so every rank ends
    with the coordinates, and the totals, that the whole set gives: the same passes, each centre
    by the same term, every position read before any is written."""
    if not isinstance(r, PartRestraints):
        return geometry.correct_inversions(xyz, r)
    return geometry.correct_inversions(xyz, r.share, bonded=r.bonded, parts=_PartsExchange(r.comm))


class _PartsExchange:
    """geometry.correct_inversions' `parts` over a communicator: counts summed (Allreduce), the
    moved rows of every rank written into each rank's coordinates (allgather: a few atoms)."""

    def __init__(self, comm):
        self.comm = comm

    def count(self, k: int) -> int:
        buf = np.array([k], dtype=np.int64)
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return int(buf[0])

    def exchange(self, xyz: np.ndarray, moved: np.ndarray) -> None:
        for idx, rows in self.comm.allgather((moved, xyz[moved])):
            xyz[idx] = rows


def distributed_minimise(comm, xyz0: np.ndarray, data_term, restraints: Restraints, res_first_atom,
                         weight: float, iterations: int, params: RefineParams,
                         callback=None, keep_parts: bool = False
                         ) -> tuple[MinimiseResult, DistributedTarget]:
    """engine.minimise shared by the ranks of comm (collective): L-BFGS on the coordinates of
    T = weight * T_data + T_geometry, every evaluation summed over comm.

    xyz0 must be the same on every rank (checked), or a BoxedCoordinates: the ranks' parts of the
    start, held in the boxes their restraints are held in (no whole model on any rank). The
    L-BFGS vectors are split between the ranks by atom ownership (DistributedTarget.owned_call);
    a callback gets this rank's part of x and must return the same answer on every rank. Returns
    the result, identical on every rank (checked), and the target (timings, neighbour-list
    builds, statistics). keep_parts, with the restraints held in boxes: the result's xyz is the
    ranks' parts of it (a BoxedCoordinates; its statistics from the parts), not gathered.
    """
    if isinstance(xyz0, BoxedCoordinates):
        # the start as the ranks hold it in their boxes: no whole model on any rank
        if not xyz0.held_by(comm, restraints):
            raise ValueError("a start held in parts needs the restraints held in the same boxes")
        _check_part(comm, restraints, len(xyz0))
        _check_box_term(data_term)
        target = BoxTarget(comm, None, data_term, restraints, restraints, params, weight,
                           x_owned=xyz0.rows)
        x_start = xyz0.rows.ravel()
    else:
        xyz0 = np.ascontiguousarray(xyz0, dtype=np.float64)
        if not same_on_all_ranks(comm, xyz0):
            raise ValueError("the start coordinates differ between the ranks of the communicator")
        target = distributed_target(comm, xyz0, data_term, restraints, res_first_atom, weight, params,
                                    boxes=True)
        x_start = target.own_part(xyz0)
    shape = (len(xyz0), 3)
    t0 = time.perf_counter()
    x_part, f, iterations, evaluations = _minimise_part(comm, target, x_start, iterations, params,
                                                        callback)
    # the geometry of the result from each rank's share of the terms and pairs (two Allreduce
    # calls), so no rank needs the whole model's neighbour list to report it
    if keep_parts and isinstance(target, BoxTarget):
        statistics = target.part_statistics(x_part)
        result = MinimiseResult(xyz=BoxedCoordinates(comm, None, target.owner, rows=x_part),
                                f=f, iterations=iterations, evaluations=evaluations,
                                seconds=time.perf_counter() - t0, statistics=statistics)
        return result, target
    x = target.gather(x_part)
    if target.halo is None:          # (blocks gather into a buffer their next evaluation reuses)
        x = x.copy()
    seconds = time.perf_counter() - t0
    result = MinimiseResult(xyz=x.reshape(shape), f=f, iterations=iterations,
                            evaluations=evaluations, seconds=seconds,
                            statistics=target.statistics(x.reshape(shape)))
    return result, target


def _minimise_part(comm, target, x_part: np.ndarray, iterations: int, params: RefineParams,
                   callback=None) -> tuple[np.ndarray, float, int, int]:
    """L-BFGS of target.owned_call from this rank's part x_part (collective): (this rank's part
    of the result, f, iterations, evaluations), checked the same on every rank."""
    # the optimiser's vectors are split between the ranks: each keeps and updates only the
    # coordinates of its own atoms (core.lbfgs with comm)
    x_part, f, state, _ = lbfgs(target.owned_call, x_part, maxiter=iterations, m=params.lbfgs_memory,
                                max_step=params.max_step, callback=callback, comm=comm)
    iterations, evaluations = state.iteration, state.n_evals
    # the history (this rank's part of m pairs of vectors) is let go of before the caller
    # gathers the whole model or makes its statistics
    del state
    if not same_on_all_ranks(comm, np.array([f, iterations, evaluations])):
        raise RuntimeError("the ranks' minimisations diverged: the reduced values differed "
                           "between ranks")
    return x_part, f, iterations, evaluations


def chained_minimise(comm, start, data_terms, restraints: PartRestraints, weight: float,
                     iterations: int, params: RefineParams, root: int = 0) -> MinimiseResult:
    """distributed_minimise against each of data_terms in turn, each from the last one's result
    (collective), by ranks that hold the restraints in boxes (a decompose.PartRestraints cut in
    boxes for comm): between and during the minimisations each rank holds only its own atoms'
    coordinates (BoxedCoordinates, keep_parts). The whole model exists twice only: the start, made by
    start() (the same on every rank) and let go of once this rank has taken its atoms from it,
    and the result, gathered on rank `root` of comm alone (None elsewhere: its xyz is None
    there). Returns the MinimiseResult of the last minimisation (f, statistics: every rank's;
    iterations, evaluations and seconds: the whole chain's); its coordinates are bitwise those of
    the same minimisations through distributed_minimise, each from the last one's gathered
    result."""
    if not held_in_boxes(restraints):
        raise ValueError("chained_minimise needs the restraints held in boxes (a PartRestraints "
                         "cut by decompose.spatial_parts)")
    t0 = time.perf_counter()
    xyz0 = np.ascontiguousarray(start(), dtype=np.float64)
    _check_part(comm, restraints, len(xyz0))
    if not same_on_all_ranks(comm, xyz0):
        raise ValueError("the start coordinates differ between the ranks of the communicator")
    x, xyz0 = BoxedCoordinates(comm, xyz0, restraints.owner), None
    res, done, evaluations = None, 0, 0
    for term in data_terms:
        # (the target is not kept: its map sub-grid and numbered terms go before the next's)
        res = distributed_minimise(comm, x, term, restraints, None, weight, iterations, params,
                                   keep_parts=True)[0]
        x, done, evaluations = res.xyz, done + res.iterations, evaluations + res.evaluations
    if res is None:
        raise ValueError("chained_minimise needs at least one data term")
    return MinimiseResult(xyz=x.gather_to(root), f=res.f, iterations=done, evaluations=evaluations,
                          seconds=time.perf_counter() - t0, statistics=res.statistics)


# ------------------------------------------------------------------------ waiting and failing

def wait_quietly(comm, request, poll: float = POLL_SECONDS, timeout: float | None = None,
                 on_poll=None):
    """Complete a nonblocking request without spinning a core: test it, sleep `poll` seconds,
    repeat. Returns its MPI.Status. A blocking MPICH call would busy-poll the core for the whole
    wait; this costs a few microseconds of CPU every poll interval and adds at most `poll` of
    latency. With timeout (seconds), raises TimeoutError (the request stays pending). on_poll()
    runs at every poll (the master passes Interrupts.poll, so a signal it gets reaches the
    workers while it waits)."""
    status = MPI.Status()
    deadline = None if timeout is None else time.monotonic() + timeout
    while not request.Test(status):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"rank {comm.Get_rank()}: request not complete after {timeout} s")
        if on_poll is not None:
            on_poll()
        time.sleep(poll)
    return status


def bcast_bytes(comm, data: bytes | None, root: int = 0):
    """Broadcast a byte string from root (data ignored elsewhere); collective over comm, every
    rank waiting without spinning (wait_quietly). Sent in pieces below MPI's 2^31 count limit.
    Returns data on root, a memoryview of the received bytes elsewhere (no second copy)."""
    size = np.array([len(data) if comm.Get_rank() == root else 0], dtype=np.int64)
    wait_quietly(comm, comm.Ibcast(size, root=root))
    n = int(size[0])
    # sent from the bytes themselves (a broadcast only reads the root's buffer)
    buf = np.frombuffer(data, dtype=np.uint8) if comm.Get_rank() == root else np.empty(n, np.uint8)
    _bcast_pieces(comm, buf, root)
    return data if comm.Get_rank() == root else memoryview(buf)


def _bcast_pieces(comm, buf: np.ndarray, root: int) -> None:
    """Broadcast a uint8 array in pieces below MPI's 2^31 count limit, waiting without spinning."""
    piece = 1 << 30
    for start in range(0, len(buf), piece):
        wait_quietly(comm, comm.Ibcast(buf[start:start + piece], root=root))


def _bcast_arrays(comm, bufs, root: int) -> None:
    """Broadcast uint8 arrays with blocking Bcast calls, for ranks that have just met in a
    broadcast: a quiet wait (wait_quietly) lets MPI move a nonblocking broadcast on only when it
    tests it, every poll interval, and 60 arrays of 96 MB took 3-5 s that way against 0.5 s."""
    piece = 1 << 30
    for buf in bufs:
        for start in range(0, len(buf), piece):
            comm.Bcast(buf[start:start + piece], root=root)


def made_once(comm, make, root: int = 0, what: str = "its task"):
    """make() run by rank `root` of comm alone and its result, pickled, broadcast to every rank
    (collective; the others wait without spinning): the same object everywhere, made once
    instead of by every rank at once. An InputError on root is raised with the same message on
    every rank; any other failure on root raises there with its traceback, and on the others an
    InputError naming root and `what`."""
    import pickle

    from ..errors import InputError
    obj, payload, buffers = None, None, []
    if comm.Get_rank() == root:
        try:
            obj = make()
            # pickle protocol 5: the arrays' memory goes out of band, broadcast from where it
            # lies and received into the memory the others' arrays are made on, instead of a
            # pickled copy on every rank and a copy of it on the root (the restraints of a
            # million atoms: 200 MB each)
            payload = b"M" + pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        except InputError as exc:
            payload = b"E" + str(exc).encode()
        except BaseException:
            bcast_bytes(comm, b"X", root=root)       # the others stop too
            raise
    payload = bcast_bytes(comm, payload, root=root)
    kind = bytes(payload[:1])
    if kind == b"E":
        raise InputError(bytes(payload[1:]).decode())
    if kind == b"X":
        raise InputError(f"rank {root} failed {what}")
    if comm.Get_rank() == root:
        raws = [b.raw() for b in buffers]
        bcast_bytes(comm, np.array([r.nbytes for r in raws], dtype=np.int64).tobytes(), root)
        _bcast_arrays(comm, [np.frombuffer(r, dtype=np.uint8) for r in raws], root)
        return obj
    sizes = np.frombuffer(bcast_bytes(comm, None, root), dtype=np.int64)
    received = [np.empty(int(n), dtype=np.uint8) for n in sizes]
    _bcast_arrays(comm, received, root)
    return pickle.loads(payload[1:], buffers=received)


def _send_pieces(comm, buf: np.ndarray, dest: int, tag: int) -> None:
    """Send a uint8 array in pieces below MPI's 2^31 count limit, waiting without spinning."""
    piece = 1 << 30
    for start in range(0, len(buf), piece):
        wait_quietly(comm, comm.Isend(buf[start:start + piece], dest=dest, tag=tag))


def _recv_pieces(comm, buf: np.ndarray, source: int, tag: int, on_poll=None) -> None:
    piece = 1 << 30
    for start in range(0, len(buf), piece):
        wait_quietly(comm, comm.Irecv(buf[start:start + piece], source=source, tag=tag), on_poll=on_poll)


def send_object(comm, obj, dest: int, tag: int) -> None:
    """Send a picklable object to rank dest, waiting without spinning until dest has received it
    (recv_object). Pickle protocol 5: its arrays' memory goes out of band, sent from where it
    lies (no pickled copy), and received into arrays of their own (recv_object)."""
    import pickle

    buffers = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    head = np.array([len(data), len(raws), *[r.nbytes for r in raws]], dtype=np.int64)
    wait_quietly(comm, comm.Isend(np.array([len(head)], dtype=np.int64), dest=dest, tag=tag))
    wait_quietly(comm, comm.Isend(head, dest=dest, tag=tag))
    _send_pieces(comm, np.frombuffer(data, dtype=np.uint8), dest, tag)
    for r in raws:
        _send_pieces(comm, np.frombuffer(r, dtype=np.uint8), dest, tag)


def recv_object(comm, source: int, tag: int, on_poll=None):
    """The object rank source sends with send_object, received without spinning; each of its
    out-of-band arrays lands in memory of its own, so one let go of is freed at once (a view of
    one received buffer would hold every array's memory as long as any of them lives)."""
    import pickle

    n = np.zeros(1, dtype=np.int64)
    wait_quietly(comm, comm.Irecv(n, source=source, tag=tag), on_poll=on_poll)
    head = np.zeros(int(n[0]), dtype=np.int64)
    wait_quietly(comm, comm.Irecv(head, source=source, tag=tag), on_poll=on_poll)
    data = np.empty(int(head[0]), dtype=np.uint8)
    _recv_pieces(comm, data, source, tag, on_poll)
    received = []
    for size in head[2:2 + int(head[1])]:
        buf = np.empty(int(size), dtype=np.uint8)
        _recv_pieces(comm, buf, source, tag, on_poll)
        received.append(buf)
    return pickle.loads(data, buffers=received)


def master_wait_for(world, poll: float = POLL_SECONDS, timeout: float | None = None) -> float:
    """The master's side of the rendezvous with the workers (collective over world): returns,
    after the wall time in seconds it waited, once every worker has called notify_master(world).
    The master sleeps while it waits. With one rank it returns at once."""
    t0 = time.perf_counter()
    wait_quietly(world, world.Ibarrier(), poll, timeout)
    return time.perf_counter() - t0


def notify_master(world) -> None:
    """A worker's side of master_wait_for: tell the master this rank's work is done (collective
    over world; a worker waits only for the other workers and the master's next poll)."""
    world.Ibarrier().Wait()


def install_abort_on_error(world):
    """Make an uncaught exception on this rank print its traceback and abort every rank of world
    (exit code 1), instead of leaving the others blocked in a collective. Returns the previous
    sys.excepthook."""
    previous = sys.excepthook

    def abort_on_error(exc_type, exc, tb):
        try:
            sys.stdout.flush()
            sys.stderr.write(f"rank {world.Get_rank()} of {world.Get_size()}: uncaught "
                             f"{exc_type.__name__}, aborting all ranks\n")
            traceback.print_exception(exc_type, exc, tb, file=sys.stderr)
            sys.stderr.flush()
            # let mpiexec's output forwarding pass the message on before the abort tears the job
            # down (an abort right after the write once left the job's stderr empty)
            time.sleep(0.5)
        finally:
            world.Abort(1)

    sys.excepthook = abort_on_error
    return previous
