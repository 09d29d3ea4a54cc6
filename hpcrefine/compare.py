"""Comparing two models of the same structure: RMSD with atoms matched by chain, residue and name."""
from __future__ import annotations

import numpy as np

from .modelio import read_model


def _keys(model) -> dict:
    out = {}
    for i in range(model.n_atoms):
        r = model.res_index[i]
        out[(model.res_chain[r], model.res_seqid[r], model.atom_name[i], model.altloc[i])] = i
    return out


def rmsd(model_path: str, truth_path: str) -> dict:
    """All-atom and C-alpha RMSD (A) of model to truth over the atoms both have (hydrogens ignored)."""
    a, b = read_model(model_path), read_model(truth_path)
    ka, kb = _keys(a), _keys(b)
    common = [k for k in ka if k in kb]
    ia = np.array([ka[k] for k in common], dtype=np.int64)
    ib = np.array([kb[k] for k in common], dtype=np.int64)
    d2 = np.sum((a.xyz[ia] - b.xyz[ib]) ** 2, axis=1)
    ca = np.array([k[2] == "CA" for k in common], dtype=bool)
    worst = common[int(np.argmax(d2))] if len(d2) else None
    return {"matched_atoms": int(len(common)), "model_atoms": a.n_atoms, "truth_atoms": b.n_atoms,
            "rmsd_all": float(np.sqrt(d2.mean())) if len(d2) else float("nan"),
            "rmsd_ca": float(np.sqrt(d2[ca].mean())) if ca.any() else float("nan"),
            "max_deviation": float(np.sqrt(d2.max())) if len(d2) else float("nan"),
            "max_deviation_atom": f"{worst[0]}/{worst[1]}/{worst[2]}" if worst else None,
            "ca_atoms": int(ca.sum())}


def per_residue_error(xyz_a: np.ndarray, xyz_b: np.ndarray, res_index: np.ndarray, n_res: int) -> np.ndarray:
    """RMS distance per residue between two coordinate sets of one model."""
    d2 = np.sum((xyz_a - xyz_b) ** 2, axis=1)
    s = np.bincount(res_index, weights=d2, minlength=n_res)
    c = np.bincount(res_index, minlength=n_res)
    return np.sqrt(s / np.maximum(c, 1))


def model_geometry(model_path: str, monlib: str | None = None) -> dict:
    """Geometry of a model file measured with hpcrefine's restraints (the bundled library unless
    monlib is given): the same yardstick for models from any program."""
    from .core import nonbonded
    from .monlib import MonomerLibrary, resolve_monlib_dir
    from .topology import build_restraints, geometry_stats

    model = read_model(model_path)
    r = build_restraints(model, MonomerLibrary(resolve_monlib_dir(monlib)))
    stats = {k: v for k, v in geometry_stats(model.xyz, r).items() if not k.startswith("n_")}
    stats["clashes"] = int(nonbonded.clashes(model.xyz, nonbonded.NeighbourList(model.xyz, r)))
    return stats
