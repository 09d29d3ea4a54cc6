"""Simulated cryo-EM maps from an atomic model: density plus independent noise per half map.

The model density is calculated with electron scattering factors (gemmi DensityCalculatorE)
using the atoms' B-factors, on a cubic box around the model. Each half map gets its own white
Gaussian noise, scaled so that the FSC between the half maps falls to 0.143 at the requested
resolution. The full map is the average of the two half maps.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time

import gemmi
import numpy as np
from numba import njit

from . import mapio, mapstats
from .core.density import rfft_freqs
from .errors import InputError
from .modelio import atomic_write_text, read_structure

log = logging.getLogger(__name__)

FSC_THRESHOLD = 0.143
MAP_NAMES = ("full", "half1", "half2")


def _n_threads() -> int:
    """Threads of one map transform: OMP_NUM_THREADS when set (an MPI rank sharing its node),
    else the cores this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


# Map transforms are used once each (no plan to reuse), in single precision: scipy's pocketfft
# took 0.38 s for the rfftn of a 480^3 float32 map here, pyfftw's numpy interface with
# FFTW_ESTIMATE 0.9-2.8 s (its copies into aligned arrays and its planning), FFTW_MEASURE plans
# 2-20 s. FFTW stays where a plan is reused (checkpoint keeps its wisdom).
def _rfftn(a: np.ndarray) -> np.ndarray:
    """rfftn of a map (float32 in, complex64 out)."""
    import scipy.fft
    return scipy.fft.rfftn(np.asarray(a, dtype=np.float32), workers=_n_threads())


def _irfftn(f: np.ndarray, shape) -> np.ndarray:
    """The real map (float32) of shape whose rfftn is f."""
    import scipy.fft
    return scipy.fft.irfftn(f, s=shape, axes=(0, 1, 2), workers=_n_threads()).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------ grid

def fft_friendly_size(n: int) -> int:
    """Smallest even integer >= n whose only prime factors are 2, 3 and 5."""
    m = max(2, int(n) + (int(n) % 2))
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 2


def default_pixel(resolution: float) -> float:
    """Pixel size for a map at this resolution: a third of it, rounded to 0.01 A."""
    return round(resolution / 3.0, 2)


def model_xyz(st: gemmi.Structure) -> np.ndarray:
    """(n, 3) coordinates of all atoms of the first model."""
    return np.array([cra.atom.pos.tolist() for cra in st[0].all()], dtype=np.float64).reshape(-1, 3)


def simulation_box(xyz: np.ndarray, pixel: float, margin: float) -> tuple[int, np.ndarray]:
    """Cubic box around the atoms: (voxels per side, origin), the model centred in the box.

    The origin is a whole number of voxels from (0, 0, 0), so that programs that place a map by
    its nxstart/nystart/nzstart and programs that use the header origin agree."""
    lo, hi = xyz.min(axis=0), xyz.max(axis=0)
    side = float((hi - lo).max()) + 2.0 * margin
    n = fft_friendly_size(int(np.ceil(side / pixel)))
    origin = np.round(((lo + hi) / 2.0 - n * pixel / 2.0) / pixel) * pixel
    return n, origin


def model_density(st: gemmi.Structure, origin: np.ndarray, n: int, pixel: float,
                  extra_b: float = 0.0) -> np.ndarray:
    """Density of st's first model on an n^3 grid of spacing pixel starting at origin.

    Electron scattering factors, the atoms' B-factors (and anisotropic ADPs) plus extra_b.
    Returns float32 indexed [z, y, x]. The calculation is periodic in the box, so the box needs
    a margin of several Angstrom around the atoms.
    """
    return mapstats.model_density(st, (n, n, n), origin, (pixel, pixel, pixel), extra_b)


# ------------------------------------------------------------------------------------- FSC

def _shells(shape_zyx, voxel, nbins=None):
    """Shell of each coefficient of an rfftn of a (nz, ny, nx) map.

    Returns (index, weight, s_centres): index is -1 beyond Nyquist; weight counts the Friedel
    mate that the half-complex layout leaves out; s_centres in 1/A.
    """
    (_, index, weight), = _shell_slabs(shape_zyx, voxel, nbins, planes=shape_zyx[0])
    return index, weight, _shell_centres(shape_zyx, voxel, nbins)


