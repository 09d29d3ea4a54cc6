"""Low-resolution restraints: secondary-structure H-bonds, Ramachandran and reference-model torsions.

At low resolution the map hardly constrains the backbone, and covalent restraints alone let a
model drift: helices unwind, phi/psi wander into disallowed regions while the model still fits
the map. add_lowres_restraints() appends three kinds of terms to a Restraints (fields dist_*,
rama_*, reft_*; evaluated by core.geometry.restraint_energy, shared among ranks by
parallel.decompose like every other term, and never part of the bond/angle statistics):

  * Secondary-structure H-bonds, found once in the start model (find_secondary_structure):
    alpha helices from runs of i -> i+4 backbone O..N contacts (optionally 3-10 and pi helices
    from i -> i+3 and i -> i+5 runs), beta ladders from DSSP's bridge patterns (two H-bonds per
    bridge, parallel or antiparallel, at least two consecutive bridges). The contact cut-off
    (params.ss_detect_cutoff, 4.0 A) is looser than DSSP-like 3.5 A, and single contacts count
    only inside runs or ladders, so a start shaken by 0.8 A rms still shows its helices and
    sheets. Each H-bond is restrained as an O..N distance: zero inside hbond_target +- hbond_flat,
    harmonic with hbond_sigma beyond, topped out at about hbond_limit A (a wrongly assigned
    H-bond stops pulling instead of tearing the model).
  * Ramachandran: every amino acid with both sequence neighbours gets weight * V_class(phi, psi),
    V = -log of the Top8000 distribution of its class (validation.ramachandran: general, Gly,
    cis-Pro, trans-Pro, pre-Pro, Ile/Val) smoothed by a Gaussian of RAMA_SMOOTH degrees, plus a
    weak broad (RAMA_FUNNEL_WIDTH) copy that leads residues in empty regions back towards the
    populated ones; zero at the most likely (phi, psi), interpolated periodically (C1 bicubic)
    with analytic gradients through both dihedrals.
  * Reference model (`--reference MODEL`): phi, psi and every torsion of the restraint set
    (side-chain chi, omega) whose four atoms the reference has (matched by chain, residue number
    and atom name) are restrained to the reference's values with sigma reference_sigma, topped
    out at reference_limit degrees, so that real conformational differences are let go.
  * Rotamers (params.rotamer_restraints): every side chain rotamer fitting could turn
    (protocol.rotamer_fit.side_chains: chi angles, not proline, no alternative conformations,
    not bonded outside its residue) whose start is not a rotamer outlier (validation.rotamer)
    has each chi restrained towards the mean of its nearest library rotamer: the component of
    the 2010 library's mixture with the highest posterior at the start's chi angles. sigma is
    that rotamer's spread, at least ROTAMER_SIGMA_FLOOR degrees; the pull tops out at
    ROTAMER_LIMIT degrees, so a side chain the map moves into another well is let go. A
    terminal chi of period 180 (Asp, Glu, Phe, Tyr) gets the copy of the mean nearest to the
    start. Outliers get nothing (they would be pulled into a well that may be the wrong one),
    and neither does a chi whose bond a reference-model torsion already restrains. These terms
    go into the reft_* arrays with the reference torsions (one kernel, one decomposition);
    Restraints.counts() reports both as reference_torsions.
"""
from __future__ import annotations

import dataclasses
import logging
from functools import lru_cache

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

from .core.common import sorted_members, unique_sorted
from .modelio import Model
from .protocol.rotamer_fit import current_chis, side_chains
from .restraints import Restraints
from .validation import ramachandran, rotamer
from .validation.residues import residue_table

log = logging.getLogger(__name__)

BACKBONE = ("N", "CA", "C", "O")
HELIX, STRAND = 0, 1
HELIX_MIN_RUN = 3            # i -> i+4 contacts in a run (after filling gaps)
HELIX_MAX_GAP = 2            # residues without a contact between two contacts of one helix
HELIX_310_PI_MIN_RUN = 2     # consecutive i -> i+3 (3-10) or i -> i+5 (pi) contacts
LADDER_MIN_BRIDGES = 2       # consecutive beta bridges
MIN_STRAND_SEPARATION = 3    # bridge partners in one linked segment: at least this far apart
RAMA_SMOOTH = 4.0            # degrees, Gaussian smoothing of the Top8000 tables
RAMA_FUNNEL_WIDTH = 30.0     # degrees, the broad copy that pulls outliers back
RAMA_FUNNEL = 1e-3           # its height relative to the most likely (phi, psi)
RAMA_FLOOR = 1e-6            # keeps the logarithm finite where both copies vanish
ROTAMER_SIGMA_FLOOR = 10.0   # degrees, least sigma of a rotamer restraint
ROTAMER_LIMIT = 30.0         # degrees, where a rotamer restraint's pull tops out (as reference_limit)


