"""Side-chain rotamer validation against the Shapovalov & Dunbrack 2010 rotamer library.

Reference data: hpcrefine/data/rotamer/bbdep2010_bbind.json, derived by
scripts/build_validation_tables.py from the 2010 backbone-dependent library (CC BY 4.0) as the
`chilife` package ships it: averaged over backbone bins into a backbone-independent Gaussian
mixture per residue type (probability, mean and spread of every rotamer's chi angles).

A residue's chi angles x (degrees, IUPAC dihedrals below; the terminal chi of Asp, Glu, Phe and
Tyr has period 180 because their two terminal atoms are equivalent) get the mixture density
p(x) = sum_k P_k prod_d N(x_d; mean_kd, sigma_kd) (differences wrapped). MolProbity calls a
rotamer an outlier when it lies in the least populated 0.3 % of the reference distribution and
favoured above 2 % (Lovell et al. 2000; Chen et al. 2010); here the same percentiles of this
distribution are used: the build script samples the mixture to find the density levels below
which 0.3 % and 2 % of its probability lies. Residues missing a chi atom are not evaluated.
Because the reference is the Dunbrack library and not MolProbity's Top8000 contours, counts
are close to but not the same as MolProbity's rotalyze.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache

import numpy as np
from numba import njit

from .residues import ResidueTable, dihedrals

CHI_ATOMS = {
    "ARG": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD"), ("CB", "CG", "CD", "NE"), ("CG", "CD", "NE", "CZ")),
    "ASN": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "OD1")),
    "ASP": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "OD1")),
    "CYS": (("N", "CA", "CB", "SG"),),
    "GLN": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD"), ("CB", "CG", "CD", "OE1")),
    "GLU": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD"), ("CB", "CG", "CD", "OE1")),
    "HIS": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "ND1")),
    "ILE": (("N", "CA", "CB", "CG1"), ("CA", "CB", "CG1", "CD1")),
    "LEU": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD1")),
    "LYS": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD"), ("CB", "CG", "CD", "CE"), ("CG", "CD", "CE", "NZ")),
    "MET": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "SD"), ("CB", "CG", "SD", "CE")),
    "PHE": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD1")),
    "PRO": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD")),
    "SER": (("N", "CA", "CB", "OG"),),
    "THR": (("N", "CA", "CB", "OG1"),),
    "TRP": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD1")),
    "TYR": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD1")),
    "VAL": (("N", "CA", "CB", "CG1"),),
}
ATOM_NAMES = tuple(sorted({a for chis in CHI_ATOMS.values() for chi in chis for a in chi} | {"C", "O"}))
OUTLIER, ALLOWED, FAVOURED = 0, 1, 2
CATEGORY_NAMES = ("outlier", "allowed", "favoured")

_TABLE_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "rotamer",
                           "bbdep2010_bbind.json")


@lru_cache(maxsize=1)
def library() -> dict:
    """Per residue type: prob (K,), mean and sigma (K, n_chi), periods (n_chi,), log-density levels."""
    with open(_TABLE_PATH) as fh:
        doc = json.load(fh)
    out = {}
    for res, e in doc["residues"].items():
        prob, sigma = np.array(e["prob"], dtype=np.float64), np.array(e["sigma"], dtype=np.float64)
        out[res] = {"prob": prob, "mean": np.array(e["mean"], dtype=np.float64), "sigma": sigma,
                    "periods": np.array(e["periods"], dtype=np.float64), "outlier": e["log_density_outlier"],
                    "allowed": e["log_density_allowed"],
                    # log of each rotamer's weight times its Gaussian's normalisation
                    "log_norm": np.log(prob) - np.sum(np.log(np.sqrt(2.0 * np.pi) * sigma), axis=1)}
    return out


def log_density(res: str, chi: np.ndarray) -> np.ndarray:
    """log p(chi) of the residue type's mixture for each row of chi (n, n_chi), degrees."""
    lib = library()[res]
    chi = np.ascontiguousarray(chi, dtype=np.float64).reshape(-1, len(lib["periods"]))
    out = np.empty(len(chi))
    _log_density(chi, lib["log_norm"], lib["mean"], lib["sigma"], lib["periods"], out)
    return out


@njit(cache=True)
def _log_density(chi, log_norm, mean, sigma, periods, out):
    """out[i] = log sum_k exp(log_norm[k] - |z_ik|^2 / 2), z the wrapped differences from the
    rotamer means in sigmas (a log-sum-exp, shifted by the largest term)."""
    n_k, n_d = mean.shape
    terms = np.empty(n_k)
    for i in range(chi.shape[0]):
        best = -np.inf
        for k in range(n_k):
            s = 0.0
            for d in range(n_d):
                p = periods[d]
                x = chi[i, d] - mean[k, d] + 0.5 * p
                z = (x - p * np.floor(x / p) - 0.5 * p) / sigma[k, d]
                s += z * z
            terms[k] = log_norm[k] - 0.5 * s
            if terms[k] > best:
                best = terms[k]
        acc = 0.0
        for k in range(n_k):
            acc += np.exp(terms[k] - best)
        out[i] = best + np.log(acc)


def analyse(table: ResidueTable, xyz: np.ndarray) -> dict:
    """Per-residue arrays for every evaluated side chain: residue index, chi angles (nan-padded
    to 4), log density, category."""
    lib = library()
    residues, chis, logd, cats = [], [], [], []
    for res, chi_atoms in CHI_ATOMS.items():
        sel = np.nonzero(table.is_amino & (table.res_type == res))[0]
        if len(sel) == 0:
            continue
        angles = np.stack([dihedrals(xyz, np.stack([table.col(a)[sel] for a in quad], axis=1))
                           for quad in chi_atoms], axis=1)
        ok = np.all(np.isfinite(angles), axis=1)
        sel, angles = sel[ok], angles[ok]
        if len(sel) == 0:
            continue
        ld = log_density(res, angles)
        cat = np.full(len(sel), ALLOWED, dtype=np.int8)
        cat[ld >= lib[res]["allowed"]] = FAVOURED
        cat[ld < lib[res]["outlier"]] = OUTLIER
        padded = np.full((len(sel), 4), np.nan)
        padded[:, :angles.shape[1]] = angles
        residues.append(sel)
        chis.append(padded)
        logd.append(ld)
        cats.append(cat)
    if not residues:
        return {"residue": np.zeros(0, dtype=np.int64), "chi": np.zeros((0, 4)),
                "log_density": np.zeros(0), "category": np.zeros(0, dtype=np.int8)}
    residue = np.concatenate(residues)
    order = np.argsort(residue, kind="stable")
    return {"residue": residue[order], "chi": np.concatenate(chis)[order],
            "log_density": np.concatenate(logd)[order], "category": np.concatenate(cats)[order]}


def summary(rot: dict) -> dict:
    n = len(rot["category"])
    c = {name: int(np.sum(rot["category"] == k)) for k, name in enumerate(CATEGORY_NAMES)}
    return {"n": n, **c, "outlier_pct": round(100.0 * c["outlier"] / n, 2) if n else None,
            "favoured_pct": round(100.0 * c["favoured"] / n, 2) if n else None}
