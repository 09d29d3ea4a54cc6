"""ADP refinement: isotropic B-factors against the map, by the density-fit target.

The model map is the Gaussian-atom map of core/modelmap.py: atom a is a 3-D Gaussian of weight
amp_a (electrons x occupancy) and variance s_a = (max(B_a, 1) + b_blur) / (8 pi^2) per axis, cut
at 3 sigma.
The data term is the masked least-squares residual T = 1000 sum_mask (rho_obs - k rho_calc)^2 /
sum_mask rho_obs^2 with k fitted at every evaluation, as DensityFitTerm; its derivative with
respect to B_a is sum_v dT/drho_calc(v) * rho_a(v) (d_av^2 / (2 s_a^2) - 3 / (2 s_a)) / (8 pi^2).

The refined target is  w * T_data + sum_bonds (B_i - B_j)^2 / sigma_sim^2
+ sum_atoms (B_a - B_start,a)^2 / sigma_prior^2, over individual B (one per atom) or grouped B
(one per residue, all its atoms alike). With several workers each evaluates the data gradient of
its block of atoms (the model map needs every atom, so each builds it whole) and the restraints
whose first atom it owns; one Allreduce sums them (the same layout as the coordinate target).
"""
from __future__ import annotations

import math

import numpy as np

from ..core.modelmap import _gather_s2, _splat, atom_amplitudes

B_FLOOR = 1.0


class ADPDataTerm:
    """T_data(B) at fixed coordinates, and its gradient with respect to B (for a block of atoms)."""

    def __init__(self, data, origin, voxel, mask, xyz, elements, b_blur: float, occ=None):
        self.data = np.ascontiguousarray(data, dtype=np.float64)
        self.origin = np.asarray(origin, dtype=np.float64)
        self.voxel = np.asarray(voxel, dtype=np.float64)
        self.mask = np.ascontiguousarray(mask, dtype=np.float64)
        self.xyz = np.ascontiguousarray(xyz, dtype=np.float64)
        self.amp = atom_amplitudes(elements, occ)
        self.b_blur = float(b_blur)
        masked = self.data * self.mask
        self.scale = 1000.0 / max(float(np.sum(masked * masked)), 1e-30)

    def _sig2(self, b):
        return (np.maximum(np.asarray(b, dtype=np.float64), B_FLOOR) + self.b_blur) / (8.0 * math.pi ** 2)

    def target(self, b, atoms: slice | None = None) -> tuple[float, np.ndarray]:
        """T_data and dT/dB (zero outside `atoms`, all atoms by default)."""
        n = len(self.xyz)
        atoms = atoms or slice(0, n)
        sig2 = self._sig2(b)
        calc = np.zeros(self.data.shape)
        _splat(self.xyz, self.amp, sig2, self.origin, self.voxel, calc)
        calc *= self.mask
        k = float(np.sum(self.data * calc) / max(float(np.sum(calc * calc)), 1e-30))
        diff = (self.data - k * calc) * self.mask
        f = float(np.sum(diff * diff)) * self.scale
        dcalc = (-2.0 * k * self.scale) * diff
        g_s2 = np.zeros(n)
        _gather_s2(self.xyz, self.amp, sig2, self.origin, self.voxel, dcalc, atoms.start, atoms.stop, g_s2)
        g = g_s2 / (8.0 * math.pi ** 2)
        g[np.asarray(b) < B_FLOOR] = 0.0
        return f, g


class ADPRestraints:
    """Similarity of bonded atoms' B and a prior towards the start B."""

    def __init__(self, bond_idx, b_start, sigma_sim: float, sigma_prior: float):
        self.bonds = np.asarray(bond_idx, dtype=np.int64).reshape(-1, 2)
        self.b_start = np.asarray(b_start, dtype=np.float64)
        self.k_sim = 1.0 / sigma_sim ** 2
        self.k_prior = 1.0 / sigma_prior ** 2

    def target(self, b, atoms: slice | None = None) -> tuple[float, np.ndarray]:
        """Energy and gradient of the terms whose first atom lies in `atoms` (all by default)."""
        b = np.asarray(b, dtype=np.float64)
        n = len(b)
        atoms = atoms or slice(0, n)
        bonds = self.bonds[(self.bonds[:, 0] >= atoms.start) & (self.bonds[:, 0] < atoms.stop)]
        d = b[bonds[:, 0]] - b[bonds[:, 1]]
        g = np.zeros(n)
        np.add.at(g, bonds[:, 0], 2 * self.k_sim * d)
        np.add.at(g, bonds[:, 1], -2 * self.k_sim * d)
        dp = b[atoms] - self.b_start[atoms]
        g[atoms] += 2 * self.k_prior * dp
        return float(self.k_sim * d @ d + self.k_prior * dp @ dp), g


class GroupedB:
    """One B per residue: B_atom = p[res_index]."""

    point_dim = 1

    def __init__(self, res_index, n_res: int):
        self.res_index = np.asarray(res_index, dtype=np.int64)
        self.n_res = int(n_res)

    def start(self, b) -> np.ndarray:
        return np.bincount(self.res_index, weights=b, minlength=self.n_res) / np.maximum(
            np.bincount(self.res_index, minlength=self.n_res), 1)

    def expand(self, p) -> np.ndarray:
        return np.asarray(p)[self.res_index]

    def pullback(self, g) -> np.ndarray:
        return np.bincount(self.res_index, weights=g, minlength=self.n_res)


class IndividualB:
    point_dim = 1

    def start(self, b) -> np.ndarray:
        return np.asarray(b, dtype=np.float64).copy()

    def expand(self, p) -> np.ndarray:
        return np.asarray(p)

    def pullback(self, g) -> np.ndarray:
        return g


def adp_objective(comm, data: ADPDataTerm, restraints: ADPRestraints, param, weight: float,
                  res_first_atom):
    """fun(p) -> (f, grad_p) of weight * T_data + T_restraints over the B parametrisation;
    collective over comm (each rank its block of atoms, one Allreduce) when comm is given."""
    n = len(data.xyz)
    if comm is None:
        block = slice(0, n)
    else:
        from ..parallel.decompose import atom_blocks
        bounds = atom_blocks(res_first_atom, comm.Get_size())
        part = comm.Get_rank()
        block = slice(int(bounds[part]), int(bounds[part + 1]))
    buf = np.zeros(n + 1)

    def fun(p):
        b = param.expand(p)
        fd, gd = data.target(b, block)
        fr, gr = restraints.target(b, block)
        buf[:n] = weight * gd + gr
        buf[n] = weight * fd + fr if (block.start == 0 or comm is None) else fr
        if comm is not None:
            from mpi4py import MPI
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return float(buf[n]), param.pullback(buf[:n].copy())
    return fun
