"""Non-crystallographic symmetry (NCS): finding copies, and refining with NCS constraints or
restraints.

Finding copies (`find_ncs`):
  * Chains are put in classes by what they hold: the entity of their polymer (gemmi's
    setup_entities groups chains by sequence) and the names of their other residues.
  * Candidate operators superpose one reference chain (from the smallest class with copies) onto
    every chain of its class; each candidate's support is the number of chains it carries onto
    chains of their own class (chain centres within CENTRE_TOL). A true copy operator moves a
    whole copy along, a quasi-equivalence between two different chains of one copy (the D, E, F
    chains of the 7cth capsid) carries few. Of the candidate sets {support >= s} the one that
    places the most atoms in copies is taken: quasi-equivalences leave the other chains of their
    copy without images, so they lose.
  * Chains are then taken in file order: a chain not yet placed joins the master copy and its
    images under the copy operators join the copies. Residues are matched by sequence number and
    name and atoms by name, across all copies; what is not matched in every copy stays a free
    atom, refined on its own.
  * Each copy's operator (R, t, with x_copy ~ R x_master + t) is the least-squares superposition
    of the master onto it (all matched atoms); its rmsd is reported.
  With --ncs constraints, a model that is the asymmetric unit of its file's assembly records
  (one generator of st.assemblies covering all its subchains, one operator the identity) is the
  master and the other operators make virtual copies (`assembly_ncs`): the data term and the
  contacts run over all copies, the operators stay fixed (the file's symmetry), and the model
  written is the asymmetric unit with its records. Otherwise the records are only logged. When
  the operators form a group (an icosahedral assembly's 60), `SymmetricTarget` evaluates that
  whole-assembly target from the asymmetric unit and the images of its atoms near it alone.
  Copies found in a model that holds them all take the same path when their superposed
  operators form a group to within params.ncs_group_tolerance (`snap_to_group`): the
  multiplication table is read off the rotations (`group_table`), the operators are made that
  group exactly (`exact_group`) in the frame nearest the superposed ones (`nearest_conjugate`)
  and fixed, and every copy is put back as the master's image after each minimisation.

Modes (RefineParams.ncs):
  * constraints: parameters are the master coordinates, the free atoms and a rigid operator
    per copy (`NcsParametrisation`: x_copy = Q(w) (R0 x_master + t0 - c) + c + tau, a rotation
    about the copy's centre, written u = rho w in A at the master's radius of gyration rho so
    that every parameter is a displacement). The target is the full model's target
    (`ConstrainedTarget`): the data term over every atom of every copy, the restraints inside the
    master counted once per copy, and every term that crosses copies or touches free atoms (links,
    non-bonded contacts between copies) on the full coordinates. The gradient is reduced to the
    parameters (g_master = sum_k A_k^T g_copy_k, operators by the chain rule). Copies are shared
    among the ranks, each rank evaluates the data term of its copies, and one buffer-based
    Allreduce of the parameter gradient (3 x master atoms + 6 per copy) sums the parts.
  * restraints: coordinates stay free; `NcsRestraintTerm` adds
    sum_copies sum_atoms |R_k^T (x_k - t_k) - mean|^2 / sigma^2 (operators from superposition at
    the start of each minimisation), pulling each copy to the average of the superposed copies.
  * auto: constraints when every copy is within NEAR_IDENTICAL_RMSD of the master after
    superposition, restraints when within SIMILAR_RMSD, else off.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from .core import geometry, nonbonded
from .core.common import unique_sorted
from .core.density import real_space_target
from .core.lbfgs import lbfgs
from .engine import MinimiseResult
from .errors import InputError
from .protocol.rigid import _skew, rotation
from .parallel.decompose import restraint_atoms
from .restraints import Restraints

log = logging.getLogger(__name__)

NEAR_IDENTICAL_RMSD = 0.5   # A: auto picks constraints below this (largest copy rmsd)
SIMILAR_RMSD = 1.0          # A: auto picks restraints below this (above: genuinely different,
                            # like the quasi-equivalent chains of a capsid's asymmetric unit)
CROSS_SKIN = 2.5            # A, skin of the neighbour list of contacts between copies
CENTRE_TOL = 3.0            # A: an operator carries a chain onto another when their centres agree
MODES = ("auto", "constraints", "restraints", "off")


# ------------------------------------------------------------------------------ superposition

def superpose(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Least-squares rigid superposition of points a onto b (Kabsch): R, t, rmsd with
    R a + t ~ b."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ca, cb = a.mean(axis=0), b.mean(axis=0)
    h = (a - ca).T @ (b - cb)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    t = cb - rot @ ca
    rmsd = float(np.sqrt(np.mean(np.sum((a @ rot.T + t - b) ** 2, axis=1))))
    return rot, t, rmsd


def right_jacobian(w: np.ndarray) -> np.ndarray:
    """J_r(w) with exp([w + d]x) ~ exp([w]x) exp([J_r d]x) to first order in d."""
    theta = float(np.linalg.norm(w))
    k = _skew(w)
    if theta < 1e-5:
        return np.eye(3) - 0.5 * k + k @ k / 6.0
    return (np.eye(3) - (1 - math.cos(theta)) / theta**2 * k
            + (theta - math.sin(theta)) / theta**3 * k @ k)


@njit(cache=True)
def _expand_kernel(xm, a, b, atoms, x):
    """x[atoms[i]] = a @ xm[i] + b."""
    for i in range(atoms.shape[0]):
        t = atoms[i]
        for r in range(3):
            x[t, r] = a[r, 0] * xm[i, 0] + a[r, 1] * xm[i, 1] + a[r, 2] * xm[i, 2] + b[r]


@njit(cache=True)
def _reduce_kernel(x, gx, atoms, rows, a, centre, gm, out):
    """gm[rows[i]] += a.T @ gx[atoms[i]]; out[0:3] += sum of gx[atoms]; out[3:6] += sum of
    (x[atoms] - centre) x gx[atoms]."""
    f0 = f1 = f2 = t0 = t1 = t2 = 0.0
    for i in range(atoms.shape[0]):
        j = atoms[i]
        g0, g1, g2 = gx[j, 0], gx[j, 1], gx[j, 2]
        if g0 == 0.0 and g1 == 0.0 and g2 == 0.0:
            continue
        r = rows[i]
        for c in range(3):
            gm[r, c] += a[0, c] * g0 + a[1, c] * g1 + a[2, c] * g2
        y0, y1, y2 = x[j, 0] - centre[0], x[j, 1] - centre[1], x[j, 2] - centre[2]
        f0 += g0
        f1 += g1
        f2 += g2
        t0 += y1 * g2 - y2 * g1
        t1 += y2 * g0 - y0 * g2
        t2 += y0 * g1 - y1 * g0
    out[0] += f0
    out[1] += f1
    out[2] += f2
    out[3] += t0
    out[4] += t1
    out[5] += t2


# ---------------------------------------------------------------------------------- detection

@dataclass
class NcsGroup:
    """One NCS group: copies[k] are the atom indices of copy k, matched atom for atom to the
    master copies[0]; x[copies[k]] ~ x[master] @ rot[k].T + trans[k] (rot[0] = identity)."""

    copies: np.ndarray            # (K, m) int64
    rot: np.ndarray               # (K, 3, 3)
    trans: np.ndarray             # (K, 3)
    rmsd: np.ndarray              # (K,) A, of each copy to the transformed master
    chains: list                  # chain names of each copy

    @property
    def master(self) -> np.ndarray:
        return self.copies[0]

    @property
    def n_copies(self) -> int:
        return len(self.copies)


@dataclass
class NcsInfo:
    groups: list
    n_atoms: int
    source: str                   # how the copies were found
    assembly: dict | None = None  # the file's assembly records, when the model is an ASU
    notes: list = field(default_factory=list)
    n_model: int | None = None    # atoms in the model; atoms n_model.. are virtual copies made by
                                  # the file's assembly operators (fixed), None: all in the model
    closed: bool = False          # operators that form a group (closed_group): virtual copies,
                                  # or copies in the model whose operators were made exact
                                  # (snap_to_group)
    master_terms: tuple | None = field(default=None, repr=False, compare=False)
                                  # (restraints, the master's own terms) of snap_to_group

    @property
    def virtual(self) -> bool:
        return self.n_model is not None and self.n_model < self.n_atoms

    @property
    def max_rmsd(self) -> float:
        return max((float(g.rmsd.max()) for g in self.groups), default=0.0)

    def free_atoms(self) -> np.ndarray:
        used = np.zeros(self.n_atoms, dtype=bool)
        for g in self.groups:
            used[g.copies.ravel()] = True
        return np.flatnonzero(~used)

    def summary(self) -> dict:
        return {"source": self.source, "groups": [
            {"copies": g.n_copies, "atoms_per_copy": int(g.copies.shape[1]),
             "master_chains": list(g.chains[0]),
             "rmsd_max": round(float(g.rmsd.max()), 4), "rmsd_mean": round(float(g.rmsd[1:].mean()), 4)
             if g.n_copies > 1 else 0.0} for g in self.groups],
            "free_atoms": int(len(self.free_atoms())), "assembly": self.assembly}

    def refit(self, xyz: np.ndarray) -> "NcsInfo":
        """The same copies with operators and rmsds superposed anew at xyz."""
        groups = []
        for g in self.groups:
            rot, trans, rmsd = _operators(xyz, g.copies)
            groups.append(dataclasses.replace(g, rot=rot, trans=trans, rmsd=rmsd))
        return dataclasses.replace(self, groups=groups)


def _operators(xyz, copies):
    k = len(copies)
    rot = np.empty((k, 3, 3))
    trans = np.empty((k, 3))
    rmsd = np.empty(k)
    master = xyz[copies[0]]
    for c in range(k):
        rot[c], trans[c], rmsd[c] = superpose(master, xyz[copies[c]])
    rot[0], trans[0], rmsd[0] = np.eye(3), 0.0, 0.0
    return rot, trans, rmsd


@dataclass
class _Chain:
    name: str
    key: tuple
    atoms: np.ndarray             # atom indices
    atom_keys: list               # (seqid, resname, atom name, altloc) per atom
    centre: np.ndarray


def _chains(model) -> list:
    """The model's chains (runs of residues with one chain name) with class keys."""
    entity_of = {}
    for ch in model.st[0]:
        poly = ch.get_polymer()
        ent = model.st.get_entity_of(poly) if len(poly) else None
        entity_of[ch.name] = ent.name if ent is not None else ""
    out = []
    first = model.res_first_atom
    rc = model.res_chain
    starts = np.flatnonzero(np.r_[True, rc[1:] != rc[:-1]])
    ends = np.r_[starts[1:], len(rc)]
    # every atom's key at once, from lists of Python values (indexing the arrays atom by atom:
    # find_ncs of the million-atom 7cth assembly took 1.7 s in one process, now 0.8 s)
    res_of = np.repeat(np.arange(len(rc)), np.diff(first))
    keys = list(zip(model.res_seqid[res_of].tolist(), model.res_names[res_of].tolist(),
                    model.atom_name.tolist(), model.altloc.tolist()))
    for r0, r1 in zip(starts, ends):
        name = str(rc[r0])
        poly = model.res_is_polymer[r0:r1]
        other = tuple(sorted(str(n) for n, p in zip(model.res_names[r0:r1], poly) if not p))
        seq = entity_of.get(name) or "".join(model.res_names[r0:r1][poly].tolist())
        a0, a1 = int(first[r0]), int(first[r1])
        atoms = np.arange(a0, a1)
        out.append(_Chain(name, (seq, other), atoms, keys[a0:a1], model.xyz[atoms].mean(axis=0)))
    return out


def _pair_atoms(a: _Chain, b: _Chain):
    """Matched atom indices of two chains of one class."""
    kb = dict(zip(b.atom_keys, b.atoms))
    ia, ib = [], []
    for k, i in zip(a.atom_keys, a.atoms):
        j = kb.get(k)
        if j is not None:
            ia.append(i)
            ib.append(j)
    return np.array(ia, dtype=np.int64), np.array(ib, dtype=np.int64)


