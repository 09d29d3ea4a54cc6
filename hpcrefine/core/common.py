"""Pieces shared by the core kernels: argument checks and 3-vector arithmetic for numba code.

The 3-vectors are plain tuples (x, y, z); the helpers are inlined into the kernels that call them,
so they cost nothing over writing the components out by hand, and each one evaluates its
components in the same order as the written-out expression (results are bitwise the same).

Numba's on-disk cache only notices changes to the file a cached function is defined in: after
editing the numba helpers here, clear the __pycache__ folders of the modules that use them
(geometry.py, nonbonded.py), or their cached kernels keep the old code.
"""
from __future__ import annotations

import numpy as np
from numba import njit


# ----------------------------------------------------------------------------------------------
# argument checks (Python)
# ----------------------------------------------------------------------------------------------

def unique_sorted(a) -> np.ndarray:
    """np.unique(a) of a 1-D array by a sort and one comparison pass. numpy 2.3 and later find
    the unique values of an integer array with a hash table when no index is asked for: 1.2 s
    for 1.3 M int64 keys here, against 12 ms sorted."""
    s = np.sort(np.asarray(a).ravel())
    if len(s) < 2:
        return s
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def sorted_members(sorted_ids: np.ndarray, ids) -> np.ndarray:
    """Bool per entry of ids: whether it is one of sorted_ids (sorted, unique), by binary search."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(sorted_ids) == 0:
        return np.zeros(ids.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[pos] == ids


def coords(xyz) -> np.ndarray:
    """xyz as a C-contiguous float64 (n, 3) array (no copy when it already is one)."""
    xyz = np.ascontiguousarray(xyz, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must have shape (n, 3), got {xyz.shape}")
    return xyz


def grad_array(xyz: np.ndarray, grad_out) -> np.ndarray:
    """A zero gradient of xyz's shape, or grad_out after checking that a kernel can add into it."""
    if grad_out is None:
        return np.zeros(xyz.shape, dtype=np.float64)
    if (grad_out.shape != xyz.shape or grad_out.dtype != np.float64
            or not grad_out.flags.c_contiguous):
        raise ValueError("grad_out must be a C-contiguous float64 array of the shape of xyz")
    return grad_out


# ----------------------------------------------------------------------------------------------
# 3-vectors as tuples (numba)
# ----------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def row(a, i):
    """Row i of an (n, 3) array."""
    return a[i, 0], a[i, 1], a[i, 2]


@njit(cache=True, inline="always")
def sub(p, q):
    return p[0] - q[0], p[1] - q[1], p[2] - q[2]


@njit(cache=True, inline="always")
def add(p, q):
    return p[0] + q[0], p[1] + q[1], p[2] + q[2]


@njit(cache=True, inline="always")
def scale(s, p):
    return s * p[0], s * p[1], s * p[2]


@njit(cache=True, inline="always")
def diff(a, i, j):
    """a[i] - a[j] for rows of an (n, 3) array."""
    return a[i, 0] - a[j, 0], a[i, 1] - a[j, 1], a[i, 2] - a[j, 2]


@njit(cache=True, inline="always")
def dot(p, q):
    return p[0] * q[0] + p[1] * q[1] + p[2] * q[2]


@njit(cache=True, inline="always")
def cross(p, q):
    return p[1] * q[2] - p[2] * q[1], p[2] * q[0] - p[0] * q[2], p[0] * q[1] - p[1] * q[0]


@njit(cache=True, inline="always")
def add_at(a, i, p):
    """a[i] += p."""
    a[i, 0] += p[0]
    a[i, 1] += p[1]
    a[i, 2] += p[2]


@njit(cache=True, inline="always")
def sub_at(a, i, p):
    """a[i] -= p."""
    a[i, 0] -= p[0]
    a[i, 1] -= p[1]
    a[i, 2] -= p[2]


@njit(cache=True, inline="always")
def catmull_rom(f):
    """Catmull-Rom weights of grid points -1, 0, 1, 2 at fraction f in [0, 1), and their
    derivatives in f (the map interpolation and the Ramachandran tables)."""
    f2 = f * f
    f3 = f2 * f
    w = (0.5 * (-f3 + 2.0 * f2 - f), 0.5 * (3.0 * f3 - 5.0 * f2 + 2.0),
         0.5 * (-3.0 * f3 + 4.0 * f2 + f), 0.5 * (f3 - f2))
    dw = (0.5 * (-3.0 * f2 + 4.0 * f - 1.0), 0.5 * (9.0 * f2 - 10.0 * f),
          0.5 * (-9.0 * f2 + 8.0 * f + 1.0), 0.5 * (3.0 * f2 - 2.0 * f))
    return w, dw