# ---------------------------------------------------------------------------------- tables

@lru_cache(maxsize=2)
def rama_potential(smooth: float = RAMA_SMOOTH, funnel_width: float = RAMA_FUNNEL_WIDTH,
                   funnel: float = RAMA_FUNNEL) -> np.ndarray:
    """(6, 180, 180) potentials -log(P_smooth + funnel P_broad + floor), zero at each class's
    minimum, on the Top8000 grid (bin centres -179 + 2k degrees), classes as in
    validation.ramachandran.CLASSES."""
    tab = ramachandran.tables()
    step = 360.0 / tab.shape[1]
    out = np.empty_like(tab)
    for c in range(len(tab)):
        p = gaussian_filter(tab[c], smooth / step, mode="wrap")
        b = gaussian_filter(tab[c], funnel_width / step, mode="wrap")
        v = -np.log(p / p.max() + funnel * b / b.max() + RAMA_FLOOR)
        out[c] = v - v.min()
    out.setflags(write=False)          # cached and shared by every Restraints that uses it
    return out


# ---------------------------------------------------------------------------------- detection

@dataclasses.dataclass
class SecondaryStructure:
    """H-bonds found in a model: O atom, N atom and kind (HELIX or STRAND) per H-bond, and the
    elements as residue ranges (first, last) over the model's residue index."""

    o_atom: np.ndarray
    n_atom: np.ndarray
    kind: np.ndarray
    helices: list
    strands: list

    def summary(self) -> str:
        nh = int(np.sum(self.kind == HELIX))
        ns = int(np.sum(self.kind == STRAND))
        return (f"{len(self.helices)} helices ({nh} H-bonds), {len(self.strands)} strands "
                f"({ns} H-bonds)")


def _step(nxt: np.ndarray, k: int) -> np.ndarray:
    """The residue k links further along the chain from each residue (-1 where there is none)."""
    r = np.arange(len(nxt))
    for _ in range(k):
        r = np.where(r >= 0, nxt[np.maximum(r, 0)], -1)
    return r


def _runs(flags: np.ndarray, min_len: int) -> list[tuple[int, int]]:
    """(first, last) of the runs of True at least min_len long."""
    f = np.concatenate(([False], np.asarray(flags, dtype=bool), [False])).astype(np.int8)
    edges = np.diff(f)
    first = np.nonzero(edges == 1)[0]
    last = np.nonzero(edges == -1)[0] - 1
    keep = last - first + 1 >= min_len
    return list(zip(first[keep].tolist(), last[keep].tolist()))