def find_ncs(model) -> NcsInfo | None:
    """NCS copies among the chains of model (a modelio.Model); None when there are none."""
    from scipy.spatial import cKDTree

    xyz = model.xyz
    assembly = _assembly_records(model)
    chains = _chains(model)
    classes: dict = {}
    for c, ch in enumerate(chains):
        classes.setdefault(ch.key, []).append(c)
    multi = [v for v in classes.values() if len(v) > 1]
    if not multi:
        return None
    # reference: the first chain of the smallest class with copies (fewest candidates)
    ref_class = min(multi, key=lambda v: (len(v), v[0]))
    a = ref_class[0]
    centres = np.array([ch.centre for ch in chains])
    trees = {k: (cKDTree(centres[v]), np.array(v)) for k, v in classes.items()}
    key_of = [ch.key for ch in chains]
    candidates = []
    for x in ref_class:
        ia, ix = _pair_atoms(chains[a], chains[x])
        if len(ia) < 3:
            continue
        rot, t, _ = superpose(xyz[ia], xyz[ix])
        image = centres @ rot.T + t
        mapping = np.full(len(chains), -1)
        for k, (tree, members) in trees.items():
            idx = np.array([c for c in classes[k]])
            d, j = tree.query(image[idx])
            ok = d < CENTRE_TOL
            mapping[idx[ok]] = members[j[ok]]
        candidates.append((x, rot, t, mapping, int(np.count_nonzero(mapping >= 0))))
    others = [c for c in candidates if c[0] != a]
    if not others:
        return None
    identity = [c for c in candidates if c[0] == a]
    sizes = np.array([len(ch.atoms) for ch in chains])

    def place(ops):
        """Chains in file order: an unplaced chain joins the master copy when every operator
        carries it onto an unplaced chain of its class; its images join the copies."""
        copy_of = np.full(len(chains), -1)
        masters, imgs_of = [], []
        for y in range(len(chains)):
            if copy_of[y] >= 0:
                continue
            imgs = [op[3][y] if op[0] != a else y for op in ops]
            if any(z < 0 or copy_of[z] >= 0 or key_of[z] != key_of[y] for z in imgs) \
                    or len(set(imgs)) != len(imgs):
                copy_of[y] = -2          # not placed: its atoms stay free
                continue
            for k, z in enumerate(imgs):
                copy_of[z] = k
            masters.append(y)
            imgs_of.append(imgs)
        return copy_of, masters, imgs_of

    # which candidates are copy operators: of the sets {support >= s}, the one that places the
    # most atoms in copies (a quasi-equivalence leaves the other chains of its copy unplaceable);
    # at least 2 chains carried (1 when the model has only 2 chains)
    floor = 1 if len(chains) == 2 else 2
    best = None
    for s in sorted({c[4] for c in others if c[4] >= floor}, reverse=True):
        ops = identity + [c for c in others if c[4] >= s]
        copy_of, master_chains, images = place(ops)
        covered = int(sizes[copy_of >= 0].sum())
        if best is None or covered > best[0]:
            best = (covered, ops, copy_of, master_chains, images)
    if best is None:
        return None
    _, ops, copy_of, master_chains, images = best
    rejected = len(others) - (len(ops) - 1)
    if not master_chains:
        return None
    n_copies = len(ops)
    copies = [[] for _ in range(n_copies)]
    for imgs in images:
        if all(chains[z].atom_keys == chains[imgs[0]].atom_keys for z in imgs[1:]):
            for k, z in enumerate(imgs):       # the same atoms in the same order in every copy
                copies[k].append(chains[z].atoms)
            continue
        # atoms matched in every copy of this chain
        common = set(chains[imgs[0]].atom_keys)
        for z in imgs[1:]:
            common &= set(chains[z].atom_keys)
        for k, z in enumerate(imgs):
            ch = chains[z]
            pos = {kk: i for kk, i in zip(ch.atom_keys, ch.atoms)}
            sel = [pos[kk] for kk in chains[imgs[0]].atom_keys if kk in common]
            copies[k].append(np.array(sel, dtype=np.int64))
    copies = np.array([np.concatenate(c) for c in copies])
    rot, trans, rmsd = _operators(xyz, copies)
    group = NcsGroup(copies=copies, rot=rot, trans=trans, rmsd=rmsd,
                     chains=[[chains[imgs[k]].name for imgs in images] for k in range(n_copies)])
    info = NcsInfo(groups=[group], n_atoms=model.n_atoms, source="copies in the model", assembly=assembly)
    if rejected:
        info.notes.append(f"{rejected} superposition(s) of chain {chains[a].name} onto chains of its "
                          f"class carried too few other chains along (quasi-equivalent chains, "
                          f"not copies)")
    n_unplaced = int(np.count_nonzero(copy_of == -2))
    if n_unplaced:
        info.notes.append(f"{n_unplaced} chain(s) without an image in every copy stay free")
    return info


def _assembly_records(model) -> dict | None:
    """The file's assembly operators when the model is an asymmetric unit of an assembly."""
    st = model.st
    if not len(st.assemblies):
        return None
    a = st.assemblies[0]
    ops = [op for gen in a.generators for op in gen.operators]
    if len(ops) < 2:
        return None
    return {"name": a.name, "oligomeric_details": a.oligomeric_details, "operators": len(ops)}


def assembly_ncs(model) -> NcsInfo | None:
    """NCS from the file's assembly records for a model that is the asymmetric unit: the model is
    the master and every other operator makes a virtual copy (atoms model.n_atoms + k n ...),
    operators fixed. None unless one generator of the first assembly covers every subchain of
    the model and one of its operators is the identity."""
    st = model.st
    if not len(st.assemblies):
        return None
    subchains = {res.subchain for ch in st[0] for res in ch}
    gens = [g for g in st.assemblies[0].generators if subchains <= set(g.subchains)]
    if len(gens) != 1 or len(gens[0].operators) < 2:
        return None
    rot = np.array([np.array(op.transform.mat.tolist()) for op in gens[0].operators])
    trans = np.array([np.array(op.transform.vec.tolist()) for op in gens[0].operators])
    ident = [k for k in range(len(rot)) if np.abs(rot[k] - np.eye(3)).max() < 1e-6
             and np.abs(trans[k]).max() < 1e-3]
    if not ident:
        return None
    order = ident[:1] + [k for k in range(len(rot)) if k != ident[0]]
    n, kk = model.n_atoms, len(rot)
    copies = np.arange(n * kk, dtype=np.int64).reshape(kk, n)
    names = [op.name for op in gens[0].operators]
    group = NcsGroup(copies=copies, rot=rot[order], trans=trans[order], rmsd=np.zeros(kk),
                     chains=[[f"{ch.name} x operator {names[k]}" for ch in st[0]] if i else
                             [ch.name for ch in st[0]] for i, k in enumerate(order)])
    return NcsInfo(groups=[group], n_atoms=n * kk, source="the file's assembly records",
                   assembly=_assembly_records(model), n_model=n,
                   closed=closed_group(group.rot, group.trans))


def expand_restraints(r: Restraints, n_model: int, n_copies: int) -> Restraints:
    """The model's restraints with the per-atom non-bonded arrays repeated for virtual copies
    (its bonded terms stay on the model's atoms: the master's)."""
    out = dataclasses.replace(r)
    out.vdw_radius = np.tile(r.vdw_radius, n_copies)
    if len(r.hbond_type):
        out.hbond_type = np.tile(r.hbond_type, n_copies)
    for name in ("excl_pairs", "pair14"):
        pairs = getattr(r, name)
        if len(pairs):
            setattr(out, name, (pairs[None] + (np.arange(n_copies) * n_model)[:, None, None]).reshape(-1, 2))
    return out


def assembly_operators(st) -> tuple[np.ndarray, np.ndarray]:
    """Rotation (K, 3, 3) and translation (K, 3) of the first assembly's operators, in order."""
    ops = [op for gen in st.assemblies[0].generators for op in gen.operators]
    rot = np.array([np.array(op.transform.mat.tolist()) for op in ops])
    trans = np.array([np.array(op.transform.vec.tolist()) for op in ops])
    return rot, trans


def choose_mode(info: NcsInfo | None, requested: str) -> tuple[str, str]:
    """The mode to use and why (for the log)."""
    if requested not in MODES:
        raise InputError(f"--ncs must be one of {', '.join(MODES)}, got {requested!r}")
    if requested == "off":
        return "off", "NCS off (requested)"
    if info is None:
        return "off", "no NCS copies found"
    r = info.max_rmsd
    if requested != "auto":
        return requested, f"{requested} (requested); copies differ by up to {r:.3f} A rmsd"
    if r < NEAR_IDENTICAL_RMSD:
        return "constraints", (f"constraints (auto): every copy within {r:.3f} A rmsd of the master "
                               f"(< {NEAR_IDENTICAL_RMSD} A)")
    if r < SIMILAR_RMSD:
        return "restraints", (f"restraints (auto): copies differ by up to {r:.3f} A rmsd "
                              f"({NEAR_IDENTICAL_RMSD}-{SIMILAR_RMSD} A)")
    return "off", f"off (auto): copies differ by up to {r:.3f} A rmsd (>= {SIMILAR_RMSD} A)"


def describe(info: NcsInfo) -> list[str]:
    lines = []
    for gi, g in enumerate(info.groups):
        lines.append(f"NCS group {gi + 1}: {g.n_copies} copies of {g.copies.shape[1]} atoms "
                     f"(master chains {', '.join(g.chains[0][:12])}{'...' if len(g.chains[0]) > 12 else ''}); "
                     f"rmsd to the transformed master: mean {g.rmsd[1:].mean():.3f} A, max "
                     f"{g.rmsd.max():.3f} A")
    lines.append(f"NCS: {len(info.free_atoms())} atoms outside the copies refined freely "
                 f"(found from {info.source})")
    if info.assembly:
        lines.append(f"the file's assembly {info.assembly['name']} ({info.assembly['oligomeric_details']}) "
                     f"has {info.assembly['operators']} operators")
    lines.extend(info.notes)
    return lines


# --------------------------------------------------------------------- constrained parameters

