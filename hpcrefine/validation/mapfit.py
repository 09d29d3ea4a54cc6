"""Map-model fit: CC_mask, CC_box, CC_volume, CC_peaks, the map-model FSC, per-residue and per-chain CC.

The model map is the model's electron-scattering density (gemmi DensityCalculatorE with the atoms'
B-factors) on the map's grid; its Fourier transform is taken once and used twice: for the
map-model FSC (the unfiltered model density against the map) and, cut at 1/resolution, for the
model map of the correlations, as phenix.map_model_cc does (Afonine et al. 2018, Acta Cryst D74,
814). The correlations follow that paper's definitions:

  CC_box     every voxel of the map box.
  CC_mask    voxels inside the molecular mask: within r_vdW + 1.11 A of an atom, shrunk by 0.9 A
             (the bulk-solvent mask of Jiang & Bruenger 1994 that cctbx uses; radii below).
  CC_volume  the N voxels where the model map is highest, N = number of voxels in the mask.
  CC_peaks   the union of the N highest voxels of the model map and the N highest of the map.

FSC: shells one Fourier voxel wide up to Nyquist; FSC_avg is the average over the shells up to
1/resolution weighted by their number of Fourier coefficients; d_FSC=0.5 is where the curve
first falls below 0.5 (linear interpolation in 1/d).

Per-residue and per-chain CC: every voxel within PER_RESIDUE_RADIUS(d) = max(2.5, 0.8 d) A of an
atom is given to its nearest atom, so each voxel counts once; a residue's CC is over the voxels
of its atoms, a chain's over those of its residues (map against the low-passed model map). The
voxel ownership is computed in slabs of the map (numba kernels), so memory stays at a few slabs
and per-residue sums, whatever the model size.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..mapstats import _cc_from_sums, _cc_sums, _mark_spheres, _span, atom_density, lowpass_coefficients
from ..simulate import _irfftn, _rfftn, fsc_crossing, shell_sums

MASK_PROBE = 1.11          # A, added to the van der Waals radius for the molecular mask
MASK_SHRINK = 0.9          # A, erosion of the molecular mask
MASK_RADII = {"C": 1.70, "N": 1.55, "O": 1.52, "S": 1.80, "P": 1.80, "SE": 1.90}   # Bondi (1964)
MASK_DEFAULT_RADIUS = 1.70
SLAB_VOXELS = 1 << 23


def per_residue_radius(resolution: float) -> float:
    return max(2.5, 0.8 * float(resolution))


# ------------------------------------------------------------------------------- kernels

@njit(cache=True)
def _own_slab(xyz, atoms, origin, voxel, k0, best, owner, radius):
    """Nearest atom (within radius) of every voxel of the slab best/owner[k - k0, j, i]."""
    nk, ny, nx = best.shape
    r2 = radius * radius
    for t in range(atoms.shape[0]):
        a = atoms[t]
        x, y, z = xyz[a, 0], xyz[a, 1], xyz[a, 2]
        i0, i1 = _span(x, radius, origin[0], voxel[0], 0, nx - 1)
        j0, j1 = _span(y, radius, origin[1], voxel[1], 0, ny - 1)
        ka, kb = _span(z, radius, origin[2], voxel[2], k0, k0 + nk - 1)
        for k in range(ka, kb + 1):
            dz = origin[2] + k * voxel[2] - z
            for j in range(j0, j1 + 1):
                dy = origin[1] + j * voxel[1] - y
                dyz = dy * dy + dz * dz
                if dyz > r2:
                    continue
                for i in range(i0, i1 + 1):
                    dx = origin[0] + i * voxel[0] - x
                    d2 = dx * dx + dyz
                    if d2 <= r2 and d2 < best[k - k0, j, i]:
                        best[k - k0, j, i] = d2
                        owner[k - k0, j, i] = a


@njit(cache=True)
def _accumulate(exp_slab, calc_slab, owner, res_index, sums):
    nk, ny, nx = owner.shape
    for k in range(nk):
        for j in range(ny):
            for i in range(nx):
                a = owner[k, j, i]
                if a < 0:
                    continue
                r = res_index[a]
                x = float(exp_slab[k, j, i])
                y = float(calc_slab[k, j, i])
                sums[r, 0] += 1.0
                sums[r, 1] += x
                sums[r, 2] += y
                sums[r, 3] += x * x
                sums[r, 4] += y * y
                sums[r, 5] += x * y


# ------------------------------------------------------------------------------ pieces

def molecular_mask(xyz, element, shape_zyx, origin, voxel) -> np.ndarray:
    """The bulk-solvent style molecular mask (uint8, [z, y, x]): vdW + probe, eroded by MASK_SHRINK."""
    from scipy import ndimage

    r = np.full(len(xyz), MASK_DEFAULT_RADIUS)
    for el, rad in MASK_RADII.items():
        r[element == el] = rad
    mask = np.zeros(shape_zyx, dtype=np.uint8)
    _mark_spheres(np.ascontiguousarray(xyz, dtype=np.float64), r + MASK_PROBE,
                  np.asarray(origin, dtype=np.float64), np.asarray(voxel, dtype=np.float64), mask)
    rv = MASK_SHRINK / np.asarray(voxel, dtype=np.float64)        # (x, y, z) in voxels
    n = np.floor(rv).astype(int)
    if n.max() >= 1:
        gz, gy, gx = np.meshgrid(*[np.arange(-m, m + 1) for m in n[::-1]], indexing="ij")
        ball = (gx / rv[0]) ** 2 + (gy / rv[1]) ** 2 + (gz / rv[2]) ** 2 <= 1.0
        mask = ndimage.binary_erosion(mask, structure=ball).astype(np.uint8)
    return mask


def model_map_and_fsc(model, xyz, exp_map: np.ndarray, origin, voxel, resolution: float, b=None,
                      occ=None, map_coefficients=None):
    """(low-passed model map float32 [z, y, x], FSC dict) with one FFT of each map (none of the
    map when its rfftn, map_coefficients, is given); the model map of the atoms at xyz with
    B-factors b and occupancies occ (the model's when None; mapstats.atom_density)."""
    voxel = np.asarray(voxel, dtype=np.float64)
    density = atom_density(xyz, model.element, model.b if b is None else b,
                           model.occ if occ is None else occ, exp_map.shape, origin, voxel, resolution)
    f_calc = _rfftn(density)
    del density
    f_map = _rfftn(np.asarray(exp_map, dtype=np.float32)) if map_coefficients is None else map_coefficients
    s, cross, pc, pm, count = shell_sums(f_calc, f_map, exp_map.shape, voxel)
    del f_map
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = np.where(pc * pm > 0, cross / np.sqrt(pc * pm), 0.0)
    upto = (s <= 1.0 / resolution) & (s > 0)
    fsc_avg = float(np.sum(curve[upto] * count[upto]) / np.sum(count[upto])) if upto.any() else float("nan")
    lowpass_coefficients(f_calc, exp_map.shape, voxel, resolution)
    calc = _irfftn(f_calc, exp_map.shape)
    del f_calc
    info = {"s": s, "fsc": curve, "count": count, "fsc_avg": fsc_avg,
            "d_fsc_05": fsc_crossing(s, curve, 0.5)}
    return calc, info


def kth_largest(a: np.ndarray, k: int) -> float:
    """The k-th largest value of the 1-d array a (1 <= k <= len(a)), np.partition's answer:
    for a large array, partitioned among the values on its side of a bound taken from a sorted
    sample with a margin, when they are sure to hold it (enough of them), else among all. At
    480^3 voxels a whole partition took 1.3-1.9 s, and the validation of a model makes two."""
    n = len(a)
    j = n - k                        # its place in ascending order
    if n >= 1 << 22:
        sample = np.sort(a[np.random.default_rng(0).integers(0, n, 1 << 16)])
        margin = 4.0 * np.sqrt(len(sample)) + 64.0
        place = j / n * len(sample)
        if j >= n // 2:
            # the values >= a bound below it: they hold it when there are at least k of them
            top = a[a >= sample[max(0, int(place - margin))]]
            if len(top) >= k:
                return np.partition(top, len(top) - k)[len(top) - k]
        else:
            low = a[a <= sample[min(len(sample) - 1, int(place + margin))]]
            if len(low) > j:
                return np.partition(low, j)[j]
    return np.partition(a, j)[j]


def correlations(exp_map: np.ndarray, calc: np.ndarray, mask: np.ndarray) -> dict:
    """CC_box, CC_mask, CC_volume, CC_peaks (definitions in the module docstring)."""
    a = np.ascontiguousarray(exp_map, dtype=np.float32).ravel()
    b = calc.ravel()
    m = mask.ravel()
    n_in = int(np.count_nonzero(m))
    ninf = -np.inf
    out = {"cc_box": _cc_from_sums(_cc_sums(a, b, m, False, ninf, ninf))[0],
           "cc_mask": _cc_from_sums(_cc_sums(a, b, m, True, ninf, ninf))[0]}
    if 0 < n_in < len(b):
        t_calc = kth_largest(b, n_in)
        t_map = kth_largest(a, n_in)
        out["cc_volume"] = _cc_from_sums(_cc_sums(a, b, m, False, np.inf, t_calc))[0]
        out["cc_peaks"] = _cc_from_sums(_cc_sums(a, b, m, False, t_map, t_calc))[0]
    else:
        out["cc_volume"] = out["cc_peaks"] = out["cc_mask"]
    out["mask_voxels"] = n_in
    return {k: (float(v) if not isinstance(v, int) else v) for k, v in out.items()}


def residue_sums(exp_map: np.ndarray, calc: np.ndarray, xyz: np.ndarray, res_index: np.ndarray,
                 n_residues: int, origin, voxel, radius: float) -> np.ndarray:
    """(n_residues, 6) correlation sums over the voxels owned by each residue's atoms."""
    origin = np.asarray(origin, dtype=np.float64)
    voxel = np.asarray(voxel, dtype=np.float64)
    xyz = np.ascontiguousarray(xyz, dtype=np.float64)
    nz, ny, nx = exp_map.shape
    sums = np.zeros((n_residues, 6))
    order = np.argsort(xyz[:, 2], kind="stable")
    zs = xyz[order, 2]
    step = max(1, SLAB_VOXELS // (ny * nx))
    res_index = np.ascontiguousarray(res_index, dtype=np.int64)
    for k0 in range(0, nz, step):
        k1 = min(nz, k0 + step)
        lo = origin[2] + k0 * voxel[2] - radius
        hi = origin[2] + (k1 - 1) * voxel[2] + radius
        atoms = order[np.searchsorted(zs, lo, "left"):np.searchsorted(zs, hi, "right")]
        if len(atoms) == 0:
            continue
        best = np.full((k1 - k0, ny, nx), np.inf, dtype=np.float32)
        owner = np.full((k1 - k0, ny, nx), -1, dtype=np.int64)
        _own_slab(xyz, np.ascontiguousarray(atoms), origin, voxel, k0, best, owner, float(radius))
        _accumulate(np.ascontiguousarray(exp_map[k0:k1]), np.ascontiguousarray(calc[k0:k1]), owner,
                    res_index, sums)
    return sums


def analyse(model, xyz: np.ndarray, exp_map: np.ndarray, origin, voxel, resolution: float, b=None,
            occ=None, map_coefficients=None, with_refinement_cc: bool = False) -> dict:
    """All map-model figures; per-residue CC as an array (nan for residues owning no voxel).
    map_coefficients: the map's rfftn, when the caller has it (model_map_and_fsc).
    with_refinement_cc: also the refinement's own CC_mask (mapstats.cc_mask: its model map is
    this low-passed model map, its mask the atoms' spheres), as "refinement_cc_mask", for a run
    whose final statistics would otherwise make the same model map again."""
    calc, fsc_info = model_map_and_fsc(model, xyz, exp_map, origin, voxel, resolution, b, occ,
                                       map_coefficients)
    extra = {}
    if with_refinement_cc:
        from ..mapstats import cc_mask
        extra["refinement_cc_mask"] = cc_mask(model, xyz, exp_map, origin, voxel, resolution, calc=calc)
    mask = molecular_mask(xyz, model.element, exp_map.shape, origin, voxel)
    cc = correlations(exp_map, calc, mask)
    del mask
    radius = per_residue_radius(resolution)
    sums = residue_sums(exp_map, calc, xyz, model.res_index, model.n_residues, origin, voxel, radius)
    chains, inverse = np.unique(model.res_chain, return_inverse=True)
    chain_sums = np.zeros((len(chains), 6))
    np.add.at(chain_sums, inverse, sums)
    return {**cc, "fsc": fsc_info, "residue_cc": _cc_from_sums(sums), "chains": chains,
            "chain_cc": _cc_from_sums(chain_sums), "per_residue_radius": radius, **extra}
