"""Rotamer fitting: a grid search of every side chain over the rotamer library.

Each residue with chi angles (validation.rotamer.CHI_ATOMS) is tried in turn against the rest of
the model held fixed. Its candidates are the library's rotamers (validation.rotamer.library: the
mean chi angles of every rotamer of the residue type) and, with params.rotamer_sample_sigma, each
rotamer with one chi at a time moved to mean +- 1 sigma. A candidate side chain is built from the
model's own coordinates by turning the atoms beyond each chi bond about that bond until the chi
angle has its target value (chi 1 first), so every bond length and bond angle of the model is
kept. Its score (in standard deviations of the map) is

    S = rho  -  w_clash * sum_pairs max(0, overlap - CLASH_ALLOWANCE)^2  +  w_prior * log p(chi)

- rho: the mean of the normalised map (mean 0, sd 1 within params.fit_mask_radius of the atoms,
  after an optional blur params.rotamer_map_blur) interpolated at the side-chain atoms beyond CB,
  each atom weighted by its number of electrons (an S counts more than a C);
- the clash sum: heavy-atom pairs between those atoms and every other atom near the residue,
  overlap = r_i + r_j - d with the clashscore's van der Waals radii (validation.clash.radii) and
  the H-bond contact cap of core.nonbonded; pairs of one bond, angle or torsion (the restraints'
  exclusions and 1-4 pairs, so the residue's own backbone atoms bonded near the side chain) are
  never counted, as in the clashscore;
- log p(chi): the library's mixture density (validation.rotamer.log_density), floored at the
  residue type's outlier level so that an outlier's prior is bounded.
The best sample of each of the LOCAL_STARTS best-scoring rotamers is then refined by a local
search (each chi +- 10, then +- 5 degrees while that raises the score), so a side chain can
settle between the library's samples. The current conformation gets the same score at its own
chi angles. The side chain is replaced by the best conformation found when that beats the
current score by more than params.rotamer_margin.

Residues are independent given the rest of the model, so the workers share them (contiguous
blocks balanced by the number of candidate atoms) and combine their choices with one Allreduce
of a float64 buffer (every residue's row is filled by one worker, zeros elsewhere, so the sum is
exact); every worker then holds the same choices and applies them the same way. The first pass
scores each side chain against the fixed atoms only (backbone, CB, proline, glycine, anything
not fitted), leaving the other side chains out: two wrong side chains sitting in each other's
places would otherwise keep each other out for ever. The changes of a pass are then settled in
order of decreasing map fit (rho of the new side chain): one whose clash with the side chains
settled before it (the accepted ones at their new places; after the first pass also the
others at their current places) would take its gain below the margin keeps its old
conformation. Later passes (params.rotamer_passes in all) score with every atom against the
updated model, and only the side chains near a moved atom are searched again; the search stops
when a pass changes nothing.

Measured (scripts/bench_rotamer.py: adk with all 165 fitted side chains set to wrong rotamers,
chi 1 more than 60 degrees off, in simulated maps of the true model; margin 0.2): chi 1 within
40 degrees of the truth 0 -> 100 % at 3 A, 95.8 % at 4 A, 91.5 % at 6 A; side-chain RMSD 3.73 ->
0.54 / 0.78 / 1.06 A; from the true model nothing changes at 3 A, 13 and 14 of 165 side chains
at 4 and 6 A (4 and 6 with rotamer_margin 0.3, the default worse than 3.5 A, which recovers 95.8
and 87.3 %; params.resolution_defaults has the whole sweep). The map blur (20 A^2) and margin
(0.2) were chosen there: without blur 5 of the true side chains changed at 3 A, with margin 0.1
21; the local search took the RMSD from 0.95 to 0.54 A.

Between macro-cycles (params.cycle_rotamers) the step searches by default only a selection
(params.cycle_rotamer_select "outliers_poor_map", select_side_chains): the rotamer outliers and
the side chains whose rho at their current place is below params.cycle_rotamer_poor_map map sd,
as phenix.real_space_refine fits "outliers and poor map" side chains in its macro-cycles. The
others are not searched and stay where they are, as fixed atoms of every clash term; the workers
share the selected ones alone. The protocol step "rotamer" searches every side chain.

Not fitted: proline (its ring closes on the backbone), residues with alternative conformations,
residues missing a chi atom, and side chains bonded to anything outside their residue (a
disulfide, a covalent ligand), which a rotation would break.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import numpy as np
from numba import njit

from ..core.common import sorted_members, unique_sorted
from ..core.density import _interp_atom, _prep_map
from ..core.geometry import _torsion, torsion_values
from ..core.nonbonded import HBOND_D0
from ..errors import InputError
from ..validation import rotamer
from ..validation.clash import radii as clash_radii
from ..validation.residues import residue_table

log = logging.getLogger(__name__)

CLASH_ALLOWANCE = 0.2      # A of van der Waals overlap that costs nothing (packing without H)
ELECTRONS = {"C": 6.0, "N": 7.0, "O": 8.0, "S": 16.0, "SE": 34.0}
LOCAL_STARTS = 4           # rotamers (their best sample) refined by the local search
LOCAL_STEPS = (10.0, 5.0)    # degrees, the local search's steps in turn
LOCAL_ROUNDS = 4           # moves at most per step
# one row per side chain in the exchanged buffer: changed, chi 1-4, gain, rho before, rho after,
# the radius around CA within which a moved atom changes its score, searched (0/1)
ROW = 10
SELECT_MODES = ("all", "outliers_poor_map", "outliers")     # what a step searches (select_side_chains)


@dataclass
class SideChain:
    """One residue whose side chain can be turned: its atoms (model indices), and in the local
    numbering of those atoms the chi quadruples and, per chi, the atoms that chi turns."""

    residue: int
    res_type: str
    atoms: np.ndarray          # (m,) model atom indices of the residue
    quads: np.ndarray          # (n_chi, 4) local indices
    moving: np.ndarray         # (n_chi, m) bool: atoms beyond chi k's bond
    ca: int                    # local index of CA

    @property
    def n_chi(self) -> int:
        return len(self.quads)

    @functools.cached_property
    def beyond_cb(self) -> np.ndarray:
        """Local indices of the atoms beyond CB (those chi 1 turns)."""
        return np.nonzero(self.moving[0])[0]

    def reach(self, xyz_res: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(CB's coordinates, (s,) bound): no chi angles put atom beyond_cb[i] farther than
        bound[i] from CB. The last chi that turns an atom turns it about an axis through that
        chi's atom c, and the earlier chis move both rigidly, so its distance to c never changes;
        the same holds for each chi's c to the c before it, down to CB (triangle inequality)."""
        c = self.quads[:, 2]
        link = np.concatenate(([0.0], np.cumsum(np.linalg.norm(np.diff(xyz_res[c], axis=0), axis=1))))
        sel = self.beyond_cb
        last = self.n_chi - 1 - np.argmax(self.moving[::-1, sel], axis=0)     # the last chi turning it
        return xyz_res[c[0]], np.linalg.norm(xyz_res[sel] - xyz_res[c[last]], axis=1) + link[last]


