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
    # low-resolution restraints (hpcrefine.lowres): robust distances |x_i - x_j| (secondary-
    # structure H-bonds O..N), zero within target +- flat, then ((|dev| - flat) / sigma)^2 topped
    # out at a deviation of about `limit` A beyond flat (limit <= 0: harmonic); kind 0 helix, 1 strand
    dist_idx: np.ndarray = _i((0, 2))
    dist_target: np.ndarray = _f((0,))
    dist_sigma: np.ndarray = _f((0,))
    dist_flat: np.ndarray = _f((0,))
    dist_limit: np.ndarray = _f((0,))
    dist_kind: np.ndarray = _i((0,))
    # Ramachandran: atoms C(i-1) N CA C N(i+1); weight * rama_table[class] at (phi, psi), the table
    # an (n_classes, m, m) potential on a periodic grid of bin centres -180 + (k + 0.5) 360/m deg
    rama_idx: np.ndarray = _i((0, 5))
    rama_class: np.ndarray = _i((0,))
    rama_weight: np.ndarray = _f((0,))
    rama_table: np.ndarray = _f((0, 0, 0))
    # reference-model torsions i-j-k-l (degrees, period 1), robust like the distances (limit in deg)
    reft_idx: np.ndarray = _i((0, 4))
    reft_target: np.ndarray = _f((0,))
    reft_sigma: np.ndarray = _f((0,))
    reft_limit: np.ndarray = _f((0,))

    @property
    def n_planes(self) -> int:
        return len(self.plane_start) - 1

    def counts(self) -> dict:
        return {"bonds": len(self.bond_idx), "angles": len(self.angle_idx),
                "torsions": len(self.tors_idx), "chirals": len(self.chir_idx),
                "planes": self.n_planes, **self.lowres_counts()}

    def lowres_counts(self) -> dict:
        """Counts of the low-resolution terms that are present (none: an empty dict)."""
        c = {"helix_hbonds": int(np.sum(self.dist_kind == 0)),
             "strand_hbonds": int(np.sum(self.dist_kind == 1)),
             "ramachandran": len(self.rama_idx), "reference_torsions": len(self.reft_idx)}
        return {k: v for k, v in c.items() if v}

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))
