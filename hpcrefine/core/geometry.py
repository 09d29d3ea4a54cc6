"""Stereochemical restraint energies and their analytic gradients.

Every term contributes ((value - target) / sigma)^2: bond lengths in A, angles and torsions in
degrees (sigma in degrees too), chiral volumes in A^3, plane distances in A. Gradients are with
respect to Cartesian coordinates in A.

The term functions take the term arrays, not a whole Restraints, so that they work on any subset
of the terms (an MPI rank evaluates the terms it owns). Each returns (energy, grad) and can add into
a caller's gradient array instead of allocating one:

    e, g = bond_terms(xyz, idx, target, sigma)                 # new (n, 3) gradient
    e, g = bond_terms(xyz, idx, target, sigma, grad_out=g)     # adds into g, returns g

`weight` scales both the energy and the gradient contribution. Kernels are compiled with numba
(no fastmath, no threads): sums run in term order, so results are bitwise reproducible.

Conventions:
  * torsions: the deviation is wrapped into [-180/p, 180/p) for period p (p <= 1: into
    [-180, 180)); the torsion angle follows the IUPAC sign convention (trans = 180).
  * chirality: the signed volume V = (a1 - c) . ((a2 - c) x (a3 - c)) against the target. A term
    marked in the optional boolean `both` array (chirality 'both': either hand allowed) restrains
    |V| to |target| instead, so its target should hold the typical magnitude (e.g. 2.5 A^3).
    `restraint_energy` picks up such an array from an attribute `chir_both` of the Restraints
    if it has one; without it every chirality term is signed.
  * planes: the plane of each group is the least-squares plane with atom weights 1/sigma^2
    (weighted centroid, normal = eigenvector of the smallest eigenvalue of the weighted scatter
    matrix); the energy is sum_atoms (distance / sigma)^2, i.e. that smallest eigenvalue. Because
    the plane minimises the energy, the gradient is taken with the plane held fixed (envelope
    theorem): dE/dx_a = 2 (d_a / sigma_a^2) n. This is exact, not an approximation, as long as
    the smallest eigenvalue is not degenerate.
  * Angles at 0 or 180 degrees, torsions with collinear atoms and zero-length bonds have no
    defined gradient direction; those terms add their energy but no gradient.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from ..restraints import Restraints
from .common import add, add_at, catmull_rom, cross, diff, dot, scale, sub_at
from .common import coords as _coords
from .common import grad_array as _grad

RAD2DEG = 180.0 / math.pi
TERM_NAMES = ("bonds", "angles", "torsions", "chirals", "planes")
# low-resolution terms (hpcrefine.lowres): in restraint_energy's parts only when present
LOWRES_TERM_NAMES = ("hbonds", "ramachandran", "reference")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _ints(a, ncol=None) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.int64 and a.dtype != np.int32:
        a = a.astype(np.int64)
    if ncol is not None:
        a = a.reshape(-1, ncol)
    return a


def _floats(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _energy(kernel, xyz, grad_out, *args):
    """kernel(xyz, *args, grad) on checked coordinates, adding into grad_out if given (else a new
    zero gradient): returns (energy, grad)."""
    xyz = _coords(xyz)
    g = _grad(xyz, grad_out)
    return float(kernel(xyz, *args, g)), g


@njit(cache=True)
def _wrap(dev, width):
    """dev wrapped into [-width/2, width/2)."""
    h = 0.5 * width
    return (dev + h) - width * math.floor((dev + h) / width) - h


@njit(cache=True)
def _period_width(p):
    if p <= 1:
        return 360.0
    return 360.0 / p


# ----------------------------------------------------------------------------------------------
# bonds
# ----------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _bond(xyz, i, j):
    """d = x_i - x_j and |d|."""
    d = diff(xyz, i, j)
    return d, math.sqrt(dot(d, d))


@njit(cache=True)
def _bond_kernel(xyz, idx, target, sigma, weight, grad):
    e = 0.0
    for t in range(idx.shape[0]):
        i = idx[t, 0]
        j = idx[t, 1]
        dv, d = _bond(xyz, i, j)
        dev = d - target[t]
        w = weight / (sigma[t] * sigma[t])
        e += w * dev * dev
        if d > 0.0:
            g = scale(2.0 * w * dev / d, dv)
            add_at(grad, i, g)
            sub_at(grad, j, g)
    return e


@njit(cache=True)
def _bond_values(xyz, idx):
    out = np.empty(idx.shape[0])
    for t in range(idx.shape[0]):
        out[t] = _bond(xyz, idx[t, 0], idx[t, 1])[1]
    return out


def bond_terms(xyz, idx, target, sigma, grad_out=None, weight=1.0):
    """Bond-length restraints: sum ((|x_i - x_j| - target) / sigma)^2. idx (t, 2)."""
    return _energy(_bond_kernel, xyz, grad_out, _ints(idx, 2), _floats(target), _floats(sigma),
                   float(weight))


def bond_lengths(xyz, idx) -> np.ndarray:
    return _bond_values(_coords(xyz), _ints(idx, 2))


# ----------------------------------------------------------------------------------------------
# angles
# ----------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _angle(xyz, i, j, k):
    """u = x_i - x_j, v = x_k - x_j, w = u x v, |w| and the angle between u and v in degrees."""
    u = diff(xyz, i, j)
    v = diff(xyz, k, j)
    w = cross(u, v)
    wn = math.sqrt(dot(w, w))
    return u, v, w, wn, math.atan2(wn, dot(u, v)) * RAD2DEG


@njit(cache=True)
def _angle_kernel(xyz, idx, target, sigma, weight, grad):
    e = 0.0
    for t in range(idx.shape[0]):
        i = idx[t, 0]
        j = idx[t, 1]
        k = idx[t, 2]
        u, v, wv, wn, theta = _angle(xyz, i, j, k)
        dev = theta - target[t]
        w = weight / (sigma[t] * sigma[t])
        e += w * dev * dev
        uu = dot(u, u)
        vv = dot(v, v)
        if wn > 1e-12 * math.sqrt(uu * vv):
            gt = 2.0 * w * dev * RAD2DEG      # dE/dtheta, theta in radians
            # dtheta/du = (u x w) / (|u|^2 |w|);  dtheta/dv = -(v x w) / (|v|^2 |w|)
            gi = scale(gt / (uu * wn), cross(u, wv))
            gk = scale(-gt / (vv * wn), cross(v, wv))
            add_at(grad, i, gi)
            add_at(grad, k, gk)
            sub_at(grad, j, add(gi, gk))
    return e


@njit(cache=True)
def _angle_values(xyz, idx):
    out = np.empty(idx.shape[0])
    for t in range(idx.shape[0]):
        out[t] = _angle(xyz, idx[t, 0], idx[t, 1], idx[t, 2])[4]
    return out


def angle_terms(xyz, idx, target, sigma, grad_out=None, weight=1.0):
    """Bond-angle restraints i-j-k (vertex j), degrees: sum ((angle - target) / sigma)^2."""
    return _energy(_angle_kernel, xyz, grad_out, _ints(idx, 3), _floats(target), _floats(sigma),
                   float(weight))


def angle_values(xyz, idx) -> np.ndarray:
    """Angles i-j-k in degrees, in [0, 180]."""
    return _angle_values(_coords(xyz), _ints(idx, 3))


# ----------------------------------------------------------------------------------------------
# torsions
# ----------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _torsion(xyz, i, j, k, m):
    """Bond vectors b1 = x_j - x_i, b2 = x_k - x_j, b3 = x_m - x_k, the normals a = b1 x b2 and
    b = b2 x b3, |b2| and the torsion angle in degrees (IUPAC sign)."""
    b1 = diff(xyz, j, i)
    b2 = diff(xyz, k, j)
    b3 = diff(xyz, m, k)
    a = cross(b1, b2)
    b = cross(b2, b3)
    l2 = math.sqrt(dot(b2, b2))
    phi = math.atan2(l2 * dot(b1, b), dot(a, b)) * RAD2DEG
    return b1, b2, b3, a, b, l2, phi


@njit(cache=True, inline="always")
def _torsion_grad(grad, i, j, k, m_, gp, b1, b2, b3, a, b, l2):
    """Adds gp * dphi/dx (phi in radians) of torsion i-j-k-m_ into grad; False when undefined."""
    aa = dot(a, a)
    bb = dot(b, b)
    if not (aa > 1e-24 and bb > 1e-24 and l2 > 1e-12):
        return False
    gi = scale(-gp * l2 / aa, a)       # dphi/dx_i = -|b2| a / |a|^2
    gl = scale(gp * l2 / bb, b)        # dphi/dx_l = |b2| b / |b|^2
    p12 = dot(b1, b2) / (l2 * l2)
    p32 = dot(b3, b2) / (l2 * l2)
    # dphi/dx_j = -(1 + p12) dphi/dx_i + p32 dphi/dx_l ; dphi/dx_k = -(sum of the others)
    gj = add(scale(-(1.0 + p12), gi), scale(p32, gl))
    add_at(grad, i, gi)
    add_at(grad, m_, gl)
    add_at(grad, j, gj)
    sub_at(grad, k, add(add(gi, gl), gj))
    return True


@njit(cache=True)
def _torsion_kernel(xyz, idx, target, sigma, period, weight, grad):
    e = 0.0
    for t in range(idx.shape[0]):
        i = idx[t, 0]
        j = idx[t, 1]
        k = idx[t, 2]
        m_ = idx[t, 3]
        b1, b2, b3, a, b, l2, phi = _torsion(xyz, i, j, k, m_)
        dev = _wrap(phi - target[t], _period_width(period[t]))
        w = weight / (sigma[t] * sigma[t])
        e += w * dev * dev
        _torsion_grad(grad, i, j, k, m_, 2.0 * w * dev * RAD2DEG, b1, b2, b3, a, b, l2)
    return e


@njit(cache=True)
def _torsion_values(xyz, idx):
    out = np.empty(idx.shape[0])
    for t in range(idx.shape[0]):
        out[t] = _torsion(xyz, idx[t, 0], idx[t, 1], idx[t, 2], idx[t, 3])[6]
    return out


@njit(cache=True)
def _torsion_devs(phi, target, period):
    out = np.empty(phi.shape[0])
    for t in range(phi.shape[0]):
        out[t] = _wrap(phi[t] - target[t], _period_width(period[t]))
    return out


def torsion_terms(xyz, idx, target, sigma, period, grad_out=None, weight=1.0):
    """Torsion restraints i-j-k-l, degrees, periodic: sum (wrap(phi - target, 360/p) / sigma)^2."""
    return _energy(_torsion_kernel, xyz, grad_out, _ints(idx, 4), _floats(target), _floats(sigma),
                   _ints(period), float(weight))


def torsion_values(xyz, idx) -> np.ndarray:
    """Torsion angles i-j-k-l in degrees, in [-180, 180] (IUPAC sign, trans = 180)."""
    return _torsion_values(_coords(xyz), _ints(idx, 4))


def torsion_deviations(xyz, idx, target, period) -> np.ndarray:
    """Periodic deviations wrap(phi - target) in degrees, in [-180/p, 180/p)."""
    return _torsion_devs(torsion_values(xyz, idx), _floats(target), _ints(period))


# ----------------------------------------------------------------------------------------------
# chirality
# ----------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _chiral(xyz, c, i1, i2, i3):
    """a = x_i1 - x_c, b = x_i2 - x_c, d = x_i3 - x_c, b x d and the volume a . (b x d)."""
    a = diff(xyz, i1, c)
    b = diff(xyz, i2, c)
    d = diff(xyz, i3, c)
    bd = cross(b, d)
    return a, b, d, bd, dot(a, bd)


@njit(cache=True)
def _chiral_kernel(xyz, idx, target, sigma, both, weight, grad):
    e = 0.0
    has_both = both.shape[0] > 0
    for t in range(idx.shape[0]):
        c = idx[t, 0]
        i1 = idx[t, 1]
        i2 = idx[t, 2]
        i3 = idx[t, 3]
        a, b, d, bd, v = _chiral(xyz, c, i1, i2, i3)
        # dV/dx_i1 = b x d, dV/dx_i2 = d x a, dV/dx_i3 = a x b
        da = cross(d, a)
        ab = cross(a, b)
        w = weight / (sigma[t] * sigma[t])
        if has_both and both[t]:
            dev = abs(v) - abs(target[t])
            gv = 2.0 * w * dev * (1.0 if v >= 0.0 else -1.0)
        else:
            dev = v - target[t]
            gv = 2.0 * w * dev
        e += w * dev * dev
        add_at(grad, i1, scale(gv, bd))
        add_at(grad, i2, scale(gv, da))
        add_at(grad, i3, scale(gv, ab))
        sub_at(grad, c, scale(gv, add(add(bd, da), ab)))
    return e


@njit(cache=True)
def _chiral_values(xyz, idx):
    out = np.empty(idx.shape[0])
    for t in range(idx.shape[0]):
        out[t] = _chiral(xyz, idx[t, 0], idx[t, 1], idx[t, 2], idx[t, 3])[4]
    return out


def _both(both, n):
    if both is None:
        return np.zeros(0, dtype=np.bool_)
    both = np.asarray(both, dtype=np.bool_)
    if both.shape != (n,):
        raise ValueError(f"chirality 'both' flags must have shape ({n},), got {both.shape}")
    return both


def chiral_terms(xyz, idx, target, sigma, both=None, grad_out=None, weight=1.0):
    """Chiral-volume restraints (centre, a1, a2, a3): sum ((V - target) / sigma)^2 with
    V = (a1 - c) . ((a2 - c) x (a3 - c)); terms flagged in `both` use (|V| - |target|)."""
    idx = _ints(idx, 4)
    return _energy(_chiral_kernel, xyz, grad_out, idx, _floats(target), _floats(sigma),
                   _both(both, len(idx)), float(weight))


def chiral_volumes(xyz, idx) -> np.ndarray:
    return _chiral_values(_coords(xyz), _ints(idx, 4))


def inverted_chirals(xyz, r: Restraints) -> np.ndarray:
    """Indices of the signed chiral terms of r whose volume has the sign opposite to its target
    (terms flagged 'both' and zero targets are never inverted)."""
    if len(r.chir_idx) == 0:
        return np.zeros(0, dtype=np.int64)
    v = chiral_volumes(xyz, r.chir_idx)
    bad = np.sign(v) * np.sign(_floats(r.chir_target)) < 0
    both = _chir_both(r)
    if both is not None:
        bad &= ~_both(both, len(v))
    return np.flatnonzero(bad)


INVERSION_PASSES = 10     # correct_inversions' passes at most


def correct_inversions(xyz, r: Restraints, max_passes: int = INVERSION_PASSES, bonded=None,
                       parts=None) -> tuple[np.ndarray, int, int]:
    """Put inverted chiral centres back: each centre atom is reflected through the plane of its
    three restrained neighbours. The reflection keeps the centre's distances to those neighbours
    and the angles between them, so only the centre moves (twice its distance from the plane,
    0.5-1 A) and no bond or angle among the four changes. A minimisation cannot do this from a
    badly distorted start: the chiral term pulls the volume through zero against the bonds and
    angles of a flat centre, and 30-50 iterations leave dozens of such centres inverted. Centres
    that share atoms (the ring carbons of a sugar) can invert each other, so the reflections are
    repeated on what is still inverted, up to max_passes times.

    A centre bonded to a fourth atom besides the three (no hydrogens are modelled, so a
    quaternary carbon of a ligand, say) is left to the minimisation: the reflection would stretch
    that bond by about 1 A.

    bonded: every atom's number of bonds, when r holds only some of the model's bonds (one part's
    terms). parts: when r is one part of the terms and the call is collective over the parts, an
    object with count(k) (k summed over the parts) and exchange(xyz, moved) (every part's moved
    rows written into xyz): each part reflects the centres of its own terms, and every part ends
    with the coordinates and the totals of the whole set (parallel.distributed.correct_inversions).

    Returns (coordinates, reflections made, centres still inverted)."""
    total = (lambda k: k) if parts is None else parts.count
    xyz = np.array(xyz, dtype=np.float64)
    made = 0
    bad = inverted_chirals(xyz, r)
    if total(len(bad)) == 0:
        return xyz, 0, 0
    if bonded is None:
        bonded = np.bincount(np.asarray(r.bond_idx).ravel(), minlength=len(xyz))
    three = np.asarray(bonded)[np.asarray(r.chir_idx)[:, 0]] <= 3
    for _ in range(max_passes):
        todo = bad[three[bad]]
        if total(len(todo)) == 0:
            break
        moved = reflect_centres(xyz, r.chir_idx, todo)
        if parts is not None:
            parts.exchange(xyz, moved)
        made += len(moved)
        bad = inverted_chirals(xyz, r)
    return xyz, total(made), total(len(bad))


def reflect_centres(xyz: np.ndarray, chir_idx, todo) -> np.ndarray:
    """One pass of correct_inversions, in place: the centres of chiral terms `todo` reflected
    through the plane of their three neighbours (each centre once, by its first term in todo;
    every position read before any is written). Returns the indices of the atoms moved."""
    idx = np.asarray(chir_idx)[todo]
    _, first = np.unique(idx[:, 0], return_index=True)   # a centre reflected once per pass
    idx = idx[first]
    c, a1, a2, a3 = (xyz[idx[:, k]] for k in range(4))
    n = np.cross(a2 - a1, a3 - a1)
    norm = np.linalg.norm(n, axis=1)
    ok = norm > 1e-6                                     # neighbours not on one line
    n = n[ok] / norm[ok, None]
    d = np.sum((c[ok] - a1[ok]) * n, axis=1)
    xyz[idx[ok, 0]] = c[ok] - 2.0 * d[:, None] * n
    return idx[ok, 0]


# ----------------------------------------------------------------------------------------------
# planes
# ----------------------------------------------------------------------------------------------

@njit(cache=True)
def _smallest_eigvec(a, v):
    """Eigenvector (returned as 3 floats) of the smallest eigenvalue of the symmetric 3x3 `a`
    (overwritten), by cyclic Jacobi rotations; v is 3x3 work space. Slower than the closed form
    but accurate for (near-)degenerate eigenvalues."""
    for r in range(3):
        for s in range(3):
            v[r, s] = 1.0 if r == s else 0.0
    scale = abs(a[0, 0]) + abs(a[1, 1]) + abs(a[2, 2])
    for sweep in range(12):          # quadratic convergence: 4-6 sweeps reach rounding level
        off = abs(a[0, 1]) + abs(a[0, 2]) + abs(a[1, 2])
        if off <= 1e-300 or off <= 1e-15 * scale:
            break
        for p in range(2):
            for q in range(p + 1, 3):
                apq = a[p, q]
                if apq == 0.0:
                    continue
                theta = (a[q, q] - a[p, p]) / (2.0 * apq)
                tt = 1.0 / (abs(theta) + math.sqrt(theta * theta + 1.0))
                if theta < 0.0:
                    tt = -tt
                c = 1.0 / math.sqrt(tt * tt + 1.0)
                s = tt * c
                for r in range(3):           # columns p, q of a
                    arp = a[r, p]
                    arq = a[r, q]
                    a[r, p] = c * arp - s * arq
                    a[r, q] = s * arp + c * arq
                for r in range(3):           # rows p, q of a
                    apr = a[p, r]
                    aqr = a[q, r]
                    a[p, r] = c * apr - s * aqr
                    a[q, r] = s * apr + c * aqr
                a[p, q] = 0.0                # zero by construction of the rotation
                a[q, p] = 0.0
                for r in range(3):
                    vrp = v[r, p]
                    vrq = v[r, q]
                    v[r, p] = c * vrp - s * vrq
                    v[r, q] = s * vrp + c * vrq
    best = 0
    if a[1, 1] < a[best, best]:
        best = 1
    if a[2, 2] < a[best, best]:
        best = 2
    nx = v[0, best]
    ny = v[1, best]
    nz = v[2, best]
    nn = math.sqrt(nx * nx + ny * ny + nz * nz)
    return nx / nn, ny / nn, nz / nn


@njit(cache=True)
def _smallest_eigvec_closed(a00, a01, a02, a11, a12, a22):
    """Unit eigenvector of the smallest eigenvalue of a symmetric 3x3 matrix in closed form
    (trigonometric eigenvalue formula, then the largest cross product of two rows of A - lam I).
    The last value is False when that eigenvalue is not well separated from the next one and the
    vector should be computed iteratively instead."""
    p1 = a01 * a01 + a02 * a02 + a12 * a12
    q = (a00 + a11 + a22) / 3.0
    b00 = a00 - q
    b11 = a11 - q
    b22 = a22 - q
    p2 = b00 * b00 + b11 * b11 + b22 * b22 + 2.0 * p1
    if not p2 > 0.0:
        return 0.0, 0.0, 1.0, False
    p = math.sqrt(p2 / 6.0)
    det = b00 * (b11 * b22 - a12 * a12) - a01 * (a01 * b22 - a12 * a02) + a02 * (a01 * a12 - b11 * a02)
    r = det / (2.0 * p * p * p)
    if r < -1.0:
        r = -1.0
    elif r > 1.0:
        r = 1.0
    lam = q + 2.0 * p * math.cos(math.acos(r) / 3.0 + 2.0 * math.pi / 3.0)
    m00 = a00 - lam
    m11 = a11 - lam
    m22 = a22 - lam
    # rows r0 = (m00, a01, a02), r1 = (a01, m11, a12), r2 = (a02, a12, m22)
    c0x = a01 * a12 - a02 * m11          # r0 x r1
    c0y = a02 * a01 - m00 * a12
    c0z = m00 * m11 - a01 * a01
    c1x = a01 * m22 - a02 * a12          # r0 x r2
    c1y = a02 * a02 - m00 * m22
    c1z = m00 * a12 - a01 * a02
    c2x = m11 * m22 - a12 * a12          # r1 x r2
    c2y = a12 * a02 - a01 * m22
    c2z = a01 * a12 - m11 * a02
    n0 = c0x * c0x + c0y * c0y + c0z * c0z
    n1 = c1x * c1x + c1y * c1y + c1z * c1z
    n2 = c2x * c2x + c2y * c2y + c2z * c2z
    if n0 >= n1 and n0 >= n2:
        x, y, z, nn = c0x, c0y, c0z, n0
    elif n1 >= n2:
        x, y, z, nn = c1x, c1y, c1z, n1
    else:
        x, y, z, nn = c2x, c2y, c2z, n2
    if not nn > 1e-12 * p2 * p2:          # |cross| <= 1e-6 scale^2: (near-)degenerate
        return 0.0, 0.0, 1.0, False
    s = 1.0 / math.sqrt(nn)
    return x * s, y * s, z * s, True


@njit(cache=True)
def _plane_kernel(xyz, atoms, start, sigma, weight, grad, dist_out, want_grad):
    """Energy of all planes; fills dist_out[a] with the signed distance of plane atom a (A)."""
    a = np.empty((3, 3))
    v = np.empty((3, 3))
    e = 0.0
    for p in range(start.shape[0] - 1):
        s0 = start[p]
        s1 = start[p + 1]
        if s1 - s0 < 1:
            continue
        wsum = 0.0
        cx = 0.0
        cy = 0.0
        cz = 0.0
        for q in range(s0, s1):
            w = 1.0 / (sigma[q] * sigma[q])
            at = atoms[q]
            wsum += w
            cx += w * xyz[at, 0]
            cy += w * xyz[at, 1]
            cz += w * xyz[at, 2]
        cx /= wsum
        cy /= wsum
        cz /= wsum
        sxx = 0.0
        sxy = 0.0
        sxz = 0.0
        syy = 0.0
        syz = 0.0
        szz = 0.0
        for q in range(s0, s1):
            w = 1.0 / (sigma[q] * sigma[q])
            at = atoms[q]
            dx = xyz[at, 0] - cx
            dy = xyz[at, 1] - cy
            dz = xyz[at, 2] - cz
            sxx += w * dx * dx
            sxy += w * dx * dy
            sxz += w * dx * dz
            syy += w * dy * dy
            syz += w * dy * dz
            szz += w * dz * dz
        nx, ny, nz, ok = _smallest_eigvec_closed(sxx, sxy, sxz, syy, syz, szz)
        if not ok:
            a[0, 0] = sxx
            a[0, 1] = sxy
            a[0, 2] = sxz
            a[1, 0] = sxy
            a[1, 1] = syy
            a[1, 2] = syz
            a[2, 0] = sxz
            a[2, 1] = syz
            a[2, 2] = szz
            nx, ny, nz = _smallest_eigvec(a, v)
        for q in range(s0, s1):
            w = 1.0 / (sigma[q] * sigma[q])
            at = atoms[q]
            d = (xyz[at, 0] - cx) * nx + (xyz[at, 1] - cy) * ny + (xyz[at, 2] - cz) * nz
            dist_out[q] = d
            e += weight * w * d * d
            if want_grad:
                gd = 2.0 * weight * w * d
                grad[at, 0] += gd * nx
                grad[at, 1] += gd * ny
                grad[at, 2] += gd * nz
    return e


def _plane_args(atoms, start, sigma):
    atoms = _ints(atoms)
    start = _ints(start)
    sigma = _floats(sigma)
    if len(start) == 0:
        start = np.zeros(1, dtype=np.int64)
    return atoms, start, sigma


def plane_terms(xyz, atoms, start, sigma, grad_out=None, weight=1.0):
    """Planarity restraints: plane p holds atoms[start[p]:start[p+1]] with per-atom sigma (A);
    energy sum (distance to the weighted least-squares plane / sigma)^2."""
    xyz = _coords(xyz)
    g = _grad(xyz, grad_out)
    atoms, start, sigma = _plane_args(atoms, start, sigma)
    dist = np.empty(len(atoms))
    e = _plane_kernel(xyz, atoms, start, sigma, float(weight), g, dist, True)
    return float(e), g


def plane_distances(xyz, atoms, start, sigma) -> np.ndarray:
    """Signed distance (A) of each plane atom (same order as `atoms`) to its group's plane."""
    xyz = _coords(xyz)
    atoms, start, sigma = _plane_args(atoms, start, sigma)
    dist = np.zeros(len(atoms))
    _plane_kernel(xyz, atoms, start, sigma, 1.0, np.zeros((0, 3)), dist, False)
    return dist


