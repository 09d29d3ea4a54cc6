"""Reading and writing cryo-EM maps (MRC/CCP4 format, via mrcfile), memory-mapped.

A map is a MapGrid: a float32 array indexed data[k, j, i] (z slowest, x fastest) and the
Angstrom position of voxel (i, j, k) = origin + (i * vx, j * vy, k * vz). Files with a
non-standard axis order (mapc/mapr/maps) are presented through a transposed view, so the rest
of the program never sees the file's axis order.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import mrcfile
import numpy as np
from mrcfile import utils as mrc_utils

from .errors import InputError

log = logging.getLogger(__name__)

GRID_VOXEL_TOL = 1e-4   # Angstrom
GRID_ORIGIN_TOL = 1e-3  # Angstrom
_CHECK_CHUNK_BYTES = 16 * 2**20  # non-finite check reads the map in pieces of about this size


@dataclass
class MapGrid:
    """A map on a regular orthogonal grid.

    data[k, j, i] is the value at origin + (i * voxel[0], j * voxel[1], k * voxel[2]).
    """

    data: np.ndarray    # float32, shape (nz, ny, nx)
    origin: np.ndarray  # (3,) float64, Angstrom position (x, y, z) of voxel (0, 0, 0)
    voxel: np.ndarray   # (3,) float64, voxel size along x, y, z in Angstrom
    path: str

    @property
    def shape_xyz(self) -> tuple[int, int, int]:
        """Number of voxels along x, y, z."""
        nz, ny, nx = self.data.shape
        return nx, ny, nz

    @property
    def extent_min(self) -> np.ndarray:
        """Position (x, y, z) of the first voxel, Angstrom."""
        return np.asarray(self.origin, dtype=np.float64).copy()

    @property
    def extent_max(self) -> np.ndarray:
        """Position (x, y, z) of the last voxel, Angstrom."""
        return self.origin + (np.array(self.shape_xyz) - 1) * self.voxel


# ----------------------------------------------------------------------------------- reading

def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"map file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"map path is a directory, not a file: {path}")
    if os.path.getsize(path) == 0:
        raise InputError(f"map file is empty: {path} (interrupted copy or download?)")


def _truncation_message(path: str) -> str | None:
    """A message if the file is shorter than its header says, else None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
                h = mrc.header
                dtype = mrc_utils.data_dtype_from_header(h)
                n_values = int(h.nx) * int(h.ny) * int(h.nz)
                expected = int(h.nbytes) + int(h.nsymbt) + n_values * dtype.itemsize
    except Exception:  # header itself unreadable: not a truncation we can describe
        return None
    actual = os.path.getsize(path)
    if actual < expected:
        return (f"map file {path} is truncated: its header describes a "
                f"{int(h.nx)}x{int(h.ny)}x{int(h.nz)} map needing {expected} bytes but the file "
                f"has only {actual} (incomplete download or copy? copy the file again)")
    return None


def _open_mrc(path: str, mmap: bool):
    """Open path with mrcfile in strict mode; InputError with a readable reason on failure."""
    opener = mrcfile.mmap if mmap else mrcfile.open
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mrc = opener(path, mode="r", permissive=False)
        except Exception as exc:
            reason = _truncation_message(path)
            if reason is None:
                reason = (f"cannot read map {path}: {exc} (is it an MRC/CCP4 map? "
                          f"convert it to MRC format first)")
            raise InputError(reason) from None
    for w in caught:
        log.warning("map %s: %s", path, w.message)
    return mrc


def _axis_order(header, path: str) -> tuple[int, int, int]:
    """(mapc, mapr, maps) as 0-based physical axes (0 = x) of the file's columns, rows, sections."""
    order = (int(header.mapc) - 1, int(header.mapr) - 1, int(header.maps) - 1)
    if sorted(order) != [0, 1, 2]:
        raise InputError(f"map {path} has an invalid axis order mapc/mapr/maps = "
                         f"{order[0] + 1}/{order[1] + 1}/{order[2] + 1} (must be a permutation of "
                         f"1, 2, 3); the header is corrupt - re-export the map")
    return order


