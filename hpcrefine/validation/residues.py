"""Per-residue atom tables: which atom of each residue is N, CA, C, CB, CG, ... as index arrays.

Every per-residue validation metric (Ramachandran, rotamers, C-beta deviation) needs a few named
atoms of each residue and of its sequence neighbours. Looking them up residue by residue in
Python costs seconds per million atoms; here each name is found for all residues at once with
numpy (one comparison over the atom-name array per name), so a table holds, for every residue,
the index of its atom of that name or -1.

Alternative conformations: the first conformer is used (atoms without altloc, else altloc 'A',
else the first letter present), as MolProbity counts "altloc A where applicable".

Sequence links: residue r follows residue r-1 when both are amino acids of the same chain's
polymer, their label_seq differ by one (or, without label_seq, their author numbers differ by at
most one) and C(r-1)-N(r) is shorter than PEPTIDE_LINK_MAX. MolProbity uses 2.0 A there; hpcrefine
links by sequence as refinement does, so that a poor start model whose peptide bonds are stretched
is still evaluated, and only a real chain break (a long C-N) stops the link.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..modelio import Model

PEPTIDE_LINK_MAX = 4.0      # A, longest C(i-1)-N(i) treated as a peptide bond

AMINO_ACIDS = ("ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE", "LEU", "LYS",
               "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL")


def _seqnum(seqid: np.ndarray) -> np.ndarray:
    """Author residue numbers without insertion codes (very negative when unparsable)."""
    out = np.full(len(seqid), -10**9, dtype=np.int64)
    for k, s in enumerate(seqid.tolist()):
        t = s.rstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
        try:
            out[k] = int(t)
        except ValueError:
            pass
    return out


@dataclass
class ResidueTable:
    """Named-atom indices per residue (-1 where absent) and sequence neighbours."""

    names: tuple
    index: np.ndarray          # (nres, len(names)) int64
    prev: np.ndarray           # (nres,) int64: linked preceding residue or -1
    next: np.ndarray           # (nres,) int64: linked following residue or -1
    is_amino: np.ndarray       # (nres,) bool: one of the 20 standard amino acids (MSE counts as MET)
    res_type: np.ndarray       # (nres,) str: residue name, MSE mapped to MET

    def col(self, name: str) -> np.ndarray:
        return self.index[:, self.names.index(name)]


def _first_conformer(model: Model) -> np.ndarray:
    """Boolean per atom: the atom belongs to its residue's first conformer."""
    alt = model.altloc
    keep = alt == ""
    has_alt = ~keep
    if has_alt.any():
        # the first altloc letter of each residue, taken in file order
        res = model.res_index[has_alt]
        letters = alt[has_alt]
        first_letter = {}
        for r, a in zip(res[::-1].tolist(), letters[::-1].tolist()):
            first_letter[r] = a
        wanted = np.array([first_letter[r] for r in res.tolist()])
        keep[np.nonzero(has_alt)[0][letters == wanted]] = True
    return keep


def residue_table(model: Model, xyz: np.ndarray, names: tuple) -> ResidueTable:
    """Index of the atom called `name` in each residue, for every name in names (first conformer)."""
    nres = model.n_residues
    keep = _first_conformer(model)
    atoms = np.nonzero(keep)[0]
    atom_names = model.atom_name[atoms]
    index = np.full((nres, len(names)), -1, dtype=np.int64)
    for c, name in enumerate(names):
        hit = atoms[atom_names == name]
        # assign in reverse so that the first atom of that name in a residue wins
        index[model.res_index[hit[::-1]], c] = hit[::-1]
    res_type = model.res_names.copy()
    res_type[res_type == "MSE"] = "MET"
    if "SD" in names:                       # selenomethionine: SE takes the place of SD
        se = atoms[atom_names == "SE"]
        r = model.res_index[se]
        is_mse = model.res_names[r] == "MSE"
        index[r[is_mse], names.index("SD")] = se[is_mse]
    is_amino = np.isin(res_type, AMINO_ACIDS) & model.res_is_polymer
    prev = _links(model, xyz, index, names, is_amino)
    nxt = np.full(nres, -1, dtype=np.int64)
    has_prev = prev >= 0
    nxt[prev[has_prev]] = np.nonzero(has_prev)[0]
    return ResidueTable(names=tuple(names), index=index, prev=prev, next=nxt, is_amino=is_amino,
                        res_type=res_type)


def _links(model: Model, xyz, index, names, is_amino) -> np.ndarray:
    nres = model.n_residues
    prev = np.full(nres, -1, dtype=np.int64)
    if nres < 2:
        return prev
    r = np.arange(1, nres)
    q = r - 1
    same = (model.res_chain[r] == model.res_chain[q]) & is_amino[r] & is_amino[q]
    ls_r, ls_q = model.res_label_seq[r], model.res_label_seq[q]
    known = (ls_r >= 0) & (ls_q >= 0)
    num = _seqnum(model.res_seqid)
    consecutive = np.where(known, ls_r - ls_q == 1, (num[r] - num[q] >= 0) & (num[r] - num[q] <= 1))
    c_prev = index[q, names.index("C")]
    n_this = index[r, names.index("N")]
    ok = same & consecutive & (c_prev >= 0) & (n_this >= 0)
    d = np.full(len(r), np.inf)
    d[ok] = np.linalg.norm(xyz[c_prev[ok]] - xyz[n_this[ok]], axis=1)
    ok &= d < PEPTIDE_LINK_MAX
    prev[r[ok]] = q[ok]
    return prev


def dihedrals(xyz: np.ndarray, quads: np.ndarray) -> np.ndarray:
    """Dihedral angles (degrees, IUPAC sign) of the (n, 4) atom-index rows; nan where an index is -1."""
    out = np.full(len(quads), np.nan)
    ok = np.all(quads >= 0, axis=1)
    if ok.any():
        from ..core.geometry import torsion_values
        out[ok] = torsion_values(xyz, quads[ok])
    return out