class NcsParametrisation:
    """x = f(p) for p = [master coordinates of every group, free atoms, (u, tau) per copy k > 0].

    Copy k of group g: x_k = Q(u/rho) (R0_k x_m + t0_k - c_k) + c_k + tau_k, with (R0, t0) the
    operators at construction, c_k = R0_k centre(x_m) + t0_k the copy's centre and rho the
    master's radius of gyration. p = 0 in the operator part reproduces R0, t0."""

    def __init__(self, info: NcsInfo, xyz_master_frame: np.ndarray):
        self.info = info
        self.fixed_operators = info.virtual      # the file's symmetry: operators not refined
        self.n = info.n_atoms
        self.free = info.free_atoms()
        self.m_off = []            # offset of each group's master in the master block (atoms)
        self.copies = []           # per copy k > 0: (group, k, atoms)
        off = 0
        for g in info.groups:
            self.m_off.append(off)
            off += g.copies.shape[1]
        self.n_master = off
        self.n_free = len(self.free)
        self.op_off = 3 * (self.n_master + self.n_free)
        self.rho, self.centre = [], []
        self.master_start = [np.array(xyz_master_frame[g.master], dtype=np.float64) for g in info.groups]
        for gi, g in enumerate(info.groups):
            xm = xyz_master_frame[g.master]
            cm = xm.mean(axis=0)
            self.rho.append(max(float(np.sqrt(np.mean(np.sum((xm - cm) ** 2, axis=1)))), 1.0))
            for k in range(1, g.n_copies):
                self.copies.append((gi, k, g.copies[k], g.rot[k] @ cm + g.trans[k]))
        self.size = self.op_off + 6 * len(self.copies)
        # every atom's copy (index into self.copies; -1 master, -2 free) for the reductions
        self.copy_id = np.full(self.n, -2, dtype=np.int64)
        for gi, g in enumerate(info.groups):
            self.copy_id[g.master] = -1
        for c, (_, _, atoms, _) in enumerate(self.copies):
            self.copy_id[atoms] = c
        self.master_pos = np.full(self.n, -1, dtype=np.int64)    # row in the master block
        for gi, g in enumerate(info.groups):
            for k in range(g.n_copies):
                self.master_pos[g.copies[k]] = self.m_off[gi] + np.arange(g.copies.shape[1])

    def group_master(self, p, gi) -> np.ndarray:
        g = self.info.groups[gi]
        o = self.m_off[gi]
        return p[3 * o:3 * (o + g.copies.shape[1])].reshape(-1, 3)

    def pack(self, xyz: np.ndarray) -> np.ndarray:
        """p for coordinates xyz: each master the average of its copies brought back by the
        operators of this parametrisation (p's operator part 0)."""
        p = np.zeros(self.size)
        for gi, g in enumerate(self.info.groups):
            o = self.m_off[gi]
            p[3 * o:3 * (o + g.copies.shape[1])] = copies_average(g, xyz).ravel()
        p[3 * self.n_master:self.op_off] = xyz[self.free].ravel()
        return p

    def copy_transform(self, p, c):
        """A, b of copy c: x_copy = x_master @ A.T + b; also Q, w, centre + tau."""
        gi, k, _, cen = self.copies[c]
        g = self.info.groups[gi]
        o = self.op_off + 6 * c
        w = p[o:o + 3] / self.rho[gi]
        tau = p[o + 3:o + 6]
        q = rotation(w)
        a = q @ g.rot[k]
        b = q @ (g.trans[k] - cen) + cen + tau
        return a, b, q, w, cen + tau

    def expand(self, p: np.ndarray, out: np.ndarray | None = None, copies=None) -> np.ndarray:
        """Full coordinates (n, 3) for p (only the listed copies when copies is given; the
        masters and free atoms always)."""
        x = np.empty((self.n, 3)) if out is None else out
        for gi, g in enumerate(self.info.groups):
            x[g.master] = self.group_master(p, gi)
        x[self.free] = p[3 * self.n_master:self.op_off].reshape(-1, 3)
        for c in (range(len(self.copies)) if copies is None else copies):
            a, b, *_ = self.copy_transform(p, c)
            gi, _, atoms, _ = self.copies[c]
            _expand_kernel(np.ascontiguousarray(self.group_master(p, gi)), a, b, atoms, x)
        return x

    def reduce(self, p, x, gx, gp, dense=None, sparse=None) -> None:
        """Add J^T gx into gp. dense: copies whose every atom may carry gradient (default: all);
        sparse: further atom indices with gradient (in copies not listed as dense). Master and
        free atoms are always taken whole."""
        for gi, g in enumerate(self.info.groups):
            o = self.m_off[gi]
            gp[3 * o:3 * (o + g.copies.shape[1])] += gx[g.master].ravel()
        gp[3 * self.n_master:self.op_off] += gx[self.free].ravel()
        dense = range(len(self.copies)) if dense is None else dense
        for c in dense:
            self._reduce_copy(p, x, gx, gp, c, None)
        if sparse is not None and len(sparse):
            cid = self.copy_id[sparse]
            keep = cid >= 0
            is_dense = np.zeros(len(self.copies) + 1, dtype=bool)
            is_dense[list(dense)] = True
            keep &= ~is_dense[np.where(cid >= 0, cid, len(self.copies))]
            sparse, cid = sparse[keep], cid[keep]
            if len(sparse) == 0:
                return
            order = np.argsort(cid, kind="stable")
            sparse, cid = sparse[order], cid[order]
            bounds = np.flatnonzero(np.r_[True, cid[1:] != cid[:-1], True])
            for s0, s1 in zip(bounds[:-1], bounds[1:]):
                self._reduce_copy(p, x, gx, gp, int(cid[s0]), sparse[s0:s1])

    def _reduce_copy(self, p, x, gx, gp, c, atoms):
        gi, _, all_atoms, _ = self.copies[c]
        a, _, q, w, centre = self.copy_transform(p, c)
        if atoms is None:
            atoms = all_atoms
        rows = self.master_pos[atoms]
        gm = gp[:3 * self.n_master].reshape(-1, 3)
        out = np.zeros(6)
        _reduce_kernel(x, gx, atoms, rows, a, centre, gm, out)
        if self.fixed_operators:
            return
        o = self.op_off + 6 * c
        gp[o:o + 3] += right_jacobian(w).T @ (q.T @ out[3:]) / self.rho[gi]
        gp[o + 3:o + 6] += out[:3]


def copies_average(g: NcsGroup, xyz: np.ndarray) -> np.ndarray:
    """The master of group g as the average of its copies in xyz brought back by the operators."""
    acc = np.zeros((g.copies.shape[1], 3))
    for k in range(g.n_copies):
        acc += (xyz[g.copies[k]] - g.trans[k]) @ g.rot[k]
    return acc / g.n_copies


# ------------------------------------------------------------------- restraint bookkeeping

def _select(r: Restraints, rows: dict, plane_keep: np.ndarray, remap=None) -> Restraints:
    """Terms of r selected by rows[idx_name] (bool) and plane_keep (bool per plane), atom
    indices mapped through remap when given (parallel.decompose.select_terms)."""
    from .parallel.decompose import select_terms
    return select_terms(r, rows, plane_keep, remap)


def split_restraints(r: Restraints, label: np.ndarray, masters: list):
    """([terms inside each master, indices into that master's atoms], terms that cross labels or
    touch a free atom, global indices). label: per atom, -2 free, else a copy label; masters:
    the atom indices of each group's master. Terms inside one copy other than a master are
    dropped (the master's own terms stand for them)."""
    from .parallel.decompose import _ROW_TERMS
    rows_same, rows_lab = {}, {}
    for idx_name in _ROW_TERMS:
        lab = label[getattr(r, idx_name)]
        rows_same[idx_name] = np.all(lab == lab[:, :1], axis=1) & (lab[:, 0] != -2) \
            if lab.shape[1] else np.zeros(len(lab), dtype=bool)
        rows_lab[idx_name] = lab[:, 0] if lab.shape[1] else np.zeros(len(lab), dtype=np.int64)
    n_planes = len(r.plane_start) - 1
    plane_same = np.zeros(n_planes, dtype=bool)
    plane_lab = np.full(n_planes, -2, dtype=np.int64)
    sizes = np.diff(r.plane_start)
    filled = sizes > 0
    if filled.any():
        # per plane the smallest and largest label of its atoms, in one pass over all planes
        lab = label[r.plane_atoms]
        starts = np.asarray(r.plane_start[:-1])[filled]
        lo, hi = np.minimum.reduceat(lab, starts), np.maximum.reduceat(lab, starts)
        plane_lab[filled] = lab[starts]
        plane_same[filled] = (lo == hi) & (lo != -2)
    out = []
    for atoms in masters:
        mlab = label[atoms[0]]
        remap = np.full(len(label), -1, dtype=np.int64)
        remap[atoms] = np.arange(len(atoms))
        rows = {k: rows_same[k] & (rows_lab[k] == mlab) for k in rows_same}
        mr = _select(r, rows, plane_same & (plane_lab == mlab), remap)
        mr.vdw_radius = r.vdw_radius[atoms]
        mr.hbond_type = r.hbond_type[atoms] if len(r.hbond_type) else r.hbond_type
        for name in ("excl_pairs", "pair14"):
            pairs = getattr(r, name)
            if len(pairs):
                inside = (remap[pairs[:, 0]] >= 0) & (remap[pairs[:, 1]] >= 0)
                setattr(mr, name, remap[pairs[inside]])
        out.append(mr)
    cross = _select(r, {k: ~v for k, v in rows_same.items()}, ~plane_same & (np.diff(r.plane_start) > 0))
    return out, cross


def symmetrise_restraints(r: Restraints, info: NcsInfo) -> dict:
    """Make every copy carry its master's internal terms (in place): under constraints the copies
    are the master, so terms the start's topology gave one copy and not the master (a disulfide
    or a cis peptide decided from a poor start's distances) could never be met. Terms that
    cross copies or touch free atoms are kept as they are. Returns term counts before and after."""
    from .parallel.decompose import _ROW_TERMS
    label = np.full(info.n_atoms, -2, dtype=np.int64)
    n_lab = 0
    for g in info.groups:
        for k in range(g.n_copies):
            label[g.copies[k]] = n_lab
            n_lab += 1
    masters, cross = split_restraints(r, label, [g.master for g in info.groups])
    before = r.counts()
    parts = [cross]
    for mr, g in zip(masters, info.groups):
        for k in range(g.n_copies):
            parts.append(_mapped(mr, g.copies[k]))
    merged = {}
    for name in list(_ROW_TERMS) + [v for vs in _ROW_TERMS.values() for v in vs] + ["plane_sigma"]:
        merged[name] = np.concatenate([getattr(q, name) for q in parts])
    merged["plane_atoms"] = np.concatenate([q.plane_atoms for q in parts]).astype(np.int64)
    sizes = np.concatenate([np.diff(q.plane_start) for q in parts])
    merged["plane_start"] = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    for name in ("excl_pairs", "pair14"):
        pairs = getattr(r, name)
        if len(pairs):
            lab = label[pairs]
            keep = (lab[:, 0] != lab[:, 1]) | (lab[:, 0] == -2)
            new = [pairs[keep]]
            for mr, g in zip(masters, info.groups):
                for k in range(g.n_copies):
                    new.append(g.copies[k][getattr(mr, name)])
            merged[name] = np.sort(np.concatenate(new), axis=1)
    both = [getattr(q, "chir_both", None) for q in parts]
    for name, value in merged.items():
        setattr(r, name, value)
    if all(b is not None and len(b) == len(q.chir_idx) for b, q in zip(both, parts)):
        r.chir_both = np.concatenate(both)
    return {"before": before, "after": r.counts()}


def _mapped(mr: Restraints, atoms: np.ndarray) -> Restraints:
    """A master's terms (indices into the master) on the atoms of one copy."""
    from .parallel.decompose import _ROW_TERMS
    kept = {k: atoms[getattr(mr, k)] for k in _ROW_TERMS}
    kept["plane_atoms"] = atoms[mr.plane_atoms]
    out = dataclasses.replace(mr, **kept)
    both = getattr(mr, "chir_both", None)
    if both is not None:
        out.chir_both = both
    return out


def _share_terms(r: Restraints, owner: np.ndarray, part: int) -> Restraints:
    from .parallel.decompose import restraints_share
    return restraints_share(r, owner, part)


# ------------------------------------------------------------------------ constrained target

AVERAGE_MARGIN = 8.0        # A around the master's atoms covered by the averaged map
INTERFACE_MARGIN = 4.0      # A beyond the contact search radius for atoms at a copy interface


def interface_atoms(x: np.ndarray, label: np.ndarray, radius: float) -> np.ndarray:
    """Bool per atom: free atoms (label -2), and atoms with an atom of another copy (another
    label) within `radius` (and some a little farther: cells of radius / 2, two cells around).
    Per cell the smallest and largest label of its atoms, spread over the 5 x 5 x 5 cells around
    it; an atom whose label lies strictly inside that range, or differs from it, has another
    copy near. O(atoms + cells)."""
    from scipy import ndimage

    x = np.asarray(x, dtype=np.float64)
    label = np.asarray(label, dtype=np.int64)
    out = label == -2
    if len(x) == 0 or not np.isfinite(x).all():
        return np.ones(len(x), dtype=bool)
    cell = radius / 2.0
    from .parallel.halo import grid_cells

    ijk, dims = grid_cells(x, cell)
    flat = np.ravel_multi_index(tuple(ijk.T), dims)
    big = 1 << 40                  # beyond any label (ndimage's cval passes through a double)
    lo = np.full(int(np.prod(dims)), big, dtype=np.int64)
    hi = np.full(int(np.prod(dims)), -big, dtype=np.int64)
    np.minimum.at(lo, flat, label)
    np.maximum.at(hi, flat, label)
    lo = ndimage.minimum_filter(lo.reshape(dims), size=5, mode="constant", cval=big).ravel()
    hi = ndimage.maximum_filter(hi.reshape(dims), size=5, mode="constant", cval=-big).ravel()
    return out | (lo[flat] < label) | (hi[flat] > label)


