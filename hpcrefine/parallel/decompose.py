"""Work decomposition by atom ownership: pure helpers over numpy arrays (no MPI).

The model is cut into `n_parts` contiguous blocks of whole residues, balanced by atom count; each
atom has exactly one owning part. A restraint term belongs to the part that owns its first atom
(a plane: the first atom of the plane's list), and a non-bonded pair (i < j) to the owner of i, so
summing the parts' energies and gradients gives every term exactly once.

    bounds = atom_blocks(model.res_first_atom, n_parts)     # part p owns bounds[p]:bounds[p+1]
    owner = owner_of_atoms(bounds, model.n_atoms)
    mine = restraints_share(r, owner, part)                  # evaluate only these terms
    pairs = pairs_share(nbl, owner, part)                    # and only these non-bonded pairs

A part owns a block of atoms, but its terms reach atoms of the neighbouring blocks (a peptide bond,
a contact across the boundary): the coordinates it reads form a halo around its block, and its
gradient is non-zero on that halo too.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..core.common import sorted_members, unique_sorted
from ..restraints import Restraints

# term arrays of a Restraints selected row by row, keyed by the index array whose first column
# names the owning atom
_ROW_TERMS = {
    "bond_idx": ("bond_target", "bond_sigma"),
    "angle_idx": ("angle_target", "angle_sigma"),
    "tors_idx": ("tors_target", "tors_sigma", "tors_period"),
    "chir_idx": ("chir_target", "chir_sigma"),
    # low-resolution terms (hpcrefine.lowres); rama_table is shared, not selected
    "dist_idx": ("dist_target", "dist_sigma", "dist_flat", "dist_limit", "dist_kind"),
    "rama_idx": ("rama_class", "rama_weight"),
    "reft_idx": ("reft_target", "reft_sigma", "reft_limit"),
}


def atom_blocks(res_first_atom, n_parts: int) -> np.ndarray:
    """Boundaries (n_parts + 1,) of n_parts contiguous blocks of whole residues, balanced by atoms.

    res_first_atom: (n_residues + 1,) non-decreasing, starting at 0 (atoms of residue r are
    res_first_atom[r]:res_first_atom[r + 1]); the last entry is the number of atoms. Cut k is the
    residue boundary nearest to k * n_atoms / n_parts, so no block differs from the ideal size by
    more than the largest residue. A block is empty only when a residue is larger than the ideal
    block (as when there are more parts than residues).
    """
    first = np.asarray(res_first_atom)
    if first.ndim != 1 or len(first) < 1 or first[0] != 0 or np.any(np.diff(first) < 0):
        raise ValueError("res_first_atom must be a non-decreasing 1-D array starting at 0")
    if int(n_parts) != n_parts or n_parts < 1:
        raise ValueError(f"the number of parts must be a positive integer, got {n_parts}")
    first = first.astype(np.int64)
    n_atoms = int(first[-1])
    ideal = np.arange(1, n_parts) * (n_atoms / n_parts)
    # nearest residue boundary to each ideal cut (ties go to the smaller block before the cut)
    right = np.clip(np.searchsorted(first, ideal, side="left"), 0, len(first) - 1)
    left = np.maximum(right - 1, 0)
    pick = np.where(ideal - first[left] <= first[right] - ideal, first[left], first[right])
    bounds = np.concatenate(([0], pick, [n_atoms])).astype(np.int64)
    return np.maximum.accumulate(bounds)


def owner_of_atoms(bounds, n_atoms: int) -> np.ndarray:
    """(n_atoms,) int64: the part owning each atom, for blocks bounds[p]:bounds[p + 1]."""
    bounds = np.asarray(bounds, dtype=np.int64)
    if bounds.ndim != 1 or len(bounds) < 2 or bounds[0] != 0 or np.any(np.diff(bounds) < 0):
        raise ValueError("bounds must be a non-decreasing 1-D array starting at 0")
    if bounds[-1] != n_atoms:
        raise ValueError(f"the blocks cover {bounds[-1]} atoms, the model has {n_atoms}")
    # side='right' skips empty blocks: atom a goes to the last p with bounds[p] <= a
    return np.searchsorted(bounds, np.arange(n_atoms, dtype=np.int64), side="right") - 1


def term_owner(idx_first_col, atom_owner) -> np.ndarray:
    """The owning part of each term: the owner of the term's first atom (idx[:, 0])."""
    return np.asarray(atom_owner)[np.asarray(idx_first_col, dtype=np.int64)]