def check_rotamer_params(params) -> None:
    """InputError for rotamer_* parameters that cannot be used."""
    for name in ("rotamer_clash_weight", "rotamer_prior_weight", "rotamer_margin"):
        v = getattr(params, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
            raise InputError(f"{name} must be a number >= 0, got {v!r}")
    b = params.rotamer_map_blur
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not np.isfinite(b) or b < 0:
        raise InputError(f"rotamer_map_blur must be a number of A^2 >= 0, got {b!r}")
    p = params.rotamer_passes
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise InputError(f"rotamer_passes must be a whole number >= 1, got {p!r}")
    if not isinstance(params.rotamer_sample_sigma, bool):
        raise InputError(f"rotamer_sample_sigma must be true or false, got {params.rotamer_sample_sigma!r}")
    if params.cycle_rotamer_select not in SELECT_MODES:
        raise InputError(f"cycle_rotamer_select must be one of {', '.join(SELECT_MODES)}, "
                         f"got {params.cycle_rotamer_select!r}")
    t = params.cycle_rotamer_poor_map
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t):
        raise InputError(f"cycle_rotamer_poor_map must be a number of map sd, got {t!r}")


def _bonded(n_atoms: int, bond_idx: np.ndarray):
    """Neighbour lists of the bond graph as CSR arrays (start, partners)."""
    b = np.asarray(bond_idx, dtype=np.int64).reshape(-1, 2)
    both = np.concatenate([b, b[:, ::-1]])
    order = np.argsort(both[:, 0], kind="stable")
    both = both[order]
    start = np.searchsorted(both[:, 0], np.arange(n_atoms + 1))
    return start, both[:, 1]


def _beyond(c: int, b: int, start, partners, allowed: set) -> set | None:
    """Atoms reached from c through bonds without passing b (c excluded); None when the walk
    leaves `allowed` (the side chain is bonded outside it: a ring onto the backbone, a link)."""
    seen = {c}
    todo = [c]
    while todo:
        a = todo.pop()
        for q in partners[start[a]:start[a + 1]].tolist():
            if q == b or q in seen:
                continue
            if q not in allowed:
                return None
            seen.add(q)
            todo.append(q)
    seen.discard(c)
    return seen


def side_chains(model, restraints) -> list[SideChain]:
    """The side chains rotamer fitting can turn, in residue order (see the module docstring)."""
    table = residue_table(model, model.xyz, rotamer.ATOM_NAMES)
    start, partners = _bonded(model.n_atoms, restraints.bond_idx)
    first = model.res_first_atom
    backbone = {"N", "CA", "C", "O", "OXT", "CB"}
    out = []
    for r in np.nonzero(table.is_amino)[0].tolist():
        res = str(table.res_type[r])
        if res not in rotamer.CHI_ATOMS or res == "PRO" or res not in rotamer.library():
            continue
        atoms = np.arange(first[r], first[r + 1])
        if np.any(model.altloc[atoms] != ""):
            continue
        quads = np.array([[table.col(a)[r] for a in quad] for quad in rotamer.CHI_ATOMS[res]])
        if np.any(quads < 0):
            continue
        names = model.atom_name[atoms]
        allowed = {int(a) for a, nm in zip(atoms, names) if nm not in backbone}
        allowed.add(int(quads[0, 2]))                       # CB: the axis atom of chi 1
        moving = np.zeros((len(quads), len(atoms)), dtype=bool)
        ok = True
        for k, (_, b, c, d) in enumerate(quads.tolist()):
            reach = _beyond(c, b, start, partners, allowed)
            if reach is None or d not in reach:
                ok = False
                break
            moving[k, np.asarray(sorted(reach)) - first[r]] = True
        if not ok:
            continue
        ca = int(quads[0, 1] - first[r])
        out.append(SideChain(r, res, atoms, quads - first[r], moving, ca))
    return out