# ----------------------------------------------------------------------------------------------
# low-resolution terms: robust distances, reference torsions, Ramachandran (hpcrefine.lowres)
# ----------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _robust(a, sigma, limit):
    """Energy and dE/da of a deviation a >= 0 beyond a flat bottom: (a / sigma)^2 for limit <= 0,
    else the top-out form L^2 (1 - exp(-(a / sigma)^2 / L^2)) with L = limit / sigma, which is
    (a / sigma)^2 for a << limit and levels off at L^2 beyond it (its pull fades there)."""
    x = a / sigma
    if limit <= 0.0:
        return x * x, 2.0 * x / sigma
    big = limit / sigma
    ex = math.exp(-(x * x) / (big * big))
    return big * big * (1.0 - ex), 2.0 * x * ex / sigma


@njit(cache=True)
def _robust_dist_kernel(xyz, idx, target, sigma, flat, limit, weight, grad):
    e = 0.0
    for t in range(idx.shape[0]):
        i = idx[t, 0]
        j = idx[t, 1]
        dv, d = _bond(xyz, i, j)
        dev = d - target[t]
        a = abs(dev) - flat[t]
        if a <= 0.0:
            continue
        et, ga = _robust(a, sigma[t], limit[t])
        e += weight * et
        if d > 0.0:
            g = scale(weight * ga * (1.0 if dev > 0.0 else -1.0) / d, dv)
            add_at(grad, i, g)
            sub_at(grad, j, g)
    return e


