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
within the search radius of an owned atom, and the rows a rank keeps for atoms beyond its halo
never enter a term. Each rank checks its own atoms (moved_far) and the answer is summed with the
energy of the same evaluation (distributed.BoxTarget.owned_call); when an atom has moved too far,
that evaluation is done again after build() has made new lists from each rank's own atoms and
the atoms the others send it from near its bounds, so the common evaluation costs no extra
collective and no rank ever holds the whole model.
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
        self.owner = np.asarray(owner)    # (any integer type: a part's is int16)
        self.owned = np.flatnonzero(self.owner == self.rank).astype(np.int64)
        fixed = np.asarray(fixed, dtype=np.int64)
        self.fixed = fixed[self.owner[fixed] != self.rank]
        self.radius = float(radius)
        self.buffer = float(buffer)
        self.need = np.zeros(0, dtype=np.int64)          # halo atoms, grouped by owner
        self.need_rows = self.need                       # their rows in the caller's arrays
        self.recv_counts = np.zeros(self.size, dtype=np.int64)
        self.send_idx = np.zeros(0, dtype=np.int64)      # own atoms others read, grouped by reader
        self.send_counts = np.zeros(self.size, dtype=np.int64)
        self.send_rows = self.send_idx
        self.x_build: np.ndarray | None = None
        self.n_builds = 0
        self.build_bytes = 0          # bytes this rank sent in the builds (and their fetches)
        self._asked_bytes = 0

    def build(self, x_owned: np.ndarray, spare: float = 0.0) -> np.ndarray:
        """New lists at this rank's own coordinates x_owned (rows of self.owned; collective,
        every rank passing its own), without the whole model: the ranks swap the bounds of their
        atoms (Allgather), each sends every other rank its atoms within radius + spare of that
        rank's bounds, with their coordinates (Alltoallv), and each keeps of those it receives
        the ones near its own atoms (near_atoms). Returns the other ranks' atoms within
        radius + spare of this rank's (sorted global indices; a superset, found on a grid);
        the halo (need) is those within radius and the atoms its restraint terms read."""
        x_owned = np.ascontiguousarray(x_owned, dtype=np.float64).reshape(-1, 3)
        if len(x_owned) != len(self.owned):
            raise ValueError(f"{len(x_owned)} coordinates for {len(self.owned)} owned atoms")
        if not np.isfinite(x_owned).all():
            raise ValueError("non-finite coordinates")
        reach = self.radius + float(spare)
        bounds = np.full(6, np.nan)
        if len(x_owned):
            bounds[:3], bounds[3:] = x_owned.min(axis=0), x_owned.max(axis=0)
        every = np.empty((self.size, 6), dtype=np.float64)
        self.comm.Allgather(bounds, every)
        picks = []
        for q in range(self.size):
            if q == self.rank or not np.isfinite(every[q]).all():
                picks.append(np.zeros(0, dtype=np.int64))
                continue
            lo, hi = every[q, :3] - reach, every[q, 3:] + reach
            inside = np.all((x_owned >= lo) & (x_owned <= hi), axis=1)
            picks.append(np.flatnonzero(inside))
        give_counts = np.array([len(p) for p in picks], dtype=np.int64)
        give = np.concatenate(picks)
        take_counts = np.empty(self.size, dtype=np.int64)
        self.comm.Alltoall(give_counts, take_counts)
        took = np.empty(int(take_counts.sum()), dtype=np.int64)
        self.comm.Alltoallv([self.owned[give], (give_counts, _displs(give_counts)), MPI.INT64_T],
                            [took, (take_counts, _displs(take_counts)), MPI.INT64_T])
        took_xyz = np.empty((len(took), 3), dtype=np.float64)
        self._exchange(np.ascontiguousarray(x_owned[give]), give_counts, took_xyz, take_counts)
        n_own = len(x_owned)
        both = np.concatenate([x_owned, took_xyz])
        own = np.arange(n_own, dtype=np.int64)
        wide = np.sort(took[near_atoms(both, own, reach) - n_own])
        near = took[near_atoms(both, own, self.radius) - n_own] if spare > 0 else wide
        halo = np.union1d(self.fixed, near)
        need = halo[np.lexsort((halo, self.owner[halo]))]
        recv_counts = np.bincount(self.owner[need], minlength=self.size).astype(np.int64)
        send_idx, send_counts = self._asked(need, recv_counts)
        self.need, self.recv_counts = need, recv_counts
        self.send_idx, self.send_counts = send_idx, send_counts
        self.need_rows, self.send_rows = need, send_idx
        self.x_build = x_owned.copy()
        self.n_builds += 1
        # the bounds, the counts, the atoms sent with their coordinates, the halo asked for
        self.build_bytes += 8 * (6 + self.size + 4 * len(give)) + self._asked_bytes
        return wide

    def _asked(self, ask: np.ndarray, ask_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Send every owner the atoms of ask (grouped by owner, ask_counts per rank) and return
        the atoms the others ask of this rank, grouped by asker, with their counts."""
        counts = np.empty(self.size, dtype=np.int64)
        self.comm.Alltoall(ask_counts, counts)
        asked = np.empty(int(counts.sum()), dtype=np.int64)
        self.comm.Alltoallv([ask, (ask_counts, _displs(ask_counts)), MPI.INT64_T],
                            [asked, (counts, _displs(counts)), MPI.INT64_T])
        if len(asked) and np.any(self.owner[asked] != self.rank):
            raise RuntimeError("halo lists: a rank asked for atoms this rank does not own")
        self._asked_bytes = 8 * (self.size + len(ask))
        return asked, counts

    def fetch(self, atoms: np.ndarray, x_owned: np.ndarray) -> np.ndarray:
        """The coordinates of other ranks' atoms (global indices) from their owners (collective:
        each rank passes its own coordinates x_owned, rows of self.owned)."""
        atoms = np.asarray(atoms, dtype=np.int64)
        order = np.lexsort((atoms, self.owner[atoms]))
        ask = atoms[order]
        ask_counts = np.bincount(self.owner[ask], minlength=self.size).astype(np.int64)
        asked, counts = self._asked(ask, ask_counts)
        rows = np.ascontiguousarray(np.asarray(x_owned, dtype=np.float64).reshape(-1, 3)
                                    [np.searchsorted(self.owned, asked)])
        got = np.empty((len(ask), 3), dtype=np.float64)
        self._exchange(rows, counts, got, ask_counts)
        self.build_bytes += self._asked_bytes + 24 * len(rows)
        out = np.empty_like(got)
        out[order] = got
        return out

    def localise(self, local: np.ndarray) -> None:
        """Exchange the rows of arrays in the numbering `local` (the sorted global indices of
        this rank's atoms and halo: row k is atom local[k]) from now until the next build."""
        self.need_rows = np.searchsorted(local, self.need)
        self.send_rows = np.searchsorted(local, self.send_idx)

    def moved_far(self, x_owned: np.ndarray) -> bool:
        """True when one of this rank's atoms has moved more than buffer / 2 since the build
        (local; the caller sums the answer over the ranks). Non-finite coordinates count as far."""
        if self.x_build is None:
            return True
        d = np.asarray(x_owned, dtype=np.float64).reshape(-1, 3) - self.x_build
        d2 = np.einsum("ij,ij->i", d, d)
        return bool(len(d2) and not (np.max(d2) <= (self.buffer / 2.0) ** 2))

    def coords(self, xyz: np.ndarray) -> None:
        """Fill the halo rows of xyz (need_rows) with the owners' coordinates; this rank's own
        rows must be current."""
        send = np.ascontiguousarray(xyz[self.send_rows], dtype=np.float64)
        recv = np.empty((len(self.need), 3), dtype=np.float64)
        self._exchange(send, self.send_counts, recv, self.recv_counts)
        xyz[self.need_rows] = recv

    def gradients(self, g: np.ndarray) -> None:
        """Send the halo rows of g to their owners and add the rows received into g's own rows."""
        send = np.ascontiguousarray(g[self.need_rows], dtype=np.float64)
        recv = np.empty((len(self.send_idx), 3), dtype=np.float64)
        self._exchange(send, self.recv_counts, recv, self.send_counts)
        np.add.at(g, self.send_rows, recv)

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
