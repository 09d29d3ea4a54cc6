"""Ramachandran validation with MolProbity's Top8000 distributions and cut-offs.

Reference data: hpcrefine/data/rama/top8000_rama.npz, the six Top8000 distributions (Williams et
al. 2018) exactly as the `cctbx-base` package ships them for mmtbx.validation.ramalyze
(scripts/build_validation_tables.py derives the file; licence beside it). Each is a 180 x 180
table over phi (rows) and psi (columns) of 2-degree bins centred on odd degrees; a residue's
score is the bilinear interpolation between the four surrounding bin centres (periodic), as
ramalyze evaluates it.

Residue classes (in this order of precedence): glycine; proline, cis when omega
CA(i-1)-C(i-1)-N(i)-CA(i) lies in (-90, 90) degrees, else trans; pre-proline (the next residue is
a proline); isoleucine or valine; general (every other standard amino acid; MSE counts as MET).
A residue needs both sequence neighbours linked (see residues.py) to have phi and psi.

Cut-offs (MolProbity, as ramalyze applies them): favoured at score >= 0.02 in every class;
outlier below 0.0005 for general residues, below 0.002 for cis-proline and below 0.001 for the
other classes; allowed in between.
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from .residues import ResidueTable, dihedrals

CLASSES = ("general", "glycine", "cis_pro", "trans_pro", "pre_pro", "ile_val")
GENERAL, GLYCINE, CIS_PRO, TRANS_PRO, PRE_PRO, ILE_VAL = range(6)
FAVOURED_CUTOFF = 0.02
OUTLIER_CUTOFF = np.array([0.0005, 0.001, 0.002, 0.001, 0.001, 0.001])   # per class, in CLASSES order
OUTLIER, ALLOWED, FAVOURED = 0, 1, 2
CATEGORY_NAMES = ("outlier", "allowed", "favoured")

BACKBONE = ("N", "CA", "C")

_TABLE_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "rama", "top8000_rama.npz")


@lru_cache(maxsize=1)
def tables() -> np.ndarray:
    """The (6, 180, 180) float64 Top8000 tables, indexed [class, phi bin, psi bin]."""
    with np.load(_TABLE_PATH) as z:
        return z["tables"].astype(np.float64)


def score(cls: np.ndarray, phi: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """Top8000 score of each (class, phi, psi) (degrees), bilinear between bin centres."""
    t = tables()
    cls = np.asarray(cls, dtype=np.int64)
    phi = (np.asarray(phi, dtype=np.float64) + 180.0) % 360.0 - 180.0
    psi = (np.asarray(psi, dtype=np.float64) + 180.0) % 360.0 - 180.0
    u = (phi + 179.0) / 2.0            # bin i is centred at -179 + 2 i
    v = (psi + 179.0) / 2.0
    i0 = np.floor(u).astype(np.int64)
    j0 = np.floor(v).astype(np.int64)
    fu, fv = u - i0, v - j0
    i1, j1 = (i0 + 1) % 180, (j0 + 1) % 180
    i0, j0 = i0 % 180, j0 % 180
    return ((1 - fu) * (1 - fv) * t[cls, i0, j0] + fu * (1 - fv) * t[cls, i1, j0]
            + (1 - fu) * fv * t[cls, i0, j1] + fu * fv * t[cls, i1, j1])


def categorise(cls: np.ndarray, values: np.ndarray) -> np.ndarray:
    """OUTLIER (0), ALLOWED (1) or FAVOURED (2) per residue."""
    out = np.full(len(values), ALLOWED, dtype=np.int8)
    out[values >= FAVOURED_CUTOFF] = FAVOURED
    out[values < OUTLIER_CUTOFF[np.asarray(cls, dtype=np.int64)]] = OUTLIER
    return out


def analyse(table: ResidueTable, xyz: np.ndarray) -> dict:
    """Per-residue arrays for every residue with phi and psi: residue index, class, phi, psi,
    omega (of the peptide before it), score, category."""
    n_col, ca_col, c_col = (table.col(a) for a in BACKBONE)
    prev, nxt = table.prev, table.next
    res = np.nonzero(table.is_amino & (prev >= 0) & (nxt >= 0)
                     & (n_col >= 0) & (ca_col >= 0) & (c_col >= 0))[0]
    p, q = prev[res], nxt[res]
    phi = dihedrals(xyz, np.stack([c_col[p], n_col[res], ca_col[res], c_col[res]], axis=1))
    psi = dihedrals(xyz, np.stack([n_col[res], ca_col[res], c_col[res], n_col[q]], axis=1))
    omega = dihedrals(xyz, np.stack([ca_col[p], c_col[p], n_col[res], ca_col[res]], axis=1))
    ok = np.isfinite(phi) & np.isfinite(psi)
    res, phi, psi, omega, q = res[ok], phi[ok], psi[ok], omega[ok], q[ok]
    name = table.res_type[res]
    cls = np.full(len(res), GENERAL, dtype=np.int64)
    cls[np.isin(name, ("ILE", "VAL"))] = ILE_VAL
    cls[table.res_type[q] == "PRO"] = PRE_PRO
    is_pro = name == "PRO"
    cis = np.isfinite(omega) & (omega > -90.0) & (omega < 90.0)
    cls[is_pro] = np.where(cis[is_pro], CIS_PRO, TRANS_PRO)
    cls[name == "GLY"] = GLYCINE
    values = score(cls, phi, psi)
    return {"residue": res, "cls": cls, "phi": phi, "psi": psi, "omega": omega, "score": values,
            "category": categorise(cls, values)}


def summary(rama: dict) -> dict:
    """Counts and percentages overall and per class."""
    cat, cls = rama["category"], rama["cls"]

    def counts(sel):
        n = int(sel.sum())
        c = {name: int(np.sum(cat[sel] == k)) for k, name in enumerate(CATEGORY_NAMES)}
        pct = {f"{name}_pct": (round(100.0 * c[name] / n, 2) if n else None) for name in CATEGORY_NAMES}
        return {"n": n, **c, **pct}

    out = counts(np.ones(len(cat), dtype=bool))
    out["by_class"] = {name: counts(cls == k) for k, name in enumerate(CLASSES)}
    return out