def robust_distance_terms(xyz, idx, target, sigma, flat, limit, grad_out=None, weight=1.0):
    """Flat-bottomed, topped-out distance restraints (H-bonds): zero for |d - target| <= flat,
    else the top-out of ((|d - target| - flat) / sigma)^2 at `limit` A (limit <= 0: harmonic)."""
    return _energy(_robust_dist_kernel, xyz, grad_out, _ints(idx, 2), _floats(target),
                   _floats(sigma), _floats(flat), _floats(limit), float(weight))


@njit(cache=True)
def _robust_torsion_kernel(xyz, idx, target, sigma, limit, weight, grad):
    e = 0.0
    for t in range(idx.shape[0]):
        i = idx[t, 0]
        j = idx[t, 1]
        k = idx[t, 2]
        m_ = idx[t, 3]
        b1, b2, b3, a, b, l2, phi = _torsion(xyz, i, j, k, m_)
        dev = _wrap(phi - target[t], 360.0)
        et, ga = _robust(abs(dev), sigma[t], limit[t])
        e += weight * et
        gp = weight * ga * (1.0 if dev > 0.0 else -1.0) * RAD2DEG
        _torsion_grad(grad, i, j, k, m_, gp, b1, b2, b3, a, b, l2)
    return e


def robust_torsion_terms(xyz, idx, target, sigma, limit, grad_out=None, weight=1.0):
    """Torsion restraints (degrees, period 1) with the top-out of (dev / sigma)^2 at `limit`
    degrees (reference-model restraints: a torsion that really differs stops pulling)."""
    return _energy(_robust_torsion_kernel, xyz, grad_out, _ints(idx, 4), _floats(target),
                   _floats(sigma), _floats(limit), float(weight))