def _voxel_size(header, path: str) -> np.ndarray:
    angles = np.array([float(header.cellb.alpha), float(header.cellb.beta), float(header.cellb.gamma)])
    if not np.allclose(angles, 90.0, atol=1e-3):
        raise InputError(f"map {path} has cell angles {angles[0]:g}, {angles[1]:g}, {angles[2]:g}; "
                         f"only orthogonal grids (all angles 90) are supported")
    cell = np.array([float(header.cella.x), float(header.cella.y), float(header.cella.z)])
    sampling = np.array([int(header.mx), int(header.my), int(header.mz)])
    if np.any(sampling <= 0) or np.any(cell <= 0) or not np.all(np.isfinite(cell)):
        raise InputError(f"map {path} has no usable voxel size (cell {cell.tolist()}, sampling "
                         f"mx,my,mz {sampling.tolist()}); set the pixel size in the header "
                         f"(e.g. with mrcfile or your processing program) and try again")
    return cell / sampling


def _origin(header, order: tuple[int, int, int], voxel: np.ndarray, path: str) -> np.ndarray:
    """Position of voxel (0,0,0): the header origin, or nstart * voxel when the origin is zero."""
    origin = np.array([float(header.origin.x), float(header.origin.y), float(header.origin.z)])
    nstart_file = (int(header.nxstart), int(header.nystart), int(header.nzstart))
    nstart = np.zeros(3)
    for file_axis, phys_axis in enumerate(order):
        nstart[phys_axis] = nstart_file[file_axis]
    if not np.all(np.isfinite(origin)):
        raise InputError(f"map {path} has a non-finite origin in its header: {origin.tolist()}")
    if np.any(origin != 0):
        if np.any(nstart != 0) and not np.allclose(nstart * voxel, origin, atol=1e-3):
            log.warning("map %s has both an origin (%s) and nstart (%s); using the origin",
                        path, origin.tolist(), nstart.astype(int).tolist())
        return origin
    return nstart * voxel


def _to_zyx(file_data: np.ndarray, order: tuple[int, int, int]) -> np.ndarray:
    """View of the file array (sections, rows, columns) indexed [z, y, x]."""
    axes_of_dim = (order[2], order[1], order[0])  # physical axis of file dims 0, 1, 2
    perm = tuple(axes_of_dim.index(phys) for phys in (2, 1, 0))
    return file_data if perm == (0, 1, 2) else file_data.transpose(perm)


def _file_chunks(file_data: np.ndarray, step: int):
    """The sections of the array in chunks of `step`: for a memory-mapped array, read from its
    file with ordinary reads, so that checking a map does not leave all its pages mapped into
    this process (each rank checks its inputs; a worker then maps only what it uses)."""
    if isinstance(file_data, np.memmap) and file_data.filename and file_data.flags.c_contiguous:
        per_section = file_data[0].size
        with open(file_data.filename, "rb") as fh:
            fh.seek(file_data.offset)
            for k in range(0, file_data.shape[0], step):
                n = min(step, file_data.shape[0] - k) * per_section
                chunk = np.fromfile(fh, dtype=file_data.dtype, count=n)
                if chunk.size != n:
                    raise InputError(f"map {file_data.filename} is shorter than its header says")
                yield chunk
        return
    for k in range(0, file_data.shape[0], step):
        yield file_data[k:k + step]


def _check_finite(file_data: np.ndarray, path: str) -> None:
    """Raise InputError if the map holds NaN or Inf; reads the array in chunks."""
    if not np.issubdtype(file_data.dtype, np.floating):
        return
    per_section = max(1, file_data[0].nbytes)
    step = max(1, _CHECK_CHUNK_BYTES // per_section)
    n_nan = n_inf = 0
    for chunk in _file_chunks(file_data, step):
        bad = ~np.isfinite(chunk)
        if bad.any():
            nan = int(np.count_nonzero(np.isnan(chunk)))
            n_nan += nan
            n_inf += int(np.count_nonzero(bad)) - nan
    if n_nan or n_inf:
        raise InputError(f"map {path} contains NaN ({n_nan} voxels) or infinite ({n_inf} voxels) "
                         f"values; the map is damaged or was written from a failed computation - "
                         f"regenerate it, or replace those values (e.g. by 0) before refining")


def read_map(path: str, mmap: bool = True) -> MapGrid:
    """Read an MRC/CCP4 map into a MapGrid (memory-mapped unless mmap is False).

    Honours the header origin, nxstart/nystart/nzstart (used when the origin is zero) and the
    axis order mapc/mapr/maps. Data in a format other than native float32 is converted (copied).
    """
    path = os.fspath(path)
    _check_file(path)
    mrc = _open_mrc(path, mmap)
    try:
        header = mrc.header
        file_data = mrc.data
        if file_data is None or file_data.ndim != 3:
            shape = None if file_data is None else file_data.shape
            raise InputError(f"map {path} is not a 3D volume (data shape {shape}); "
                             f"an image or image stack cannot be used as a map")
        if np.iscomplexobj(file_data):
            raise InputError(f"map {path} holds complex values (MRC mode {int(header.mode)}); "
                             f"a real-space map is needed")
        order = _axis_order(header, path)
        voxel = _voxel_size(header, path)
        origin = _origin(header, order, voxel, path)
    finally:
        mrc.close()  # the memmap array keeps its own mapping of the file
    _check_finite(file_data, path)
    data = _to_zyx(file_data, order)
    if data.dtype != np.float32:
        log.info("map %s stores %s values; converting to float32 in memory", path, data.dtype)
        data = np.ascontiguousarray(data, dtype=np.float32)
    grid = MapGrid(data=data, origin=origin, voxel=voxel, path=path)
    log.debug("read map %s: %s voxels of %s A, origin %s", path, grid.shape_xyz, voxel.tolist(),
              origin.tolist())
    return grid


# ------------------------------------------------------------------------------------ checks

def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:.4f}" for x in np.asarray(v, dtype=float)) + ")"