def _shell_width(shape_zyx, voxel, nbins=None) -> tuple[float, int]:
    nz, ny, nx = shape_zyx
    vx, vy, vz = (float(v) for v in voxel)
    s_max = 0.5 / max(vx, vy, vz)
    if nbins:
        width = s_max / (nbins - 1)
    else:
        width = 1.0 / max(nx * vx, ny * vy, nz * vz)
    return width, int(np.floor(s_max / width + 1e-9)) + 1


def _shell_centres(shape_zyx, voxel, nbins=None) -> np.ndarray:
    width, n_shells = _shell_width(shape_zyx, voxel, nbins)
    return np.arange(n_shells) * width


def _shell_slabs(shape_zyx, voxel, nbins=None, planes: int = 16):
    """The shells of _shells for slabs of `planes` z planes of the coefficient array at a time:
    yields (z slice, index, weight) with the same values as the slab of _shells' arrays, so a
    sum over the coefficients needs no map-sized temporaries."""
    nz, ny, nx = shape_zyx
    vx, vy, vz = (float(v) for v in voxel)
    fz, fy, fx = rfft_freqs(shape_zyx, (vx, vy, vz))
    width, n_shells = _shell_width(shape_zyx, voxel, nbins)
    weight = np.full(fx.shape, 2.0)
    weight[..., 0] = 1.0
    if nx % 2 == 0:
        weight[..., -1] = 1.0
    for z0 in range(0, nz, max(1, int(planes))):
        sl = slice(z0, min(nz, z0 + max(1, int(planes))))
        s = np.sqrt(fz[sl]**2 + fy**2 + fx**2)
        index = np.rint(s / width).astype(np.int32)
        index[index >= n_shells] = -1
        yield sl, index, np.broadcast_to(weight, index.shape)


def _shell_sum(index, weight, values, n_shells):
    keep = index >= 0
    return np.bincount(index[keep], weights=(weight * values)[keep], minlength=n_shells)


def shell_power(data: np.ndarray, voxel) -> tuple[np.ndarray, np.ndarray]:
    """(s_centres, mean |F|^2 per shell) of a map (unnormalised forward FFT)."""
    index, weight, s = _shells(data.shape, voxel)
    f = _rfftn(np.asarray(data, dtype=np.float32))
    power = _shell_sum(index, weight, np.abs(f) ** 2, len(s))
    count = _shell_sum(index, weight, np.ones(index.shape), len(s))
    return s, power / np.maximum(count, 1)


def fsc(a: np.ndarray, b: np.ndarray, voxel, nbins=None) -> tuple[np.ndarray, np.ndarray]:
    """Fourier shell correlation of two maps on the same grid.

    Shells are one Fourier voxel wide (1 / longest box edge) unless nbins is given, up to
    Nyquist. Returns (s_centres in 1/A, fsc).
    """
    if a.shape != b.shape:
        raise ValueError(f"fsc needs maps of the same shape, got {a.shape} and {b.shape}")
    return fsc_of_transforms(_rfftn(np.asarray(a, dtype=np.float32)),
                             _rfftn(np.asarray(b, dtype=np.float32)), a.shape, voxel, nbins)


def shell_sums(fa: np.ndarray, fb: np.ndarray, shape_zyx, voxel, nbins=None):
    """Per shell of _shells, over the rfftn coefficients a, b of two maps of shape_zyx:
    (s_centres, sum Re(a b*), sum |a|^2, sum |b|^2, number of coefficients), each coefficient
    counted twice when the half-complex layout leaves out its Friedel mate. One compiled pass
    over the coefficients (0.25 s for a 480^3 map, against 1.2-1.5 s for the slabs of index
    arrays and bincounts it replaces), with no temporaries."""
    width, n = _shell_width(shape_zyx, voxel, nbins)
    out = np.zeros((4, n))
    _over_shells(fa, fb, *_axis_freqs(shape_zyx, voxel), float(width), shape_zyx[2] % 2 == 0, out,
                 np.zeros(n), False)
    return _shell_centres(shape_zyx, voxel, nbins), out[0], out[1], out[2], out[3]


