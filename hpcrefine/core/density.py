"""The fast real-space data term: map values at atom centres by C1 tricubic interpolation.

Map convention: `data` has shape (nz, ny, nx) and is indexed data[k, j, i]; voxel (i, j, k) sits at
origin + (i * voxel[0], j * voxel[1], k * voxel[2]) (origin, voxel: (3,) in A, x y z order). The
array may be float32 or float64 and any strided view (a memory-mapped file, a transposed array):
the kernels read it in place.

Interpolation: Catmull-Rom (Keys a = -0.5) cubic convolution in each axis over the 4x4x4 voxel
neighbourhood. The interpolant is C1, and the gradient returned is the exact derivative of the
interpolating polynomial. Edges: stencil indices are clamped to 0..n-1, which is the same as
interpolating the map extended by repeating its edge planes forever. The interpolant therefore stays
C1 everywhere; outside the map the value tends to the nearest edge value and the gradient across
the edge to zero (an atom more than 2 voxels outside feels no force along that axis).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .common import coords as _prep_xyz
from .common import catmull_rom, grad_array


def _prep_map(data) -> np.ndarray:
    data = np.asarray(data)         # a plain ndarray view of np.memmap etc., no copy
    if data.ndim != 3:
        raise ValueError(f"map must be 3-D (nz, ny, nx), got shape {data.shape}")
    dt = data.dtype
    if dt.kind != "f" or dt.itemsize not in (4, 8):
        data = data.astype(np.float32)
    elif not dt.isnative:                 # e.g. a big-endian MRC file: a native copy
        data = data.astype(dt.newbyteorder("="))
    return data


def _vec3(v, what) -> np.ndarray:
    v = np.ascontiguousarray(v, dtype=np.float64).reshape(-1)
    if v.shape != (3,):
        raise ValueError(f"{what} must have 3 components (x, y, z)")
    return v


@njit(cache=True, inline="always")
def _cell(x, o, v, n):
    """Along one axis of n voxels: the voxel index below the position (its floor, the position
    limited to -3..n+2 first: far outside, every stencil index clamps to the same edge and the
    int stays small) and the fraction above it."""
    u = (x - o) / v
    if u < -3.0:
        u = -3.0
    elif u > n + 2.0:
        u = n + 2.0
    f = math.floor(u)
    return int(f), u - f


@njit(cache=True, inline="always")
def _axis(x, o, v, n):
    """Along one axis: clamped stencil indices of the samples at -1, 0, 1, 2 around the
    fractional position, their Catmull-Rom weights and the weights' derivatives."""
    f, t = _cell(x, o, v, n)
    w, dw = catmull_rom(t)
    i0 = f - 1
    hi = n - 1
    idx = (min(max(i0, 0), hi), min(max(i0 + 1, 0), hi), min(max(i0 + 2, 0), hi),
           min(max(i0 + 3, 0), hi))
    return idx, w, dw


@njit(cache=True, inline="always")
def _stencil_within(x, o, v, n, lo, m):
    """True when the clamped stencil of _axis lies in voxels lo..lo+m-1 of the axis."""
    f, _ = _cell(x, o, v, n)
    hi = n - 1
    return min(max(f - 1, 0), hi) >= lo and min(max(f + 2, 0), hi) < lo + m


@njit(cache=True, inline="always")
def _interp(data, ox, oy, oz, vx, vy, vz, x, y, z):
    """Value and d/dx, d/dy, d/dz at one (finite) point."""
    nz, ny, nx = data.shape
    return _interp_in(data, 0, 0, 0, nx, ny, nz, ox, oy, oz, vx, vy, vz, x, y, z)


@njit(cache=True, inline="always")
def _interp_in(data, li, lj, lk, nx, ny, nz, ox, oy, oz, vx, vy, vz, x, y, z):
    """_interp on a sub-grid: data holds voxels (li.., lj.., lk..) of a map of (nx, ny, nz)
    voxels whose voxel (0, 0, 0) sits at the origin; the stencil must lie inside data
    (_stencil_within). The same sums in the same order as on the whole map."""
    ix, wx, dwx = _axis(x, ox, vx, nx)
    iy, wy, dwy = _axis(y, oy, vy, ny)
    iz, wz, dwz = _axis(z, oz, vz, nz)
    i0 = ix[0] - li
    i1 = ix[1] - li
    i2 = ix[2] - li
    i3 = ix[3] - li
    val = 0.0
    gx = 0.0
    gy = 0.0
    gz = 0.0
    for c in range(4):
        k = iz[c] - lk
        sv = 0.0      # sums over the (j, i) plane k
        sgx = 0.0
        sgy = 0.0
        for b in range(4):
            j = iy[b] - lj
            r0 = float(data[k, j, i0])
            r1 = float(data[k, j, i1])
            r2 = float(data[k, j, i2])
            r3 = float(data[k, j, i3])
            rv = wx[0] * r0 + wx[1] * r1 + wx[2] * r2 + wx[3] * r3
            rd = dwx[0] * r0 + dwx[1] * r1 + dwx[2] * r2 + dwx[3] * r3
            sv += wy[b] * rv
            sgx += wy[b] * rd
            sgy += dwy[b] * rv
        val += wz[c] * sv
        gx += wz[c] * sgx
        gy += wz[c] * sgy
        gz += dwz[c] * sv
    return val, gx / vx, gy / vy, gz / vz