def plane_owner(plane_atoms, plane_start, atom_owner) -> np.ndarray:
    """The owning part of each plane: the owner of its first listed atom (part 0 for an empty
    plane, which carries no energy)."""
    start = np.asarray(plane_start, dtype=np.int64)
    atoms = np.asarray(plane_atoms, dtype=np.int64)
    owner = np.zeros(len(start) - 1, dtype=np.int64)
    filled = start[1:] > start[:-1]
    owner[filled] = np.asarray(atom_owner)[atoms[start[:-1][filled]]]
    return owner


def _indices(keep) -> np.ndarray:
    """Ascending row indices from a bool mask (or the indices themselves)."""
    keep = np.asarray(keep)
    return np.flatnonzero(keep) if keep.dtype == bool else keep


def select_terms(r: Restraints, rows: dict, plane_keep: np.ndarray, remap=None) -> Restraints:
    """The terms of r selected by rows[idx_name] (for every index array of _ROW_TERMS: a bool
    per term, or the ascending indices of the terms kept) and plane_keep (a bool per plane, or
    ascending plane indices), atom indices mapped through remap when given. The per-atom and
    non-bonded arrays are r's own objects, not copies. A `chir_both` attribute, when r has one,
    is selected with the chirality rows."""
    rows = {name: _indices(rows[name]) for name in _ROW_TERMS}
    planes = _indices(plane_keep)
    # every term kept and no remapping (one part owns them all: a group of one worker, a
    # half-set task of the parallel layout): r's own arrays, not a copy of every term (123 MB
    # at a million atoms, made for each minimisation)
    whole = remap is None and len(planes) == r.n_planes and all(
        len(keep) == len(getattr(r, name)) for name, keep in rows.items())
    kept = {}
    if not whole:
        for idx_name, value_names in _ROW_TERMS.items():
            idx = getattr(r, idx_name)[rows[idx_name]]
            kept[idx_name] = remap[idx] if remap is not None else idx
            for name in value_names:
                kept[name] = getattr(r, name)[rows[idx_name]]
        sizes = np.diff(r.plane_start)[planes]
        # the atoms of the kept planes, plane by plane: plane_start[q] + 0 .. size_q - 1
        at = np.repeat(r.plane_start[:-1][planes] - (np.cumsum(sizes) - sizes), sizes) + \
            np.arange(int(sizes.sum()))
        pa = r.plane_atoms[at]
        kept["plane_atoms"] = remap[pa] if remap is not None else pa
        kept["plane_sigma"] = r.plane_sigma[at]
        kept["plane_start"] = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    out = dataclasses.replace(r, **kept)
    both = getattr(r, "chir_both", None)
    if both is not None and len(both):
        out.chir_both = both if whole else np.asarray(both)[rows["chir_idx"]]
    return out


def restraints_share(r: Restraints, atom_owner, part: int) -> Restraints:
    """The terms of r that `part` evaluates: those whose first atom it owns (planes: the plane's
    first atom). Atom indices keep their global numbering. The per-atom and non-bonded arrays
    (vdw_radius, hbond_type, excl_pairs, pair14) are the same objects as r's, not copies: pair
    ownership is decided on the neighbour list (pairs_share). A `chir_both` attribute, when r
    has one, is selected with the chirality rows."""
    atom_owner = np.asarray(atom_owner)
    rows = {name: term_owner(getattr(r, name)[:, 0], atom_owner) == part for name in _ROW_TERMS}
    mine = plane_owner(r.plane_atoms, r.plane_start, atom_owner) == part
    return select_terms(r, rows, mine)