class AveragedMap:
    """The map summed over the copies' fixed operators, sampled in the master's frame:
    avg(g) = sum_k rho(A_k g + b_k) at the points g of a grid around the master's atoms (the map's
    voxel size, or half of it with few operators; AVERAGE_MARGIN beyond the atoms), each rho(.)
    interpolated tricubically.

    Only the points within AVERAGE_MARGIN plus the interpolation's reach (2 sqrt(3) voxels, the
    far corner of a 4 x 4 x 4 stencil) of a master atom are summed (42 % of the box around the
    7cth asymmetric unit); the others hold the least value summed. So an atom reads only summed
    points until it has moved AVERAGE_MARGIN from where it was when the map was made, and beyond
    that it finds no false density, only the emptiest; averaged_map makes the map anew for a
    master that has moved more than half the margin.

    With the operators fixed, the fast target of every copy, -sum_k sum_i w_i rho(A_k x_i + b_k),
    is -sum_i w_i avg(x_i) for the master's atoms x_i (every copy's atoms weighted alike), and its
    gradient sum_k A_k^T grad rho is grad avg: so an evaluation interpolates one copy instead of
    every copy, and no copy carries a data gradient to reduce. The difference from the direct sum
    is the interpolation of the sampled sum (measured on the 7cth assembly in tests/test_ncs.py)."""

    def __init__(self, data, origin, voxel, rot, trans, master_xyz, key=None, ident=None, comm=None):
        from .core.density import summed_over_operators

        voxel = map_voxel = np.asarray(voxel, dtype=np.float64)
        reach = AVERAGE_MARGIN + 2.0 * math.sqrt(3.0) * float(np.max(voxel))
        lo = np.min(master_xyz, axis=0) - reach
        hi = np.max(master_xyz, axis=0) + reach
        points = float(np.prod(np.ceil((hi - lo) / voxel) + 1))
        # with few operators the sum is sampled at half the map's voxel: interpolating it again
        # then smooths its peaks much less (test_ncs: 5 copies refined to 0.2439 A against 0.2540
        # on the map's grid, 0.2425 from the direct sum), at no more than a sum over
        # OVERSAMPLE_OPERATORS operators on the map's grid
        if 8 * len(rot) <= OVERSAMPLE_OPERATORS and 8 * points <= OVERSAMPLE_POINTS:
            voxel = voxel / 2.0
        nx, ny, nz = (np.ceil((hi - lo) / voxel).astype(np.int64) + 1).tolist()
        self.origin = lo
        self.voxel = voxel
        self.map_voxel = map_voxel
        # one compiled pass per operator (60 operators, 16,667 master atoms: 10.4 s as numpy
        # planes through tricubic(), about a fifth of that compiled; the same sums to 1e-14)
        from .mapstats import atom_mask

        near = self.near = atom_mask(master_xyz, (nz, ny, nx), lo, voxel, reach)
        if comm is None or comm.Get_size() == 1:
            self.data = summed_over_operators(data, origin, map_voxel, rot, trans, lo, (nz, ny, nx), near,
                                              voxel)
        else:
            # the ranks of comm (which all make this map) sum every size-th operator each, and
            # one buffer Allreduce adds their parts
            from mpi4py import MPI
            part, size = comm.Get_rank(), comm.Get_size()
            self.data = summed_over_operators(data, origin, map_voxel, np.asarray(rot)[part::size],
                                              np.asarray(trans)[part::size], lo, (nz, ny, nx), near, voxel)
            comm.Allreduce(MPI.IN_PLACE, self.data, op=MPI.SUM)
        if near.any():
            self.data[~near] = self.data[near].min()
        # the map it was made from, kept so that `is` identifies it; a map named by ident (a
        # map store's key) is not kept, so the stored map's pages are let go
        self.source = data if ident is None else None
        self.key = key              # origin and operators it was made for (averaged_map)
        self.ident = ident
        self.master_xyz = np.array(master_xyz, dtype=np.float64)     # where its points were chosen

    @classmethod
    def blurred_from(cls, parent: "AveragedMap", b_extra: float, data, origin, voxel, rot, trans,
                     key=None, ident=None, scale: float | None = None) -> "AveragedMap | None":
        """The AveragedMap of map `data`, the map of `parent` blurred by exp(-b_extra s^2 / 4) and
        normalised again, made from parent's sum instead of summing `data` anew: a blur is
        isotropic, so the sum over rigid operators of the blurred map is the blurred sum, here
        transformed on parent's box. The normalisation's factor is fitted by least squares to
        the direct sum at up to BLUR_FIT_POINTS points within AVERAGE_MARGIN of the atoms; None
        when the fit misses them by more than BLUR_FIT_TOLERANCE (relative rms).

        scale: the factor, known (the ratio of the standard deviations of the raw map and of
        its blurred copy: halfset.HalfTransforms.blur_scale); then `data` is not read (may be
        None) and there is no fit, so the blur must not reach beyond the summed points from
        where atoms read: a blur wider than scaled_blur_fits allows raises ValueError."""
        import scipy.fft

        from .core.density import rfft_freqs, summed_over_operators
        from .mapstats import atom_mask

        if scale is not None and not scaled_blur_fits(b_extra, parent.map_voxel):
            raise ValueError(f"a blur of {b_extra:g} A^2 reaches beyond the summed map's points; "
                             f"its normalisation must be fitted")
        shape = parent.data.shape
        f = scipy.fft.rfftn(parent.data)
        for k in rfft_freqs(shape, parent.voxel):
            f *= np.exp(-0.25 * b_extra * k * k)
        blurred = scipy.fft.irfftn(f, s=shape)
        near = parent.near
        if scale is not None:
            return cls._blurred(parent, blurred, float(scale), data, key, ident, None)
        # the fit's points lie within AVERAGE_MARGIN of the atoms, where atoms read: the blur
        # smears the step to the constant beyond the summed points, farther out
        inside = np.flatnonzero(atom_mask(parent.master_xyz, shape, parent.origin, parent.voxel,
                                          AVERAGE_MARGIN).ravel())
        if len(inside) == 0:
            return None
        pick = inside[np.linspace(0, len(inside) - 1, min(len(inside), BLUR_FIT_POINTS)).astype(np.int64)]
        sample = np.zeros(shape, dtype=bool)
        sample.ravel()[pick] = True
        direct = summed_over_operators(data, origin, voxel, rot, trans, parent.origin, shape, sample,
                                       parent.voxel).ravel()[pick]
        got = blurred.ravel()[pick]
        scale = float(direct @ got) / max(float(got @ got), 1e-300)
        miss = math.sqrt(float(np.sum((direct - scale * got) ** 2)) / max(float(direct @ direct), 1e-300))
        if not miss < BLUR_FIT_TOLERANCE:
            log.debug("summed map blurred by %g A^2: fit misses by %.3f, summed anew", b_extra, miss)
            return None
        return cls._blurred(parent, blurred, scale, data, key, ident, miss)

    @classmethod
    def _blurred(cls, parent, blurred, scale, data, key, ident, miss) -> "AveragedMap":
        out = cls.__new__(cls)
        out.origin, out.voxel, out.near = parent.origin, parent.voxel, parent.near
        out.map_voxel = parent.map_voxel
        blurred *= scale
        blurred[~out.near] = blurred[out.near].min()
        out.data = blurred
        out.source = data if ident is None else None
        out.key, out.ident = key, ident
        out.master_xyz = parent.master_xyz
        out.fit_miss = miss
        return out


def scaled_blur_fits(b_extra: float, map_voxel) -> bool:
    """True when a blur of b_extra A^2 (a Gaussian of sigma sqrt(b / 8 pi^2) A per axis) stays,
    to SCALED_BLUR_REACH sigmas, within the points an AveragedMap of a map of voxel map_voxel
    sums beyond where its atoms read (the interpolation's reach, 2 sqrt(3) of the map's
    voxels): blurring the summed map then gives the sum of the blurred map there without a fit
    (AveragedMap.blurred_from's scale)."""
    sigma = math.sqrt(max(float(b_extra), 0.0) / (8.0 * math.pi ** 2))
    return SCALED_BLUR_REACH * sigma <= 2.0 * math.sqrt(3.0) * float(np.max(map_voxel))


OVERSAMPLE_OPERATORS = 60   # a summed map is sampled at half the map's voxel when 8 x its operators
OVERSAMPLE_POINTS = 1 << 23  # and 8 x its box's points are at most these (8 M points: 64 MB)
BLUR_FIT_POINTS = 4096      # points of a summed map blurred from its parent checked against the direct sum
BLUR_FIT_TOLERANCE = 0.05   # relative rms miss beyond which it is summed anew
SCALED_BLUR_REACH = 4.0     # sigmas of a blur that must stay within the summed points (no fit)
AVERAGED_KEEP = 4           # AveragedMaps kept: a half set's two blurs, or the final map's two
OPERATOR_TOLERANCE = 1e-9   # rotation elements and translations (A) that count as the same
_AVERAGED: list = []        # the AveragedMaps made last, reused while the map and operators stay


def term_average(term, rot, trans, master_xyz, comm=None) -> AveragedMap:
    """averaged_map of a fast real-space term's map (named by its map store's key when it has
    one); a term blurred from another (its blur_of: (that term, b_extra)) has its summed map
    blurred from that term's (AveragedMap.blurred_from), which is kept for the unblurred
    minimisations to come."""
    def ident(t):
        store = getattr(t, "store", None)
        return None if store is None else (id(store), t.key)
    base = getattr(term, "blur_of", None)
    scale = getattr(term, "blur_scale", None)
    if base is not None and scale is not None and ident(term) is not None:
        # a blurred copy known by its normalisation's factor (mapstore.ScaledBlur): its map is
        # not read
        return averaged_map(None, term.origin, term.voxel, rot, trans, master_xyz, ident(term),
                            (base[0].data, ident(base[0]), base[1], scale), comm)
    return averaged_map(term.data, term.origin, term.voxel, rot, trans, master_xyz, ident(term),
                        None if base is None else (base[0].data, ident(base[0]), base[1]), comm)


def averaged_map(data, origin, voxel, rot, trans, master_xyz, ident=None, base=None, comm=None
                 ) -> AveragedMap:
    """The AveragedMap of this map and these operators, made once for as long as the same map
    is used (the weight trials and the macro-cycles on one map share it; a half set's
    minimisations alternate between its map and its blurred copy, so a few are kept). The map
    is the same array, or, with ident, the map named ident (a map store's key: each use maps
    the file anew). The operators are the same when they agree to OPERATOR_TOLERANCE: each
    minimisation superposes them anew, and copies held at fixed operators superpose back to
    them only to rounding, so an exact match made a half-set task sum the map again for its
    second macro-cycle (a quarter of a constrained task's time)."""
    key = (np.array(origin, dtype=np.float64), np.array(rot, dtype=np.float64),
           np.array(trans, dtype=np.float64))            # copies: the caller's arrays may change
    found = None
    for got in _AVERAGED:
        same = got.ident == ident if ident is not None else got.source is data
        if same and _same_operators(got.key, key) and _covers(got, master_xyz):
            found = got
            break
    if comm is not None and comm.Get_size() > 1:
        from mpi4py import MPI
        # made collectively (the operators shared out): kept maps are used only when every
        # rank of comm has one
        flag = np.array([0 if found is None else 1], dtype=np.int32)
        comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.MIN)
        found = found if flag[0] else None
    if found is not None:
        _AVERAGED.remove(found)          # the least recently used are let go first
        _AVERAGED.append(found)
        return found
    avg = None
    if base is not None:            # (data, ident, b_extra[, scale]) of the map that data blurs
        parent = averaged_map(base[0], origin, voxel, rot, trans, master_xyz, base[1], comm=comm)
        avg = AveragedMap.blurred_from(parent, base[2], data, origin, voxel, rot, trans, key, ident,
                                       scale=base[3] if len(base) > 3 else None)
    if avg is None:
        avg = AveragedMap(data, origin, voxel, rot, trans, master_xyz, key, ident, comm)
    _AVERAGED.append(avg)
    del _AVERAGED[:-AVERAGED_KEEP]
    return avg