@njit(cache=True, inline="always")
def _interp_atom(data, ox, oy, oz, vx, vy, vz, xyz, a):
    """_interp at atom a; NaN value and gradient for a non-finite position."""
    x = xyz[a, 0]
    y = xyz[a, 1]
    z = xyz[a, 2]
    if math.isfinite(x) and math.isfinite(y) and math.isfinite(z):
        return _interp(data, ox, oy, oz, vx, vy, vz, x, y, z)
    return np.nan, np.nan, np.nan, np.nan


@njit(cache=True)
def _tricubic_kernel(data, origin, voxel, xyz, values, grad):
    ox, oy, oz = origin[0], origin[1], origin[2]
    vx, vy, vz = voxel[0], voxel[1], voxel[2]
    for a in range(xyz.shape[0]):
        v, gx, gy, gz = _interp_atom(data, ox, oy, oz, vx, vy, vz, xyz, a)
        values[a] = v
        grad[a, 0] = gx
        grad[a, 1] = gy
        grad[a, 2] = gz


@njit(cache=True)
def _owned_target_kernel(data, lo, n, origin, voxel, xyz, atoms, weight, scale, grad):
    """-scale * sum_a weight[a] * rho(xyz[atoms[a]]) on a sub-grid of the map (_interp_in:
    lo, n = (x, y, z) offsets and whole-map sizes), the gradient added into the rows
    grad[atoms]. Returns (T, -1), or (0, a) without touching grad when the stencil of atoms[a]
    leaves the sub-grid (non-finite positions count as inside; they make T NaN)."""
    ox, oy, oz = origin[0], origin[1], origin[2]
    vx, vy, vz = voxel[0], voxel[1], voxel[2]
    li, lj, lk = lo[0], lo[1], lo[2]
    nx, ny, nz = n[0], n[1], n[2]
    mz, my, mx = data.shape
    for a in range(atoms.shape[0]):
        p = atoms[a]
        x = xyz[p, 0]
        y = xyz[p, 1]
        z = xyz[p, 2]
        if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(z)):
            continue
        if not (_stencil_within(x, ox, vx, nx, li, mx) and _stencil_within(y, oy, vy, ny, lj, my)
                and _stencil_within(z, oz, vz, nz, lk, mz)):
            return 0.0, a
    t = 0.0
    for a in range(atoms.shape[0]):
        p = atoms[a]
        x = xyz[p, 0]
        y = xyz[p, 1]
        z = xyz[p, 2]
        if math.isfinite(x) and math.isfinite(y) and math.isfinite(z):
            v, gx, gy, gz = _interp_in(data, li, lj, lk, nx, ny, nz, ox, oy, oz, vx, vy, vz,
                                       x, y, z)
        else:
            v = gx = gy = gz = np.nan
        c = -scale * weight[a]
        t += c * v
        grad[p, 0] += c * gx
        grad[p, 1] += c * gy
        grad[p, 2] += c * gz
    return t, -1


def tricubic(data, origin, voxel, xyz):
    """Interpolated map values at xyz (n,) and their gradient d rho / d xyz (n, 3), float64.

    Non-finite coordinates give NaN. See the module docstring for the map convention and edges.
    """
    data = _prep_map(data)
    xyz = _prep_xyz(xyz)
    values = np.empty(len(xyz))
    grad = np.empty((len(xyz), 3))
    _tricubic_kernel(data, _vec3(origin, "origin"), _vec3(voxel, "voxel"), xyz, values, grad)
    return values, grad


