"""Covalent geometry against the restraint targets: rmsd, rmsZ and the outliers (|Z| > 4).

The rmsd figures come from topology.geometry_stats (the same numbers refinement logs); this
module adds the per-term Z = deviation / sigma of every kind (bond, angle, torsion, chirality,
planarity: one Z per plane atom, its distance from the least-squares plane over its sigma) and
lists the worst outliers by |Z|, with atom labels, as MolProbity and phenix list geometry
outliers at 4 sigma. Lists are capped at MAX_LISTED entries per kind (the counts are not), so
a poor million-atom start model does not produce a million-line report.
"""
from __future__ import annotations

import numpy as np

from ..core import geometry as core
from ..modelio import Model
from ..restraints import Restraints
from ..topology import geometry_stats

Z_OUTLIER = 4.0
MAX_LISTED = 50
KINDS = ("bond", "angle", "torsion", "chirality", "planarity")


def _z_values(xyz: np.ndarray, r: Restraints) -> dict:
    """(Z array, atom-index array) per kind."""
    out = {}
    if len(r.bond_idx):
        d = core.bond_lengths(xyz, r.bond_idx) - r.bond_target
        out["bond"] = (d / r.bond_sigma, r.bond_idx, d)
    if len(r.angle_idx):
        d = core.angle_values(xyz, r.angle_idx) - r.angle_target
        out["angle"] = (d / r.angle_sigma, r.angle_idx, d)
    if len(r.tors_idx):
        d = core.torsion_deviations(xyz, r.tors_idx, r.tors_target, r.tors_period)
        out["torsion"] = (d / r.tors_sigma, r.tors_idx, d)
    if len(r.chir_idx):
        v = core.chiral_volumes(xyz, r.chir_idx)
        d = v - r.chir_target
        both = getattr(r, "chir_both", None)
        if both is not None and len(both):
            both = np.asarray(both, dtype=bool)
            d[both] = np.abs(v[both]) - np.abs(r.chir_target[both])
        out["chirality"] = (d / r.chir_sigma, r.chir_idx, d)
    if r.n_planes:
        d = core.plane_distances(xyz, r.plane_atoms, r.plane_start, r.plane_sigma)
        out["planarity"] = (d / r.plane_sigma, r.plane_atoms[:, None], d)
    return out


def _atom_label(model: Model, i: int) -> str:
    alt = model.altloc[i]
    return (f"{model.chain[i]}/{model.res_name[i]}{model.res_seqid[model.res_index[i]]}/"
            f"{model.atom_name[i]}" + (f".{alt}" if alt else ""))


def analyse(model: Model, xyz: np.ndarray, r: Restraints) -> dict:
    """rmsd/rmsZ per kind (geometry_stats plus torsion, chirality and planarity rmsZ), outlier
    counts at |Z| > 4 and the worst outliers listed."""
    xyz = np.asarray(xyz, dtype=np.float64)
    stats = geometry_stats(xyz, r)
    out = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in stats.items()}
    outliers = {}
    for kind, (z, idx, dev) in _z_values(xyz, r).items():
        az = np.abs(z)
        out[f"{kind}_rmsz"] = round(float(np.sqrt(np.mean(z * z))), 4) if len(z) else None
        bad = np.nonzero(az > Z_OUTLIER)[0]
        worst = bad[np.argsort(-az[bad], kind="stable")[:MAX_LISTED]]
        outliers[kind] = {
            "count": int(len(bad)),
            "listed": [{"atoms": [_atom_label(model, int(a)) for a in idx[t]],
                        "deviation": round(float(dev[t]), 4), "z": round(float(z[t]), 2)}
                       for t in worst.tolist()],
        }
    out["outliers"] = outliers
    out["z_outlier"] = Z_OUTLIER
    return out