def _axis_freqs(shape_zyx, voxel):
    fz, fy, fx = rfft_freqs(shape_zyx, tuple(float(v) for v in voxel))
    return (np.ascontiguousarray(fz.ravel()), np.ascontiguousarray(fy.ravel()),
            np.ascontiguousarray(fx.ravel()))


@njit(cache=True)
def _over_shells(fa, fb, fz, fy, fx, width, last_single, out, factor, scale):
    """Over the rfftn coefficients a (and b) in shells of _shell_slabs (index rint(s / width)):
    scale False: out[0..3, shell] += weight x (Re(a b*), |a|^2, |b|^2, 1) within Nyquist, weight 2
    where the half-complex layout leaves out the Friedel mate; scale True: a *= factor[shell]
    in place, 0 beyond the last shell."""
    nz, ny, nh = fa.shape
    n = out.shape[1]
    for k in range(nz):
        for j in range(ny):
            szy = fz[k] * fz[k] + fy[j] * fy[j]
            for i in range(nh):
                idx = int(np.rint(math.sqrt(szy + fx[i] * fx[i]) / width))
                if scale:
                    fa[k, j, i] *= factor[idx] if idx < factor.shape[0] else 0.0
                    continue
                if idx >= n:
                    continue
                w = 1.0 if (i == 0 or (last_single and i == nh - 1)) else 2.0
                a = fa[k, j, i]
                b = fb[k, j, i]
                out[0, idx] += w * (a.real * b.real + a.imag * b.imag)
                out[1, idx] += w * (a.real * a.real + a.imag * a.imag)
                out[2, idx] += w * (b.real * b.real + b.imag * b.imag)
                out[3, idx] += w


def scale_shells(f: np.ndarray, shape_zyx, voxel, factor: np.ndarray) -> None:
    """Multiply the rfftn coefficients f of a map of shape_zyx by factor[shell] (shells of
    _shells; coefficients beyond Nyquist by 0), in place."""
    width, _ = _shell_width(shape_zyx, voxel)
    _over_shells(f, f, *_axis_freqs(shape_zyx, voxel), float(width), False, np.zeros((4, 1)),
                 np.asarray(factor, dtype=np.float64), True)


def fsc_of_transforms(fa: np.ndarray, fb: np.ndarray, shape_zyx, voxel, nbins=None):
    """fsc of two maps of shape_zyx given their rfftn transforms: (s_centres, fsc)."""
    s, cross, pa, pb, _ = shell_sums(fa, fb, shape_zyx, voxel, nbins)
    denom = np.sqrt(pa * pb)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(denom > 0, cross / denom, 0.0)
    return s, values


def _runs(index: np.ndarray):
    """(position in index, start, stop) of each run of consecutive values of an ascending index."""
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(index)]])
    return [(int(a), int(index[a]), int(index[b - 1]) + 1) for a, b in zip(starts, stops)]