def summed_over_operators(data, origin, voxel, rot, trans, grid_origin, shape_zyx,
                          mask=None, grid_voxel=None) -> np.ndarray:
    """sum_k rho(A_k g + b_k) at the points g = grid_origin + (i, j, k) * grid_voxel (the map's
    voxel when None) of a grid of shape_zyx (float64, (nz, ny, nx)), rho interpolated as
    tricubic() does; rot (K, 3, 3), trans (K, 3). One compiled pass per operator over the grid,
    whose points it maps to one coherent region of the map (ncs.AveragedMap). With mask (bool,
    shape_zyx) only its points are summed; the others are 0."""
    data = _prep_map(data)
    rot = np.ascontiguousarray(rot, dtype=np.float64).reshape(-1, 3, 3)
    trans = np.ascontiguousarray(trans, dtype=np.float64).reshape(-1, 3)
    shape = tuple(int(n) for n in shape_zyx)
    out = np.zeros(shape, dtype=np.float64)
    if mask is None:
        mask = np.ones(shape, dtype=np.uint8)
    elif np.shape(mask) != shape:
        raise ValueError(f"mask has shape {np.shape(mask)}, expected {shape}")
    _summed_kernel(data, _vec3(origin, "origin"), _vec3(voxel, "voxel"),
                   _vec3(voxel if grid_voxel is None else grid_voxel, "grid voxel"), rot, trans,
                   _vec3(grid_origin, "grid origin"), np.ascontiguousarray(mask, dtype=bool).view(np.uint8), out)
    return out


@njit(cache=True, inline="always")
def _value(data, ox, oy, oz, vx, vy, vz, x, y, z):
    """_interp's value alone (the same sums in the same order, no derivatives)."""
    ix, wx, _ = _axis(x, ox, vx, data.shape[2])
    iy, wy, _ = _axis(y, oy, vy, data.shape[1])
    iz, wz, _ = _axis(z, oz, vz, data.shape[0])
    val = 0.0
    for c in range(4):
        k = iz[c]
        sv = 0.0
        for b in range(4):
            j = iy[b]
            rv = (wx[0] * float(data[k, j, ix[0]]) + wx[1] * float(data[k, j, ix[1]])
                  + wx[2] * float(data[k, j, ix[2]]) + wx[3] * float(data[k, j, ix[3]]))
            sv += wy[b] * rv
        val += wz[c] * sv
    return val


@njit(cache=True)
def _summed_kernel(data, origin, voxel, gv, rot, trans, lo, mask, out):
    ox, oy, oz = origin[0], origin[1], origin[2]
    vx, vy, vz = voxel[0], voxel[1], voxel[2]
    nz, ny, nx = out.shape
    for k in range(rot.shape[0]):
        a = rot[k]
        b = trans[k]
        for iz in range(nz):
            gz = lo[2] + gv[2] * iz
            for iy in range(ny):
                gy = lo[1] + gv[1] * iy
                for ix in range(nx):
                    if mask[iz, iy, ix] == 0:
                        continue
                    gx = lo[0] + gv[0] * ix
                    x = a[0, 0] * gx + a[0, 1] * gy + a[0, 2] * gz + b[0]
                    y = a[1, 0] * gx + a[1, 1] * gy + a[1, 2] * gz + b[1]
                    z = a[2, 0] * gx + a[2, 1] * gy + a[2, 2] * gz + b[2]
                    out[iz, iy, ix] += _value(data, ox, oy, oz, vx, vy, vz, x, y, z)


def real_space_target(data, origin, voxel, xyz, atom_weight, grad_out=None, scale: float = 1.0):
    """T = -scale * sum_i atom_weight_i * rho(x_i) and its gradient (added into grad_out if
    given; scale multiplies both). Non-finite coordinates make T NaN."""
    data = _prep_map(data)
    xyz = _prep_xyz(xyz)
    w = np.ascontiguousarray(atom_weight, dtype=np.float64)
    if w.ndim == 0:
        w = np.full(len(xyz), float(w))
    if w.shape != (len(xyz),):
        raise ValueError(f"atom_weight has shape {w.shape}, expected ({len(xyz)},)")
    grad_out = grad_array(xyz, grad_out)
    t, _ = owned_target(data, (0, 0, 0), data.shape, origin, voxel, xyz,
                        np.arange(len(xyz), dtype=np.int64), w, grad_out, scale)
    return t, grad_out


def owned_target(sub, lo, full_shape, origin, voxel, xyz, atoms, atom_weight, grad_out,
                 scale: float = 1.0) -> tuple[float, int]:
    """real_space_target of the atoms xyz[atoms] (atom_weight per listed atom) read from a
    sub-grid of the map: sub holds voxels lo (x, y, z) onwards of a map of full_shape
    (nz, ny, nx). The gradient is added into grad_out[atoms] (grad_out: the whole (n, 3)).
    Returns (T, -1), bitwise what real_space_target gives on the whole map, or (0, a) with
    grad_out untouched when the stencil of atom atoms[a] is not inside sub."""
    sub = _prep_map(sub)
    xyz = _prep_xyz(xyz)
    grad_out = grad_array(xyz, grad_out)
    atoms = np.ascontiguousarray(atoms, dtype=np.int64)
    w = np.ascontiguousarray(atom_weight, dtype=np.float64)
    if w.shape != atoms.shape:
        raise ValueError(f"atom_weight has shape {w.shape}, expected {atoms.shape}")
    nz, ny, nx = (int(v) for v in full_shape)
    lo = np.ascontiguousarray(lo, dtype=np.int64).reshape(3)
    t, outside = _owned_target_kernel(sub, lo, np.array([nx, ny, nz], dtype=np.int64),
                                      _vec3(origin, "origin"), _vec3(voxel, "voxel"), xyz, atoms,
                                      w, float(scale), grad_out)
    return float(t), int(outside)