@dataclasses.dataclass
class AtomTables:
    """The per-atom arrays every part of a decomposition reads whole (PartRestraints), 5 bytes an
    atom: owner, the part of every atom (int16; int32 beyond 2^15 parts); radii, the distinct
    repulsion radii and radius_of, each atom's index into them (uint8 while there are at most 256:
    bitwise the same values); hbond_type (int8); bonded, every atom's number of bonds in the whole
    set (uint8, 255 for more: read as "three or fewer", core.geometry.correct_inversions). The
    same for every part, so the master sends them once to all (hpcrefine.refine)."""

    owner: np.ndarray
    radii: np.ndarray
    radius_of: np.ndarray
    hbond_type: np.ndarray
    bonded: np.ndarray

    @classmethod
    def of(cls, r: Restraints, owner, n_parts: int) -> "AtomTables":
        owner = np.ascontiguousarray(owner, dtype=np.int16 if n_parts <= 2 ** 15 else np.int32)
        if len(owner) != len(r.vdw_radius):
            raise ValueError(f"owner has {len(owner)} atoms, the restraints {len(r.vdw_radius)}")
        radii, codes = np.unique(np.asarray(r.vdw_radius, dtype=np.float64), return_inverse=True)
        radius_of = codes.astype(np.uint8 if len(radii) <= 256 else np.int32)
        del codes
        hb = np.asarray(r.hbond_type)
        counts = np.bincount(np.asarray(r.bond_idx, dtype=np.int64).ravel(), minlength=len(owner))
        return cls(owner=owner, radii=radii, radius_of=radius_of,
                   hbond_type=hb.astype(np.int8) if hb.size else hb,
                   bonded=np.minimum(counts, 255).astype(np.uint8))


def _special_pairs(pairs, owner) -> np.ndarray:
    """(m, 2) exclusions or 1-4 pairs (i < j) as an array, and the part of each (the owner of its
    lower atom, by which the neighbour list keys it: nonbonded._build_table)."""
    pairs = np.asarray(pairs).reshape(-1, 2)
    return pairs, (owner[pairs.min(axis=1)] if len(pairs) else np.zeros(0, dtype=owner.dtype))


def _part_terms(share: Restraints, excl, pair14) -> Restraints:
    """A part's terms as PartRestraints holds them: share with only the part's exclusions and
    1-4 pairs, and no per-atom arrays (AtomTables carries them)."""
    terms = dataclasses.replace(share, excl_pairs=excl, pair14=pair14, vdw_radius=None, hbond_type=None)
    both = getattr(share, "chir_both", None)
    if both is not None:
        terms.chir_both = both
    return terms


def _grouped(key, n_parts: int):
    """The rows of each part for a key per row: (order, bounds), rows order[bounds[p]:bounds[p+1]]
    of part p, ascending (a stable sort: a radix sort of the small integer keys)."""
    order = np.argsort(key, kind="stable")
    return order, np.searchsorted(key[order], np.arange(n_parts + 1))


def cut_parts(r: Restraints, owner, n_parts: int):
    """Every part's terms of r under owner, in one pass over the terms: yields (part, terms) for
    part 0 .. n_parts - 1, terms as PartRestraints holds them, the same bit for bit as
    PartRestraints(r, owner, part, n_parts) holds (the rows in the same order). Cutting each part
    with restraints_share would scan every term once per part; the master cuts every worker's
    part (hpcrefine.refine), up to thousands of parts."""
    owner = np.asarray(owner)
    groups = {name: _grouped(term_owner(getattr(r, name)[:, 0], owner), n_parts) for name in _ROW_TERMS}
    plane_groups = _grouped(plane_owner(r.plane_atoms, r.plane_start, owner), n_parts)
    excl, excl_part = _special_pairs(r.excl_pairs, owner)
    p14, p14_part = _special_pairs(r.pair14, owner)
    excl_groups, p14_groups = _grouped(excl_part, n_parts), _grouped(p14_part, n_parts)

    def rows(group, p):
        order, bounds = group
        return order[bounds[p]:bounds[p + 1]]

    for p in range(n_parts):
        share = select_terms(r, {name: rows(g, p) for name, g in groups.items()}, rows(plane_groups, p))
        yield p, _part_terms(share, excl[rows(excl_groups, p)], p14[rows(p14_groups, p)])


def held_in_boxes(restraints) -> bool:
    """Whether restraints are a rank's PartRestraints cut in boxes (spatial_parts), not blocks:
    then its ranks exchange halos and may hold the coordinates in parts too
    (distributed.BoxedCoordinates)."""
    return isinstance(restraints, PartRestraints) and restraints.blocks is None