# the neighbour list of contacts between copies of the last ConstrainedTarget, for the next
# target of the same restraints, copies and share (the macro-cycles, weight trials and half-set
# tasks of one run). Building it searches the whole model (a million atoms: 16 % of a
# constrained worker's time when each target built its own); a kept list is refreshed around the
# atoms that moved, and dropped when an atom has moved too far for its interface atoms
# (ConstrainedTarget._interface_moved). NCS from assembly records expands the restraints anew
# for every minimisation: nothing is shared there.
_CROSS_LISTS = nonbonded.ListKeeper()


def _moved_beyond(xyz, reference, distance: float) -> bool:
    """True when some atom of xyz is more than distance from its position in reference (one
    compiled pass: checked at every evaluation over the whole model)."""
    return nonbonded.largest_move(xyz, reference) > distance


def _covers(avg: AveragedMap, master_xyz) -> bool:
    """True when no master atom has moved more than half of AVERAGE_MARGIN from where avg's
    points were chosen (a minimisation from there keeps the other half)."""
    return (np.shape(master_xyz) == avg.master_xyz.shape
            and not _moved_beyond(master_xyz, avg.master_xyz, AVERAGE_MARGIN / 2))


def _same_operators(a, b) -> bool:
    """(origin, rot, trans) of two AveragedMaps: the same grid origin and the same operators."""
    return (np.array_equal(a[0], b[0]) and a[1].shape == b[1].shape
            and np.allclose(a[1], b[1], rtol=0, atol=OPERATOR_TOLERANCE)
            and np.allclose(a[2], b[2], rtol=0, atol=OPERATOR_TOLERANCE))


class _SummedTarget:
    """f and gradient summed over the ranks of comm (None: one process): local(p) leaves this
    rank's part of the gradient and f in self._buf (the gradient, then f), which one buffer
    Allreduce sums. Needs comm, size, mine (the atoms of the rank's data term), _buf, n_evals,
    seconds_local, seconds_reduce (_share_over sets all but mine and _buf)."""

    def _share_over(self, comm, params, weight: float) -> None:
        self.comm = comm
        self.size = 1 if comm is None else comm.Get_size()
        self.part = 0 if comm is None else comm.Get_rank()
        self.weight = float(weight)
        self.nb_sigma = params.nonbonded_sigma
        self.nb_weight = params.nonbonded_weight
        self.n_evals = 0
        self.seconds_local = 0.0
        self.seconds_reduce = 0.0

    def __call__(self, p: np.ndarray) -> tuple[float, np.ndarray]:
        from .parallel.distributed import EVALUATION_TOTALS
        t0 = time.perf_counter()
        self.local(np.ascontiguousarray(p, dtype=np.float64))
        t1 = time.perf_counter()
        shared = self.comm is not None and self.size > 1
        if shared:
            from mpi4py import MPI
            self.comm.Allreduce(MPI.IN_PLACE, self._buf, op=MPI.SUM)
        t2 = time.perf_counter()
        self.seconds_local += t1 - t0
        self.seconds_reduce += t2 - t1
        self.n_evals += 1
        # the run report's per-rank figures (atom-evaluations: the atoms of this rank's data term)
        EVALUATION_TOTALS.add(t1 - t0, t2 - t1, len(self.mine), self._buf.nbytes if shared else 0, shared)
        return float(self._buf[-1]), self._buf[:-1].copy()


class ConstrainedTarget(_SummedTarget):
    """T(p) = weight * T_data(x) + sum_g K_g T_restraints(master_g) + T_cross(x), x = f(p),
    shared by the ranks of comm (None: one process does everything).

    Work of a rank: the data term of the copies it owns (copies dealt to ranks by size) and of its
    block of free atoms; its block of the masters' internal terms; the terms crossing copies and
    the non-bonded pairs whose first atom it owns. Each rank reduces its gradient to p; one
    buffer Allreduce sums p's gradient and f."""

    def __init__(self, par: NcsParametrisation, data_term, restraints: Restraints, params, weight: float,
                 comm=None):
        self.par = par
        self._share_over(comm, params, weight)
        n = par.n
        # ownership: copies by size to the least loaded rank, masters and free atoms by blocks
        load = np.zeros(self.size)
        owner = np.full(n, -1, dtype=np.int64)
        for gi, g in enumerate(par.info.groups):
            owner[g.master] = _blocks(len(g.master), self.size)
            load += np.bincount(owner[g.master], minlength=self.size)
        owner[par.free] = _blocks(len(par.free), self.size)
        load += np.bincount(owner[par.free], minlength=self.size)
        self.my_copies = []
        for c in sorted(range(len(par.copies)), key=lambda c: -len(par.copies[c][2])):
            r = int(np.argmin(load))
            owner[par.copies[c][2]] = r
            load[r] += len(par.copies[c][2])
            if r == self.part:
                self.my_copies.append(c)
        self.my_copies.sort()
        self.owner = owner
        self.mine = np.flatnonzero(owner == self.part)
        # data term: the fast real-space target on this rank's atoms, or any term on rank 0
        self.generic = not is_fast_term(data_term)
        self.data_term = data_term
        self.averaged = None
        if (not self.generic and par.fixed_operators and len(par.info.groups) == 1
                and getattr(params, "ncs_average_map", False)):
            # every copy's data term from the map summed over the fixed operators (AveragedMap):
            # this rank's master atoms against it, its free atoms against the map itself
            g = par.info.groups[0]
            w = np.asarray(data_term.atom_weight, dtype=np.float64)
            if all(np.array_equal(w[g.copies[k]], w[g.master]) for k in range(g.n_copies)):
                self.averaged = term_average(data_term, g.rot, g.trans, par.master_start[0], comm)
        if self.averaged is not None:
            self.mine = np.flatnonzero((owner == self.part) & (par.copy_id < 0))
        if not self.generic:
            self.atom_weight = np.ascontiguousarray(data_term.atom_weight[self.mine], dtype=np.float64)
        # restraints: per group the master's own terms (x K), and the crossing terms
        label = par.copy_id.copy()
        for gi, g in enumerate(par.info.groups):
            label[g.master] = -3 - gi          # each group's master its own label
        self.master_r = []
        masters, cross = split_restraints(restraints, label, [g.master for g in par.info.groups])
        for mr, g in zip(masters, par.info.groups):
            mo = owner[g.master]
            self.master_r.append((mr, _share_terms(mr, mo, self.part), mo == self.part, g.n_copies))
        self.cross = _share_terms(cross, owner, self.part)
        self.restraints = restraints
        self.label = label
        self.master_nbl = [None] * len(self.master_r)
        # the contacts between copies: the list of the last target of these restraints and
        # copies, when there is one (_CROSS_LISTS), else made at the first evaluation
        self.cross_nbl, self._interface_xyz = (_CROSS_LISTS.get(restraints, label, owner, self.part)
                                               or (None, None))
        self.cross_pairs = None
        self.touched_terms = restraint_atoms(self.cross)
        self.touched = self.touched_terms
        self._x = np.empty((n, 3))
        self._gx = np.zeros((n, 3))
        self._buf = np.zeros(par.size + 1)

    # -- non-bonded lists
    def _master_pairs(self, gi, xm):
        mr, _, owned, _ = self.master_r[gi]
        nbl = self.master_nbl[gi]
        if nbl is None:
            nbl = self.master_nbl[gi] = nonbonded.NeighbourList(xm, mr, owned=owned)
        else:
            nbl.refresh(xm)
        return nbl

    def _cross_pairs(self, x):
        nbl = self.cross_nbl
        if nbl is not None and self._interface_moved(x):
            nbl = None                     # an atom moved too far for the interface set: anew
        if nbl is None:
            # only pairs between atoms at an interface between copies (or free atoms) can cross
            # copies: the list is searched from those atoms only (interface_atoms)
            self._interface_xyz = np.array(x, dtype=np.float64)
            search = contact_reach(self.restraints)
            owned = (self.owner == self.part) & interface_atoms(x, self.label, search + INTERFACE_MARGIN)
            # a wide skin: this list spans the whole model, so rebuilds are what it costs. Only
            # pairs of two copies (or with a free atom) are listed: an interface atom's pairs
            # within its own copy, 28 of every 29 it has at a million atoms, are never written
            nbl = self.cross_nbl = nonbonded.NeighbourList(x, self.restraints, owned=owned,
                                                           cutoff_extra=CROSS_SKIN,
                                                           group=self._contact_groups())
            _CROSS_LISTS.keep(self.restraints, (self.label, self.owner, self.part), (nbl, self._interface_xyz))
        elif not nbl.refresh(x) and self.cross_pairs is not None:
            return self.cross_pairs
        from .parallel.decompose import PairShare
        self.cross_pairs = PairShare(i=nbl.i, j=nbl.j, kind=nbl.kind, radius=nbl.radius,
                                     hbond=nbl.hbond)
        self.touched = unique_sorted(np.concatenate([self.touched_terms, self.cross_pairs.i,
                                                     self.cross_pairs.j]).astype(np.int64))
        return self.cross_pairs

    def _contact_groups(self) -> np.ndarray:
        """The groups of the contact list: an atom's copy (each master its group's label), and
        every free atom a group of its own (free atoms meet every atom, each other included)."""
        group = self.label.copy()
        free = np.flatnonzero(group == -2)
        group[free] = -(1 << 40) - free
        return group

    def _interface_moved(self, x) -> bool:
        """True when some atom has moved more than INTERFACE_MARGIN / 2 since the interface
        atoms were found (so another atom may have come within reach of a copy)."""
        return _moved_beyond(x, self._interface_xyz, INTERFACE_MARGIN / 2)

    def local(self, p: np.ndarray) -> tuple[float, np.ndarray]:
        """This rank's part of f and of the gradient with respect to p."""
        par = self.par
        gp = self._buf[:-1]
        gp[:] = 0.0
        x = par.expand(p, out=self._x)
        gx = self._gx
        gx[:] = 0.0
        f = 0.0
        if self.generic:
            if self.part == 0:
                fd, gd = self.data_term.target(x)
                f += self.weight * fd
                gx += self.weight * gd
        elif self.averaged is not None:
            # master atoms against the summed map (every copy at once), free atoms against the map
            t, avg = self.data_term, self.averaged
            is_free = self.par.copy_id[self.mine] == -2
            for sel, (data, origin, voxel) in ((~is_free, (avg.data, avg.origin, avg.voxel)),
                                               (is_free, (t.data, t.origin, t.voxel))):
                if not sel.any():
                    continue
                atoms = self.mine[sel]
                gm = np.zeros((len(atoms), 3))
                f += real_space_target(data, origin, voxel, x[atoms], self.atom_weight[sel],
                                       grad_out=gm, scale=self.weight)[0]
                gx[atoms] = gm
        else:
            t = self.data_term
            gm = np.zeros((len(self.mine), 3))
            f += real_space_target(t.data, t.origin, t.voxel, x[self.mine], self.atom_weight,
                                   grad_out=gm, scale=self.weight)[0]
            gx[self.mine] = gm
        for gi, (mr, share, owned, k) in enumerate(self.master_r):
            xm = np.ascontiguousarray(par.group_master(p, gi))
            gmr = np.zeros_like(xm)
            fm = geometry.restraint_energy(xm, share, grad_out=gmr)[0]
            if self.nb_weight > 0:
                fm += nonbonded.repulsion(xm, self._master_pairs(gi, xm), sigma=self.nb_sigma,
                                          grad_out=gmr, weight=self.nb_weight)[0]
            f += k * fm
            gx[par.info.groups[gi].master] += k * gmr
        f += geometry.restraint_energy(x, self.cross, grad_out=gx)[0]
        if self.nb_weight > 0:
            f += nonbonded.repulsion(x, self._cross_pairs(x), sigma=self.nb_sigma, grad_out=gx,
                                     weight=self.nb_weight)[0]
        if self.generic and self.part == 0:
            dense = list(range(len(par.copies)))
        else:               # with the summed map no copy carries a data gradient
            dense = [] if self.averaged is not None else self.my_copies
        par.reduce(p, x, gx, gp, dense=dense, sparse=self.touched)
        self._buf[-1] = f
        return f, gp