@njit(cache=True)
def _periodic_bicubic(table, c, phi, psi):
    """Value of table[c] (periodic m x m grid, bin centres -180 + (k + 0.5) 360/m degrees) at
    (phi, psi) degrees by C1 Catmull-Rom interpolation, and its derivatives per degree."""
    m = table.shape[1]
    step = 360.0 / m
    u = (phi + 180.0) / step - 0.5
    v = (psi + 180.0) / step - 0.5
    iu = math.floor(u)
    iv = math.floor(v)
    wu, du = catmull_rom(u - iu)
    wv, dv = catmull_rom(v - iv)
    val = 0.0
    gu = 0.0
    gv = 0.0
    for p in range(4):
        ip = (iu - 1 + p) % m
        rv = 0.0
        rd = 0.0
        for q in range(4):
            tq = table[c, ip, (iv - 1 + q) % m]
            rv += wv[q] * tq
            rd += dv[q] * tq
        val += wu[p] * rv
        gu += du[p] * rv
        gv += wu[p] * rd
    return val, gu / step, gv / step


@njit(cache=True)
def _rama_kernel(xyz, idx, cls, wt, table, weight, grad):
    e = 0.0
    for t in range(idx.shape[0]):
        cp = idx[t, 0]
        n = idx[t, 1]
        ca = idx[t, 2]
        c = idx[t, 3]
        nn = idx[t, 4]
        a1, a2, a3, aa, ab, al, phi = _torsion(xyz, cp, n, ca, c)
        b1, b2, b3, ba, bb, bl, psi = _torsion(xyz, n, ca, c, nn)
        val, dphi, dpsi = _periodic_bicubic(table, cls[t], phi, psi)
        w = weight * wt[t]
        e += w * val
        _torsion_grad(grad, cp, n, ca, c, w * dphi * RAD2DEG, a1, a2, a3, aa, ab, al)
        _torsion_grad(grad, n, ca, c, nn, w * dpsi * RAD2DEG, b1, b2, b3, ba, bb, bl)
    return e