class PartRestraints:
    """One part's restraints under a decomposition fixed for the run, held instead of the whole
    set (the workers of a run with whole_model_on_workers off: hpcrefine.refine), or for one
    minimisation (a rank owning a box: parallel.distributed.BoxTarget).

    owner: (n,) the part of every atom (spatial_parts or atom_blocks of the start, the same on
    every rank); part: this one; n_parts. share: the terms whose first atom the part owns
    (restraints_share), with the per-atom arrays whole (AtomTables: radii, H-bond types, bond
    counts) but only the exclusions and 1-4 pairs whose lower atom it owns, which is all its
    neighbour list reads (the pairs whose lower atom it owns). numbered(local): the same terms
    numbered by the rows of a box's own arrays. reads: every atom the terms read (sorted).
    bonded: every atom's number of bonds in the whole set. comm: the communicator whose rank
    `part` this is (a collective use, such as putting back inverted chiral centres, exchanges
    over it). blocks: (start, stop) when owner is contiguous blocks in file order (atom_blocks),
    else None (boxes).

    At a million atoms the whole set is 230 MB; a part is 1/parts of it plus the 5 bytes an atom
    of AtomTables (28 bytes an atom as int64 and float64 arrays). PartRestraints(r, owner, part,
    n_parts) cuts a part from the whole set; received(terms, tables, part) makes it from a part's
    terms cut elsewhere (cut_parts), so its holder never holds the whole set."""

    def __init__(self, r: Restraints, owner, part: int, n_parts: int, comm=None):
        tables = AtomTables.of(r, owner, n_parts)
        share = restraints_share(r, tables.owner, int(part))
        excl, excl_part = _special_pairs(r.excl_pairs, tables.owner)
        p14, p14_part = _special_pairs(r.pair14, tables.owner)
        self._take(_part_terms(share, excl[excl_part == part], p14[p14_part == part]), tables, part,
                   n_parts, comm)

    @classmethod
    def received(cls, terms: Restraints, tables: AtomTables, part: int, n_parts: int,
                 comm=None) -> "PartRestraints":
        """The part whose terms (as cut_parts yields them) and tables were cut elsewhere."""
        self = cls.__new__(cls)
        self._take(terms, tables, part, n_parts, comm)
        return self

    def _take(self, terms: Restraints, tables: AtomTables, part: int, n_parts: int, comm) -> None:
        self.owner = tables.owner
        self.part = int(part)
        self.n_parts = int(n_parts)
        self.comm = comm
        self.excl_pairs, self.pair14 = terms.excl_pairs, terms.pair14
        self._terms = terms
        self._numbering: np.ndarray | None = None      # the terms' numbering (None: the model's)
        self._radii, self._radius_of = tables.radii, tables.radius_of
        self.hbond_type = tables.hbond_type
        self.bonded = tables.bonded
        self.reads = restraint_atoms(terms)
        owner = self.owner
        mine = np.flatnonzero(owner == self.part)
        contiguous = len(mine) == 0 or mine[-1] - mine[0] + 1 == len(mine)
        self.blocks = ((int(mine[0]), int(mine[-1]) + 1) if len(mine) else (0, 0)) \
            if contiguous and np.all(np.diff(owner) >= 0) else None

    @property
    def n_atoms(self) -> int:
        return len(self.owner)

    @property
    def vdw_radius(self) -> np.ndarray:
        """Every atom's radius (a new array)."""
        return self._radii[self._radius_of]

    @property
    def max_radius(self) -> float:
        return float(np.max(self._radii, initial=0.0))

    @property
    def share(self) -> Restraints:
        """The part's terms in the model's numbering (numbered(None))."""
        return self.numbered(None)

    def numbered(self, local: np.ndarray | None) -> Restraints:
        """The part's terms numbered by the rows of `local`: atom a of the model is atom
        searchsorted(local, a), local the sorted global indices of a box's atoms and halo, which
        must hold every atom the terms read (reads, checked); None: the model's numbering. The
        per-atom radii and H-bond types are local's rows, and the exclusions and 1-4 pairs
        those whose other atom is in local too. Sorted, the local numbering keeps the model's
        order: terms, pairs and sums come in the same order as in the model's numbering and give
        the same values bit for bit.

        The part holds its terms in one numbering at a time: the index arrays are numbered
        again in place, one at a time (no second copy of the terms), and the object returned is
        the same, valid until the part is asked for another numbering."""
        t, old = self._terms, self._numbering
        if t.vdw_radius is not None and ((local is None and old is None) or (
                local is not None and old is not None and np.array_equal(local, old))):
            return t
        if local is not None:
            local = np.asarray(local, dtype=np.int64)
            if not np.all(sorted_members(local, self.reads)):
                raise ValueError("the local atoms miss atoms the part's terms read")
        for name in (*_ROW_TERMS, "plane_atoms"):
            idx = np.asarray(getattr(t, name))
            if old is not None:
                idx = old[idx]
            setattr(t, name, idx if local is None else np.searchsorted(local, idx))
        if local is None:
            t.vdw_radius, t.hbond_type = self.vdw_radius, self.hbond_type
            t.excl_pairs, t.pair14 = self.excl_pairs, self.pair14
        else:
            hb = self.hbond_type
            t.vdw_radius = self._radii[self._radius_of[local]]
            t.hbond_type = hb[local] if hb.size else hb

            def special(pairs):
                return np.searchsorted(local, pairs[sorted_members(local, pairs.max(axis=1))])
            t.excl_pairs = t.pair14 = None     # (those of the old numbering go first)
            t.excl_pairs, t.pair14 = special(self.excl_pairs), special(self.pair14)
        self._numbering = local
        return t