GROUP_ROTATION_TOLERANCE = 1e-4     # rotation elements that count as the same in closed_group
GROUP_TRANSLATION_TOLERANCE = 1e-2  # A, the same for translations


def closed_group(rot: np.ndarray, trans: np.ndarray) -> bool:
    """True when the operators x -> rot[k] x + trans[k] form a group: T_k^-1 T_l is one of them
    for every k, l (the 60 operators of an icosahedral assembly; not the first few of them)."""
    rot = np.asarray(rot, dtype=np.float64)
    trans = np.asarray(trans, dtype=np.float64)
    kk = len(rot)
    flat = rot.reshape(kk, 9)
    for k in range(kk):
        # T_k^-1 T_l x = R_k^T R_l x + R_k^T (t_l - t_k), for every l at once
        comp_r = np.einsum("ji,ljm->lim", rot[k], rot).reshape(kk, 9)
        comp_t = (trans - trans[k]) @ rot[k]
        same = ((np.abs(comp_r[:, None, :] - flat[None]).max(axis=2) < GROUP_ROTATION_TOLERANCE)
                & (np.abs(comp_t[:, None, :] - trans[None]).max(axis=2) < GROUP_TRANSLATION_TOLERANCE))
        if not same.any(axis=1).all():
            return False
    return True


GROUP_MATCH = 0.05                  # rotation elements: a product of two operators is the operator
                                    # nearest to it when within this (group_table)


def group_table(rot: np.ndarray) -> np.ndarray | None:
    """The multiplication table of operators whose rotations form a group to within GROUP_MATCH
    (table[k, l] = m where R_k R_l ~ R_m, every row and column a permutation), else None. In a
    finite group of rigid motions no two elements share a rotation, so rotations name them."""
    rot = np.asarray(rot, dtype=np.float64)
    kk = len(rot)
    flat = rot.reshape(kk, 9)
    table = np.empty((kk, kk), dtype=np.int64)
    for k in range(kk):
        prod = np.einsum("ij,ljm->lim", rot[k], rot).reshape(kk, 9)
        d = np.abs(prod[:, None, :] - flat[None]).max(axis=2)
        m = d.argmin(axis=1)
        if d[np.arange(kk), m].max() > GROUP_MATCH:
            return None
        table[k] = m
    every = np.arange(kk)
    if not (np.all(np.sort(table, axis=1) == every) and np.all(np.sort(table, axis=0) == every[:, None])):
        return None
    return table


def exact_group(rot: np.ndarray, trans: np.ndarray, table: np.ndarray, iterations: int = 50
                ) -> tuple[np.ndarray, np.ndarray]:
    """Operators that form the group of `table` exactly, nearest the given approximate ones:
    M_g <- the rigid motion nearest mean_h M_h^-1 M_hg (4 x 4 matrices; the rotation part by
    polar decomposition), repeated to convergence. For operators off a group by a small error e
    one step leaves an error of the form a - Ad(g^-1) a (the mean of e), which a conjugation of
    the group by exp(-a) makes exact to first order: the steps converge quadratically."""
    kk = len(rot)
    m = np.zeros((kk, 4, 4))
    m[:, :3, :3], m[:, :3, 3], m[:, 3, 3] = rot, trans, 1.0
    for _ in range(iterations):
        inv = np.zeros_like(m)
        inv[:, :3, :3] = np.transpose(m[:, :3, :3], (0, 2, 1))
        inv[:, :3, 3] = -np.einsum("kji,kj->ki", m[:, :3, :3], m[:, :3, 3])
        inv[:, 3, 3] = 1.0
        mean = np.einsum("hij,hgjk->gik", inv, m[table]) / kk
        u, _, vt = np.linalg.svd(mean[:, :3, :3])
        new = mean.copy()
        new[:, :3, :3] = u @ vt
        new[:, 3, :3] = 0.0
        new[:, 3, 3] = 1.0
        change = float(np.abs(new - m).max())
        m = new
        if change < 1e-12:
            break
    return m[:, :3, :3].copy(), m[:, :3, 3].copy()


def operator_shift(xm: np.ndarray, rot_a, trans_a, rot_b, trans_b) -> np.ndarray:
    """Per operator the rms distance between the images of the points xm under a and under b."""
    xm = np.asarray(xm, dtype=np.float64)
    mean = xm.mean(axis=0)
    second = xm.T @ xm / len(xm)
    dr = np.asarray(rot_a) - np.asarray(rot_b)
    dt = np.asarray(trans_a) - np.asarray(trans_b)
    msd = (np.einsum("kij,jl,kil->k", dr, second, dr) + 2.0 * np.einsum("ki,kij,j->k", dt, dr, mean)
           + np.einsum("ki,ki->k", dt, dt))
    return np.sqrt(np.maximum(msd, 0.0))


def nearest_conjugate(xm: np.ndarray, rot, trans, rot_ref, trans_ref) -> tuple[np.ndarray, np.ndarray]:
    """The group (rot, trans) conjugated by the rigid motion Q that brings its operators nearest
    the reference ones (least squares over the copies' rms shifts, operator_shift): exact_group
    leaves the group's frame off by the mean error of the operators it started from."""
    from scipy.optimize import least_squares

    rot, trans = np.asarray(rot), np.asarray(trans)
    centre = xm.mean(axis=0)

    def conjugated(v):
        q = rotation(v[:3])
        qt = centre + v[3:] - q @ centre              # Q x = q (x - centre) + centre + v[3:]
        r = np.einsum("ij,kjl,ml->kim", q, rot, q)    # q R_k q^T
        t = np.einsum("ij,kj->ki", q, trans) + qt - np.einsum("kij,j->ki", r, qt)
        return r, t

    fit = least_squares(lambda v: operator_shift(xm, *conjugated(v), rot_ref, trans_ref),
                        np.zeros(6), x_scale=np.r_[np.full(3, 1e-3), np.full(3, 0.1)])
    return conjugated(fit.x)


def snap_to_group(info: NcsInfo, xyz: np.ndarray, restraints: Restraints, tolerance: float
                  ) -> tuple[NcsInfo | None, str]:
    """The copies of info (found in the model at xyz, its operators superposed there) with
    operators made an exact group and fixed, when the superposed ones form a group to within
    `tolerance` (the largest rms shift of a copy's atoms): (new info with closed = True, what
    was done) or (None, why not). Needs one NCS group, no free atoms and no restraint between
    copies (SymmetricTarget has none)."""
    if info.virtual or len(info.groups) != 1:
        return None, "not one group of copies in the model"
    g = info.groups[0]
    if g.n_copies < 2 or len(info.free_atoms()):
        return None, f"{len(info.free_atoms())} atoms outside the copies"
    table = group_table(g.rot)
    if table is None:
        return None, "the copies' operators are no group"
    rot, trans = exact_group(g.rot, g.trans, table)
    if not closed_group(rot, trans):
        return None, "the operators did not converge to a group"
    xm = copies_average(g, xyz)
    rot, trans = nearest_conjugate(xm, rot, trans, g.rot, g.trans)
    shift = operator_shift(xm, rot, trans, g.rot, g.trans)
    if shift.max() > tolerance:
        return None, (f"making the operators a group would move a copy by {shift.max():.2f} A rms "
                      f"(> ncs_group_tolerance {tolerance} A)")
    masters, cross = split_restraints(restraints, _copy_labels(g, info.n_atoms), [g.master])
    from .parallel.decompose import _ROW_TERMS
    n_cross = sum(len(getattr(cross, k)) for k in _ROW_TERMS) + int(np.count_nonzero(np.diff(cross.plane_start)))
    if n_cross:
        return None, f"{n_cross} restraint(s) between copies"
    # each copy's rmsd to the master's image under the exact operators
    rmsd = np.array([float(np.sqrt(np.mean(np.sum((xyz[g.copies[k]] - (xm @ rot[k].T + trans[k])) ** 2,
                                                   axis=1)))) for k in range(g.n_copies)])
    out = dataclasses.replace(info, groups=[dataclasses.replace(g, rot=rot, trans=trans, rmsd=rmsd)],
                              closed=True, master_terms=(restraints, masters[0]))
    why = (f"the {g.n_copies} operators found by superposition form a group: made exact and fixed "
           f"(copies moved by {shift.mean():.3f} A rms on average, {shift.max():.3f} A at most); "
           f"every copy is the master's image and the target is evaluated from the master and "
           f"the images of its atoms near it")
    out.notes = list(info.notes) + [why]
    return out, why


def master_restraints(info: NcsInfo, restraints: Restraints) -> Restraints:
    """The master's own terms (indices into the master) of a group made exact (snap_to_group)."""
    kept = info.master_terms
    if kept is not None and kept[0] is restraints:
        return kept[1]
    g = info.groups[0]
    return split_restraints(restraints, _copy_labels(g, info.n_atoms), [g.master])[0][0]


def _copy_labels(g: NcsGroup, n_atoms: int) -> np.ndarray:
    """The copy of every atom of a group that holds them all (split_restraints' labels)."""
    label = np.zeros(n_atoms, dtype=np.int64)
    for k in range(g.n_copies):
        label[g.copies[k]] = k
    return label


class _Reweighted:
    """A fast real-space term's map (and its store's key, and the term it blurs) with other atom
    weights: one copy's (a master), or the model's tiled over its virtual copies."""

    def __init__(self, term, atom_weight: np.ndarray):
        self.term = term
        self.origin, self.voxel = term.origin, term.voxel
        self.atom_weight = atom_weight
        self.store, self.key = getattr(term, "store", None), getattr(term, "key", None)
        self.blur_of = getattr(term, "blur_of", None)
        self.blur_scale = getattr(term, "blur_scale", None)

    @property
    def data(self):
        return self.term.data           # read when used: a ScaledBlur's map is made on reading


@njit(cache=True)
def _image_kernel(xm, rot, trans, op, src, out, offset):
    """out[offset + e] = rot[op[e]] @ xm[src[e]] + trans[op[e]]."""
    for e in range(op.shape[0]):
        a = rot[op[e]]
        b = trans[op[e]]
        s = src[e]
        for r in range(3):
            out[offset + e, r] = a[r, 0] * xm[s, 0] + a[r, 1] * xm[s, 1] + a[r, 2] * xm[s, 2] + b[r]


def image_contacts(x: np.ndarray, rot: np.ndarray, trans: np.ndarray, restraints: Restraints,
                   reach: float, owned=None):
    """The images of the atoms x under the operators (rot, trans: the group without the
    identity) that lie within reach + INTERFACE_MARGIN of an atom of x, and the neighbour list of
    their contacts with x: ((operator index, source atom) of each image, coordinates of x and
    the images, the list). Operators whose image of x's bounding sphere is farther are skipped,
    the rest searched with a k-d tree. Only pairs of an atom of x and an image are listed: the
    atoms (group 0, owned where `owned`) come first, so an image's pairs with other images
    (lower atom not owned) are never written."""
    from scipy.spatial import cKDTree

    n = len(x)
    far = reach + INTERFACE_MARGIN
    centre = x.mean(axis=0)
    radius = float(np.sqrt(np.max(np.sum((x - centre) ** 2, axis=1))))
    tree = cKDTree(x)
    ops, src = [], []
    for o in range(len(rot)):
        if np.linalg.norm(rot[o] @ centre + trans[o] - centre) > 2.0 * radius + far:
            continue
        dist, _ = tree.query(x @ rot[o].T + trans[o], distance_upper_bound=far)
        near = np.flatnonzero(np.isfinite(dist))
        ops.append(np.full(len(near), o, dtype=np.int64))
        src.append(near.astype(np.int64))
    op = np.concatenate(ops) if ops else np.zeros(0, dtype=np.int64)
    sr = np.concatenate(src) if src else np.zeros(0, dtype=np.int64)
    z = np.empty((n + len(op), 3))
    z[:n] = x
    _image_kernel(np.ascontiguousarray(x, dtype=np.float64), rot, trans, op, sr, z, n)
    own = np.ones(n, dtype=bool) if owned is None else np.asarray(owned, dtype=bool)
    nbl = _contact_list(z, restraints, np.r_[np.arange(n), sr], np.r_[np.zeros(n, dtype=np.int64), 1 + op],
                        np.r_[own, np.zeros(len(op), dtype=bool)])
    return (op, sr), z, nbl