@functools.lru_cache(maxsize=64)
def candidate_chis(res: str, sample_sigma: bool) -> np.ndarray:
    """(K, n_chi) chi angles (degrees, in [-180, 180)): the library's rotamer means and, with
    sample_sigma, each rotamer with one chi at mean - sigma and at mean + sigma; in blocks of
    one row per rotamer (row k is a sample of rotamer k % n_rotamers). Read-only."""
    lib = rotamer.library()[res]
    mean, sigma = lib["mean"], lib["sigma"]
    rows = [mean]
    if sample_sigma:
        for d in range(mean.shape[1]):
            for s in (-1.0, 1.0):
                m = mean.copy()
                m[:, d] += s * sigma[:, d]
                rows.append(m)
    chi = (np.concatenate(rows) + 180.0) % 360.0 - 180.0
    chi.flags.writeable = False         # shared by every caller (lru_cache)
    return chi


def prior(res: str, chi: np.ndarray) -> np.ndarray:
    """The score's prior: log p(chi), floored at the residue type's outlier level."""
    return np.maximum(rotamer.log_density(res, chi), rotamer.library()[res]["outlier"])


@functools.lru_cache(maxsize=64)
def candidate_prior(res: str, sample_sigma: bool) -> np.ndarray:
    """prior() of candidate_chis(res, sample_sigma), the same for every side chain. Read-only."""
    out = prior(res, candidate_chis(res, sample_sigma))
    out.flags.writeable = False
    return out


def set_chis(xyz_res: np.ndarray, sc: SideChain, chi: np.ndarray) -> np.ndarray:
    """(K, m, 3) coordinates of the residue's atoms with chi angles chi (K, n_chi) degrees: for
    chi 1, 2, ... in turn, the atoms beyond that chi's bond b-c turn about the b->c axis by the
    difference between the target and the current dihedral (Rodrigues), so bond lengths and
    angles stay the model's own."""
    chi = np.ascontiguousarray(np.atleast_2d(chi), dtype=np.float64)
    xyz_res = np.ascontiguousarray(xyz_res, dtype=np.float64)
    out = np.empty((len(chi), len(xyz_res), 3))
    _set_chis(xyz_res, np.ascontiguousarray(sc.quads, dtype=np.int64), sc.moving, chi, out)
    return out


@njit(cache=True)
def _set_chis(xyz_res, quads, moving, chi, out):
    """out[k]: xyz_res with the chi angles chi[k] (set_chis), one candidate after another."""
    for k in range(chi.shape[0]):
        x = out[k]
        x[:] = xyz_res
        for q in range(quads.shape[0]):
            b, c = quads[q, 1], quads[q, 2]
            now = _torsion(x, quads[q, 0], b, c, quads[q, 3])[6]
            delta = (chi[k, q] - now) * (np.pi / 180.0)
            cs, sn = np.cos(delta), np.sin(delta)
            ux, uy, uz = x[c, 0] - x[b, 0], x[c, 1] - x[b, 1], x[c, 2] - x[b, 2]
            n = np.sqrt(ux * ux + uy * uy + uz * uz)
            ux, uy, uz = ux / n, uy / n, uz / n
            for a in range(x.shape[0]):
                if not moving[q, a]:
                    continue
                px, py, pz = x[a, 0] - x[c, 0], x[a, 1] - x[c, 1], x[a, 2] - x[c, 2]
                dot = (ux * px + uy * py + uz * pz) * (1.0 - cs)
                x[a, 0] = px * cs + (uy * pz - uz * py) * sn + ux * dot + x[c, 0]
                x[a, 1] = py * cs + (uz * px - ux * pz) * sn + uy * dot + x[c, 1]
                x[a, 2] = pz * cs + (ux * py - uy * px) * sn + uz * dot + x[c, 2]


