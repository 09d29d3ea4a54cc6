"""Clashscore without hydrogens: atom pairs overlapping by 0.4 A or more, per 1000 atoms.

MolProbity's clashscore counts pairs whose van der Waals spheres overlap by >= 0.4 A in a model
with all hydrogens added (Reduce) and measured with Probe's dots. hpcrefine models carry no
hydrogens, so this clashscore is computed on heavy atoms only, with these van der Waals radii
(A; Probe's heavy-atom radii for C, N, O, S):

    C 1.70   N 1.55   O 1.40   S 1.80   P 1.80   SE 1.90   F 1.30   CL 1.77   BR 1.95   I 2.10
    metal ions (NA MG K CA MN FE CO NI CU ZN CD) 0.80   any other element 1.70

A pair clashes when its distance is below r_i + r_j - 0.4 A. Pairs that are never counted:
atoms of one bond, angle or torsion (1-2, 1-3 and 1-4 neighbours of the restraint bond graph,
links such as disulfides included), and atoms of different alternative conformers. A hydrogen-bond
donor-acceptor pair (N/O types from the monomer library) has its contact distance capped at 2.7 A,
standing in for the hydrogen that Probe would see, so an H-bond at 2.7-3.0 A is no clash.
clashscore = 1000 * clashes / heavy atoms. Because hydrogens are absent (their clashes are a large
part of MolProbity's count) and the pair rule differs from Probe's dot surfaces, this number is not
MolProbity's all-hydrogen clashscore; it is lower for the same model and is meant for comparing
models refined here (start versus refined, one refinement against another).

The search is hpcrefine's cell-list NeighbourList (O(atoms), no all-pairs arrays).
"""
from __future__ import annotations

import numpy as np

from ..core.nonbonded import NeighbourList
from ..modelio import Model
from ..restraints import Restraints

OVERLAP = 0.4
MAX_LISTED = 50
RADII = {"C": 1.70, "N": 1.55, "O": 1.40, "S": 1.80, "P": 1.80, "SE": 1.90, "F": 1.30, "CL": 1.77,
         "BR": 1.95, "I": 2.10}
METALS = ("NA", "MG", "K", "CA", "MN", "FE", "CO", "NI", "CU", "ZN", "CD")
METAL_RADIUS = 0.80
DEFAULT_RADIUS = 1.70


def radii(element: np.ndarray) -> np.ndarray:
    """van der Waals radius per atom from its element (table above)."""
    out = np.full(len(element), DEFAULT_RADIUS)
    for el, r in RADII.items():
        out[element == el] = r
    out[np.isin(element, METALS)] = METAL_RADIUS
    return out


def analyse(model: Model, xyz: np.ndarray, r: Restraints) -> dict:
    """Clashing pairs (i, j, overlap) sorted by overlap, and the clashscore."""
    xyz = np.asarray(xyz, dtype=np.float64)
    excluded = np.concatenate([np.asarray(r.excl_pairs, dtype=np.int64).reshape(-1, 2),
                               np.asarray(r.pair14, dtype=np.int64).reshape(-1, 2)])
    nbl = NeighbourList(xyz, vdw_radius=radii(model.element), hbond_type=r.hbond_type,
                        excl_pairs=excluded, pair14=np.zeros((0, 2), dtype=np.int64), cutoff_extra=0.0)
    i = nbl.i.astype(np.int64)
    j = nbl.j.astype(np.int64)
    overlap = nbl.contact_distance() - np.linalg.norm(xyz[i] - xyz[j], axis=1)
    bad = overlap >= OVERLAP
    order = np.argsort(-overlap[bad], kind="stable")
    i, j, overlap = i[bad][order], j[bad][order], overlap[bad][order]
    n_atoms = max(model.n_atoms, 1)
    return {"i": i, "j": j, "overlap": overlap, "clashscore": 1000.0 * len(i) / n_atoms}


def _label(model: Model, a: int) -> str:
    alt = model.altloc[a]
    return (f"{model.chain[a]}/{model.res_name[a]}{model.res_seqid[model.res_index[a]]}/"
            f"{model.atom_name[a]}" + (f".{alt}" if alt else ""))


def summary(model: Model, cl: dict) -> dict:
    return {"clashscore": round(float(cl["clashscore"]), 2), "clashes": int(len(cl["i"])),
            "n_atoms": int(model.n_atoms), "overlap_cutoff": OVERLAP, "hydrogens": "none (heavy atoms only)",
            "listed": [{"atoms": [_label(model, int(a)), _label(model, int(b))], "overlap": round(float(o), 3)}
                       for a, b, o in zip(cl["i"][:MAX_LISTED].tolist(), cl["j"][:MAX_LISTED].tolist(),
                                          cl["overlap"][:MAX_LISTED].tolist())]}