@dataclasses.dataclass
class PairShare:
    """The non-bonded pairs of a neighbour list whose first atom i belongs to one part.

    Carries the attributes the repulsion and clash kernels read (i, j, kind, radius, hbond), so
    it can stand in for the NeighbourList in nonbonded.repulsion and nonbonded.clashes."""

    i: np.ndarray
    j: np.ndarray
    kind: np.ndarray
    radius: np.ndarray
    hbond: np.ndarray

    def __len__(self) -> int:
        return len(self.i)


def pairs_share(nbl, atom_owner, part: int) -> PairShare:
    """The pairs (i < j) of the neighbour list nbl with atom i owned by `part`."""
    keep = np.asarray(atom_owner)[nbl.i] == part
    return PairShare(i=nbl.i[keep], j=nbl.j[keep], kind=nbl.kind[keep], radius=nbl.radius,
                     hbond=nbl.hbond)


def spatial_parts(xyz, res_first_atom, n_parts: int) -> np.ndarray:
    """(n_atoms,) int64: the owning part of every atom for n_parts compact boxes of whole residues.

    Recursive coordinate bisection of the residue centres, balanced by atom count: the residues
    are cut across the longest extent of their centres into two sets whose atoms are in the
    ratio of the parts each set gets (k // 2 : k - k // 2), and each set is cut again until
    there is one set per part. Each part is then a box-like region, so the atoms its terms reach
    beyond it (its halo) grow with the box surface, not with the atoms it owns. Residues are
    whole, and ties are broken by residue number, so the result is a pure function of the
    coordinates (every rank computes the same parts)."""
    first = np.asarray(res_first_atom, dtype=np.int64)
    xyz = np.asarray(xyz, dtype=np.float64)
    bounds_check = atom_blocks(first, 1)          # validates res_first_atom
    n_atoms = int(bounds_check[-1])
    if xyz.shape != (n_atoms, 3):
        raise ValueError(f"xyz has shape {xyz.shape}, res_first_atom describes {n_atoms} atoms")
    sizes = np.diff(first)
    filled = np.flatnonzero(sizes > 0)
    centre = np.add.reduceat(xyz, first[filled], axis=0) / sizes[filled, None] if len(filled) else \
        np.zeros((0, 3))
    res_part = np.zeros(len(sizes), dtype=np.int64)
    # empty residues own no atom: their part does not matter
    stack = [(filled, 0, int(n_parts))]
    while stack:
        res, base, k = stack.pop()
        if k == 1 or len(res) <= 1:
            res_part[res] = base
            continue
        c = centre[np.searchsorted(filled, res)]
        axis = int(np.argmax(c.max(axis=0) - c.min(axis=0)))
        order = np.lexsort((res, c[:, axis]))
        w = np.cumsum(sizes[res[order]])
        k1 = k // 2
        cut = int(np.searchsorted(w, w[-1] * k1 / k, side="left")) + 1
        cut = min(max(cut, 1), len(res) - 1)
        stack.append((np.sort(res[order[:cut]]), base, k1))
        stack.append((np.sort(res[order[cut:]]), base + k1, k - k1))
    return np.repeat(res_part, sizes)


def restraint_atoms(r: Restraints) -> np.ndarray:
    """Sorted unique indices of every atom a term of r reads (the rows of every index array of
    _ROW_TERMS and the plane atoms)."""
    parts = [np.asarray(getattr(r, name), dtype=np.int64).ravel() for name in _ROW_TERMS]
    parts.append(np.asarray(r.plane_atoms, dtype=np.int64).ravel())
    return unique_sorted(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
