"""The restraint set of a model as flat arrays: the contract between topology and the numerical core.

topology.build_restraints() fills a Restraints from a Model and a monomer library; the kernels in
hpcrefine.core.geometry and hpcrefine.core.nonbonded evaluate it. Atom indices refer to Model arrays.
Angles are in degrees in the arrays (as in the monomer library) and converted inside the kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np


def _i(shape):
    return field(default_factory=lambda: np.zeros(shape, dtype=np.int64))


def _f(shape):
    return field(default_factory=lambda: np.zeros(shape, dtype=np.float64))


@dataclass
class Restraints:
    # bonds: |x_i - x_j| -> target, weight 1/sigma^2
    bond_idx: np.ndarray = _i((0, 2))
    bond_target: np.ndarray = _f((0,))
    bond_sigma: np.ndarray = _f((0,))
    # angles i-j-k (j at the vertex), degrees
    angle_idx: np.ndarray = _i((0, 3))
    angle_target: np.ndarray = _f((0,))
    angle_sigma: np.ndarray = _f((0,))
    # torsions i-j-k-l, degrees; period p: any target + k*360/p is equally good
    tors_idx: np.ndarray = _i((0, 4))
    tors_target: np.ndarray = _f((0,))
    tors_sigma: np.ndarray = _f((0,))
    tors_period: np.ndarray = _i((0,))
    # chirality: centre c, then a1 a2 a3; signed volume (a1-c).((a2-c)x(a3-c)) -> target (A^3)
    chir_idx: np.ndarray = _i((0, 4))
    chir_target: np.ndarray = _f((0,))
    chir_sigma: np.ndarray = _f((0,))
    # planes: atoms of plane p are plane_atoms[plane_start[p]:plane_start[p+1]], sigma per atom (A)
    plane_atoms: np.ndarray = _i((0,))
    plane_sigma: np.ndarray = _f((0,))
    plane_start: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    # non-bonded: per-atom repulsion radius (A); pairs closer than r_i + r_j are pushed apart.
    # Pairs listed in excl_pairs (1-2 and 1-3 neighbours, and atoms of different alternative
    # conformers, i < j) are never restrained;
    # pairs in pair14 (1-4 neighbours, i < j) use a reduced distance.
    vdw_radius: np.ndarray = _f((0,))
    hbond_type: np.ndarray = _i((0,))   # 0 none, 1 donor, 2 acceptor, 3 both (for H-bond distances)
    excl_pairs: np.ndarray = _i((0, 2))
    pair14: np.ndarray = _i((0, 2))

    @property
    def n_planes(self) -> int:
        return len(self.plane_start) - 1

    def counts(self) -> dict:
        return {"bonds": len(self.bond_idx), "angles": len(self.angle_idx),
                "torsions": len(self.tors_idx), "chirals": len(self.chir_idx),
                "planes": self.n_planes}

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))