@njit(cache=True, nogil=True)
def _masked_sums(data, mask, use_mask, mean):
    """Over the voxels of data (3-D, any strides; within mask where use_mask): their count, the
    sum of (value - mean) and of its square, in float64, read in place (no temporaries)."""
    count = 0
    s1 = 0.0
    s2 = 0.0
    nz, ny, nx = data.shape
    for k in range(nz):
        for j in range(ny):
            r1 = 0.0            # a row's sums first: shorter chains of float64 additions
            r2 = 0.0
            for i in range(nx):
                if use_mask and not mask[k, j, i]:
                    continue
                d = np.float64(data[k, j, i]) - mean
                r1 += d
                r2 += d * d
                count += 1
            s1 += r1
            s2 += r2
    return count, s1, s2


@njit(cache=True, nogil=True)
def _normalised_into(data, mean, std, out):
    nz, ny, nx = data.shape
    for k in range(nz):
        for j in range(ny):
            for i in range(nx):
                out[k, j, i] = (np.float64(data[k, j, i]) - mean) / std


def map_mean_std(data, mask=None) -> tuple[float, float]:
    """Mean and standard deviation of the map (over mask, if given), in float64, read in place:
    a memory-mapped map is never loaded whole, and no map-sized temporary is made (on a machine
    where every first touch of new memory costs, converting a 240^3 map to float64 in slabs
    took 0.2-0.3 s of a fresh process, against 20 ms)."""
    return _mean_std(_prep_map(data), mask)


def _mean_std(data: np.ndarray, mask) -> tuple[float, float]:
    """map_mean_std of a map _prep_map gave."""
    if mask is None:
        mask, use = np.zeros((1, 1, 1), dtype=np.bool_), False
    else:
        mask, use = np.asarray(mask, dtype=np.bool_), True
        if mask.shape != data.shape:
            raise ValueError(f"mask shape {mask.shape} differs from map shape {data.shape}")
    count, s1, _ = _masked_sums(data, mask, use, 0.0)
    if count == 0:
        raise ValueError("the mask selects no voxels")
    mean = s1 / count
    _, s1, s2 = _masked_sums(data, mask, use, mean)    # about the mean: no cancellation
    return mean, math.sqrt(max(s2 / count - (s1 / count) ** 2, 0.0))


def normalise_map(data, mask=None, out=None) -> np.ndarray:
    """Float32 C-contiguous copy of the map as (x - mean) / std, with mean and std over the mask
    (boolean array of the map's shape) or the whole map; the map is read in place. out: a
    float32 C-contiguous array of the map's shape to write instead (the map itself to
    normalise it in place: each voxel is read before it is written)."""
    data = _prep_map(data)              # once: a copy for a big-endian or integer map
    mean, std = _mean_std(data, mask)
    if not std > 0:
        raise ValueError("the map is constant (standard deviation 0); cannot normalise it")
    if out is None:
        out = np.empty(data.shape, dtype=np.float32)
    elif out.shape != data.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {data.shape}")
    _normalised_into(data, float(mean), float(std), out)
    return out


def rfft_freqs(shape_zyx, voxel):
    """Spatial frequencies (1/A) along z, y and x of the coefficients of an rfftn of a
    (nz, ny, nx) map with voxel (x, y, z) in A, as arrays of shapes (nz, 1, 1), (1, ny, 1) and
    (1, 1, nx // 2 + 1) that broadcast to the coefficient array."""
    kz = np.fft.fftfreq(shape_zyx[0], voxel[2])[:, None, None]
    ky = np.fft.fftfreq(shape_zyx[1], voxel[1])[None, :, None]
    kx = np.fft.rfftfreq(shape_zyx[2], voxel[0])[None, None, :]
    return kz, ky, kx


def blur_map(data, voxel, b_extra: float) -> np.ndarray:
    """The map multiplied in Fourier space by exp(-b_extra s^2 / 4), float32: a B-factor blur, or
    sharpening when b_extra < 0 (then low-pass the result: sharpening amplifies noise)."""
    data = np.asarray(data, dtype=np.float32)
    if b_extra == 0:
        return data.copy()
    import scipy.fft
    f = scipy.fft.rfftn(data)
    for k in rfft_freqs(data.shape, _vec3(voxel, "voxel")):         # separable factors: no full-size temporary
        f *= np.exp(-0.25 * b_extra * k * k).astype(np.float32)
    return scipy.fft.irfftn(f, s=data.shape).astype(np.float32)
