"""Halo exchange: each rank receives only the coordinates its terms read beyond its own atoms.

A rank owns a set of atoms (decompose.spatial_parts: a box of whole residues) and evaluates the
terms whose first atom it owns. Those terms read a halo of atoms owned by other ranks: the
partners of its restraints (fixed for a run) and every atom within `radius` of one of its own
(the candidates of its non-bonded pairs). Per evaluation,

  * coords(xyz): the owners send the halo coordinates (one Alltoallv, rows of 3 doubles);
  * gradients(g): the halo rows of the gradient go back to their owners, which add them to
    their own rows in rank order (one Alltoallv; np.add.at in a fixed order, so bit-reproducible);

so the bytes a rank exchanges grow with its box's surface, not with the model.

The halo stays valid while no atom has moved more than `buffer / 2` from where it was at the
last build (radius = the neighbour search radius + buffer): then no atom outside the halo can come
within the search radius of an owned atom, and the stale coordinates a rank keeps for atoms far
outside its box never enter a term. Each rank checks its own atoms (moved_far) and the answer is
summed with the energy of the same evaluation (DistributedTarget._halo_call); when an atom has
moved too far, that evaluation is done again after build() has gathered the whole model once
(Allgatherv) and made new lists, so the common evaluation costs no extra collective.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

HALO_BUFFER = 2.0      # A: an atom may move buffer / 2 from its position at the build


def halo_buffer(max_step: float) -> float:
    """The buffer for an optimiser whose trials move no atom more than max_step (A) from where
    its line search started: HALO_BUFFER, or 2 max_step + 1 when that is larger, so that a trial
    and the return from it do not each make the lists again. With max_step 2 and a 2 A buffer a
    million-atom run made its lists 124 times in 211 evaluations, gathering the whole model each
    time."""
    return max(HALO_BUFFER, 2.0 * float(max_step) + 1.0)


def grid_cells(xyz: np.ndarray, cell: float) -> tuple[np.ndarray, tuple]:
    """(ijk (n, 3) int32, dims): each point's cell on a grid of cubes of edge `cell` starting at
    the points' lowest corner, and the grid's shape (for the neighbourhood searches on a grid:
    near_atoms here, ncs.interface_atoms)."""
    # one axis at a time, into int32 (a cell index never nears 2^31): 12 bytes an atom where
    # the whole-array expression held 48 at once (a halo build of a million atoms)
    ijk = np.empty((len(xyz), 3), dtype=np.int32)
    for a in range(3):
        col = xyz[:, a] - xyz[:, a].min(initial=np.inf)
        col /= cell
        ijk[:, a] = np.floor(col, out=col)
    return ijk, tuple((ijk.max(axis=0, initial=-1) + 1).tolist())


def near_atoms(xyz: np.ndarray, own: np.ndarray, radius: float) -> np.ndarray:
    """Sorted indices of the atoms not in `own` that lie within `radius` of some atom of `own`
    (and some a little farther: cells of radius / 2 within two cells of an owned atom's cell),
    found on a grid, O(atoms)."""
    from scipy import ndimage

    xyz = np.asarray(xyz, dtype=np.float64)
    if not np.isfinite(xyz).all():
        raise ValueError("non-finite coordinates")
    n = len(xyz)
    is_own = np.zeros(n, dtype=bool)
    is_own[own] = True
    if n == 0 or len(own) == 0 or radius <= 0:
        return np.zeros(0, dtype=np.int64)
    cell = radius / 2.0
    ijk, dims = grid_cells(xyz, cell)
    occupied = np.zeros(dims, dtype=bool)
    occupied[tuple(ijk[own].T)] = True
    near = ndimage.binary_dilation(occupied, structure=np.ones((5, 5, 5), dtype=bool))
    return np.flatnonzero(near[tuple(ijk.T)] & ~is_own).astype(np.int64)


class HaloExchange:
    """The halo lists of one rank of comm, and the two exchanges that use them (collective).

    owner: (n,) owning rank of every atom; fixed: atoms this rank's restraint terms read (any
    rank's, sorted); radius: the non-bonded search radius + buffer."""

    def __init__(self, comm, owner: np.ndarray, fixed: np.ndarray, radius: float,
                 buffer: float = HALO_BUFFER):
        self.comm = comm
        self.size = comm.Get_size()
        self.rank = comm.Get_rank()
        self.owner = np.asarray(owner, dtype=np.int64)
        self.owned = np.flatnonzero(self.owner == self.rank).astype(np.int64)
        fixed = np.asarray(fixed, dtype=np.int64)
        self.fixed = fixed[self.owner[fixed] != self.rank]
        self.radius = float(radius)
        self.buffer = float(buffer)
        self.need = np.zeros(0, dtype=np.int64)          # halo atoms, grouped by owner
        self.recv_counts = np.zeros(self.size, dtype=np.int64)
        self.send_idx = np.zeros(0, dtype=np.int64)      # own atoms others read, grouped by reader
        self.send_counts = np.zeros(self.size, dtype=np.int64)
        self.x_build: np.ndarray | None = None
        self.n_builds = 0
        self.build_bytes = 0          # bytes this rank sent in the builds' Alltoallv of lists

    def build(self, xyz: np.ndarray) -> None:
        """New lists at xyz, which must be the whole model and the same on every rank."""
        halo = np.union1d(self.fixed, near_atoms(xyz, self.owned, self.radius))
        need = halo[np.lexsort((halo, self.owner[halo]))]
        recv_counts = np.bincount(self.owner[need], minlength=self.size).astype(np.int64)
        send_counts = np.empty(self.size, dtype=np.int64)
        self.comm.Alltoall(recv_counts, send_counts)
        send_idx = np.empty(int(send_counts.sum()), dtype=np.int64)
        self.comm.Alltoallv([need, (recv_counts, _displs(recv_counts)), MPI.INT64_T],
                            [send_idx, (send_counts, _displs(send_counts)), MPI.INT64_T])
        if len(send_idx) and np.any(self.owner[send_idx] != self.rank):
            raise RuntimeError("halo lists: a rank asked for atoms this rank does not own")
        self.need, self.recv_counts = need, recv_counts
        self.send_idx, self.send_counts = send_idx, send_counts
        self.x_build = np.array(xyz[self.owned], dtype=np.float64)
        self.n_builds += 1
        self.build_bytes += 8 * (self.size + len(need))

    def moved_far(self, x_owned: np.ndarray) -> bool:
        """True when one of this rank's atoms has moved more than buffer / 2 since the build
        (local; the caller sums the answer over the ranks). Non-finite coordinates count as far."""
        if self.x_build is None:
            return True
        d = np.asarray(x_owned, dtype=np.float64).reshape(-1, 3) - self.x_build
        d2 = np.einsum("ij,ij->i", d, d)
        return bool(len(d2) and not (np.max(d2) <= (self.buffer / 2.0) ** 2))

    def coords(self, xyz: np.ndarray) -> None:
        """Fill xyz[need] (rows) with the owners' coordinates; this rank's own rows must be
        current."""
        send = np.ascontiguousarray(xyz[self.send_idx], dtype=np.float64)
        recv = np.empty((len(self.need), 3), dtype=np.float64)
        self._exchange(send, self.send_counts, recv, self.recv_counts)
        xyz[self.need] = recv

    def gradients(self, g: np.ndarray) -> None:
        """Send the halo rows of g to their owners and add the rows received into g's own rows."""
        send = np.ascontiguousarray(g[self.need], dtype=np.float64)
        recv = np.empty((len(self.send_idx), 3), dtype=np.float64)
        self._exchange(send, self.recv_counts, recv, self.send_counts)
        np.add.at(g, self.send_idx, recv)

    def _exchange(self, send, send_counts, recv, recv_counts) -> None:
        sc = 3 * send_counts
        rc = 3 * recv_counts
        self.comm.Alltoallv([send, (sc, _displs(sc)), MPI.DOUBLE], [recv, (rc, _displs(rc)), MPI.DOUBLE])

    def bytes_per_evaluation(self) -> int:
        """Bytes this rank sends per evaluation: its coordinates to the readers, the halo
        gradient to the owners, and the scalar reductions (displacement, energy)."""
        return 8 * 3 * (len(self.send_idx) + len(self.need)) + 16


def _displs(counts: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
