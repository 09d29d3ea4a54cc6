"""Restraints of a model from a monomer library: build_restraints(model, lib) -> Restraints.

What is restrained
  * Inside each residue: the bonds, angles, chiral centres and planes of its monomer template,
    and its torsions that are chemistry rather than one conformation (see below). A restraint is
    dropped when it names a hydrogen (models are refined without H) or an atom the model lacks
    (e.g. a truncated side chain, or OP3 of a nucleotide inside a chain).
  * Between residues, by sequence and not by distance: two residues that follow each other in one
    chain's polymer (both model.res_is_polymer, label_seq differing by one; when label_seq is
    unknown (-1), adjacent in the file with author numbers at most one apart) are joined by the
    peptide link (TRANS; CIS when the model's omega is within 30 degrees of 0 and CA-CA is under
    3.3 A; PTRANS/PCIS, whose omega restraint allows both cis and trans, when
    the second residue's N is bonded to a CD, as in proline) or, for nucleotides, the
    phosphodiester link (p). A gap in label_seq means no link. The first residue of a chain has
    its N free (NH3); a residue with an OXT atom gets the C-terminal carboxylate (COO).
  * From distances, as other programs do: disulfides (SG-SG < 2.5 A), N-glycosylation (a sugar
    C1 within 2.0 A of ASN ND2) and glycosidic bonds (a sugar C1 within 2.0 A of O2/O3/O4/O6 of
    another sugar; O4 gives BETA1-4). A link that replaces a sugar's O1 keeps the template's
    chirality at C1 with the partner atom in O1's place.
  * Torsions: from the templates, those with 0 < sigma < 90 degrees and period >= 2 whose middle
    bond is not in a ring: side-chain chi angles (period 3, sigma 15; period 2, sigma 20 for
    aromatic chi2) and the like. Period-1 torsions of the CCP4 files (e.g. the nucleotide 'var_'
    ones, which record one conformation) and ring torsions (the ring's bonds, angles and
    chirality already fix it; a single ring torsion target would bias proline and sugar
    puckers) are left out, as are phi and psi. Peptide omega comes from the links.
  * Alternative conformations: each conformer of a residue (the atoms with altloc L plus those
    with none) is restrained on its own; atoms of different conformers are never restrained to
    each other. Non-bonded: pairs of atoms in different conformers (altloc A vs B) of one residue,
    and of different residues closer than ALTLOC_EXCLUSION_RANGE, are put in excl_pairs, so that
    the overlapping conformers do not repel each other.
  * Non-bonded: excl_pairs holds all 1-2 and 1-3 pairs of the bond graph (links included),
    pair14 the 1-4 pairs; vdw_radius and hbond_type come from the energy types (energy_types.cif).

Everything is vectorised per residue type: each template's restraints are index arrays that are
mapped onto all residues of that type at once through a (residues x template atoms) table of
global atom indices.

geometry_stats(xyz, restraints) reports rmsd and rmsZ of the restraint set in plain numpy,
independent of the refinement kernels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from .errors import InputError
from .modelio import Model
from .monlib import CHIRAL_SIGMA, LinkDef, MonomerLibrary, MonomerTemplate, resolve_monlib_dir
from .restraints import Restraints

log = logging.getLogger(__name__)

CIS_OMEGA_LIMIT = 30.0          # degrees: |omega| below this (and a short CA-CA) gives the CIS link
CIS_CA_CA_LIMIT = 3.3           # A: CA(i)-CA(i+1) is 2.9 A in a cis peptide, 3.8 A in a trans one
SS_CUTOFF = 2.5                 # A, SG-SG distance for a disulfide
GLYCO_CUTOFF = 2.0              # A, C1 to N/O distance for glycosylation and glycosidic links
ALTLOC_EXCLUSION_RANGE = 6.0    # A, atoms of different conformers of different residues within
                                # this range are excluded (within a residue: all of them)
TORSION_MAX_SIGMA = 90.0
MIN_PLANE_ATOMS = 4
SUGAR_OXYGENS = {"O4": "BETA1-4", "O2": "ALPHA1-2", "O3": "ALPHA1-3", "O6": "ALPHA1-6"}


# --------------------------------------------------------------------------------------------
# per-template restraint index arrays (heavy atoms only)

@dataclass
class _TemplateTerms:
    n_atoms: int
    bond_idx: np.ndarray
    bond_value: np.ndarray
    bond_esd: np.ndarray
    angle_idx: np.ndarray
    angle_value: np.ndarray
    angle_esd: np.ndarray
    tors_idx: np.ndarray
    tors_value: np.ndarray
    tors_esd: np.ndarray
    tors_period: np.ndarray
    chir_idx: np.ndarray
    chir_target: np.ndarray
    planes: list
    radius: np.ndarray          # per template atom
    hbond: np.ndarray
    pro_like: bool              # N bonded to CD: takes the PTRANS/PCIS link
    has_oxt: bool


def _ring_bonds(n: int, bonds: np.ndarray) -> set[frozenset]:
    """Bonds that lie in a ring: their ends stay connected when the bond is removed."""
    adj: list[set[int]] = [set() for _ in range(n)]
    for a, b in bonds:
        adj[a].add(b)
        adj[b].add(a)
    ring = set()
    for a, b in bonds:
        seen, todo = {a}, [a]
        found = False
        while todo and not found:
            u = todo.pop()
            for v in adj[u]:
                if u == a and v == b:
                    continue
                if v == b:
                    found = True
                    break
                if v not in seen:
                    seen.add(v)
                    todo.append(v)
        if found:
            ring.add(frozenset((int(a), int(b))))
    return ring


def _template_terms(t: MonomerTemplate, lib: MonomerLibrary) -> _TemplateTerms:
    heavy = ~t.is_hydrogen

    def keep(idx):
        return heavy[idx].all(axis=1) if len(idx) else np.zeros(0, dtype=bool)

    kb = keep(t.bond_idx)
    ka = keep(t.angle_idx)
    rings = _ring_bonds(len(t.atoms), t.bond_idx[kb])
    kt = keep(t.tors_idx) & (t.tors_esd > 0) & (t.tors_esd < TORSION_MAX_SIGMA) & (t.tors_period >= 2)
    for i in np.nonzero(kt)[0]:
        if frozenset((int(t.tors_idx[i, 1]), int(t.tors_idx[i, 2]))) in rings:
            kt[i] = False
    kc = keep(t.chir_idx) & (t.chir_sign != 0)
    planes = []
    for atoms, esd in t.planes:
        h = heavy[atoms]
        if h.sum() >= MIN_PLANE_ATOMS:
            planes.append((atoms[h], esd[h]))
    radius = np.empty(len(t.atoms))
    hbond = np.empty(len(t.atoms), dtype=np.int64)
    for i, (ty, el, name) in enumerate(zip(t.type_energy, t.element, t.atoms)):
        radius[i], hbond[i] = lib.energy.lookup(ty, el)
        hbond[i] = lib.energy.overrides.get((t.code, name), hbond[i])
    return _TemplateTerms(
        n_atoms=len(t.atoms),
        bond_idx=t.bond_idx[kb], bond_value=t.bond_value[kb], bond_esd=t.bond_esd[kb],
        angle_idx=t.angle_idx[ka], angle_value=t.angle_value[ka], angle_esd=t.angle_esd[ka],
        tors_idx=t.tors_idx[kt], tors_value=t.tors_value[kt], tors_esd=t.tors_esd[kt],
        tors_period=t.tors_period[kt],
        chir_idx=t.chir_idx[kc], chir_target=(t.chir_sign * t.chir_volume)[kc],
        planes=planes, radius=radius, hbond=hbond,
        pro_like=t.has_bond("N", "CD"), has_oxt="OXT" in t.index)


# --------------------------------------------------------------------------------------------
# collecting restraints

@dataclass
class _Terms:
    """Restraint rows as lists of arrays; `multi` marks rows that may be duplicated (conformers)."""

    idx: list = field(default_factory=list)
    cols: list = field(default_factory=list)     # tuples of value arrays
    multi: list = field(default_factory=list)

    def add(self, idx, cols, multi):
        if len(idx):
            self.idx.append(np.asarray(idx, dtype=np.int64))
            self.cols.append(tuple(np.asarray(c) for c in cols))
            self.multi.append(np.broadcast_to(np.asarray(multi, dtype=bool), (len(idx),)))

    def finish(self, width, ncols, canon):
        if not self.idx:
            return np.zeros((0, width), dtype=np.int64), [np.zeros(0) for _ in range(ncols)]
        idx = np.concatenate(self.idx)
        cols = [np.concatenate([c[k] for c in self.cols]) for k in range(ncols)]
        multi = np.concatenate(self.multi)
        if multi.any():
            # the same restraint reached from two conformers of one residue: keep it once
            sub = np.nonzero(multi)[0]
            _, first = np.unique(canon(idx[sub]), axis=0, return_index=True)
            keep = np.ones(len(idx), dtype=bool)
            keep[sub] = False
            keep[sub[first]] = True
            idx = idx[keep]
            cols = [c[keep] for c in cols]
        return idx, cols


def _canon_bond(x):
    return np.sort(x, axis=1)


def _canon_angle(x):
    out = x.copy()
    swap = x[:, 0] > x[:, 2]
    out[swap, 0], out[swap, 2] = x[swap, 2], x[swap, 0]
    return out


def _canon_tors(x):
    out = x.copy()
    swap = x[:, 0] > x[:, 3]
    out[swap] = x[swap, ::-1]
    return out


def _canon_same(x):
    return x


class _Builder:
    """State of one build_restraints call."""

    def __init__(self, model: Model, lib: MonomerLibrary):
        self.m = model
        self.lib = lib
        self.bonds, self.angles, self.tors, self.chirs = _Terms(), _Terms(), _Terms(), _Terms()
        self.plane_rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]] = []  # atoms, sigma, sizes, multi
        self.link_counts: dict[str, int] = {}
        self._named: dict[str, np.ndarray] = {}

    # ---------------------------------------------------------------- residue types and atoms
    def setup(self):
        m = self.m
        self.type_codes, self.res_type = np.unique(m.res_names, return_inverse=True)
        self.res_type = self.res_type.astype(np.int64)
        codes = [str(c) for c in self.type_codes]
        need = [c for c in codes if c not in self.lib]
        if need:
            _, first = np.unique(m.res_names, return_index=True)
            examples = {str(m.res_names[r]): m.residue_label(r) for r in first}
            self.lib.load(need, (), examples)
        self.templates = [self.lib[c] for c in codes]
        self.terms = [_template_terms(t, self.lib) for t in self.templates]
        self.kind = np.array([t.kind for t in self.templates])
        self.name_codes, name_id = np.unique(m.atom_name, return_inverse=True)
        self.name_id = name_id.astype(np.int64)
        self.name_index = {str(n): i for i, n in enumerate(self.name_codes)}
        atom_type = self.res_type[m.res_index]
        nn = len(self.name_codes)
        names = [str(x) for x in self.name_codes]
        table = np.array([t.index.get(x, -1) for t in self.templates for x in names], dtype=np.int64)
        self.atom_tidx = table[atom_type * nn + self.name_id]
        # OXT of a peptide is described by the C-terminal modification (COO), not the template
        kind_atom = self.kind[atom_type]
        unknown = np.nonzero((self.atom_tidx < 0) & ~((m.atom_name == "OXT") & (kind_atom == "peptide")))[0]
        if len(unknown):
            ex = ", ".join(f"{m.residue_label(m.res_index[i])} {m.atom_name[i]}" for i in unknown[:8])
            log.warning("%d atom(s) have names that their residue's dictionary does not know, and get "
                        "no restraints except non-bonded ones: %s%s", len(unknown), ex,
                        " ..." if len(unknown) > 8 else "")
        self.n_unknown_atoms = len(unknown)

    # ---------------------------------------------------------------- conformer instances
    def instances(self):
        """Instance = one conformer of one residue. Instance r (< nres) is residue r's first
        conformer; further conformers are numbered from nres on."""
        m = self.m
        nres, n = m.n_residues, m.n_atoms
        first = m.res_first_atom
        alt = m.altloc
        self.home = m.res_index.copy()          # the instance each atom is listed under first
        inst_res = list(range(nres))
        self.inst_alt = [""] * nres
        extra_pa, extra_pi = [], []
        alt_res = np.unique(m.res_index[alt != ""])
        for r in alt_res.tolist():
            s, e = first[r], first[r + 1]
            a = alt[s:e]
            letters = sorted(set(a.tolist()) - {""})
            self.inst_alt[r] = letters[0]
            blank = np.nonzero(a == "")[0] + s
            for letter in letters[1:]:
                iid = len(inst_res)
                inst_res.append(r)
                self.inst_alt.append(letter)
                self.home[np.nonzero(a == letter)[0] + s] = iid
                extra_pa.append(blank)            # atoms without altloc belong to every conformer
                extra_pi.append(np.full(len(blank), iid, dtype=np.int64))
        self.inst_res = np.array(inst_res, dtype=np.int64)
        self.n_inst = len(self.inst_res)
        self.inst_multi = np.zeros(self.n_inst, dtype=bool)
        self.inst_multi[alt_res] = True
        self.inst_multi[nres:] = True
        self.res_insts = {r: [r] for r in alt_res.tolist()}
        for iid in range(nres, self.n_inst):
            self.res_insts[int(self.inst_res[iid])].append(iid)
        self.pair_atom = np.concatenate([np.arange(n, dtype=np.int64)] + extra_pa)
        self.pair_inst = np.concatenate([self.home] + extra_pi)
        self.inst_type = self.res_type[self.inst_res]

    def named(self, name: str) -> np.ndarray:
        """Global index of the atom called `name` in every instance (-1 where absent)."""
        out = self._named.get(name)
        if out is None:
            out = np.full(self.n_inst, -1, dtype=np.int64)
            nid = self.name_index.get(name)
            if nid is not None:
                sel = self.name_id[self.pair_atom] == nid
                out[self.pair_inst[sel]] = self.pair_atom[sel]
            self._named[name] = out
        return out

    # ---------------------------------------------------------------- intra-residue restraints
    def intra(self):
        n_types = len(self.templates)
        self.slots = []
        inst_type = self.inst_type
        order = np.argsort(inst_type, kind="stable")
        bounds = np.searchsorted(inst_type[order], np.arange(n_types + 1))
        inst_row = np.empty(self.n_inst, dtype=np.int64)
        k = np.array([t.n_atoms for t in self.terms], dtype=np.int64)
        counts = np.diff(bounds)
        offset = np.concatenate([[0], np.cumsum(counts * k)])
        for t in range(n_types):
            inst_row[order[bounds[t]:bounds[t + 1]]] = np.arange(counts[t])
        flat = np.full(int(offset[-1]), -1, dtype=np.int64)
        pa, pi = self.pair_atom, self.pair_inst
        tid = self.atom_tidx[pa]
        ok = tid >= 0
        pa, pi, tid = pa[ok], pi[ok], tid[ok]
        ty = inst_type[pi]
        pos = offset[ty] + inst_row[pi] * k[ty] + tid
        flat[pos] = pa
        n_dup = int(np.count_nonzero(np.bincount(pos, minlength=len(flat)) > 1))
        if n_dup:
            log.warning("%d atom(s) repeat a name within one residue (and conformer); only the last "
                        "of each is restrained", n_dup)
        for t in range(n_types):
            insts = order[bounds[t]:bounds[t + 1]]
            slot = flat[offset[t]:offset[t + 1]].reshape(len(insts), k[t])
            self.slots.append((insts, slot))
            if len(insts) == 0:
                continue
            multi = self.inst_multi[insts]
            tt = self.terms[t]
            self._map(self.bonds, slot, multi, tt.bond_idx, (tt.bond_value, tt.bond_esd))
            self._map(self.angles, slot, multi, tt.angle_idx, (tt.angle_value, tt.angle_esd))
            self._map(self.tors, slot, multi, tt.tors_idx, (tt.tors_value, tt.tors_esd, tt.tors_period))
            self._map(self.chirs, slot, multi, tt.chir_idx,
                      (tt.chir_target, np.full(len(tt.chir_idx), CHIRAL_SIGMA)))
            for atoms, esd in tt.planes:
                g = slot[:, atoms]                       # (instances, plane atoms)
                present = g >= 0
                size = present.sum(axis=1)
                use = size >= MIN_PLANE_ATOMS
                if not use.any():
                    continue
                gp, pp = g[use], present[use]
                sig = np.broadcast_to(esd, gp.shape)[pp]
                self.plane_rows.append((gp[pp], sig, size[use], multi[use]))

    @staticmethod
    def _map(terms: _Terms, slot, multi, tidx, cols):
        if len(tidx) == 0:
            return
        g = slot[:, tidx]                                # (instances, terms, width)
        ok = (g >= 0).all(axis=2)
        nrow = slot.shape[0]
        terms.add(g[ok], [np.broadcast_to(c, (nrow, len(c)))[ok] for c in cols],
                  np.broadcast_to(multi[:, None], ok.shape)[ok])

    # ---------------------------------------------------------------- links
    def apply_link(self, link: LinkDef, inst1: np.ndarray, inst2: np.ndarray | None):
        """Add the restraints of `link` for instance pairs (inst1[i], inst2[i])."""
        if len(inst1) == 0:
            return
        inst2 = inst1 if inst2 is None else inst2
        multi = self.inst_multi[inst1] | self.inst_multi[inst2]
        self.link_counts[link.id] = self.link_counts.get(link.id, 0) + len(inst1)

        def atoms(specs):
            cols = [self.named(name)[inst1 if res == 1 else inst2] for name, res in specs]
            return np.stack(cols, axis=1)

        def add(terms, specs_list, values):
            if not specs_list:
                return
            idx = np.stack([atoms(s) for s in specs_list], axis=1)   # (pairs, terms, width)
            ok = (idx >= 0).all(axis=2)
            n = len(inst1)
            terms.add(idx[ok], [np.broadcast_to(np.asarray(v), (n, len(v)))[ok] for v in values],
                      np.broadcast_to(multi[:, None], ok.shape)[ok])

        add(self.bonds, [b[:2] for b in link.bonds],
            [[b[2] for b in link.bonds], [b[3] for b in link.bonds]])
        add(self.angles, [a[:3] for a in link.angles],
            [[a[3] for a in link.angles], [a[4] for a in link.angles]])
        add(self.tors, [t[:4] for t in link.torsions],
            [[t[4] for t in link.torsions], [t[5] for t in link.torsions], [t[6] for t in link.torsions]])
        for plane in link.planes.values():
            idx = atoms([p[0] for p in plane])
            present = idx >= 0
            size = present.sum(axis=1)
            use = size >= MIN_PLANE_ATOMS
            if use.any():
                sig = np.broadcast_to(np.array([p[1] for p in plane]), idx.shape)
                self.plane_rows.append((idx[use][present[use]], sig[use][present[use]], size[use], multi[use]))
        for (lname, lres), partner in link.leaving:
            self._leaving_chirality(lname, lres, partner, inst1, inst2, multi)

    def _leaving_chirality(self, lname, lres, partner, inst1, inst2, multi):
        """Chiral centres of residue `lres` naming the leaving atom, with the partner atom instead."""
        side = inst1 if lres == 1 else inst2
        types = self.inst_type[side]
        for t in np.unique(types).tolist():
            tmpl = self.templates[t]
            li = tmpl.index.get(lname)
            if li is None:
                continue
            sel = types == t
            heavy = ~tmpl.is_hydrogen
            for row in range(len(tmpl.chir_idx)):
                c = tmpl.chir_idx[row]
                if tmpl.chir_sign[row] == 0 or li not in c[1:].tolist():
                    continue
                if not heavy[[a for a in c if a != li]].all():
                    continue
                specs = [(partner if a == li else (tmpl.atoms[a], lres)) for a in c.tolist()]
                i1, i2 = inst1[sel], inst2[sel]
                idx = np.stack([self.named(nm)[i1 if rs == 1 else i2] for nm, rs in specs], axis=1)
                ok = (idx >= 0).all(axis=1)
                target = tmpl.chir_sign[row] * tmpl.chir_volume[row]
                self.chirs.add(idx[ok], [np.full(ok.sum(), target), np.full(ok.sum(), CHIRAL_SIGMA)],
                               multi[sel][ok])

    def _instance_pairs(self, r1: np.ndarray, r2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Conformer pairs for residue pairs: the same altloc, or any conformer of one residue
        with a residue that has no conformer of that altloc."""
        simple = ~(self.inst_multi[r1] | self.inst_multi[r2])
        i1, i2 = [r1[simple]], [r2[simple]]
        for a, b in zip(r1[~simple].tolist(), r2[~simple].tolist()):
            ia, ib = self.res_insts.get(a, [a]), self.res_insts.get(b, [b])
            la = {self.inst_alt[x] for x in ia}
            lb = {self.inst_alt[y] for y in ib}
            for x in ia:
                for y in ib:
                    lx, ly = self.inst_alt[x], self.inst_alt[y]
                    if lx == ly or lx not in lb or ly not in la:
                        i1.append(np.array([x]))
                        i2.append(np.array([y]))
        return np.concatenate(i1).astype(np.int64), np.concatenate(i2).astype(np.int64)

    def sequence_links(self):
        m = self.m
        nres = m.n_residues
        if nres < 2:
            return
        r = np.arange(nres - 1)
        ls = m.res_label_seq
        same = (m.res_chain[r] == m.res_chain[r + 1]) & m.res_is_polymer[r] & m.res_is_polymer[r + 1]
        consec = (ls[r] >= 0) & (ls[r + 1] - ls[r] == 1)
        unknown = np.nonzero(same & (ls[r] < 0) & (ls[r + 1] < 0))[0]
        if len(unknown):     # no label_seq: adjacent in the file, author numbers at most 1 apart
            num = np.array([[_seqnum(m.res_seqid[q]), _seqnum(m.res_seqid[q + 1])] for q in unknown.tolist()],
                           dtype=np.int64).reshape(-1, 2)
            step = num[:, 1] - num[:, 0]
            consec[unknown] = (step >= 0) & (step <= 1)
        cand = r[same & consec]
        k1, k2 = self.kind[self.res_type[cand]], self.kind[self.res_type[cand + 1]]
        pep = (k1 == "peptide") & (k2 == "peptide")
        nuc = (k1 == "nucleic") & (k2 == "nucleic")
        other = ~(pep | nuc)
        if other.any():   # residues whose dictionary group says neither: decide by their atoms
            o1, o2 = cand[other], cand[other] + 1
            by_pep = (self.named("C")[o1] >= 0) & (self.named("N")[o2] >= 0)
            by_nuc = (self.named("O3'")[o1] >= 0) & (self.named("P")[o2] >= 0)
            pep[np.nonzero(other)[0][by_pep]] = True
            nuc[np.nonzero(other)[0][by_nuc & ~by_pep]] = True
        self.n_unlinked_polymer_pairs = int((~(pep | nuc)).sum())
        # peptides
        i1, i2 = self._instance_pairs(cand[pep], cand[pep] + 1)
        if len(i1):
            omega = _dihedral(m.xyz, self.named("CA")[i1], self.named("C")[i1], self.named("N")[i2],
                              self.named("CA")[i2])
            ca_ca = np.linalg.norm(m.xyz[self.named("CA")[i1]] - m.xyz[self.named("CA")[i2]], axis=1)
            pro = np.array([t.pro_like for t in self.terms], dtype=bool)[self.inst_type[i2]]
            # A non-proline cis peptide is rare: it needs both a cis omega and a short CA-CA (2.9 A
            # against 3.8 A trans) in the input. Into proline, the omega restraint has period 2
            # (PTRANS/PCIS), so the map decides; the link only sets which minimum is nearer.
            cis = np.where(pro, np.abs(omega) < 90.0,
                           (np.abs(omega) < CIS_OMEGA_LIMIT) & (ca_ca < CIS_CA_CA_LIMIT))  # nan -> trans
            for name, sel in (("TRANS", ~cis & ~pro), ("CIS", cis & ~pro),
                              ("PTRANS", ~cis & pro), ("PCIS", cis & pro)):
                self.apply_link(self.lib.links[name], i1[sel], i2[sel])
        self.peptide_pairs = cand[pep]
        # nucleic acids
        i1, i2 = self._instance_pairs(cand[nuc], cand[nuc] + 1)
        self.apply_link(self.lib.links["p"], i1, i2)
        self.nucleic_pairs = cand[nuc]

    def distance_links(self):
        m = self.m
        kind_atom = self.kind[self.res_type[m.res_index]]
        names = m.atom_name
        # disulfides
        sg = np.nonzero((names == "SG") & (kind_atom == "peptide"))[0]
        self._close_pairs(sg, sg, SS_CUTOFF, self.lib.links["SS"], symmetric=True)
        # N-glycosylation: ASN ND2 (res 1) - sugar C1 (res 2)
        c1 = np.nonzero((names == "C1") & (kind_atom == "sugar"))[0]
        nd2 = np.nonzero((names == "ND2") & (m.res_name == "ASN"))[0]
        self._close_pairs(nd2, c1, GLYCO_CUTOFF, self.lib.links["NAG-ASN"])
        # glycosidic: sugar O2/O3/O4/O6 (res 1) - sugar C1 (res 2)
        for oname, link in SUGAR_OXYGENS.items():
            o = np.nonzero((names == oname) & (kind_atom == "sugar"))[0]
            self._close_pairs(o, c1, GLYCO_CUTOFF, self.lib.links[link])

    def _close_pairs(self, a: np.ndarray, b: np.ndarray, cutoff: float, link: LinkDef, symmetric=False):
        if len(a) == 0 or len(b) == 0:
            return
        xyz, m = self.m.xyz, self.m
        if symmetric:
            pairs = cKDTree(xyz[a]).query_pairs(cutoff, output_type="ndarray")
            ia, ib = a[pairs[:, 0]], a[pairs[:, 1]]
        else:
            hits = cKDTree(xyz[b]).query_ball_point(xyz[a], cutoff)
            ia = np.repeat(a, [len(h) for h in hits])
            ib = b[np.concatenate([np.asarray(h, dtype=np.int64) for h in hits])] if len(ia) else b[:0]
        if len(ia) == 0:
            return
        alt = m.altloc
        ok = (m.res_index[ia] != m.res_index[ib]) & ((alt[ia] == alt[ib]) | (alt[ia] == "") | (alt[ib] == ""))
        ia, ib = ia[ok], ib[ok]
        self.apply_link(link, self.home[ia], self.home[ib])

    def termini(self):
        """COO on every peptide residue that has an OXT its template does not describe."""
        oxt = self.named("OXT")
        pep = self.kind[self.inst_type] == "peptide"
        has_oxt_t = np.array([t.has_oxt for t in self.terms], dtype=bool)[self.inst_type]
        inst = np.nonzero((oxt >= 0) & pep & ~has_oxt_t)[0]
        self.apply_link(self.lib.links["COO"], inst, None)

    # ---------------------------------------------------------------- assembly
    def finish(self) -> Restraints:
        m = self.m
        r = Restraints()
        r.bond_idx, (r.bond_target, r.bond_sigma) = self.bonds.finish(2, 2, _canon_bond)
        r.angle_idx, (r.angle_target, r.angle_sigma) = self.angles.finish(3, 2, _canon_angle)
        r.tors_idx, (r.tors_target, r.tors_sigma, tp) = self.tors.finish(4, 3, _canon_tors)
        r.tors_period = tp.astype(np.int64)
        r.chir_idx, (r.chir_target, r.chir_sigma) = self.chirs.finish(4, 2, _canon_same)
        r.plane_atoms, r.plane_sigma, r.plane_start = self._planes()
        r.vdw_radius, r.hbond_type = self._nonbond_types()
        r.excl_pairs, r.pair14 = _exclusions(m.n_atoms, r.bond_idx, self._altloc_exclusions())
        for name in ("bond_target", "bond_sigma", "angle_target", "angle_sigma", "tors_target",
                     "tors_sigma", "chir_target", "chir_sigma", "plane_sigma"):
            setattr(r, name, np.ascontiguousarray(getattr(r, name), dtype=np.float64))
        return r

    def _planes(self):
        if not self.plane_rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(1, dtype=np.int64)
        atoms = np.concatenate([p[0] for p in self.plane_rows]).astype(np.int64)
        sigma = np.concatenate([p[1] for p in self.plane_rows]).astype(np.float64)
        sizes = np.concatenate([p[2] for p in self.plane_rows]).astype(np.int64)
        multi = np.concatenate([p[3] for p in self.plane_rows])
        start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if multi.any():
            seen, keep = set(), np.ones(len(sizes), dtype=bool)
            for p in np.nonzero(multi)[0].tolist():
                key = tuple(sorted(atoms[start[p]:start[p + 1]].tolist()))
                if key in seen:
                    keep[p] = False
                seen.add(key)
            if not keep.all():
                atom_keep = np.repeat(keep, sizes)
                atoms, sigma, sizes = atoms[atom_keep], sigma[atom_keep], sizes[keep]
                start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return atoms, sigma, start

    def _nonbond_types(self):
        m = self.m
        rad_tab = np.concatenate([t.radius for t in self.terms] + [np.zeros(0)])
        hb_tab = np.concatenate([t.hbond for t in self.terms] + [np.zeros(0, dtype=np.int64)])
        off = np.concatenate([[0], np.cumsum([t.n_atoms for t in self.terms])]).astype(np.int64)
        atom_type = self.res_type[m.res_index]
        tid = self.atom_tidx
        radius = np.empty(m.n_atoms)
        hbond = np.zeros(m.n_atoms, dtype=np.int64)
        known = tid >= 0
        radius[known] = rad_tab[off[atom_type[known]] + tid[known]]
        hbond[known] = hb_tab[off[atom_type[known]] + tid[known]]
        if (~known).any():       # atoms no template describes: by element
            els, inv = np.unique(m.element[~known], return_inverse=True)
            pairs = [self.lib.energy.lookup("", str(e)) for e in els]
            radius[~known] = np.array([p[0] for p in pairs])[inv]
            hbond[~known] = np.array([p[1] for p in pairs], dtype=np.int64)[inv]
        return radius, hbond

    def _altloc_exclusions(self) -> np.ndarray:
        """Pairs of atoms in different conformers (altloc A vs B): all such pairs within a
        residue, and those closer than ALTLOC_EXCLUSION_RANGE across residues."""
        m = self.m
        alt_atoms = np.nonzero(m.altloc != "")[0]
        if len(alt_atoms) < 2:
            return np.zeros((0, 2), dtype=np.int64)
        pairs = [cKDTree(m.xyz[alt_atoms]).query_pairs(ALTLOC_EXCLUSION_RANGE, output_type="ndarray")]
        res = m.res_index[alt_atoms]
        bounds = np.concatenate([[0], np.nonzero(np.diff(res))[0] + 1, [len(res)]])
        for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            if e - s > 1:
                ii, jj = np.triu_indices(e - s, k=1)
                pairs.append(np.stack([ii + s, jj + s], axis=1))
        pairs = np.concatenate(pairs).astype(np.int64)
        i, j = alt_atoms[pairs[:, 0]], alt_atoms[pairs[:, 1]]
        diff = m.altloc[i] != m.altloc[j]
        return np.stack([np.minimum(i, j)[diff], np.maximum(i, j)[diff]], axis=1)