def rama_terms(xyz, idx, cls, rama_weight, table, grad_out=None, weight=1.0):
    """Ramachandran restraints: sum rama_weight * table[cls] at (phi, psi) of the atoms
    C(i-1) N CA C N(i+1) (idx (t, 5)), interpolated periodically (C1 bicubic)."""
    table = np.ascontiguousarray(table, dtype=np.float64)
    idx = _ints(idx, 5)
    if len(idx) and (table.ndim != 3 or table.shape[1] != table.shape[2] or table.shape[1] < 4):
        raise ValueError(f"the Ramachandran table must have shape (classes, m, m), got {table.shape}")
    return _energy(_rama_kernel, xyz, grad_out, idx, _ints(cls), _floats(rama_weight), table,
                   float(weight))


def rama_values(table, cls, phi, psi) -> np.ndarray:
    """The table potential at (phi, psi) degrees for each class (as the restraint sees it)."""
    table = np.ascontiguousarray(table, dtype=np.float64)
    return np.array([_periodic_bicubic(table, int(c), float(a), float(b))[0]
                     for c, a, b in zip(np.atleast_1d(cls), np.atleast_1d(phi), np.atleast_1d(psi))])


# ----------------------------------------------------------------------------------------------
# all terms
# ----------------------------------------------------------------------------------------------