def contact_reach(restraints: Restraints) -> float:
    """The search radius of contacts between copies: the largest contact distance plus CROSS_SKIN."""
    return 2.0 * float(np.max(restraints.vdw_radius, initial=0.0)) + CROSS_SKIN


def _contact_list(z, restraints: Restraints, source, group, owned=None) -> nonbonded.NeighbourList:
    """The contacts between groups of the atoms z, each the copy of model atom source[i]
    (radius and H-bond type from it; no exclusions: no bonded term crosses copies here)."""
    hb = restraints.hbond_type if len(restraints.hbond_type) else np.zeros(len(restraints.vdw_radius), dtype=np.int8)
    return nonbonded.NeighbourList(z, vdw_radius=restraints.vdw_radius[source],
                                   hbond_type=np.asarray(hb)[source], excl_pairs=np.zeros((0, 2)),
                                   pair14=np.zeros((0, 2)), owned=owned, group=group,
                                   cutoff_extra=CROSS_SKIN)


def clashes_between_copies(info: NcsInfo, xyz: np.ndarray, restraints: Restraints,
                           overlap: float = 0.4) -> int:
    """Pairs of atoms of different copies closer than their contact distance less `overlap`, in
    the whole assembly of an asymmetric unit xyz whose virtual copies the file's operators make
    (info.virtual): from its images near it when the operators form a group (K / 2 times the
    clashes of the asymmetric unit with its images), else from all the copies."""
    g = info.groups[0]
    xyz = np.ascontiguousarray(xyz, dtype=np.float64)
    if info.closed:
        _, z, nbl = image_contacts(xyz, np.ascontiguousarray(g.rot[1:]), np.ascontiguousarray(g.trans[1:]),
                                   restraints, contact_reach(restraints))
        return int(round(0.5 * g.n_copies * nonbonded.clashes(z, nbl, overlap)))
    full, every = expanded(info, xyz)
    nbl = _contact_list(full, restraints, every, np.repeat(np.arange(g.n_copies), len(xyz)))
    return nonbonded.clashes(full, nbl, overlap)


class SymmetricTarget(_SummedTarget):
    """The constrained target of an asymmetric unit whose virtual copies are made by a closed
    group of fixed operators (the file's assembly), in terms of the asymmetric unit alone:
    T(x) = weight * T_avg(x) + K (T_restraints(x) + T_repulsion within x) + (K / 2) S(x), with
    S(x) the repulsion between the asymmetric unit and its images g x under the other
    operators g. It is the whole assembly's target: the copies k < l meet as copy 0 meets
    T_k^-1 T_l, which runs over every other operator once for each k (closed_group), so the
    contacts between copies are K / 2 times S; and each atom's gradient is K times its side of
    S's pairs (the image side of a pair is the same pair seen from the other copy). Only the
    images of atoms within reach of the asymmetric unit are made (`mates`), so no evaluation
    touches the other copies' atoms: ConstrainedTarget made all K copies at every evaluation
    and searched their contacts over the whole assembly.

    Work of a rank of comm: its block of the atoms (data term, restraints whose first atom it
    owns, pairs whose first atom it owns); one buffer Allreduce of 3 n + 1 values."""

    def __init__(self, info: NcsInfo, data_term, restraints: Restraints, params, weight: float,
                 xyz0: np.ndarray, comm=None):
        g = info.groups[0]
        self.k = g.n_copies
        self.rot = np.ascontiguousarray(g.rot[1:], dtype=np.float64)       # rot[0]: the identity
        self.trans = np.ascontiguousarray(g.trans[1:], dtype=np.float64)
        self._share_over(comm, params, weight)
        n = self.n = len(xyz0)
        owner = _blocks(n, self.size)
        self.owned = owner == self.part
        self.mine = np.flatnonzero(self.owned)
        self.restraints = restraints
        self.share = _share_terms(restraints, owner, self.part)
        self.averaged = term_average(data_term, g.rot, g.trans, xyz0, comm)
        self.atom_weight = np.ascontiguousarray(np.asarray(data_term.atom_weight)[self.mine], dtype=np.float64)
        self.reach = contact_reach(restraints)
        self.master_nbl = None
        self.mates = None             # (operator index, source atom) of the images kept
        self.mate_nbl = None
        self._mates_xyz = None        # the atoms when the images were chosen
        self._z = None
        self._buf = np.zeros(3 * n + 1)

    def _choose_mates(self, x: np.ndarray) -> None:
        self.mates, self._z, self.mate_nbl = image_contacts(x, self.rot, self.trans, self.restraints,
                                                            self.reach, self.owned)
        self._mates_xyz = np.array(x, dtype=np.float64)

    def _mate_pairs(self, x: np.ndarray):
        if self.mates is None or _moved_beyond(x, self._mates_xyz, INTERFACE_MARGIN / 2):
            self._choose_mates(x)
        else:
            z = self._z
            z[:self.n] = x
            _image_kernel(x, self.rot, self.trans, self.mates[0], self.mates[1], z, self.n)
            self.mate_nbl.refresh(z)
        return self._z, self.mate_nbl

    def _master_pairs(self, x: np.ndarray) -> nonbonded.NeighbourList:
        if self.master_nbl is None:
            self.master_nbl = nonbonded.NeighbourList(x, self.restraints, owned=self.owned)
        else:
            self.master_nbl.refresh(x)
        return self.master_nbl

    def statistics(self, p: np.ndarray) -> dict:
        """GeometryTerm.statistics of the whole assembly at the asymmetric unit p (collective
        over comm), without making it: every copy is an exact image of the asymmetric unit and has
        its restraints, so each term deviates in every copy as in the asymmetric unit (the rms
        values and maxima are its own); the clashes are K times those within it plus K / 2 times
        those between it and its images (each contact of two copies is seen from both). Each
        rank counts its share (gather_statistics); the whole million-atom model's statistics
        took 4-5 s on every rank after each minimisation."""
        from mpi4py import MPI

        from .parallel.distributed import gather_statistics
        x = np.ascontiguousarray(p, dtype=np.float64).reshape(self.n, 3)
        comm = self.comm if self.comm is not None else MPI.COMM_SELF
        st = gather_statistics(comm, x, self.share, self._master_pairs(x))
        z, nbl = self._mate_pairs(x)
        between = np.array([float(nonbonded.clashes(z, nbl))])
        comm.Allreduce(MPI.IN_PLACE, between, op=MPI.SUM)
        st["clashes"] = int(round(self.k * st["clashes"] + 0.5 * self.k * between[0]))
        return st

    def local(self, p: np.ndarray) -> tuple[float, np.ndarray]:
        """This rank's part of f and of the gradient (3 n,)."""
        x = np.ascontiguousarray(p, dtype=np.float64).reshape(self.n, 3)
        g = self._buf[:-1].reshape(self.n, 3)
        g[:] = 0.0
        avg = self.averaged
        gm = np.zeros((len(self.mine), 3))
        f = real_space_target(avg.data, avg.origin, avg.voxel, x[self.mine], self.atom_weight,
                              grad_out=gm, scale=self.weight)[0]
        g[self.mine] = gm
        gr = np.zeros((self.n, 3))
        fr = geometry.restraint_energy(x, self.share, grad_out=gr)[0]
        if self.nb_weight > 0:
            fr += nonbonded.repulsion(x, self._master_pairs(x), sigma=self.nb_sigma, grad_out=gr,
                                      weight=self.nb_weight)[0]
            z, nbl = self._mate_pairs(x)
            gz = np.zeros_like(z)
            fs = nonbonded.repulsion(z, nbl, sigma=self.nb_sigma, grad_out=gz, weight=self.nb_weight)[0]
            f += 0.5 * self.k * fs
            gr += gz[:self.n]         # K / 2 of S's atom side and K / 2 of its image side: equal
        f += self.k * fr
        g += self.k * gr
        self._buf[-1] = f
        return f, self._buf[:-1]


def symmetric_applies(info: NcsInfo, data_term, params) -> bool:
    """True when SymmetricTarget can stand for ConstrainedTarget: one group of copies, virtual (an
    asymmetric unit and its file's operators) or in the model (snap_to_group), made by a closed
    group of fixed operators, the fast data term summed over the operators
    (params.ncs_average_map), the same atom weights in every copy."""
    if not is_fast_term(data_term):
        return False
    return symmetric_weights(info, data_term.atom_weight, params)


def is_fast_term(term) -> bool:
    """True for a fast real-space term (a map, its origin, voxel and atom weights), told without
    reading a map that is a property (mapstore.ScaledBlur's is made when read)."""
    return (all(hasattr(term, a) for a in ("origin", "voxel", "atom_weight"))
            and (isinstance(getattr(type(term), "data", None), property) or hasattr(term, "data")))


def symmetric_weights(info: NcsInfo, atom_weight, params) -> bool:
    """symmetric_applies for a fast real-space term of these atom weights."""
    if not (info.closed and len(info.groups) == 1 and len(info.free_atoms()) == 0
            and getattr(params, "ncs_average_map", False)):
        return False
    if info.virtual:
        return True
    w = np.asarray(atom_weight)       # copies in the model: the same weight in each
    g = info.groups[0]
    return bool(np.all(w[g.copies] == w[g.master][None]))


def _blocks(n: int, parts: int) -> np.ndarray:
    """Owner of each of n items cut into `parts` contiguous blocks."""
    return (np.arange(n, dtype=np.int64) * parts) // max(n, 1)


def virtual_copies(info: NcsInfo, xyz: np.ndarray) -> np.ndarray:
    """The model (an asymmetric unit, the master) and its virtual copies by the file's operators,
    copy after copy: (n_model x copies, 3)."""
    g = info.groups[0]
    return np.concatenate([xyz @ g.rot[c].T + g.trans[c] for c in range(g.n_copies)])


