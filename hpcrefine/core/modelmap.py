"""The density-fit data term: a model map of Gaussian atoms compared with the map voxel by voxel.

Each atom is a 3-D Gaussian of weight amp_i (electrons x occupancy) and variance
(B_i + b_blur) / (8 pi^2) per axis, cut at 3 sigma. The target is the masked least-squares
residual  T = sum_mask (rho_obs - k rho_calc)^2 / sum_mask rho_obs^2 (times 1000), with k the
least-squares scale at every evaluation (its derivative drops out at the optimum). Unlike the fast
target (map values at atom centres), it does not pull neighbouring atoms into their merged density
peaks, so it is not biased at low resolution; it costs a few hundred voxels per atom per evaluation.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def _box(x, origin, voxel, r, n):
    f = (x - origin) / voxel
    lo = max(int(math.floor(f - r / voxel)), 0)
    hi = min(int(math.ceil(f + r / voxel)), n - 1)
    return f, lo, hi


@njit(cache=True, inline="always")
def _atom(xyz, a, amp, sig2, origin, voxel, shape):
    """Atom a's variance, cut-off radius (3 sigma), normalisation, fractional position and the
    index range of the voxels within the cut-off along each axis."""
    nz, ny, nx = shape
    s2 = sig2[a]
    r = 3.0 * math.sqrt(s2)
    norm = amp[a] / (2.0 * math.pi * s2) ** 1.5
    fx, i0, i1 = _box(xyz[a, 0], origin[0], voxel[0], r, nx)
    fy, j0, j1 = _box(xyz[a, 1], origin[1], voxel[1], r, ny)
    fz, k0, k1 = _box(xyz[a, 2], origin[2], voxel[2], r, nz)
    return s2, r, norm, fx, i0, i1, fy, j0, j1, fz, k0, k1


SPLAT, GRAD_XYZ, GRAD_S2, GRAD_AMP = 0, 1, 2, 3       # what _over_atoms does at each voxel


@njit(cache=True)
def _over_atoms(xyz, amp, sig2, origin, voxel, grid, lo_atom, hi_atom, mode, grad, grad_s2):
    """For atoms lo_atom..hi_atom-1, over the voxels within 3 sigma of each: SPLAT adds the
    atom's Gaussian into grid; GRAD_XYZ adds sum_v grid_v d rho_a(v) / d x_a into grad[a];
    GRAD_S2 adds sum_v grid_v d rho_a(v) / d s2_a into grad_s2[a] (s2: the Gaussian's variance);
    GRAD_AMP adds sum_v grid_v d rho_a(v) / d amp_a (the Gaussian of unit weight) into grad_s2[a],
    without dividing by amp_a, so an atom of weight 0 has its derivative too."""
    for a in range(lo_atom, hi_atom):
        s2, r, norm, fx, i0, i1, fy, j0, j1, fz, k0, k1 = _atom(xyz, a, amp, sig2, origin, voxel, grid.shape)
        gx = 0.0
        gy = 0.0
        gz = 0.0
        for k in range(k0, k1 + 1):
            dz = (k - fz) * voxel[2]
            for j in range(j0, j1 + 1):
                dy = (j - fy) * voxel[1]
                for i in range(i0, i1 + 1):
                    dx = (i - fx) * voxel[0]
                    d2 = dx * dx + dy * dy + dz * dz
                    if d2 <= r * r:
                        e = math.exp(-0.5 * d2 / s2)
                        g = norm * e
                        if mode == SPLAT:
                            grid[k, j, i] += g
                        elif mode == GRAD_XYZ:
                            w = grid[k, j, i] * g / s2
                            gx += w * dx
                            gy += w * dy
                            gz += w * dz
                        elif mode == GRAD_S2:
                            gx += grid[k, j, i] * g * (0.5 * d2 / (s2 * s2) - 1.5 / s2)
                        else:
                            gx += grid[k, j, i] * e
        if mode == GRAD_XYZ:
            grad[a, 0] += gx
            grad[a, 1] += gy
            grad[a, 2] += gz
        elif mode == GRAD_S2:
            grad_s2[a] += gx
        elif mode == GRAD_AMP:
            grad_s2[a] += gx / (2.0 * math.pi * s2) ** 1.5


def _splat(xyz, amp, sig2, origin, voxel, out):
    _over_atoms(xyz, amp, sig2, origin, voxel, out, 0, len(xyz), SPLAT, np.zeros((1, 3)), np.zeros(1))


def _gather(xyz, amp, sig2, origin, voxel, diff, lo_atom, hi_atom, grad):
    _over_atoms(xyz, amp, sig2, origin, voxel, diff, lo_atom, hi_atom, GRAD_XYZ, grad, np.zeros(1))


def _gather_s2(xyz, amp, sig2, origin, voxel, diff, lo_atom, hi_atom, grad_s2):
    """grad_s2[a] += sum_v diff_v d rho_a(v) / d s2_a for atoms lo_atom..hi_atom-1 (the ADP step)."""
    _over_atoms(xyz, amp, sig2, origin, voxel, diff, lo_atom, hi_atom, GRAD_S2, np.zeros((1, 3)), grad_s2)


def _gather_amp(xyz, amp, sig2, origin, voxel, diff, lo_atom, hi_atom, grad_amp):
    """grad_amp[a] += sum_v diff_v d rho_a(v) / d amp_a for atoms lo_atom..hi_atom-1 (the
    occupancy step: amp_a = electrons_a * occupancy_a)."""
    _over_atoms(xyz, amp, sig2, origin, voxel, diff, lo_atom, hi_atom, GRAD_AMP, np.zeros((1, 3)), grad_amp)


ELECTRONS = {"H": 1, "C": 6, "N": 7, "O": 8, "P": 15, "S": 16, "SE": 34}


def atom_amplitudes(elements, occ=None) -> np.ndarray:
    """Each atom's weight in the model map: its electrons (ELECTRONS, 6 for unknown elements)
    times its occupancy (1 when occ is None; an occupancy of 1 leaves the weight bitwise as it is)."""
    amp = np.array([ELECTRONS.get(e, 6) for e in np.asarray(elements)], dtype=np.float64)
    if occ is not None:
        amp *= np.asarray(occ, dtype=np.float64)
    return amp


class DensityFitTerm:
    """Data term: masked least-squares fit of a Gaussian-atom model map to the map."""

    def __init__(self, data, origin, voxel, mask, elements, b, b_blur: float, atoms: slice | None = None,
                 occ=None):
        self.data = np.ascontiguousarray(data, dtype=np.float64)
        self.origin = np.asarray(origin, dtype=np.float64)
        self.voxel = np.asarray(voxel, dtype=np.float64)
        self.mask = np.ascontiguousarray(mask, dtype=np.float64)
        self.elements = np.asarray(elements)
        self.b = np.asarray(b, dtype=np.float64)
        self.b_blur = float(b_blur)
        self.occ = None if occ is None else np.asarray(occ, dtype=np.float64)
        self.amp = atom_amplitudes(self.elements, self.occ)
        self.sig2 = (np.maximum(self.b, 1.0) + self.b_blur) / (8.0 * math.pi ** 2)
        masked = self.data * self.mask
        self.scale = 1000.0 / max(float(np.sum(masked * masked)), 1e-30)
        self.atoms = atoms

    def blurred(self, b_extra: float) -> "DensityFitTerm":
        """The same term with atoms blurred by b_extra more (a wider basin of attraction)."""
        return DensityFitTerm(self.data, self.origin, self.voxel, self.mask, self.elements, self.b,
                              self.b_blur + b_extra, occ=self.occ)

    def _residual(self, xyz):
        calc = np.zeros(self.data.shape)
        _splat(np.ascontiguousarray(xyz, dtype=np.float64), self.amp, self.sig2, self.origin, self.voxel, calc)
        calc *= self.mask
        k = float(np.sum(self.data * calc) / max(float(np.sum(calc * calc)), 1e-30))
        diff = (self.data - k * calc) * self.mask
        return k, diff

    def target(self, xyz: np.ndarray) -> tuple[float, np.ndarray]:
        k, diff = self._residual(xyz)
        grad = np.zeros((len(xyz), 3))
        _gather(np.ascontiguousarray(xyz, dtype=np.float64), self.amp, self.sig2, self.origin, self.voxel,
                (-2.0 * k * self.scale) * diff, 0, len(xyz), grad)
        return float(np.sum(diff * diff)) * self.scale, grad

    def local(self, atoms: slice) -> "DensityFitTerm":
        """For a rank owning a block of atoms: the model map needs every atom, so each rank builds
        it whole; the gradient is taken for the block only, and the target counted by the rank
        whose block starts at atom 0, so that a sum over ranks counts it once."""
        return DensityFitTerm(self.data, self.origin, self.voxel, self.mask, self.elements, self.b,
                              self.b_blur, atoms, occ=self.occ)

    def accumulate(self, xyz: np.ndarray, grad_out: np.ndarray, scale: float) -> float:
        sl = self.atoms
        k, diff = self._residual(xyz)
        _gather(np.ascontiguousarray(xyz, dtype=np.float64), self.amp, self.sig2, self.origin, self.voxel,
                (-2.0 * k * self.scale * scale) * diff, sl.start, sl.stop, grad_out)
        return float(np.sum(diff * diff)) * self.scale * scale if sl.start == 0 else 0.0
