"""Morphing: a smooth field of local shifts that brings a poorly fitting model into its density.

Control points are the C-alpha (P for nucleic acids, else the first atom) of every k-th residue
of each chain in the start model. Each control point i carries a shift s_i; an atom moves by the
Gaussian-weighted average of the shifts near it,

    x_a = x0_a + sum_i W_ai s_i,   W_ai = exp(-|x0_a - c_i|^2 / (2 r^2)) / sum_j (...)

(cut at 3 r), so the displacement varies smoothly over about r (10 A) and the local geometry is
nearly kept. The gradient is W^T grad_xyz. A smoothness penalty
lambda * sum_(i,j) v_ij |s_i - s_j|^2 over pairs of control points within 2 r (v_ij the same
Gaussian of their distance) keeps neighbouring shifts alike. Refined against a heavily blurred
map, in rounds of decreasing blur and radius, followed by restrained coordinate minimisation.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse
from scipy.spatial import cKDTree


def control_atoms(model, every: int) -> np.ndarray:
    """Indices of the control atoms: CA (or P, else the first atom) of every `every`-th residue
    of each chain, and of each chain's last residue."""
    first = np.asarray(model.res_first_atom)
    out = []
    for chain in dict.fromkeys(np.asarray(model.res_chain).tolist()):
        res = np.flatnonzero(np.asarray(model.res_chain) == chain)
        picks = list(res[::max(1, every)])
        if res[-1] not in picks:
            picks.append(res[-1])
        for r in picks:
            names = model.atom_name[first[r]:first[r + 1]]
            a = first[r]
            for want in ("CA", "P"):
                hit = np.flatnonzero(names == want)
                if len(hit):
                    a = first[r] + int(hit[0])
                    break
            out.append(int(a))
    return np.array(sorted(set(out)), dtype=np.int64)


class Morph:
    """Parametrisation x = x0 + W s by shifts s of control points (3 parameters each)."""

    point_dim = 3

    def __init__(self, xyz0: np.ndarray, control_xyz: np.ndarray, radius: float):
        self.xyz0 = np.array(xyz0, dtype=np.float64)
        self.control = np.array(control_xyz, dtype=np.float64).reshape(-1, 3)
        self.radius = float(radius)
        tree_c = cKDTree(self.control)
        cut = 3.0 * self.radius
        # ndarray output keeps pairs at distance 0 (a control point is an atom)
        pairs = cKDTree(self.xyz0).sparse_distance_matrix(tree_c, cut, output_type="ndarray")
        w = np.exp(-pairs["v"] ** 2 / (2 * self.radius ** 2))
        W = scipy.sparse.csr_matrix((w, (pairs["i"], pairs["j"])),
                                    shape=(len(self.xyz0), len(self.control)))
        total = np.asarray(W.sum(axis=1)).ravel()
        scale = np.where(total > 0, 1.0 / np.where(total > 0, total, 1.0), 0.0)
        self.W = scipy.sparse.diags(scale) @ W
        self.W = self.W.tocsr()
        self.WT = self.W.T.tocsr()
        cp = tree_c.sparse_distance_matrix(tree_c, 2.0 * self.radius, output_type="ndarray")
        keep = cp["i"] < cp["j"]
        self.edge_i = cp["i"][keep]
        self.edge_j = cp["j"][keep]
        self.edge_w = np.exp(-cp["v"][keep] ** 2 / (2 * self.radius ** 2))

    @property
    def n_params(self) -> int:
        return 3 * len(self.control)

    def zero(self) -> np.ndarray:
        return np.zeros(self.n_params)

    def coords(self, p) -> np.ndarray:
        return self.xyz0 + self.W @ np.asarray(p, dtype=np.float64).reshape(-1, 3)

    def pullback(self, p, grad_xyz) -> np.ndarray:
        return (self.WT @ np.asarray(grad_xyz, dtype=np.float64).reshape(-1, 3)).ravel()

    def smoothness(self, lam: float):
        """penalty(p) -> (f, grad): lam * sum over control pairs v_ij |s_i - s_j|^2."""
        i, j, v = self.edge_i, self.edge_j, self.edge_w

        def penalty(p):
            s = np.asarray(p, dtype=np.float64).reshape(-1, 3)
            d = s[i] - s[j]
            f = lam * float(np.sum(v * np.sum(d * d, axis=1)))
            g = np.zeros_like(s)
            gd = (2.0 * lam * v)[:, None] * d
            np.add.at(g, i, gd)
            np.add.at(g, j, -gd)
            return f, g.ravel()
        return penalty
