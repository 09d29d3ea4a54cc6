"""Map-model statistics: model maps on an experimental map's grid, masks, correlations."""
from __future__ import annotations

import gemmi
import numpy as np


def model_density(st: gemmi.Structure, shape_zyx: tuple, origin: np.ndarray, voxel: np.ndarray,
                  b_extra: float = 0.0) -> np.ndarray:
    """Electron-scattering model density of st's first model on the grid (nz, ny, nx), float32.

    The grid is treated as a P1 box with the map's origin at its corner; atoms must lie inside it.
    """
    nz, ny, nx = shape_zyx
    work = st.clone()
    shift = gemmi.Position(*(-np.asarray(origin, dtype=float)))
    for ch in work[0]:
        for res in ch:
            for at in res:
                at.pos = at.pos + shift
                if b_extra:
                    at.b_iso = at.b_iso + b_extra
    dc = gemmi.DensityCalculatorE()
    dc.grid.unit_cell = gemmi.UnitCell(nx * voxel[0], ny * voxel[1], nz * voxel[2], 90, 90, 90)
    dc.grid.spacegroup = gemmi.SpaceGroup("P 1")
    dc.grid.set_size(nx, ny, nz)
    dc.grid.fill(0)
    dc.add_model_density_to_grid(work[0])
    return np.ascontiguousarray(np.array(dc.grid, copy=False).T)


def lowpass(data: np.ndarray, voxel: np.ndarray, resolution: float) -> np.ndarray:
    """Sharp low-pass filter at 1/resolution (float32)."""
    f = np.fft.rfftn(data)
    kz = np.fft.fftfreq(data.shape[0], voxel[2])[:, None, None]
    ky = np.fft.fftfreq(data.shape[1], voxel[1])[None, :, None]
    kx = np.fft.rfftfreq(data.shape[2], voxel[0])[None, None, :]
    s2 = kx * kx + ky * ky + kz * kz
    f[s2 > 1.0 / resolution**2] = 0
    return np.fft.irfftn(f, s=data.shape, axes=(0, 1, 2)).astype(np.float32)


def atom_mask(xyz: np.ndarray, shape_zyx: tuple, origin: np.ndarray, voxel: np.ndarray,
              radius: float) -> np.ndarray:
    """Boolean mask of voxels within radius of any atom (O(atoms * voxels per sphere))."""
    mask = np.zeros(shape_zyx, dtype=bool)
    r_vox = np.ceil(radius / voxel).astype(int)
    offs = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in r_vox[::-1]], indexing="ij"), -1).reshape(-1, 3)
    centre = np.rint((xyz - origin) / voxel).astype(np.int64)[:, ::-1]          # (k, j, i)
    frac = (xyz - origin) / voxel
    for start in range(0, len(xyz), 20000):
        c = centre[start:start + 20000]
        pts = c[:, None, :] + offs[None, :, :]
        d = (pts[..., ::-1] - frac[start:start + 20000, None, :]) * voxel
        keep = np.sum(d * d, axis=-1) <= radius * radius
        p = pts[keep]
        ok = np.all((p >= 0) & (p < np.array(shape_zyx)), axis=1)
        p = p[ok]
        mask[p[:, 0], p[:, 1], p[:, 2]] = True
    return mask


def correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    if mask is not None:
        a = a[mask]
        b = b[mask]
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt(np.dot(a, a) * np.dot(b, b))
    return float(np.dot(a, b) / den) if den > 0 else 0.0


def cc_mask(st: gemmi.Structure, exp_map: np.ndarray, origin, voxel, resolution: float,
            xyz: np.ndarray, radius: float | None = None) -> float:
    """Map-model correlation inside a mask around the atoms (model map low-passed at resolution)."""
    calc = lowpass(model_density(st, exp_map.shape, origin, voxel), voxel, resolution)
    mask = atom_mask(xyz, exp_map.shape, origin, voxel, radius or max(2.5, 0.8 * resolution))
    return correlation(np.asarray(exp_map), calc, mask)


def fsc_weighted(full: np.ndarray, half1: np.ndarray, half2: np.ndarray, voxel) -> tuple[np.ndarray, dict]:
    """The full map weighted per shell by sqrt(2 FSC / (1 + FSC)) of the half maps (Rosenthal &
    Henderson's C_ref): shells that hold mostly noise are damped instead of cut at one resolution.
    Returns the weighted map (float32) and the curve used."""
    from .simulate import _rfftn, _shells, fsc

    s, f = fsc(half1, half2, voxel)
    f_full = np.clip(2 * f / (1 + f), 0.0, 1.0)          # FSC of the full map (Rosenthal & Henderson)
    c_ref = np.sqrt(2 * f_full / (1 + f_full))
    index, _, _ = _shells(full.shape, voxel)
    w = np.where(index >= 0, c_ref[np.maximum(index, 0)], 0.0).astype(np.float32)
    ft = _rfftn(np.asarray(full, dtype=np.float32)) * w
    out = np.fft.irfftn(ft, s=full.shape, axes=(0, 1, 2)).astype(np.float32)
    return out, {"s": s.tolist(), "fsc_half": f.tolist(), "c_ref": c_ref.tolist()}