def _segments(prev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment, position) of each residue: residues linked one after the other form a segment
    (a linked residue always follows its predecessor in the residue order)."""
    start = prev < 0
    seg = np.cumsum(start) - 1
    first = np.nonzero(start)[0]
    return seg, np.arange(len(prev)) - first[seg]


class _PairSet:
    """Membership of residue pairs (i, j) in a set, vectorised (pairs with -1 are never in it)."""

    def __init__(self, i: np.ndarray, j: np.ndarray, n: int):
        self.n = n
        self.keys = unique_sorted(i.astype(np.int64) * n + j)

    def has(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        ok = (i >= 0) & (j >= 0)
        return ok & sorted_members(self.keys, np.where(ok, i * self.n + j, -1))


def find_secondary_structure(model: Model, xyz: np.ndarray, cutoff: float = 4.0,
                             helix_310_pi: bool = False) -> SecondaryStructure:
    """Backbone H-bonds of helices and beta ladders in xyz (see the module text).

    A contact is O(i)..N(j) < cutoff with j's N able to donate (not proline, not a chain start).
    Helices: contacts i -> i+4 along linked residues; gaps of up to HELIX_MAX_GAP residues
    between two contacts are filled; runs holding at least HELIX_MIN_RUN contacts make a helix
    whose every i -> i+4 pair is restrained. Beta: bridges (i, j) as DSSP defines them from
    contacts, the residues at least MIN_STRAND_SEPARATION apart along one linked segment (or in
    different segments); a bridge next to another of its type (a ladder of at least
    LADDER_MIN_BRIDGES = 2) is kept, and its contacts are restrained. Vectorised: 1.9 s for the
    million atoms of the 7cth assembly.
    """
    t = residue_table(model, xyz, BACKBONE)
    n_col, o_col = t.col("N"), t.col("O")
    nres = len(n_col)
    prev, nxt = t.prev, t.next
    donor = (n_col >= 0) & (prev >= 0) & (t.res_type != "PRO") & t.is_amino
    accept = (o_col >= 0) & t.is_amino
    res = np.arange(nres)

    def contact(i, j):
        ok = (i >= 0) & (j >= 0)
        ok[ok] &= accept[i[ok]] & donor[j[ok]]
        d = np.full(len(i), np.inf)
        d[ok] = np.linalg.norm(xyz[o_col[i[ok]]] - xyz[n_col[j[ok]]], axis=1)
        return d < cutoff

    hb_o, hb_n, hb_kind = [], [], []
    helices = []
    in_helix = np.zeros(nres, dtype=bool)
    kinds = [(4, HELIX_MIN_RUN)] + ([(3, HELIX_310_PI_MIN_RUN), (5, HELIX_310_PI_MIN_RUN)]
                                    if helix_310_pi else [])
    for k, min_run in kinds:
        partner = _step(nxt, k)
        hb = contact(res, partner)
        filled = hb.copy()
        for gap in range(1, HELIX_MAX_GAP + 1):      # gaps of up to HELIX_MAX_GAP between contacts
            for s in range(gap):
                filled[1 + s:nres - gap + s] |= (hb[:nres - gap - 1] & hb[gap + 1:]
                                                 & (partner[1 + s:nres - gap + s] >= 0))
        count = np.concatenate(([0], np.cumsum(hb)))
        for a, b in _runs(filled, min_run):
            if count[b + 1] - count[a] < min_run or (k != 4 and in_helix[a:b + 1].any()):
                continue                 # 3-10 / pi contacts inside an alpha helix are its own
            helices.append((a, int(partner[b])))
            in_helix[a:partner[b] + 1] = True
            span = np.arange(a, b + 1)
            span = span[accept[span] & donor[partner[span]]]
            hb_o.append(span)
            hb_n.append(partner[span])
            hb_kind.append(np.full(len(span), HELIX, dtype=np.int64))

    # beta: all contacts between residues apart along the chain, then DSSP's bridge patterns
    seg, pos = _segments(prev)
    o_res = np.nonzero(accept)[0]
    n_res = np.nonzero(donor)[0]
    ci = cj = np.zeros(0, dtype=np.int64)
    if len(o_res) and len(n_res):
        near = cKDTree(xyz[o_col[o_res]]).sparse_distance_matrix(
            cKDTree(xyz[n_col[n_res]]), cutoff, output_type="ndarray")
        near = near[near["v"] < cutoff]
        ci, cj = o_res[near["i"]], n_res[near["j"]]

    def apart(i, j):
        return (seg[i] != seg[j]) | (np.abs(pos[i] - pos[j]) >= MIN_STRAND_SEPARATION)

    keep = apart(ci, cj)
    ci, cj = ci[keep], cj[keep]
    hb = _PairSet(ci, cj, nres)
    # candidate bridges: every pair within one residue of a contact's two residues
    shifts = (prev, res, nxt)
    cand = np.concatenate([np.stack([sa[ci], sb[cj]], axis=1) for sa in shifts for sb in shifts]
                          + [np.zeros((0, 2), dtype=np.int64)])
    cand = cand[np.all(cand >= 0, axis=1)]
    cand = np.unique(np.sort(cand, axis=1), axis=0)
    bi, bj = cand[:, 0], cand[:, 1]
    ok = (bi != bj) & apart(bi, bj)
    bi, bj = bi[ok], bj[ok]
    ip, inx, jp, jn = prev[bi], nxt[bi], prev[bj], nxt[bj]
    patterns = (("p", (ip, bj), (bj, inx)), ("p", (jp, bi), (bi, jn)),
                ("a", (bi, bj), (bj, bi)), ("a", (ip, jn), (jp, inx)))
    which = np.full(len(bi), -1)
    for p, (_, h1, h2) in enumerate(patterns):
        which[(which < 0) & hb.has(*h1) & hb.has(*h2)] = p
    found = which >= 0
    bi, bj, which = bi[found], bj[found], which[found]
    parallel = which < 2
    # a bridge with a neighbour of its own type along the ladder: (i+1, j+1) parallel, (i+1, j-1)
    # antiparallel (and the same backwards)
    bridges = {0: _PairSet(bi[parallel], bj[parallel], nres),
               1: _PairSet(bi[~parallel], bj[~parallel], nres)}

    def has_bridge(i, j, par):
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        ok_ = (i >= 0) & (j >= 0)
        return ok_ & np.where(par, bridges[0].has(lo, hi), bridges[1].has(lo, hi))

    nb_fwd = np.where(parallel, nxt[bj], prev[bj])
    nb_back = np.where(parallel, prev[bj], nxt[bj])
    laddered = has_bridge(nxt[bi], nb_fwd, parallel) | has_bridge(prev[bi], nb_back, parallel)
    strand_res = np.zeros(nres, dtype=bool)
    strand_res[bi[laddered]] = True
    strand_res[bj[laddered]] = True
    for p, (_, h1, h2) in enumerate(patterns):
        sel = laddered & (which == p)
        for a, b in (h1, h2):
            hb_o.append(np.asarray(a)[found][sel])
            hb_n.append(np.asarray(b)[found][sel])
            hb_kind.append(np.full(int(sel.sum()), STRAND, dtype=np.int64))
    o_r = np.concatenate(hb_o + [np.zeros(0, dtype=np.int64)]).astype(np.int64)
    n_r = np.concatenate(hb_n + [np.zeros(0, dtype=np.int64)]).astype(np.int64)
    kind = np.concatenate(hb_kind + [np.zeros(0, dtype=np.int64)])
    # one term per H-bond; a helix H-bond that is also a bridge's stays a helix one
    _, first = np.unique(o_r * nres + n_r, return_index=True)
    o_r, n_r, kind = o_r[first], n_r[first], kind[first]
    return SecondaryStructure(o_col[o_r], n_col[n_r], kind, sorted(helices),
                              _runs(strand_res, LADDER_MIN_BRIDGES))


# ---------------------------------------------------------------------------------- terms

def rama_terms_of(model: Model, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rama_idx (n, 5): C(i-1) N CA C N(i+1), class (n,)) of every amino acid with both
    neighbours linked, classes as validation.ramachandran assigns them in xyz."""
    t = residue_table(model, xyz, BACKBONE)
    a = ramachandran.analyse(t, xyz)
    r = a["residue"]
    n_col, ca_col, c_col = t.col("N"), t.col("CA"), t.col("C")
    idx = np.stack([c_col[t.prev[r]], n_col[r], ca_col[r], c_col[r], n_col[t.next[r]]], axis=1)
    return idx.astype(np.int64).reshape(-1, 5), a["cls"].astype(np.int64)