def _seqnum(seqid: str) -> int:
    s = str(seqid).rstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    try:
        return int(s)
    except ValueError:
        return -10**9


def _dihedral(xyz, a, b, c, d) -> np.ndarray:
    """Dihedral a-b-c-d in degrees (IUPAC sign); nan where an index is -1."""
    ok = (a >= 0) & (b >= 0) & (c >= 0) & (d >= 0)
    out = np.full(len(a), np.nan)
    if not ok.any():
        return out
    p0, p1, p2, p3 = (xyz[x[ok]] for x in (a, b, c, d))
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1n = b1 / np.linalg.norm(b1, axis=1, keepdims=True)
    v = b0 - np.sum(b0 * b1n, axis=1, keepdims=True) * b1n
    w = b2 - np.sum(b2 * b1n, axis=1, keepdims=True) * b1n
    x = np.sum(v * w, axis=1)
    y = np.sum(np.cross(b1n, v) * w, axis=1)
    out[ok] = np.degrees(np.arctan2(y, x))
    return out


def _pair_matrix(n: int, pairs: np.ndarray) -> sp.csr_matrix:
    """Symmetric boolean adjacency matrix of the pairs."""
    i = np.concatenate([pairs[:, 0], pairs[:, 1]])
    j = np.concatenate([pairs[:, 1], pairs[:, 0]])
    a = sp.csr_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    a.sum_duplicates()
    a.data[:] = 1
    return a