def _chir_both(r: Restraints):
    both = getattr(r, "chir_both", None)
    if both is None or len(both) == 0:
        return None
    return both


def restraint_energy(xyz, r: Restraints, weights: dict | None = None, grad_out=None):
    """All stereochemical terms of r: returns (total, grad, parts).

    weights maps a term name ('bonds', 'angles', 'torsions', 'chirals', 'planes', and the
    low-resolution 'hbonds', 'ramachandran', 'reference') to a factor (default 1; a zero weight
    skips the term). parts holds each term's weighted energy, so total == sum(parts.values());
    the low-resolution terms appear in it only when r has such terms. With grad_out the
    gradient is added into it.
    """
    xyz = _coords(xyz)
    w = {name: 1.0 for name in TERM_NAMES + LOWRES_TERM_NAMES}
    if weights:
        unknown = set(weights) - set(w)
        if unknown:
            raise ValueError(f"unknown restraint term(s) {sorted(unknown)}; known: {tuple(w)}")
        w.update({k: float(v) for k, v in weights.items()})
    g = _grad(xyz, grad_out)
    parts = {name: 0.0 for name in TERM_NAMES}
    if w["bonds"] != 0.0:
        parts["bonds"] = bond_terms(xyz, r.bond_idx, r.bond_target, r.bond_sigma, g, w["bonds"])[0]
    if w["angles"] != 0.0:
        parts["angles"] = angle_terms(xyz, r.angle_idx, r.angle_target, r.angle_sigma, g,
                                      w["angles"])[0]
    if w["torsions"] != 0.0:
        parts["torsions"] = torsion_terms(xyz, r.tors_idx, r.tors_target, r.tors_sigma,
                                          r.tors_period, g, w["torsions"])[0]
    if w["chirals"] != 0.0:
        parts["chirals"] = chiral_terms(xyz, r.chir_idx, r.chir_target, r.chir_sigma,
                                        _chir_both(r), g, w["chirals"])[0]
    if w["planes"] != 0.0:
        parts["planes"] = plane_terms(xyz, r.plane_atoms, r.plane_start, r.plane_sigma, g,
                                      w["planes"])[0]
    _lowres_energy(xyz, r, w, g, parts)
    total = 0.0
    for name in parts:
        total += parts[name]
    return total, g, parts