@njit(cache=True)
def _rho_clash(data, origin, voxel, coords, sel, weight, i, fixed, d0, a, b, d0_ab, rho, clash):
    """Per candidate k: rho[k], the weight-averaged map value (tricubic) at the atoms sel of
    coords[k], and clash[k] (_penalty) over the moving atoms coords[k, sel]."""
    ox, oy, oz = origin[0], origin[1], origin[2]
    vx, vy, vz = voxel[0], voxel[1], voxel[2]
    w_sum = 0.0
    for s in range(sel.shape[0]):
        w_sum += weight[s]
    moving = np.empty((sel.shape[0], 3))
    one = np.empty(1)
    for k in range(coords.shape[0]):
        t = 0.0
        for s in range(sel.shape[0]):
            for c in range(3):
                moving[s, c] = coords[k, sel[s], c]
            t += weight[s] * _interp_atom(data, ox, oy, oz, vx, vy, vz, moving, s)[0]
        rho[k] = t / w_sum
        _penalty(moving[None], i, fixed, d0, a, b, d0_ab, one)
        clash[k] = one[0]


@njit(cache=True)
def _penalty(coords, i, fixed, d0, a, b, d0_ab, out):
    """out[k] = sum over the pairs of max(0, limit - d)^2 for candidate k (Scorer.penalty)."""
    for k in range(coords.shape[0]):
        x = coords[k]
        t = 0.0
        for p in range(i.shape[0]):
            dx, dy, dz = x[i[p], 0] - fixed[p, 0], x[i[p], 1] - fixed[p, 1], x[i[p], 2] - fixed[p, 2]
            r2 = dx * dx + dy * dy + dz * dz
            if r2 < d0[p] * d0[p]:
                v = d0[p] - np.sqrt(r2)
                t += v * v
        for p in range(a.shape[0]):
            u, w = a[p], b[p]
            dx, dy, dz = x[u, 0] - x[w, 0], x[u, 1] - x[w, 1], x[u, 2] - x[w, 2]
            r2 = dx * dx + dy * dy + dz * dz
            if r2 < d0_ab[p] * d0_ab[p]:
                v = d0_ab[p] - np.sqrt(r2)
                t += v * v
        out[k] = t


def current_chis(xyz: np.ndarray, sc: SideChain) -> np.ndarray:
    return torsion_values(xyz, sc.atoms[sc.quads])