def _atom_keys(model: Model) -> dict:
    """(chain, residue number, atom name) -> atom index (first conformer wins)."""
    seq = model.res_seqid[model.res_index]
    keys = {}
    for k, key in enumerate(zip(model.chain.tolist(), seq.tolist(), model.atom_name.tolist())):
        keys.setdefault(key, k)
    return keys


def reference_torsions(model: Model, xyz: np.ndarray, restraints: Restraints, reference: Model,
                       rama_idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(torsion quadruples (n, 4) of model atoms, reference values in degrees) of phi, psi and
    the restraint set's torsions whose four atoms the reference has."""
    from .core.geometry import torsion_values

    if rama_idx is None:
        rama_idx = rama_terms_of(model, xyz)[0]
    quads = np.concatenate([rama_idx[:, 0:4], rama_idx[:, 1:5], restraints.tors_idx.reshape(-1, 4)])
    if len(quads):
        quads = np.unique(quads, axis=0)
    ref_keys = _atom_keys(reference)
    seq = model.res_seqid[model.res_index]
    to_ref = np.array([ref_keys.get(key, -1) for key in zip(model.chain.tolist(), seq.tolist(),
                                                            model.atom_name.tolist())],
                      dtype=np.int64)
    rq = to_ref[quads] if len(quads) else np.zeros((0, 4), dtype=np.int64)
    ok = np.all(rq >= 0, axis=1)
    quads, rq = quads[ok], rq[ok]
    return quads.astype(np.int64).reshape(-1, 4), torsion_values(reference.xyz, rq)


@dataclasses.dataclass
class RotamerTorsions:
    """Rotamer restraints of a model (rotamer_torsions): chi quadruples (n, 4) of model atoms,
    targets and sigmas (degrees), the residue of each, and the eligible side chains left free
    as rotamer outliers (residue indices)."""

    quads: np.ndarray
    target: np.ndarray
    sigma: np.ndarray
    residue: np.ndarray
    outliers: np.ndarray

    def summary(self) -> str:
        return (f"{len(self.quads)} chi angles of {len(np.unique(self.residue))} side chains, "
                f"{len(self.outliers)} rotamer outliers left free")


def nearest_rotamer(res: str, chi: np.ndarray) -> np.ndarray:
    """Index of the library rotamer of residue type res with the highest posterior at each row
    of chi (n, n_chi) degrees: argmax_k log P_k + sum_d log N(chi_d; mean_kd, sigma_kd), the
    differences wrapped by each chi's period (validation.rotamer.log_density's mixture)."""
    lib = rotamer.library()[res]
    prob, mean, sigma, periods = lib["prob"], lib["mean"], lib["sigma"], lib["periods"]
    chi = np.asarray(chi, dtype=np.float64).reshape(-1, mean.shape[1])
    d = (chi[None] - mean[:, None] + periods / 2) % periods - periods / 2      # (K, n, n_chi)
    z = d / sigma[:, None]
    post = (np.log(prob) - np.sum(np.log(sigma), axis=1))[:, None] - 0.5 * np.sum(z * z, axis=2)
    return np.argmax(post, axis=0)


def rotamer_torsions(model: Model, xyz: np.ndarray, restraints: Restraints) -> RotamerTorsions:
    """The rotamer restraints of the side chains at xyz (see the module text): each chi's target
    is the nearest rotamer's mean (the copy nearest to chi for a period-180 chi, in [-180, 180)),
    its sigma that rotamer's spread floored at ROTAMER_SIGMA_FLOOR."""
    xyz = np.asarray(xyz, dtype=np.float64)
    lib = rotamer.library()
    by_type: dict[str, list] = {}
    for sc in side_chains(model, restraints):
        by_type.setdefault(sc.res_type, []).append(sc)
    quads, target, sigma, residue, outliers = [], [], [], [], []
    for res, chains in by_type.items():
        chi = np.stack([current_chis(xyz, sc) for sc in chains])
        bad = rotamer.log_density(res, chi) < lib[res]["outlier"]
        outliers.extend(sc.residue for sc, b in zip(chains, bad) if b)
        keep = np.nonzero(~bad)[0]
        if len(keep) == 0:
            continue
        k = nearest_rotamer(res, chi[keep])
        periods = lib[res]["periods"]
        mean = lib[res]["mean"][k]
        t = chi[keep] + (mean - chi[keep] + periods / 2) % periods - periods / 2
        target.append(((t + 180.0) % 360.0 - 180.0).ravel())
        sigma.append(np.maximum(lib[res]["sigma"][k], ROTAMER_SIGMA_FLOOR).ravel())
        quads.append(np.concatenate([chains[j].atoms[chains[j].quads] for j in keep]))
        residue.append(np.repeat([chains[j].residue for j in keep], chi.shape[1]))
    if not quads:
        return RotamerTorsions(np.zeros((0, 4), dtype=np.int64), np.zeros(0), np.zeros(0),
                               np.zeros(0, dtype=np.int64), np.array(sorted(outliers), dtype=np.int64))
    quads_, residue_ = np.concatenate(quads), np.concatenate(residue)
    order = np.argsort(residue_, kind="stable")
    return RotamerTorsions(quads_[order].astype(np.int64), np.concatenate(target)[order],
                           np.concatenate(sigma)[order], residue_[order].astype(np.int64),
                           np.array(sorted(outliers), dtype=np.int64))


def _central_bonds(quads: np.ndarray) -> np.ndarray:
    """The middle bond of each torsion as a sorted pair (n, 2)."""
    return np.sort(np.asarray(quads, dtype=np.int64).reshape(-1, 4)[:, 1:3], axis=1)


def add_lowres_restraints(model: Model, restraints: Restraints, xyz: np.ndarray, params,
                          reference: Model | None = None) -> Restraints:
    """restraints with the low-resolution terms that params ask for (a new Restraints; the
    input is not changed): secondary-structure H-bonds found in xyz when params.ss_restraints,
    Ramachandran restraints when params.rama_restraints, reference-model torsions when a
    reference model is given, rotamer restraints towards the library rotamers nearest to xyz's
    side chains when params.rotamer_restraints (after the reference torsions in reft_*; none on
    a chi bond the reference restrains). Logs what was found.

    Defaults (params.resolution_defaults): secondary-structure, Ramachandran and rotamer
    restraints are on at resolutions worse than 4.0 A and off at 4.0 A or better; reference
    restraints only with a reference model (`--reference`).
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    new = {}
    if params.ss_restraints:
        ss = find_secondary_structure(model, xyz, params.ss_detect_cutoff, params.ss_helix_310_pi)
        n = len(ss.kind)
        new.update(dist_idx=np.stack([ss.o_atom, ss.n_atom], axis=1).reshape(-1, 2),
                   dist_target=np.full(n, params.hbond_target),
                   dist_sigma=np.full(n, params.hbond_sigma),
                   dist_flat=np.full(n, params.hbond_flat),
                   dist_limit=np.full(n, params.hbond_limit), dist_kind=ss.kind)
        log.info("secondary structure: %s", ss.summary())
    rama_idx = None
    if params.rama_restraints or reference is not None:
        rama_idx, cls = rama_terms_of(model, xyz)
    if params.rama_restraints:
        new.update(rama_idx=rama_idx, rama_class=cls,
                   rama_weight=np.full(len(cls), params.rama_weight), rama_table=rama_potential())
        log.info("Ramachandran restraints on %d residues (weight %g)", len(cls), params.rama_weight)
    if reference is not None:
        quads, target = reference_torsions(model, xyz, restraints, reference, rama_idx)
        n = len(quads)
        new.update(reft_idx=quads, reft_target=target, reft_sigma=np.full(n, params.reference_sigma),
                   reft_limit=np.full(n, params.reference_limit))
        log.info("reference model: %d torsions restrained (sigma %g deg, top-out at %g deg)", n,
                 params.reference_sigma, params.reference_limit)
        if n == 0:
            log.warning("the reference model shares no torsion with the model: atoms are matched by "
                        "chain, residue number and atom name")
    if params.rotamer_restraints:
        rt = rotamer_torsions(model, xyz, restraints)
        keep = np.ones(len(rt.quads), dtype=bool)
        if len(new.get("reft_idx", ())) and len(rt.quads):
            n_atoms = np.int64(model.n_atoms)
            ref_bonds = _central_bonds(new["reft_idx"]) @ np.array([n_atoms, 1])
            keep = ~np.isin(_central_bonds(rt.quads) @ np.array([n_atoms, 1]), ref_bonds)
        base = {k: new.get(k, getattr(restraints, k))
                for k in ("reft_idx", "reft_target", "reft_sigma", "reft_limit")}
        new.update(reft_idx=np.concatenate([base["reft_idx"].reshape(-1, 4), rt.quads[keep]]),
                   reft_target=np.concatenate([base["reft_target"], rt.target[keep]]),
                   reft_sigma=np.concatenate([base["reft_sigma"], rt.sigma[keep]]),
                   reft_limit=np.concatenate([base["reft_limit"],
                                              np.full(int(keep.sum()), ROTAMER_LIMIT)]))
        log.info("rotamer restraints: %s (sigma >= %g deg, top-out at %g deg)%s", rt.summary(),
                 ROTAMER_SIGMA_FLOOR, ROTAMER_LIMIT,
                 f"; {int(np.sum(~keep))} chi left to the reference model" if not keep.all() else "")
    return dataclasses.replace(restraints, **new) if new else restraints