class CroppedTransform:
    """The rfftn coefficients of maps of one grid within the cube |k_z|, |k_y|, |k_x| <= s_max
    (1/A): all that a map low-passed at s_max holds. At 3.5 A on a 1.17 A grid the cube keeps
    0.3 of the coefficients (133 MB of a 480^3 map's 444 MB), so a map's transform can be kept
    for many FSCs and low-passed maps: transform(map) once, then fsc() and to_map() without
    transforming the map again.

    The shells are those of the whole grid (_shell_width), and fsc() visits the kept coefficients
    in the order of fsc_of_transforms: on the same coefficients (crop() of a whole rfftn) a shell
    the cube holds whole has the same sums, bit for bit; transform() computes them axis by axis
    and agrees to rounding (2e-7 of the largest). A shell is whole when s_max reaches its outer
    edge: take s_max one shell width beyond the last shell that matters (for_resolution)."""

    def __init__(self, shape_zyx, voxel, s_max: float):
        self.shape = tuple(int(n) for n in shape_zyx)
        self.voxel = tuple(float(v) for v in voxel)
        fz, fy, fx = _axis_freqs(self.shape, self.voxel)
        self.iz = np.flatnonzero(np.abs(fz) <= s_max)      # ascending: the order of the full array
        self.iy = np.flatnonzero(np.abs(fy) <= s_max)
        self.nx = int(np.count_nonzero(fx <= s_max))       # kx >= 0 ascending: a prefix
        self.fz, self.fy, self.fx = fz[self.iz], fy[self.iy], fx[:self.nx]
        self.width, self.n_shells = _shell_width(self.shape, self.voxel)
        # the half-complex layout's last x plane (nx even) has no Friedel mate: counted once
        self.last_single = self.shape[2] % 2 == 0 and self.nx == self.shape[2] // 2 + 1

    @classmethod
    def for_resolution(cls, shape_zyx, voxel, resolution: float) -> "CroppedTransform":
        """The cube that holds every shell up to 1/resolution whole."""
        width, _ = _shell_width(shape_zyx, voxel)
        return cls(shape_zyx, voxel, 1.0 / resolution + width)

    def crop(self, f: np.ndarray) -> np.ndarray:
        """The cube's coefficients of a full rfftn array (a new array; slices, no gathers)."""
        out = np.empty((len(self.iz), len(self.iy), self.nx), dtype=f.dtype)
        for oz, z0, z1 in _runs(self.iz):
            for oy, y0, y1 in _runs(self.iy):
                out[oz:oz + z1 - z0, oy:oy + y1 - y0] = f[z0:z1, y0:y1, :self.nx]
        return out

    def work_shape(self) -> tuple:
        """The shape of transform()'s intermediate array (complex64): every z plane, the cube's
        y and x."""
        return (self.shape[0], len(self.iy), self.nx)

    def out_shape(self) -> tuple:
        return (len(self.iz), len(self.iy), self.nx)

    def transform(self, data: np.ndarray, slab: int = 16, out: np.ndarray | None = None,
                  work: np.ndarray | None = None) -> np.ndarray:
        """The cube's coefficients of a real map, without the whole rfftn: x then y transformed
        slab by slab in z, keeping the cube's x and y, then z (0.7 of the work of the whole
        transform, and a third of its memory). out (complex64, out_shape()) and work
        (complex64, work_shape()): arrays to fill instead of new ones, for a caller that
        transforms many maps (at 480^3 the new pages of the two arrays, 330 MB, took about
        1 s a transform on this virtual machine with huge pages: parallel.context.small_pages)."""
        import scipy.fft

        data = np.asarray(data)
        nz = self.shape[0]
        threads = _n_threads()
        part = work if work is not None else np.empty(self.work_shape(), dtype=np.complex64)
        for z0 in range(0, nz, slab):
            z1 = min(nz, z0 + slab)
            f = scipy.fft.rfft(np.asarray(data[z0:z1], dtype=np.float32), axis=2, workers=threads)
            f = scipy.fft.fft(f[:, :, :self.nx], axis=1, workers=threads)
            for oy, y0, y1 in _runs(self.iy):
                part[z0:z1, oy:oy + y1 - y0] = f[:, y0:y1]
        part = scipy.fft.fft(part, axis=0, workers=threads, overwrite_x=True)
        if out is None:
            out = np.empty(self.out_shape(), dtype=np.complex64)
        for oz, z0, z1 in _runs(self.iz):
            out[oz:oz + z1 - z0] = part[z0:z1]
        return out

    def lowpass(self, c: np.ndarray, resolution: float) -> None:
        """Zero the coefficients beyond 1/resolution, in place (mapstats.lowpass_coefficients)."""
        mapstats.lowpass_coefficients(c, self.shape, self.voxel, resolution, (self.fz, self.fy, self.fx))

    def blur(self, c: np.ndarray, b_extra: float) -> None:
        """Multiply the coefficients by exp(-b_extra s^2 / 4), in place (as density.blur_map;
        one factor per axis: no temporaries of the cube's size)."""
        for k, shape in ((self.fz, (-1, 1, 1)), (self.fy, (1, -1, 1)), (self.fx, (1, 1, -1))):
            c *= np.exp(-0.25 * b_extra * k * k).astype(np.float32).reshape(shape)

    def to_map(self, c: np.ndarray, out: np.ndarray | None = None, work: np.ndarray | None = None,
               slab: int = 16) -> np.ndarray:
        """The real map (float32) whose coefficients are c inside the cube and 0 outside: z
        transformed on the cube's y and x only, then y and x slab by slab in z (the inverse of
        transform(); the same map as irfftn of the zero-padded coefficients to 4e-7 of its
        largest value). out (float32, the grid's shape) and work (complex64, work_shape()):
        arrays to fill instead of new ones. Only slabs are allocated: irfftn of the padded
        coefficients made three new map-sized arrays (1.3 GB at 480^3), whose new pages cost
        more than the transform on this virtual machine with huge pages
        (parallel.context.small_pages; four low-passed, normalised 480^3 maps in one process:
        9.3 s, 12 s of it in the kernel, against 5.0 s this way with kept arrays)."""
        import scipy.fft

        nz, ny, nx = self.shape
        threads = _n_threads()
        part = work if work is not None else np.empty(self.work_shape(), dtype=np.complex64)
        part.fill(0)
        for oz, z0, z1 in _runs(self.iz):
            part[z0:z1] = c[oz:oz + z1 - z0]
        for y0 in range(0, part.shape[1], slab):         # z, in slabs of y: no whole-array temporary
            y1 = min(part.shape[1], y0 + slab)
            part[:, y0:y1] = scipy.fft.ifft(part[:, y0:y1], axis=0, workers=threads)
        if out is None:
            out = np.empty(self.shape, dtype=np.float32)
        pad = np.zeros((min(slab, nz), ny, nx // 2 + 1), dtype=np.complex64)
        for z0 in range(0, nz, slab):
            z1 = min(nz, z0 + slab)
            p = pad[:z1 - z0]
            for oy, y0, y1 in _runs(self.iy):
                p[:, y0:y1, :self.nx] = part[z0:z1, oy:oy + y1 - y0]
            out[z0:z1] = scipy.fft.irfft(scipy.fft.ifft(p, axis=1, workers=threads), n=nx, axis=2,
                                         workers=threads)
        return out

    def fsc(self, ca: np.ndarray, cb: np.ndarray) -> np.ndarray:
        """The FSC per shell of the grid's shells (fsc_of_transforms) from two cropped transforms:
        exact for the shells the cube holds whole, partial sums for those it cuts, 0 beyond it."""
        out = np.zeros((4, self.n_shells))
        _over_shells(ca, cb, self.fz, self.fy, self.fx, float(self.width), self.last_single, out,
                     np.zeros(self.n_shells), False)
        denom = np.sqrt(out[1] * out[2])
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, out[0] / denom, 0.0)


def fsc_crossing(s: np.ndarray, f: np.ndarray, threshold: float = FSC_THRESHOLD) -> float:
    """Resolution (A) where the FSC first falls below threshold, interpolating linearly in s.

    The zero-frequency shell is skipped. If the FSC never falls below the threshold, the
    resolution of the last shell is returned.
    """
    s = np.asarray(s, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    below = np.nonzero(f[1:] < threshold)[0]
    if len(below) == 0:
        return float(1.0 / s[-1])
    i = int(below[0]) + 1
    frac = (f[i - 1] - threshold) / (f[i - 1] - f[i])
    s_cross = s[i - 1] + frac * (s[i] - s[i - 1])
    return float(1.0 / s_cross) if s_cross > 0 else float("inf")


def _power_at(s: np.ndarray, power: np.ndarray, s_target: float) -> float:
    """Signal power at s_target, interpolated linearly in log power between shells."""
    ok = (s > 0) & (power > 0)
    if ok.sum() < 2 or s_target > s[ok][-1]:
        raise InputError(f"the model has no density at {1 / s_target:.2f} A resolution in this "
                         f"box; cannot scale the noise")
    return float(np.exp(np.interp(s_target, s[ok], np.log(power[ok]))))


def noise_sigma(density: np.ndarray, voxel, resolution: float,
                threshold: float = FSC_THRESHOLD) -> tuple[float, float]:
    """Real-space sigma of white noise that makes the half-map FSC reach threshold at resolution.

    With signal power S per Fourier coefficient and white noise of variance sigma^2 per voxel
    (power N = sigma^2 * n_voxels per coefficient), the expected half-map FSC is S / (S + N);
    N is chosen so that this is threshold at 1/resolution. Returns (sigma, expected resolution):
    the latter is where the expected FSC first falls below threshold, which differs from the
    request when the signal power dips below its value at 1/resolution at lower resolution.
    """
    s, power = shell_power(density, voxel)
    signal = _power_at(s, power, 1.0 / resolution)
    noise_power = signal * (1.0 - threshold) / threshold
    expected = fsc_crossing(s, power / (power + noise_power), threshold)
    return float(np.sqrt(noise_power / density.size)), expected


# -------------------------------------------------------------------------------- simulate

def _check_request(resolution: float, pixel: float) -> None:
    if not resolution > 0:
        raise InputError(f"resolution must be positive, got {resolution}")
    if not pixel > 0:
        raise InputError(f"pixel size must be positive, got {pixel}")
    if resolution < 2.0 * pixel:
        raise InputError(f"resolution {resolution} A is beyond Nyquist for a {pixel} A pixel "
                         f"(needs resolution >= {2 * pixel:.2f} A); use a smaller pixel")


def simulate_maps(st: gemmi.Structure, resolution: float, seed: int, pixel=None,
                  margin: float = 10.0, extra_b: float = 0.0):
    """Simulated full map and half maps of st's first model at the given resolution.

    Returns (full, half1, half2, origin, voxel, info): float32 arrays indexed [z, y, x] on a
    cubic box (origin = position of voxel (0,0,0); voxel = (pixel,)*3) and a dict with pixel,
    box, noise sigma and the measured half-map FSC=0.143 resolution. Deterministic for a seed.
    """
    t0 = time.perf_counter()
    pixel = default_pixel(resolution) if pixel is None else float(pixel)
    _check_request(resolution, pixel)
    xyz = model_xyz(st)
    if len(xyz) == 0:
        raise InputError("the model has no atoms; nothing to simulate")
    n, origin = simulation_box(xyz, pixel, margin)
    voxel = np.full(3, pixel)
    log.info("simulating %.2f A maps of %d atoms: %d^3 box, %.2f A pixel", resolution, len(xyz),
             n, pixel)
    density = model_density(st, origin, n, pixel, extra_b)
    sigma, expected = noise_sigma(density, voxel, resolution)
    if abs(expected - resolution) > 0.05 * resolution:
        log.warning("the model's power spectrum is not decreasing up to %.2f A, so white noise "
                    "puts the expected half-map FSC=0.143 at %.2f A instead; an overall "
                    "B-factor (extra_b, e.g. 100-150 A^2 at 5 A) makes the FSC fall cleanly",
                    resolution, expected)
    rng = np.random.default_rng(seed)
    half1 = density + (sigma * rng.standard_normal(density.shape, dtype=np.float32))
    half2 = density + (sigma * rng.standard_normal(density.shape, dtype=np.float32))
    full = 0.5 * (half1 + half2)
    s, f = fsc(half1, half2, voxel)
    measured = fsc_crossing(s, f, FSC_THRESHOLD)
    info = {
        "resolution": float(resolution), "seed": int(seed), "pixel": pixel, "box": [n, n, n],
        "box_angstrom": round(n * pixel, 4), "origin": [float(c) for c in origin], "margin": float(margin),
        "extra_b": float(extra_b), "n_atoms": int(len(xyz)), "noise_sigma": sigma,
        "signal_std": float(density.std()), "fsc_expected_0143": expected,
        "fsc_half_0143": measured,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log.info("half-map FSC=0.143 at %.2f A (requested %.2f A); noise sigma %.4g",
             measured, resolution, sigma)
    return full, half1, half2, origin, voxel, info


def write_simulated(model_path: str, resolution: float, outdir: str, seed: int, pixel=None,
                    margin: float = 10.0, extra_b: float = 0.0, overwrite: bool = False) -> dict:
    """Simulate maps of the model file and write outdir/{full,half1,half2}.mrc and simulate.json.

    Refuses to replace existing map files unless overwrite is True. Returns the info dict
    (with the model path and the written paths).
    """
    paths = {name: os.path.join(outdir, name + ".mrc") for name in MAP_NAMES}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise InputError(f"map files already exist: {', '.join(existing)}; choose another output "
                         f"directory, or allow overwriting (--overwrite) to replace them")
    st = read_structure(model_path)
    full, half1, half2, origin, voxel, info = simulate_maps(st, resolution, seed, pixel=pixel,
                                                             margin=margin, extra_b=extra_b)
    os.makedirs(outdir, exist_ok=True)
    for name, data in zip(MAP_NAMES, (full, half1, half2)):
        mapio.write_map(paths[name], data, origin, voxel)
    info = {"model": os.path.abspath(model_path), **info,
            "maps": {k: os.path.abspath(v) for k, v in paths.items()}}
    atomic_write_text(os.path.join(outdir, "simulate.json"), json.dumps(info, indent=2) + "\n")
    return info


def shake(xyz: np.ndarray, rms: float, seed) -> np.ndarray:
    """Coordinates with random Gaussian displacements whose all-atom rms is exactly rms A (seed:
    an integer or a sequence of integers, as numpy.random.default_rng takes it)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    if rms < 0:
        raise InputError(f"shake rms must not be negative, got {rms}")
    if len(xyz) == 0 or rms == 0:
        return xyz.copy()
    d = np.random.default_rng(seed).standard_normal(xyz.shape)
    d *= rms / np.sqrt((d**2).sum(axis=1).mean())
    return xyz + d


def alternative_conformers(model, restraints, count: int, seed: int, occ_range=(0.2, 0.8),
                           min_contact: float = 3.0):
    """A test case for occupancy refinement: a copy of the model's structure in which `count`
    side chains get a second conformer. Candidates are the side chains the rotamer step can turn
    (protocol.rotamer_fit.side_chains) with at least two atoms beyond CB; they are taken in a
    seeded random order. A side chain's atoms beyond CB become altloc A (as in the model, occupancy
    q drawn uniformly from occ_range) and altloc B (occupancy 1 - q): the most probable library
    rotamer whose chi 1 is more than 60 degrees from the model's and whose atoms stay min_contact
    A from every atom outside the residue (a side chain with none is passed over).

    Returns (structure, picks): picks lists (residue index, q) in residue order."""
    from .protocol.rotamer_fit import current_chis, set_chis, side_chains
    from .validation import rotamer

    rng = np.random.default_rng(seed)
    chains = [c for c in side_chains(model, restraints) if len(c.beyond_cb) >= 2]
    lib = rotamer.library()
    picks, coords = [], {}
    for k in rng.permutation(len(chains)).tolist():
        if len(picks) == count:
            break
        sc = chains[k]
        others = np.ones(model.n_atoms, dtype=bool)
        others[sc.atoms] = False
        mean = lib[sc.res_type]["mean"]
        off = np.abs((mean[:, 0] - current_chis(model.xyz, sc)[0] + 180.0) % 360.0 - 180.0) > 60.0
        for j in np.argsort(-lib[sc.res_type]["prob"]).tolist():
            if not off[j]:
                continue
            alt = set_chis(model.xyz[sc.atoms], sc, mean[j][None])[0][sc.beyond_cb]
            d = np.linalg.norm(alt[:, None, :] - model.xyz[others][None, :, :], axis=2)
            if d.min() >= min_contact:
                q = float(rng.uniform(*occ_range))
                picks.append((sc.residue, q))
                coords[sc.residue] = (set(model.atom_name[sc.atoms[sc.beyond_cb]].tolist()), alt, q)
                break
    st = model.st.clone()
    r = 0
    for ch in st[0]:
        for res in ch:
            if r in coords:
                names, alt, q = coords[r]
                moved = [i for i, at in enumerate(res) if at.name in names]
                for n_alt, i in enumerate(moved):
                    res[i].altloc, res[i].occ = "A", q
                    b = res[i].clone()
                    b.altloc, b.occ = "B", 1.0 - q
                    b.pos = gemmi.Position(*alt[n_alt])
                    res.add_atom(b)
            r += 1
    return st, sorted(picks)
