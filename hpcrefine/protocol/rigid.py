"""Rigid-body refinement of groups of atoms (chains or user domains).

Each group g moves as x = R(w_g) (x0 - c_g) + c_g + t_g, with c_g the group's centroid in the
start model, t_g a translation and w_g a rotation vector (axis * angle, Rodrigues' formula). The
parameters of a group are t_g (A) and r_g * w_g (A of arc at the group's radius of gyration r_g),
so that translations and rotations are on one scale for L-BFGS and its step limit. The gradient
is the chain rule from the coordinate gradient: dT/dt_g = sum_a g_a and
dT/dw_k = sum_a g_a . (dR/dw_k) (x0_a - c_g), with dR/dw_k after Gallego & Yezzi (2015, "A compact
formula for the derivative of a 3-D rotation in exponential coordinates").

Group specification (`--rigid-groups`, or params.rigid_groups): groups separated by "|" or new
lines, each a comma-separated list of selections "A" (chain A), "A:12" (one residue) or "A:1-29"
(residues 1 to 29 of chain A by author number). The text may instead be a file holding the same.
Empty: one group per chain. "auto": the structural domains of each protein chain found in the
start model (domains.py). Atoms outside every group stay where they are.
"""
from __future__ import annotations

import os
import re

import numpy as np

from ..errors import InputError


def _skew(v):
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


def rotation(w) -> np.ndarray:
    """Rodrigues: the rotation matrix of rotation vector w (radians)."""
    w = np.asarray(w, dtype=np.float64)
    th = float(np.linalg.norm(w))
    K = _skew(w)
    if th < 1e-8:
        return np.eye(3) + K + 0.5 * K @ K
    return np.eye(3) + (np.sin(th) / th) * K + ((1.0 - np.cos(th)) / (th * th)) * (K @ K)


def rotation_derivatives(w) -> np.ndarray:
    """(3, 3, 3): dR/dw_k for k = 0, 1, 2."""
    w = np.asarray(w, dtype=np.float64)
    th2 = float(w @ w)
    if th2 < 1e-14:
        return np.array([_skew(e) for e in np.eye(3)])
    R = rotation(w)
    I_R = np.eye(3) - R
    out = np.empty((3, 3, 3))
    for k in range(3):
        out[k] = ((w[k] * _skew(w) + _skew(np.cross(w, I_R[:, k]))) / th2) @ R
    return out


def _seq_number(seqid: str) -> int:
    m = re.match(r"-?\d+", str(seqid).strip())
    if not m:
        raise InputError(f"residue number {seqid!r} is not a number")
    return int(m.group())


def parse_groups(spec: str | None, model) -> list[np.ndarray]:
    """Atom index arrays of the rigid groups of `spec` (see the module docstring)."""
    res_chain = np.asarray(model.res_chain)
    if not spec or not str(spec).strip():
        chains = list(dict.fromkeys(res_chain.tolist()))
        return [np.flatnonzero(model.chain == c) for c in chains]
    if str(spec).strip().lower() == "auto":
        from .domains import domain_groups
        return domain_groups(model)
    text = str(spec)
    if os.path.isfile(text):
        with open(text) as fh:
            text = "\n".join(line.split("#", 1)[0] for line in fh)
    numbers = np.array([_seq_number(s) for s in model.res_seqid])
    owner = np.full(model.n_residues, -1)
    groups_txt = [g.strip() for g in re.split(r"[|\n]", text) if g.strip()]
    if not groups_txt:
        raise InputError(f"rigid groups {spec!r}: no group given")
    for gi, gtxt in enumerate(groups_txt):
        for sel in (s.strip() for s in gtxt.split(",") if s.strip()):
            m = re.fullmatch(r"([^:\s]+)(?::\s*(-?\d+)\s*(?:-\s*(-?\d+))?)?", sel)
            if not m:
                raise InputError(f"rigid groups: cannot read selection {sel!r} (use A, A:12 or A:1-29)")
            chain, lo, hi = m.group(1), m.group(2), m.group(3)
            pick = res_chain == chain
            if lo is not None:
                lo = int(lo)
                hi = int(hi) if hi is not None else lo
                pick &= (numbers >= lo) & (numbers <= hi)
            if not pick.any():
                raise InputError(f"rigid groups: selection {sel!r} matches no residue of the model")
            clash = pick & (owner >= 0) & (owner != gi)
            if clash.any():
                r = int(np.flatnonzero(clash)[0])
                raise InputError(f"rigid groups: residue {model.residue_label(r)} is in two groups")
            owner[pick] = gi
    first = np.asarray(model.res_first_atom)
    out = []
    for gi in range(len(groups_txt)):
        res = np.flatnonzero(owner == gi)
        out.append(np.concatenate([np.arange(first[r], first[r + 1]) for r in res]).astype(np.int64))
    return out


class RigidBodies:
    """Parametrisation of coordinates by rigid-body moves of groups (6 parameters each)."""

    point_dim = 3

    def __init__(self, xyz0: np.ndarray, groups: list[np.ndarray]):
        self.xyz0 = np.array(xyz0, dtype=np.float64)
        self.groups = [np.asarray(g, dtype=np.int64) for g in groups if len(g)]
        self.centre = np.array([self.xyz0[g].mean(axis=0) for g in self.groups]).reshape(-1, 3)
        self.local = [self.xyz0[g] - c for g, c in zip(self.groups, self.centre)]
        self.radius = np.array([max(1.0, float(np.sqrt(np.mean(np.sum(y * y, axis=1)))))
                                for y in self.local])

    @property
    def n_params(self) -> int:
        return 6 * len(self.groups)

    def zero(self) -> np.ndarray:
        return np.zeros(self.n_params)

    def _split(self, p):
        p = np.asarray(p, dtype=np.float64).reshape(-1, 2, 3)
        return p[:, 0], p[:, 1] / self.radius[:, None]

    def coords(self, p) -> np.ndarray:
        t, w = self._split(p)
        xyz = self.xyz0.copy()
        for i, g in enumerate(self.groups):
            xyz[g] = self.local[i] @ rotation(w[i]).T + self.centre[i] + t[i]
        return xyz

    def pullback(self, p, grad_xyz) -> np.ndarray:
        _, w = self._split(p)
        g = np.asarray(grad_xyz, dtype=np.float64).reshape(-1, 3)
        out = np.empty((len(self.groups), 2, 3))
        for i, idx in enumerate(self.groups):
            gi = g[idx]
            out[i, 0] = gi.sum(axis=0)
            M = gi.T @ self.local[i]                     # sum_a g_a y_a^T
            dR = rotation_derivatives(w[i])
            out[i, 1] = np.einsum("kij,ij->k", dR, M) / self.radius[i]
        return out.ravel()

    def describe(self, p) -> list[dict]:
        """Per group: atoms, translation (A) and rotation (deg)."""
        t, w = self._split(p)
        return [{"atoms": int(len(g)), "shift": round(float(np.linalg.norm(t[i])), 3),
                 "rotation_deg": round(float(np.degrees(np.linalg.norm(w[i]))), 3)}
                for i, g in enumerate(self.groups)]