def _lowres_energy(xyz, r: Restraints, w: dict, g, parts: dict) -> None:
    """The low-resolution terms r holds (none for a Restraints without them) into g and parts."""
    if len(r.dist_idx):
        parts["hbonds"] = 0.0 if w["hbonds"] == 0.0 else robust_distance_terms(
            xyz, r.dist_idx, r.dist_target, r.dist_sigma, r.dist_flat, r.dist_limit, g,
            w["hbonds"])[0]
    if len(r.rama_idx):
        parts["ramachandran"] = 0.0 if w["ramachandran"] == 0.0 else rama_terms(
            xyz, r.rama_idx, r.rama_class, r.rama_weight, r.rama_table, g, w["ramachandran"])[0]
    if len(r.reft_idx):
        parts["reference"] = 0.0 if w["reference"] == 0.0 else robust_torsion_terms(
            xyz, r.reft_idx, r.reft_target, r.reft_sigma, r.reft_limit, g, w["reference"])[0]


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(a * a))) if len(a) else 0.0


def _amax(a: np.ndarray) -> float:
    return float(np.max(np.abs(a))) if len(a) else 0.0


def deviations(xyz, r: Restraints) -> dict:
    """Geometry statistics: rmsd and largest absolute deviation from target of each term kind.

    Keys: bond_rmsd/bond_max (A), angle_rmsd/angle_max (deg), torsion_rmsd (deg, periodic),
    chiral_rmsd (A^3), planarity_rmsd/planarity_max (A, atom distances from their planes), and
    n_bonds, n_angles, n_torsions, n_chirals, n_planes. Empty term sets give 0.
    """
    xyz = _coords(xyz)
    db = bond_lengths(xyz, r.bond_idx) - _floats(r.bond_target)
    da = angle_values(xyz, r.angle_idx) - _floats(r.angle_target)
    dt = torsion_deviations(xyz, r.tors_idx, r.tors_target, r.tors_period)
    v = chiral_volumes(xyz, r.chir_idx)
    tc = _floats(r.chir_target)
    dc = v - tc
    both = _chir_both(r)
    if both is not None:
        both = _both(both, len(v))
        dc[both] = np.abs(v[both]) - np.abs(tc[both])
    dp = plane_distances(xyz, r.plane_atoms, r.plane_start, r.plane_sigma)
    return {"bond_rmsd": _rms(db), "bond_max": _amax(db),
            "angle_rmsd": _rms(da), "angle_max": _amax(da),
            "torsion_rmsd": _rms(dt),
            "chiral_rmsd": _rms(dc),
            "planarity_rmsd": _rms(dp), "planarity_max": _amax(dp),
            "n_bonds": len(db), "n_angles": len(da), "n_torsions": len(dt),
            "n_chirals": len(dc), "n_planes": r.n_planes}