def _upper_rows(mat: sp.spmatrix) -> np.ndarray:
    """(i < j) index rows of the nonzero entries of a symmetric matrix, sorted."""
    upper = sp.triu(mat, k=1, format="csr")
    upper.eliminate_zeros()
    upper.sort_indices()
    rows = np.repeat(np.arange(upper.shape[0], dtype=np.int64), np.diff(upper.indptr))
    return np.stack([rows, upper.indices.astype(np.int64)], axis=1)


def _exclusions(n: int, bonds: np.ndarray, extra: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Excluded pairs (1-2 and 1-3 neighbours of the bond graph, plus `extra` pairs) and 1-4
    pairs, each as sorted, unique (i < j) rows. Sparse matrix products, no sorting of pair keys."""
    empty = np.zeros((0, 2), dtype=np.int64)
    if len(bonds) == 0:
        return (_upper_rows(_pair_matrix(n, extra)) if extra is not None and len(extra) else empty), empty
    a = _pair_matrix(n, bonds).astype(np.int32)
    a2 = a @ a
    a3 = a2 @ a
    near = ((a + a2) > 0).astype(np.int8)             # 1-2 or 1-3 (or the diagonal)
    p14 = (a3 > 0).astype(np.int8) - near             # 1-4 and not nearer: +1
    p14.data = (p14.data > 0).astype(np.int8)
    if extra is not None and len(extra):
        near = ((near + _pair_matrix(n, extra)) > 0).astype(np.int8)
    return _upper_rows(near), _upper_rows(p14)


def library_restraints(model: Model, monlib: str | None, ligands=()) -> tuple[str, Restraints]:
    """(the monomer library directory that monlib names (resolve_monlib_dir: --monlib, else
    CLIBD_MON, else the bundled library), the model's restraints from that library and the
    --ligand dictionaries); InputError for a bad library or residues without a dictionary."""
    lib_dir = resolve_monlib_dir(monlib)
    lib = MonomerLibrary(lib_dir)
    examples = {model.res_names[r]: model.residue_label(r) for r in range(model.n_residues - 1, -1, -1)}
    lib.load(set(model.res_names.tolist()), list(ligands or []), examples=examples)
    return lib_dir, build_restraints(model, lib)


def build_restraints(model: Model, lib: MonomerLibrary) -> Restraints:
    """All geometric restraints of `model` (see the module docstring for what is included).

    Raises InputError, naming them, when residue types have no dictionary in `lib`.
    """
    if model.n_atoms == 0:
        raise InputError("the model has no atoms")
    b = _Builder(model, lib)
    b.setup()
    b.instances()
    b.intra()
    b.sequence_links()
    b.distance_links()
    b.termini()
    r = b.finish()
    counts = ", ".join(f"{k} {v}" for k, v in sorted(b.link_counts.items()))
    log.info("restraints: %s; links: %s", ", ".join(f"{v} {k}" for k, v in r.counts().items()),
             counts or "none")
    if b.n_unlinked_polymer_pairs:
        log.info("%d consecutive polymer residue pairs are neither peptide nor nucleotide pairs and "
                 "are not linked", b.n_unlinked_polymer_pairs)
    return r


# --------------------------------------------------------------------------------------------
# statistics (plain numpy, independent of hpcrefine.core)

def _angles_deg(xyz, idx):
    u = xyz[idx[:, 0]] - xyz[idx[:, 1]]
    v = xyz[idx[:, 2]] - xyz[idx[:, 1]]
    return np.degrees(np.arctan2(np.linalg.norm(np.cross(u, v), axis=1), np.sum(u * v, axis=1)))


def _torsions_deg(xyz, idx):
    return _dihedral(xyz, idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3])


def _rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else float("nan")


def bond_angle_stats(xyz: np.ndarray, r: Restraints) -> dict:
    """The bond and angle part of geometry_stats (what the weight choices read)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    out: dict = {}
    d = np.linalg.norm(xyz[r.bond_idx[:, 0]] - xyz[r.bond_idx[:, 1]], axis=1) - r.bond_target
    out.update(n_bonds=len(d), bond_rmsd=_rms(d), bond_rmsz=_rms(d / r.bond_sigma) if len(d) else float("nan"),
               bond_max_dev=float(np.abs(d).max()) if len(d) else 0.0)
    a = _angles_deg(xyz, r.angle_idx) - r.angle_target if len(r.angle_idx) else np.zeros(0)
    out.update(n_angles=len(a), angle_rmsd=_rms(a), angle_rmsz=_rms(a / r.angle_sigma) if len(a) else float("nan"),
               angle_max_dev=float(np.abs(a).max()) if len(a) else 0.0)
    return out


def geometry_stats(xyz: np.ndarray, r: Restraints) -> dict:
    """Deviations of coordinates xyz from the restraint targets (plain numpy).

    Returns counts and: bond_rmsd (A), bond_rmsz, angle_rmsd (deg), angle_rmsz, torsion_rmsd
    (deg, periodic), chiral_rmsd (A^3), chiral_inversions (signed volume of the opposite sign),
    planarity_rmsd (A, distance of plane atoms from their least-squares plane).
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    out = bond_angle_stats(xyz, r)
    if len(r.tors_idx):
        width = 360.0 / np.maximum(r.tors_period, 1)
        t = _torsions_deg(xyz, r.tors_idx) - r.tors_target
        t = (t + width / 2) % width - width / 2
    else:
        t = np.zeros(0)
    out.update(n_torsions=len(t), torsion_rmsd=_rms(t))
    if len(r.chir_idx):
        c, a1, a2, a3 = (xyz[r.chir_idx[:, k]] for k in range(4))
        vol = np.sum((a1 - c) * np.cross(a2 - c, a3 - c), axis=1)
        cd = vol - r.chir_target
        inv = int(np.sum(np.sign(vol) * np.sign(r.chir_target) < 0))
    else:
        cd, inv = np.zeros(0), 0
    out.update(n_chirals=len(cd), chiral_rmsd=_rms(cd), chiral_inversions=inv)
    out.update(n_planes=r.n_planes, planarity_rmsd=_plane_rmsd(xyz, r))
    return out


def _plane_rmsd(xyz, r: Restraints) -> float:
    if r.n_planes == 0:
        return float("nan")
    start = r.plane_start
    sizes = np.diff(start)
    p = xyz[r.plane_atoms]
    w = 1.0 / r.plane_sigma ** 2
    wsum = np.add.reduceat(w, start[:-1])
    cen = np.add.reduceat(p * w[:, None], start[:-1], axis=0) / wsum[:, None]
    q = p - np.repeat(cen, sizes, axis=0)
    scatter = np.add.reduceat((q[:, :, None] * q[:, None, :]) * w[:, None, None], start[:-1], axis=0)
    _, vecs = np.linalg.eigh(scatter)
    normal = vecs[:, :, 0]
    dist = np.sum(q * np.repeat(normal, sizes, axis=0), axis=1)
    return _rms(dist)