def check_same_grid(a: MapGrid, b: MapGrid) -> None:
    """InputError unless a and b have the same shape, voxel size and origin."""
    problems = []
    if a.data.shape != b.data.shape:
        problems.append(f"size {a.shape_xyz} vs {b.shape_xyz} voxels (x, y, z)")
    if not np.allclose(a.voxel, b.voxel, rtol=0, atol=GRID_VOXEL_TOL):
        problems.append(f"voxel size {_fmt(a.voxel)} vs {_fmt(b.voxel)} A")
    if not np.allclose(a.origin, b.origin, rtol=0, atol=GRID_ORIGIN_TOL):
        problems.append(f"origin {_fmt(a.origin)} vs {_fmt(b.origin)} A")
    if problems:
        raise InputError(f"maps {a.path} and {b.path} are not on the same grid: "
                         + "; ".join(problems)
                         + ". Half maps and masks must come from the same reconstruction box; "
                           "resample one onto the other's grid first")


def check_model_inside(xyz: np.ndarray, grid: MapGrid, margin: float = 0.0) -> None:
    """InputError if any atom lies outside the map box (shrunk by margin Angstrom on each side)."""
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    if len(xyz) == 0:
        return
    lo = grid.extent_min + margin
    hi = grid.extent_max - margin
    outside = np.any((xyz < lo) | (xyz > hi), axis=1)
    n_out = int(np.count_nonzero(outside))
    if n_out:
        where = f" (with a margin of {margin:g} A)" if margin else ""
        raise InputError(
            f"{n_out} of {len(xyz)} atoms lie outside the map {grid.path}{where}: the model spans "
            f"{_fmt(xyz.min(axis=0))} to {_fmt(xyz.max(axis=0))} A, the map covers "
            f"{_fmt(grid.extent_min)} to {_fmt(grid.extent_max)} A. The model and map are probably "
            f"not in the same frame: fit the model into this map (or check the map's origin) first")


# ----------------------------------------------------------------------------------- writing

def write_map(path: str, data_zyx: np.ndarray, origin, voxel) -> None:
    """Write a float32 map (indexed [z, y, x]) as MRC, atomically (via path + '.part').

    Standard axis order (mapc, mapr, maps = 1, 2, 3), origin in the header origin field,
    nxstart/nystart/nzstart = origin / voxel when that is a whole number of voxels (else 0),
    cell = voxel * shape.
    """
    path = os.fspath(path)
    data = np.ascontiguousarray(data_zyx, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"write_map needs a 3D array, got shape {data.shape}")
    origin = np.asarray(origin, dtype=np.float64).reshape(3)
    voxel = np.asarray(voxel, dtype=np.float64).reshape(3)
    tmp = path + ".part"
    try:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            h = mrc.header
            h.mapc, h.mapr, h.maps = 1, 2, 3
            start = np.asarray(origin) / np.asarray(voxel)
            if np.allclose(start, np.round(start), atol=1e-4):
                # a whole number of voxels: write it as nstart too, for readers that ignore origin
                h.nxstart, h.nystart, h.nzstart = (int(v) for v in np.round(start))
            else:
                h.nxstart = h.nystart = h.nzstart = 0
            nz, ny, nx = data.shape
            h.mx, h.my, h.mz = nx, ny, nz
            mrc.voxel_size = tuple(voxel)
            h.cellb.alpha = h.cellb.beta = h.cellb.gamma = 90.0
            h.origin.x, h.origin.y, h.origin.z = origin
            mrc.update_header_stats()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