def expanded(info: NcsInfo, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(virtual_copies(info, xyz), the model atom of each of those coordinates)."""
    return virtual_copies(info, xyz), np.tile(np.arange(len(xyz)), info.groups[0].n_copies)


def constrained_minimise(info: NcsInfo, xyz0, data_term, restraints: Restraints, weight: float,
                         iterations: int, params, comm=None, fixed_operators: bool = False
                         ) -> tuple[MinimiseResult, ConstrainedTarget]:
    """L-BFGS over the NCS parameters from xyz0 (operators superposed at xyz0, masters the
    average of their copies); collective over comm. Returns the full coordinates x = f(p).
    fixed_operators: the operators stay at that superposition (only the masters and free atoms
    move), so with one NCS group the data term of every copy comes from the map summed over
    the operators (AveragedMap)."""
    xyz0 = np.ascontiguousarray(xyz0, dtype=np.float64)
    if symmetric_applies(info, data_term, params):
        # the asymmetric unit (the master) alone: no copy is made at any evaluation
        # (SymmetricTarget); copies in the model are put back as its images at the end
        g = info.groups[0]
        whole = not info.virtual
        xm = copies_average(g, xyz0) if whole else xyz0
        target = SymmetricTarget(info, _Reweighted(data_term, np.asarray(data_term.atom_weight)[g.master])
                                 if whole else data_term,
                                 master_restraints(info, restraints) if whole else restraints,
                                 params, weight, xm, comm)
        t0 = time.perf_counter()
        p, f, state, _ = lbfgs(target, xm.ravel().copy(), maxiter=iterations,
                               m=params.lbfgs_memory, max_step=params.max_step)
        x = p.reshape(xm.shape)
        if whole:
            x = np.empty_like(xyz0)
            x[g.copies.ravel()] = virtual_copies(info, p.reshape(xm.shape))
        seconds = time.perf_counter() - t0
        # the whole assembly's geometry from the asymmetric unit, which every rank has
        return MinimiseResult(xyz=x, f=f, iterations=state.iteration, evaluations=state.n_evals,
                              seconds=seconds, statistics=target.statistics(p)), target
    if info.virtual:
        # the model is the master; its virtual copies come from the file's operators
        k = info.groups[0].n_copies
        full = virtual_copies(info, xyz0)
        par = NcsParametrisation(info, full)
        data_term = _TiledData(data_term, k)
        restraints = expand_restraints(restraints, len(xyz0), k)
    else:
        full = xyz0
        par = NcsParametrisation(info.refit(xyz0), xyz0)
        par.fixed_operators = fixed_operators
    p0 = par.pack(full)
    target = ConstrainedTarget(par, data_term, restraints, params, weight, comm)
    t0 = time.perf_counter()
    p, f, state, _ = lbfgs(target, p0, maxiter=iterations, m=params.lbfgs_memory,
                           max_step=params.max_step)
    seconds = time.perf_counter() - t0
    x = par.expand(p)[:len(xyz0)]
    return MinimiseResult(xyz=x, f=f, iterations=state.iteration, evaluations=state.n_evals,
                          seconds=seconds), target


def _TiledData(term, n_copies: int) -> _Reweighted:
    """The fast real-space data term over the model's atoms and its virtual copies."""
    if not is_fast_term(term):
        raise InputError("NCS constraints from assembly records need the fast real-space "
                         "target (--target fast)")
    return _Reweighted(term, np.tile(term.atom_weight, n_copies))


class ConstrainedMinimiser:
    """Callable with engine.minimise's signature that refines under NCS constraints; run by every
    rank of ctx.world (ctx None: one process). The workers share each minimisation; the master
    waits without spinning and receives the result from the first worker."""

    TAG = 19

    def __init__(self, info: NcsInfo, ctx=None, interrupts=None):
        self.info = info
        self.ctx = ctx
        self.on_poll = interrupts.poll if interrupts is not None else None
        self.last_target = None

    @property
    def parameters(self) -> tuple[float, int]:
        """(share, operators): the refined atoms (masters and free atoms) as a share of the
        model's atoms, and the refined operator parameters (6 per copy; none when the operators
        are the file's, fixed)."""
        info = self.info
        if info.virtual:
            return 1.0, 0
        if info.closed:
            return info.groups[0].copies.shape[1] / info.n_atoms, 0
        n_master = sum(g.copies.shape[1] for g in info.groups)
        copies = sum(g.n_copies - 1 for g in info.groups)
        return (n_master + len(info.free_atoms())) / info.n_atoms, 6 * copies

    def expand_model(self, xyz):
        """(coordinates of every copy, model atom of each) when the model is an asymmetric unit
        whose copies are virtual (the file's operators), for maps of the whole assembly."""
        if not self.info.virtual:
            return xyz, np.arange(len(xyz))
        return expanded(self.info, xyz)

    def for_group(self, comm, base=None):
        """The minimiser of one group of ranks that share a minimisation on their own (a
        half-set task; comm None: one process), with the same constraints: every rank of comm
        calls it and gets the result."""
        info = self.info

        def group_minimise(xyz0, data_term, geom, weight, iterations, params) -> MinimiseResult:
            return constrained_minimise(info, xyz0, data_term, geom.r, weight, iterations, params,
                                        comm=comm, fixed_operators=params.halfset_fixed_operators)[0]
        return group_minimise

    def __call__(self, xyz0, data_term, geom, weight, iterations, params) -> MinimiseResult:
        ctx = self.ctx
        if ctx is None or ctx.size == 1:
            res, self.last_target = constrained_minimise(self.info, xyz0, data_term, geom.r, weight,
                                                         iterations, params)
            return res
        from mpi4py import MPI

        from .engine import result_buffer, result_from_buffer, result_to_buffer
        from .parallel.distributed import wait_quietly
        buf = result_buffer(xyz0.size)      # with the statistics when the workers made them
        if ctx.is_worker:
            res, self.last_target = constrained_minimise(self.info, xyz0, data_term, geom.r, weight,
                                                         iterations, params, comm=ctx.workers)
            if ctx.rank == 1:
                ctx.world.Send([result_to_buffer(res, buf), MPI.DOUBLE], dest=0, tag=self.TAG)
            return res
        req = ctx.world.Irecv([buf, MPI.DOUBLE], source=1, tag=self.TAG)
        wait_quietly(ctx.world, req, on_poll=self.on_poll)
        return result_from_buffer(buf, xyz0.shape)


# ------------------------------------------------------------------------- NCS restraints

class NcsRestraintTerm:
    """E = sum_groups sum_copies sum_atoms |R_k^T (x_k,i - t_k) - zbar_i|^2 / sigma^2, zbar_i the
    mean over copies; operators fixed (superposed when the term is made)."""

    def __init__(self, info: NcsInfo, xyz: np.ndarray, sigma: float):
        self.info = info.refit(xyz)
        self.k = 1.0 / (sigma * sigma)

    def _parts(self, xyz):
        for g in self.info.groups:
            z = np.stack([(xyz[g.copies[k]] - g.trans[k]) @ g.rot[k] for k in range(g.n_copies)])
            yield g, z - z.mean(axis=0)

    def target(self, xyz) -> tuple[float, np.ndarray]:
        grad = np.zeros_like(xyz)
        return self.accumulate(xyz, grad, None), grad

    def accumulate(self, xyz, grad_out, atoms: slice | None) -> float:
        """Energy of the atoms in `atoms` (all when None); their gradient added into grad_out."""
        f = 0.0
        for g, d in self._parts(xyz):
            for k in range(g.n_copies):
                idx = g.copies[k]
                dk = d[k]
                if atoms is not None:
                    sel = (idx >= atoms.start) & (idx < atoms.stop)
                    idx, dk = idx[sel], dk[sel]
                f += self.k * float(np.sum(dk * dk))
                grad_out[idx] += (2.0 * self.k) * (dk @ g.rot[k].T)
        return f


class _RestrainedData:
    """A data term whose block-restricted form (for the ranks of a distributed run) also carries
    the NCS restraint of the block's atoms, unscaled by the data weight. target() is the data
    term alone (reports and the weight's first guess use it)."""

    def __init__(self, inner, term: NcsRestraintTerm):
        self.inner = inner
        self.term = term
        self.atoms = None
        self.part = None

    def target(self, xyz):
        return self.inner.target(xyz)

    def blurred(self, b_extra):
        return _RestrainedData(self.inner.blurred(b_extra), self.term)

    def local(self, atoms: slice):
        from .parallel.distributed import _local_term
        out = _RestrainedData(self.inner, self.term)
        out.atoms = atoms
        out.part = _local_term(self.inner, atoms)
        return out

    def accumulate(self, xyz, grad_out, scale):
        return self.part.accumulate(xyz, grad_out, scale) + self.term.accumulate(xyz, grad_out, self.atoms)

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)


class _RestrainedGeometry:
    """A GeometryTerm with the NCS restraint added to its target (the one-process path)."""

    def __init__(self, geom, term: NcsRestraintTerm):
        self.geom = geom
        self.term = term

    def target(self, xyz):
        f, g = self.geom.target(xyz)
        fn, gn = self.term.target(xyz)
        return f + fn, g + gn

    def __getattr__(self, name):
        return getattr(self.__dict__["geom"], name)


class RestrainedMinimiser:
    """Wraps a minimiser (engine.minimise or parallel RankMinimiser): every call restrains the
    copies to their superposed average at the call's start."""

    def __init__(self, info: NcsInfo, inner, sigma: float):
        self.info = info
        self.inner = inner
        self.sigma = sigma

    def for_group(self, comm, base):
        """The same restraints around base, the minimiser of one group of ranks (a half-set
        task)."""
        return RestrainedMinimiser(self.info, base, self.sigma)

    def __call__(self, xyz0, data_term, geom, weight, iterations, params) -> MinimiseResult:
        term = NcsRestraintTerm(self.info, xyz0, self.sigma)
        return self.inner(xyz0, _RestrainedData(data_term, term), _RestrainedGeometry(geom, term),
                          weight, iterations, params)


# ---------------------------------------------------------------------------------- driver

def setup(model, restraints, params, minimiser, ctx=None, interrupts=None):
    """Find NCS in model, decide the mode from params.ncs, log the choice; returns
    (the minimiser to use, a report dict). restraints: a function giving the model's restraints,
    called only when NCS constraints over copies in the model need them (on every rank at once:
    the decision is the same everywhere, and the workers may receive them then,
    refine._restraints_to_workers); they are made the same in every copy
    (symmetrise_restraints, in place)."""
    requested = getattr(params, "ncs", "off")
    if requested == "off":
        log.info("NCS: off (requested)")
        return minimiser, {"mode": "off", "reason": "requested"}
    t0 = time.perf_counter()
    info = assembly_ncs(model) if requested == "constraints" else None
    if info is not None:
        log.info("NCS: the model is the asymmetric unit of assembly %s (%s): %d copies made by the "
                 "file's operators, fixed; data term and contacts over all copies%s",
                 info.assembly["name"], info.assembly["oligomeric_details"], info.groups[0].n_copies,
                 " (the operators form a group: the contacts between copies are evaluated from "
                 "the asymmetric unit and the images of its atoms near it)"
                 if getattr(params, "ncs_average_map", False) and info.closed else "")
    else:
        info = find_ncs(model)
    mode, why = choose_mode(info, requested)
    if info is not None:
        for line in describe(info):
            log.info(line)
    log.info("NCS mode: %s (search %.1f s)", why, time.perf_counter() - t0)
    report = {"mode": mode, "reason": why, "found": info.summary() if info is not None else None}
    if mode == "constraints":
        counts = {"before": 0, "after": 0}
        if not info.virtual:
            restraints = restraints()
            counts = symmetrise_restraints(restraints, info)
        if counts["before"] != counts["after"]:
            log.info("NCS constraints: every copy takes its master's restraints (%s before, %s after)",
                     counts["before"], counts["after"])
        if not info.virtual and getattr(params, "ncs_exact_group", False):
            t1 = time.perf_counter()
            snapped, why = snap_to_group(info, model.xyz, restraints, params.ncs_group_tolerance)
            log.info("NCS: %s (%.1f s)", why, time.perf_counter() - t1)
            report["exact_group"] = snapped is not None
            report["exact_group_reason"] = why
            info = snapped or info
        return ConstrainedMinimiser(info, ctx, interrupts), report
    if mode == "restraints":
        sigma = getattr(params, "ncs_sigma", 0.25)
        log.info("NCS restraints: copies pulled to their superposed average, sigma %.3f A", sigma)
        return RestrainedMinimiser(info, minimiser, sigma), report
    return minimiser, report


# ------------------------------------------------------------------------- building copies

def expand_by_operators(st, n_operators: int | None = None, chains=None):
    """A new gemmi Structure holding the chains of st's first model (all, or those named in
    chains) copied by the first n_operators operators of st's first assembly (all when None).
    Copy k (from 1) of chain X is named Xk, its subchains likewise; the entities are st's, with
    the copies' subchains."""
    import gemmi

    rot, trans = assembly_operators(st)
    if n_operators is not None:
        rot, trans = rot[:n_operators], trans[:n_operators]
    model = gemmi.Model("1")
    for k in range(len(rot)):
        tr = gemmi.Transform(gemmi.Mat33(rot[k].tolist()), gemmi.Vec3(*trans[k]))
        for ch in st[0]:
            if chains is not None and ch.name not in chains:
                continue
            c = ch.clone()
            c.name = f"{ch.name}{k + 1}"
            for res in c:
                res.subchain = f"{res.subchain}{k + 1}"
                for at in res:
                    at.pos = gemmi.Position(tr.apply(at.pos))
            model.add_chain(c)
    out = gemmi.Structure()
    out.name = st.name
    out.cell = gemmi.UnitCell()
    out.add_model(model)
    subchains = {res.subchain for ch in model for res in ch}
    for ent in st.entities:
        e = gemmi.Entity(ent.name)
        e.entity_type = ent.entity_type
        e.polymer_type = ent.polymer_type
        e.full_sequence = list(ent.full_sequence)
        e.subchains = [f"{s}{k + 1}" for k in range(len(rot)) for s in ent.subchains
                       if f"{s}{k + 1}" in subchains]
        if e.subchains:
            out.entities.append(e)
    return out