class Scorer:
    """Scores candidate side chains against the map and the atoms around them (module docstring):
    the map prepared for scoring, per-atom electrons, radii and H-bond types, the excluded
    pairs as sorted keys min * n + max, the side-chain atoms being fitted (movable) and the
    model they are scored against. make_scorer builds one on each worker."""

    def __init__(self, data, origin, voxel, electrons, radius, hbond, excluded, movable, params, xyz):
        from scipy.spatial import cKDTree

        self.map = _prep_map(data)
        self.origin = np.ascontiguousarray(origin, dtype=np.float64)
        self.voxel = np.ascontiguousarray(voxel, dtype=np.float64)
        self.electrons, self.radius, self.hbond = electrons, radius, hbond
        self.reach = 2.0 * float(radius.max()) if len(radius) else 0.0
        self.excluded, self.n = excluded, np.int64(len(radius))
        self.movable = movable
        self.params = params
        self.xyz = np.array(xyz, dtype=np.float64)
        self.tree = cKDTree(self.xyz)

    def update(self, xyz) -> None:
        """The model the next side chains are scored against."""
        from scipy.spatial import cKDTree
        self.xyz = np.array(xyz, dtype=np.float64)
        self.tree = cKDTree(self.xyz)

    def fit_only(self, chains: list[SideChain]) -> None:
        """Fit these side chains alone: every other one counts as fixed atoms, also in the first
        pass (environment)."""
        self.movable = np.zeros(len(self.radius), dtype=bool)
        for sc in chains:
            self.movable[sc.atoms[sc.beyond_cb]] = True

    def current_rho(self, chains: list[SideChain]) -> np.ndarray:
        """rho (the score's map term, in map sd) of every side chain at the model's coordinates,
        one interpolation for all of them."""
        from ..core.density import tricubic
        if not chains:
            return np.zeros(0)
        atoms = np.concatenate([sc.atoms[sc.beyond_cb] for sc in chains])
        starts = np.cumsum([0] + [len(sc.beyond_cb) for sc in chains[:-1]])
        values, _ = tricubic(self.map, self.origin, self.voxel, self.xyz[atoms])
        w = self.electrons[atoms]
        return np.add.reduceat(values * w, starts) / np.add.reduceat(w, starts)

    def _is_excluded(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return sorted_members(self.excluded, np.minimum(i, j) * self.n + np.maximum(i, j))

    def _contact(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        d0 = self.radius[i] + self.radius[j]
        hi, hj = self.hbond[i], self.hbond[j]
        hb = (((hi & 1) != 0) & ((hj & 2) != 0)) | (((hi & 2) != 0) & ((hj & 1) != 0))
        return np.where(hb, np.minimum(d0, HBOND_D0), d0)

    def contacts(self, atoms: np.ndarray, others: np.ndarray, others_xyz: np.ndarray,
                 bound: tuple | None = None) -> tuple:
        """The pairs a clash sum runs over, found once per side chain: moving atoms `atoms`
        against each other and against fixed atoms `others` (at others_xyz), excluded pairs
        left out; as (i, fixed xyz, d0) and (a, b, d0) with i, a, b indices into atoms.
        bound: (centre, reach), no moving atom i ever farther than reach[i] from centre
        (SideChain.reach): pairs with a fixed atom that can never come within contact of it are
        left out too (they add nothing to any candidate's sum)."""
        s = len(atoms)
        others_xyz = np.asarray(others_xyz, dtype=np.float64).reshape(-1, 3)
        if bound is not None:
            dist = np.linalg.norm(others_xyz - bound[0], axis=1)
            i, j = np.nonzero(dist[None, :] < bound[1][:, None] + self.reach)
        else:
            i = np.repeat(np.arange(s), len(others))
            j = np.tile(np.arange(len(others)), s)
        keep = ~self._is_excluded(atoms[i], others[j])
        i, j = i[keep], j[keep]
        d0 = self._contact(atoms[i], others[j]) - CLASH_ALLOWANCE
        if bound is not None:
            keep = dist[j] - bound[1][i] < d0
            i, j, d0 = i[keep], j[keep], d0[keep]
        a, b = np.triu_indices(s, 1)
        keep = ~self._is_excluded(atoms[a], atoms[b])
        a, b = a[keep], b[keep]
        as_int = functools.partial(np.ascontiguousarray, dtype=np.int64)
        return (as_int(i), np.ascontiguousarray(others_xyz[j]), np.ascontiguousarray(d0, dtype=np.float64),
                as_int(a), as_int(b),
                np.ascontiguousarray(self._contact(atoms[a], atoms[b]) - CLASH_ALLOWANCE, dtype=np.float64))

    @staticmethod
    def penalty(coords: np.ndarray, pairs: tuple) -> np.ndarray:
        """sum max(0, overlap - CLASH_ALLOWANCE)^2 per candidate, moving atoms at coords (K, s, 3)."""
        out = np.empty(len(coords))
        _penalty(np.ascontiguousarray(coords, dtype=np.float64), *pairs, out)
        return out

    def clash(self, coords: np.ndarray, atoms: np.ndarray, others: np.ndarray,
              others_xyz: np.ndarray) -> np.ndarray:
        """The clash sum per candidate of moving atoms `atoms` at coords (K, s, 3) against each
        other and against fixed atoms `others` at others_xyz (module docstring)."""
        return self.penalty(coords, self.contacts(atoms, others, others_xyz))

    def prior(self, res: str, chi: np.ndarray) -> np.ndarray:
        return prior(res, chi)

    def environment(self, sc: SideChain, coords: np.ndarray, soft: bool) -> tuple[np.ndarray, float]:
        """Atoms (model indices) within contact reach of any candidate's moving atoms, the
        residue's own moving atoms left out (soft: every side chain being fitted left out),
        and the radius around CA they were taken from."""
        beyond = sc.atoms[sc.beyond_cb]
        centre = self.xyz[sc.atoms[sc.ca]]
        radius = float(np.max(np.linalg.norm(coords - centre, axis=2))) + self.reach
        near = np.asarray(self.tree.query_ball_point(centre, radius), dtype=np.int64)   # sorted
        out = self.movable[near] if soft else np.zeros(len(near), dtype=bool)
        out |= (near >= sc.atoms[0]) & (near <= sc.atoms[-1])           # the residue's own atoms...
        out[out] = np.isin(near[out], beyond) | (soft & self.movable[near[out]])   # ...that move
        return near[~out], radius

    def score(self, sc: SideChain, coords: np.ndarray, chi: np.ndarray, pairs: tuple, prior=None):
        """(S, rho) per candidate: coords (K, m, 3) of the residue's atoms, chi (K, n_chi),
        pairs: the contacts of its side chain with the atoms around (contacts); prior: the
        candidates' prior when known (candidate_prior)."""
        sel = sc.beyond_cb
        rho, clash = np.empty(len(coords)), np.empty(len(coords))
        _rho_clash(self.map, self.origin, self.voxel, np.ascontiguousarray(coords, dtype=np.float64),
                   sel, self.electrons[sc.atoms[sel]], *pairs, rho, clash)
        p = self.params
        if prior is None:
            prior = self.prior(sc.res_type, chi)
        return rho - p.rotamer_clash_weight * clash + p.rotamer_prior_weight * prior, rho

    def refine(self, sc: SideChain, xyz_res: np.ndarray, chi: np.ndarray, s: np.ndarray,
               rho: np.ndarray, pairs: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Local search from each row of chi (scores s, rho): every chi +- the step, for each
        of LOCAL_STEPS degrees in turn, all starts at once, a start taking its best move while
        that improves its score. Returns the chi angles, scores and rho reached."""
        chi, s, rho = chi.copy(), s.copy(), rho.copy()
        n = sc.n_chi
        moves = np.concatenate([np.eye(n), -np.eye(n)])
        for step in LOCAL_STEPS:
            for _ in range(LOCAL_ROUNDS):
                trial = (chi[:, None, :] + step * moves[None]).reshape(-1, n)
                ts, trho = self.score(sc, set_chis(xyz_res, sc, trial), trial, pairs)
                ts, trho = ts.reshape(len(chi), 2 * n), trho.reshape(len(chi), 2 * n)
                pick = np.argmax(ts, axis=1)
                better = ts[np.arange(len(chi)), pick] > s
                if not better.any():
                    break
                chi[better] = trial.reshape(len(chi), 2 * n, n)[better, pick[better]]
                s[better] = ts[better, pick[better]]
                rho[better] = trho[better, pick[better]]
        return chi, s, rho

    def fit(self, sc: SideChain, soft: bool) -> np.ndarray:
        """The row of one side chain: changed (0/1), chi 1-4 to set (0-padded), gain of the best
        candidate over the current conformation, rho now, rho of the best, the radius around
        CA of the atoms it was scored against."""
        xyz_res = self.xyz[sc.atoms]
        chi = candidate_chis(sc.res_type, self.params.rotamer_sample_sigma)
        coords = set_chis(xyz_res, sc, chi)
        env, radius = self.environment(sc, coords, soft)
        pairs = self.contacts(sc.atoms[sc.beyond_cb], env, self.xyz[env], sc.reach(xyz_res))
        s, rho = self.score(sc, coords, chi, pairs,
                            candidate_prior(sc.res_type, self.params.rotamer_sample_sigma))
        # the starts of the local search: the best sample of each of the best rotamers (the
        # candidates come in blocks of one sample of every rotamer, candidate_chis)
        per = s.reshape(-1, len(rotamer.library()[sc.res_type]["prob"]))
        block = np.argmax(per, axis=0)
        best_rot = np.argsort(-per[block, np.arange(per.shape[1])], kind="stable")[:LOCAL_STARTS]
        top = block[best_rot] * per.shape[1] + best_rot
        chi, s, rho = self.refine(sc, xyz_res, chi[top], s[top], rho[top], pairs)
        now_chi = current_chis(self.xyz, sc)[None]
        s0, rho0 = self.score(sc, xyz_res[None], now_chi, pairs)
        best = int(np.argmax(s))
        gain = float(s[best] - s0[0])
        row = np.zeros(ROW)
        row[0] = 1.0 if gain > self.params.rotamer_margin else 0.0
        row[1:1 + sc.n_chi] = chi[best]
        row[5], row[6], row[7], row[8] = gain, rho0[0], rho[best], radius
        return row


def _blurred_map(data, voxel, b_extra: float) -> np.ndarray:
    from ..core.density import blur_map
    data = np.asarray(data, dtype=np.float32)
    return blur_map(data, np.asarray(voxel, dtype=np.float64), b_extra) if b_extra > 0 else data


def _scoring_job(inputs, params):
    """(map store, key, maker) of scoring_map's map; the store is None when the map is made in
    this process (one rank, or no blur: the map itself)."""
    b = params.rotamer_map_blur
    store = getattr(inputs, "store", None) if b > 0 else None
    return store, f"rotamer_b{b:g}", functools.partial(_blurred_map, inputs.data, inputs.map.voxel, b)


def scoring_map(inputs, params) -> np.ndarray:
    """The map the side chains are scored against, before its normalisation around the atoms:
    inputs.data blurred by params.rotamer_map_blur. With a map store (several ranks) the master
    makes it once, perhaps ahead (prefetch_scoring_map), and every rank maps the file
    (collective); before, every worker transformed the whole box for it."""
    store, key, make = _scoring_job(inputs, params)
    return make() if store is None else store.publish(key, make)


def prefetch_scoring_map(inputs, params) -> None:
    """The master starts writing scoring_map's map (MapStore.prefetch; not collective)."""
    store, key, make = _scoring_job(inputs, params)
    if store is not None:
        store.prefetch(key, make)


def make_scorer(model, restraints, data, origin, voxel, params, xyz, chains: list[SideChain],
                blurred: bool = False) -> Scorer:
    """The Scorer of the side chains `chains` at xyz: the map blurred by params.rotamer_map_blur
    (blurred: data is that already, scoring_map) and normalised within params.fit_mask_radius of
    the atoms."""
    from ..core.density import normalise_map
    from ..mapstats import atom_mask

    origin = np.asarray(origin, dtype=np.float64)
    voxel = np.asarray(voxel, dtype=np.float64)
    if not blurred:
        data = _blurred_map(data, voxel, params.rotamer_map_blur)
    data = np.asarray(data, dtype=np.float32)
    mask = atom_mask(xyz, data.shape, origin, voxel, params.fit_mask_radius)
    n = model.n_atoms
    hb = np.asarray(restraints.hbond_type, dtype=np.int64)
    pairs = np.concatenate([np.asarray(restraints.excl_pairs, dtype=np.int64).reshape(-1, 2),
                            np.asarray(restraints.pair14, dtype=np.int64).reshape(-1, 2)])
    excluded = unique_sorted(pairs.min(axis=1) * np.int64(n) + pairs.max(axis=1)) if len(pairs) \
        else np.zeros(0, dtype=np.int64)
    movable = np.zeros(n, dtype=bool)
    for sc in chains:
        movable[sc.atoms[sc.beyond_cb]] = True
    return Scorer(normalise_map(data, mask), origin, voxel,
                  np.array([ELECTRONS.get(e, 6.0) for e in model.element.tolist()]),
                  clash_radii(model.element), hb if hb.size == n else np.zeros(n, dtype=np.int64),
                  excluded, movable, params, xyz)


def select_side_chains(scorer: Scorer, model, chains: list[SideChain], select: str) -> np.ndarray:
    """(n_chains,) bool: the side chains a step searches at the scorer's coordinates. "all":
    every one; "outliers_poor_map": the rotamer outliers (validation.rotamer) and those whose
    current rho is below params.cycle_rotamer_poor_map map sd, as phenix.real_space_refine fits
    "outliers and poor map" side chains in its macro-cycles; "outliers": the rotamer outliers
    alone (a library rotamer that fits the map poorly stays). Deterministic in the coordinates
    and the map: every worker picks the same."""
    if select == "all":
        return np.ones(len(chains), dtype=bool)
    if select not in ("outliers_poor_map", "outliers"):
        raise InputError(f"unknown side-chain selection {select!r}")
    rot = rotamer.analyse(residue_table(model, scorer.xyz, rotamer.ATOM_NAMES), scorer.xyz)
    outliers = set(rot["residue"][rot["category"] == rotamer.OUTLIER].tolist())
    outlier = np.array([sc.residue in outliers for sc in chains], dtype=bool)
    if select == "outliers":
        return outlier
    return outlier | (scorer.current_rho(chains) < scorer.params.cycle_rotamer_poor_map)


def _shares(chains: list[SideChain], n_parts: int) -> np.ndarray:
    """Boundaries (n_parts + 1,) of contiguous blocks of side chains balanced by the number of
    candidate atoms each one scores (parallel.decompose.atom_blocks on that cost)."""
    from ..parallel.decompose import atom_blocks
    cost = np.array([len(candidate_chis(sc.res_type, True)) * len(sc.beyond_cb) for sc in chains],
                    dtype=np.int64)
    cum = np.concatenate(([0], np.cumsum(cost)))
    return np.searchsorted(cum, atom_blocks(cum, n_parts))


def apply_rows(xyz: np.ndarray, chains: list[SideChain], rows: np.ndarray) -> np.ndarray:
    """xyz with every side chain whose row is marked changed set to that row's chi angles."""
    out = np.array(xyz, dtype=np.float64)
    for sc, row in zip(chains, rows):
        if row[0] > 0:
            out[sc.atoms] = set_chis(out[sc.atoms], sc, row[1:1 + sc.n_chi][None])[0]
    return out


def _resolve(scorer: Scorer, chains: list[SideChain], rows: np.ndarray, xyz: np.ndarray,
             radius: np.ndarray, soft: bool, searched: np.ndarray) -> np.ndarray:
    """Accept the changed side chains of one pass in order of decreasing gain; one whose clash
    with the side chains settled before it would take its gain below the margin stays as it was.
    Settled: the accepted ones at their new places and, after a soft pass (whose scores left the
    other searched side chains out), also the searched ones staying or sent back at their current
    places (those not searched were fixed atoms in the scores already). Only
    side chains whose CA lie within reach are compared. The same arithmetic on every worker:
    the same answer."""
    from scipy.spatial import cKDTree

    rows = rows.copy()
    w, margin = scorer.params.rotamer_clash_weight, scorer.params.rotamer_margin
    changed = np.nonzero(rows[:, 0] > 0)[0]
    if len(changed) == 0 or w == 0:
        return rows
    order = changed[np.argsort(-rows[changed, 7], kind="stable")]
    ca = np.array([xyz[sc.atoms[sc.ca]] for sc in chains])
    ca_tree = cKDTree(ca[changed])
    rmax = float(radius[changed].max())
    if soft:
        stay = searched.copy()
        stay[changed] = False
        stay_atoms = np.concatenate([chains[k].atoms[chains[k].beyond_cb] for k in np.nonzero(stay)[0]]
                                    or [np.zeros(0, dtype=np.int64)])
        stay_tree = cKDTree(xyz[stay_atoms]) if len(stay_atoms) else None
    settled: dict[int, np.ndarray] = {}
    for k in order.tolist():
        sc = chains[k]
        sel = sc.beyond_cb
        new = set_chis(xyz[sc.atoms], sc, rows[k, 1:1 + sc.n_chi][None])[:, sel]
        near = [changed[j] for j in ca_tree.query_ball_point(ca[k], radius[k] + rmax)]
        atoms = [chains[j].atoms[chains[j].beyond_cb] for j in near if j in settled]
        where = [settled[j] for j in near if j in settled]
        if soft and stay_tree is not None:
            hit = np.asarray(stay_tree.query_ball_point(ca[k], radius[k]), dtype=np.int64)
            atoms.append(stay_atoms[hit])
            where.append(xyz[stay_atoms[hit]])
        if atoms:
            extra = scorer.clash(new, sc.atoms[sel], np.concatenate(atoms), np.concatenate(where))[0]
            if rows[k, 5] - w * extra <= margin:
                rows[k, 0] = 0.0
                if soft:
                    settled[k] = xyz[sc.atoms[sel]]
                continue
        settled[k] = new[0]
    return rows


def _affected(chains: list[SideChain], xyz: np.ndarray, radius: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """The side chains whose score can have changed: a moved atom within the radius around CA
    of the atoms they were scored against (their own move included)."""
    from scipy.spatial import cKDTree
    tree = cKDTree(xyz[moved])
    ca = xyz[[sc.atoms[sc.ca] for sc in chains]]
    d, _ = tree.query(ca, k=1)
    return d <= radius


def fit_rotamers(comm, model, restraints, data, origin, voxel, xyz, params,
                 chains: list[SideChain], select: str = "all", blurred: bool = False) -> np.ndarray:
    """The collective search of the workers in comm (None: this process alone) over the side
    chains `select` picks (select_side_chains; the others stay, as fixed atoms); data: the map,
    or with blurred, scoring_map's map. Returns the
    rows (n_chains, ROW) of the final choice against xyz (chi to set where changed, gain and rho
    of the last pass that changed the side chain, searched), then passes run and seconds, flat."""
    t0 = time.perf_counter()
    rank, size = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())
    scorer = make_scorer(model, restraints, data, origin, voxel, params, xyz, chains, blurred)
    searched = select_side_chains(scorer, model, chains, select)
    picked = np.nonzero(searched)[0]
    scorer.fit_only([chains[k] for k in picked])
    final = np.zeros((len(chains), ROW))
    current = np.array(xyz, dtype=np.float64)
    todo = searched.copy()
    radius = np.zeros(len(chains))
    passes = 0
    for _ in range(params.rotamer_passes if len(picked) else 0):
        soft = passes == 0                  # the first pass: side chains against fixed atoms
        passes += 1
        rows = np.zeros((len(chains), ROW))
        now = np.nonzero(todo)[0]
        bounds = _shares([chains[k] for k in now], size)
        for k in now[bounds[rank]:bounds[rank + 1]].tolist():     # this worker's share of the pass
            rows[k] = scorer.fit(chains[k], soft)
        if comm is not None:
            from mpi4py import MPI
            comm.Allreduce(MPI.IN_PLACE, [rows, MPI.DOUBLE], op=MPI.SUM)
        radius = np.maximum(radius, rows[:, 8])
        rows = _resolve(scorer, chains, rows, current, radius, soft, searched)
        moved = rows[:, 0] > 0
        if not moved.any():
            break
        final[moved] = rows[moved]
        current = apply_rows(current, chains, rows)
        scorer.update(current)
        todo = searched & _affected(chains, current, radius, np.concatenate(
            [chains[k].atoms[chains[k].beyond_cb] for k in np.nonzero(moved)[0]]))
    # the final chi angles set from xyz in one go, as every rank will (apply_rows)
    for k, sc in enumerate(chains):
        if final[k, 0] > 0:
            final[k, 1:1 + sc.n_chi] = current_chis(current, sc)
    final[:, 9] = searched
    return np.concatenate((final.ravel(), (passes, time.perf_counter() - t0)))


def _outliers(model, xyz) -> dict:
    table = residue_table(model, xyz, rotamer.ATOM_NAMES)
    return rotamer.summary(rotamer.analyse(table, xyz))


def rotamer_step(runner, inputs, xyz, params, select: str = "all"):
    """Rotamer fitting at xyz of the side chains `select` picks (select_side_chains: "all" for
    the protocol step, params.cycle_rotamer_select between macro-cycles), run collectively
    through runner (a ParamRunner: the workers search, the master waits). Returns (xyz, record),
    the same on every rank."""
    check_rotamer_params(params)
    t0 = time.perf_counter()
    model, r, grid = inputs.model, inputs.restraints, inputs.map
    chains = side_chains(model, r)
    xyz = np.asarray(xyz, dtype=np.float64)

    data = scoring_map(inputs, params)         # collective with a map store

    def work(comm):
        return fit_rotamers(comm, model, r, data, grid.origin, grid.voxel, xyz, params, chains,
                            select, blurred=True)
    n = len(chains) * ROW
    out = runner.run(work, n + 2, what="rotamer choices", same=n + 1)
    rows = out[:n].reshape(len(chains), ROW)
    new = apply_rows(xyz, chains, rows)
    before, after = _outliers(model, xyz), _outliers(model, new)
    changed = rows[:, 0] > 0
    record = {"step": "rotamer", "residues": len(chains), "changed": int(changed.sum()),
              "select": select, "searched": int(np.sum(rows[:, 9] > 0)),
              "passes": int(out[n]), "iterations": int(out[n]),      # iterations: for the progress line
              "seconds": round(time.perf_counter() - t0, 2),
              "search_seconds": round(float(out[n + 1]), 2),
              "rotamer_outliers_before": before["outlier"], "rotamer_outliers_after": after["outlier"],
              "rotamer_outlier_pct_before": before["outlier_pct"],
              "rotamer_outlier_pct_after": after["outlier_pct"]}
    log.info("rotamer fit: %d of %d side chains changed (%d searched) in %d pass(es) (%.1f s); "
             "rotamer outliers %d -> %d", record["changed"], len(chains), record["searched"],
             record["iterations"], record["seconds"], before["outlier"], after["outlier"])
    return new, record
