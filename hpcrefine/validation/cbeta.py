"""C-beta deviations: distance of each CB from its ideal position built from the backbone.

MolProbity's measure (Lovell et al. 2003, Proteins 50:437): the ideal CB is placed twice from
the backbone N, CA, C with ideal geometry, once from the C side (angle C-CA-CB and dihedral
N-C-CA-CB) and once from the N side (angle N-CA-CB and dihedral C-N-CA-CB); the two positions
are averaged and put back at the ideal CA-CB distance. A deviation of 0.25 A or more is an
outlier: it flags a backbone and side chain that do not fit together (a misfit rotamer, a
wrong hand at CA, a strained backbone). The ideal values are Engh & Huber geometry per residue
class (Ala; Pro; the beta-branched Val, Thr, Ile; all others). Glycine has no CB and is skipped.
D-amino acids (DAL, DPR, ...) are not standard residues here and are not evaluated, so an
L-named residue built with D chirality shows a deviation of about 1.5 A or more.
"""
from __future__ import annotations

import numpy as np

from .residues import ResidueTable

OUTLIER_CUTOFF = 0.25   # A
ATOM_NAMES = ("N", "CA", "C", "CB")

# (CA-CB distance, angle C-CA-CB, dihedral N-C-CA-CB, angle N-CA-CB, dihedral C-N-CA-CB)
_IDEAL = {
    "ALA": (1.536, 110.1, 122.9, 110.6, -122.6),
    "PRO": (1.530, 112.2, 115.1, 103.0, -120.7),
    "VAL": (1.540, 109.1, 123.4, 111.5, -122.0),
    "THR": (1.540, 109.1, 123.4, 111.5, -122.0),
    "ILE": (1.540, 109.1, 123.4, 111.5, -122.0),
}
_DEFAULT = (1.530, 110.1, 122.8, 110.5, -122.6)


def place_atom(a: np.ndarray, b: np.ndarray, c: np.ndarray, dist, angle, dihedral) -> np.ndarray:
    """Positions d (n, 3) with |c-d| = dist, angle b-c-d = angle and dihedral a-b-c-d = dihedral
    (degrees), for rows of a, b, c."""
    dist = np.broadcast_to(np.asarray(dist, dtype=np.float64).ravel(), (len(c),)) if np.ndim(dist) else np.full(len(c), float(dist))
    angle = np.radians(np.broadcast_to(np.asarray(angle, dtype=np.float64).ravel(), (len(c),)))
    dihedral = np.radians(np.broadcast_to(np.asarray(dihedral, dtype=np.float64).ravel(), (len(c),)))
    bc = c - b
    bc /= np.linalg.norm(bc, axis=1, keepdims=True)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    m = np.cross(n, bc)
    d = np.stack([-dist * np.cos(angle), dist * np.sin(angle) * np.cos(dihedral),
                  dist * np.sin(angle) * np.sin(dihedral)], axis=1)
    return c + d[:, :1] * bc + d[:, 1:2] * m + d[:, 2:3] * n


def ideal_cb(res_type: np.ndarray, n: np.ndarray, ca: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Ideal CB positions for residues of the given types from their N, CA, C positions."""
    p = np.array([_IDEAL.get(r, _DEFAULT) for r in res_type.tolist()]).reshape(-1, 5)
    from_c = place_atom(n, c, ca, p[:, 0:1], p[:, 1:2], p[:, 2:3])
    from_n = place_atom(c, n, ca, p[:, 0:1], p[:, 3:4], p[:, 4:5])
    mid = (from_c + from_n) / 2 - ca
    return ca + mid * (p[:, 0:1] / np.linalg.norm(mid, axis=1, keepdims=True))


def analyse(table: ResidueTable, xyz: np.ndarray) -> dict:
    """Residue index and CB deviation (A) of every standard non-glycine residue with N, CA, C, CB."""
    n, ca, c, cb = (table.col(a) for a in ATOM_NAMES)
    res = np.nonzero(table.is_amino & (table.res_type != "GLY") & (n >= 0) & (ca >= 0) & (c >= 0)
                     & (cb >= 0))[0]
    if len(res) == 0:
        return {"residue": res, "deviation": np.zeros(0)}
    ideal = ideal_cb(table.res_type[res], xyz[n[res]], xyz[ca[res]], xyz[c[res]])
    return {"residue": res, "deviation": np.linalg.norm(xyz[cb[res]] - ideal, axis=1)}


def summary(cb: dict) -> dict:
    dev = cb["deviation"]
    n_out = int(np.sum(dev >= OUTLIER_CUTOFF))
    return {"n": int(len(dev)), "outliers": n_out,
            "outlier_pct": round(100.0 * n_out / len(dev), 2) if len(dev) else None,
            "mean": round(float(dev.mean()), 4) if len(dev) else None,
            "max": round(float(dev.max()), 4) if len(dev) else None}
