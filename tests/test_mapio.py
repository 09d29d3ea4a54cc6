"""Map reading/writing: origin conventions, axis order, damaged files, grid and model checks."""
from __future__ import annotations

import os

import mrcfile
import numpy as np
import pytest

from hpcrefine import mapio
from hpcrefine.errors import InputError

BLOB_CENTRE = np.array([23.0, -7.5, 41.0])  # Angstrom (x, y, z)
BLOB_SIGMA = 2.5


def blob(x, y, z):
    """Gaussian blob at BLOB_CENTRE, evaluated at Angstrom positions."""
    r2 = (x - BLOB_CENTRE[0]) ** 2 + (y - BLOB_CENTRE[1]) ** 2 + (z - BLOB_CENTRE[2]) ** 2
    return np.exp(-r2 / (2 * BLOB_SIGMA**2)).astype(np.float32)


def physical_map(shape_xyz, origin, voxel):
    """The blob sampled on a grid, indexed [z, y, x]."""
    nx, ny, nz = shape_xyz
    x = origin[0] + np.arange(nx) * voxel[0]
    y = origin[1] + np.arange(ny) * voxel[1]
    z = origin[2] + np.arange(nz) * voxel[2]
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    return blob(xx, yy, zz)


def write_raw(path, file_data, *, voxel, origin=(0, 0, 0), nstart=(0, 0, 0), axes=(1, 2, 3),
              sampling=None, angles=(90, 90, 90)):
    """Write file_data (sections, rows, columns) with an explicit header, as other programs do."""
    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(file_data))
        h = mrc.header
        h.mapc, h.mapr, h.maps = axes
        h.nxstart, h.nystart, h.nzstart = nstart
        if sampling is not None:
            h.mx, h.my, h.mz = sampling
        mx, my, mz = int(h.mx), int(h.my), int(h.mz)
        h.cella.x, h.cella.y, h.cella.z = voxel[0] * mx, voxel[1] * my, voxel[2] * mz
        h.cellb.alpha, h.cellb.beta, h.cellb.gamma = angles
        h.origin.x, h.origin.y, h.origin.z = origin


def peak_position(grid: mapio.MapGrid) -> np.ndarray:
    k, j, i = np.unravel_index(np.argmax(grid.data), grid.data.shape)
    return grid.origin + np.array([i, j, k]) * grid.voxel


def assert_blob_where_expected(grid: mapio.MapGrid):
    expected = physical_map(grid.shape_xyz, grid.origin, grid.voxel)
    np.testing.assert_allclose(np.asarray(grid.data), expected, atol=1e-6)
    assert np.all(np.abs(peak_position(grid) - BLOB_CENTRE) <= grid.voxel / 2 + 1e-6)


def test_nonzero_origin(tmp_path):
    voxel = np.array([1.1, 1.1, 1.1])
    origin = np.array([5.5, -30.8, 20.9])
    shape = (40, 36, 44)
    data = physical_map(shape, origin, voxel)
    path = tmp_path / "origin.mrc"
    write_raw(path, data, voxel=voxel, origin=origin)
    grid = mapio.read_map(str(path))
    np.testing.assert_allclose(grid.origin, origin, atol=1e-5)
    np.testing.assert_allclose(grid.voxel, voxel, atol=1e-6)
    assert grid.shape_xyz == shape
    assert grid.data.dtype == np.float32
    assert isinstance(grid.data, np.memmap)
    assert_blob_where_expected(grid)
    np.testing.assert_allclose(grid.extent_max, origin + (np.array(shape) - 1) * voxel)


def test_nstart_with_zero_origin(tmp_path):
    voxel = np.array([1.0, 1.25, 1.5])
    nstart = (10, -12, 20)
    origin = np.array(nstart) * voxel
    shape = (32, 30, 28)
    data = physical_map(shape, origin, voxel)
    path = tmp_path / "nstart.mrc"
    write_raw(path, data, voxel=voxel, nstart=nstart, sampling=(64, 60, 56))
    grid = mapio.read_map(str(path))
    np.testing.assert_allclose(grid.origin, origin, atol=1e-5)
    np.testing.assert_allclose(grid.voxel, voxel, atol=1e-6)
    assert_blob_where_expected(grid)


def test_permuted_axis_order(tmp_path):
    """mapc=3, mapr=1, maps=2: columns run along z, rows along x, sections along y."""
    voxel = np.array([1.2, 1.2, 1.2])
    nstart_xyz = np.array([15, -8, 30])
    origin = nstart_xyz * voxel
    shape = (30, 26, 34)  # x, y, z
    zyx = physical_map(shape, origin, voxel)
    file_data = np.ascontiguousarray(zyx.transpose(1, 2, 0))  # [y, x, z] = [section, row, column]
    nstart_file = (nstart_xyz[2], nstart_xyz[0], nstart_xyz[1])  # column, row, section starts
    path = tmp_path / "permuted.mrc"
    write_raw(path, file_data, voxel=voxel, nstart=nstart_file, axes=(3, 1, 2), sampling=shape)
    grid = mapio.read_map(str(path))
    assert grid.shape_xyz == shape
    np.testing.assert_allclose(grid.origin, origin, atol=1e-5)
    assert isinstance(grid.data, np.memmap) and not grid.data.flags.c_contiguous  # a view
    assert_blob_where_expected(grid)


def test_standard_order_is_not_copied(tmp_path):
    path = tmp_path / "std.mrc"
    write_raw(path, np.zeros((6, 7, 8), np.float32), voxel=(1, 1, 1))
    grid = mapio.read_map(str(path))
    assert isinstance(grid.data, np.memmap)
    assert not grid.data.flags.writeable


def test_write_then_read_roundtrip(tmp_path):
    voxel = np.array([0.83, 0.83, 0.83])
    origin = np.array([-12.3, 4.5, 17.0])
    shape = (24, 26, 28)
    data = physical_map(shape, origin, voxel)
    path = str(tmp_path / "out.mrc")
    mapio.write_map(path, data, origin, voxel)
    assert not os.path.exists(path + ".part")
    with mrcfile.open(path) as mrc:
        h = mrc.header
        assert (int(h.mapc), int(h.mapr), int(h.maps)) == (1, 2, 3)
        assert (int(h.nxstart), int(h.nystart), int(h.nzstart)) == (0, 0, 0)
        np.testing.assert_allclose([h.cella.x, h.cella.y, h.cella.z], voxel * shape, rtol=1e-6)
    grid = mapio.read_map(path, mmap=False)
    np.testing.assert_allclose(grid.origin, origin, atol=1e-5)
    np.testing.assert_allclose(grid.voxel, voxel, atol=1e-6)
    np.testing.assert_array_equal(grid.data, data)


def test_non_float32_modes_are_converted(tmp_path):
    path = tmp_path / "int16.mrc"
    data = (np.arange(4 * 5 * 6).reshape(4, 5, 6) - 50).astype(np.int16)
    write_raw(path, data, voxel=(2, 2, 2))
    grid = mapio.read_map(str(path))
    assert grid.data.dtype == np.float32
    np.testing.assert_array_equal(grid.data, data.astype(np.float32))


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_map_is_rejected(tmp_path):
    data = np.ones((20, 20, 20), np.float32)
    data[13, 2, 7] = np.nan
    data[3, 4, 5] = np.inf
    path = tmp_path / "nan.mrc"
    write_raw(path, data, voxel=(1, 1, 1))
    with pytest.raises(InputError, match="contains NaN") as exc:
        mapio.read_map(str(path))
    assert str(path) in str(exc.value)
    assert "(1 voxels)" in str(exc.value)


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_check_spans_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(mapio, "_CHECK_CHUNK_BYTES", 3 * 20 * 20 * 4)  # 3 sections a chunk
    data = np.ones((20, 20, 20), np.float32)
    data[19, 19, 19] = np.nan
    path = tmp_path / "nan_last.mrc"
    write_raw(path, data, voxel=(1, 1, 1))
    with pytest.raises(InputError, match="NaN"):
        mapio.read_map(str(path))


def test_truncated_map_is_rejected(tmp_path):
    path = tmp_path / "full.mrc"
    write_raw(path, np.zeros((16, 16, 16), np.float32), voxel=(1, 1, 1))
    raw = path.read_bytes()
    cut = tmp_path / "cut.mrc"
    cut.write_bytes(raw[: len(raw) - 16 * 16 * 4 * 3])  # lose three sections
    for mmap in (True, False):
        with pytest.raises(InputError, match="truncated") as exc:
            mapio.read_map(str(cut), mmap=mmap)
        assert str(cut) in str(exc.value)


def test_missing_empty_and_foreign_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        mapio.read_map(str(tmp_path / "nope.mrc"))
    empty = tmp_path / "empty.mrc"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        mapio.read_map(str(empty))
    text = tmp_path / "model.mrc"
    text.write_text("ATOM      1  N   MET A   1      11.104  13.207   2.100  1.00 20.00\n" * 40)
    with pytest.raises(InputError, match="MRC"):
        mapio.read_map(str(text))


def test_oblique_cell_is_rejected(tmp_path):
    path = tmp_path / "oblique.mrc"
    write_raw(path, np.zeros((8, 8, 8), np.float32), voxel=(1, 1, 1), angles=(90, 90, 120))
    with pytest.raises(InputError, match="cell angles"):
        mapio.read_map(str(path))


def _grid(shape_xyz=(10, 12, 14), origin=(0, 0, 0), voxel=(1, 1, 1), name="m"):
    nx, ny, nz = shape_xyz
    return mapio.MapGrid(np.zeros((nz, ny, nx), np.float32), np.array(origin, float),
                         np.array(voxel, float), name)


def test_check_same_grid():
    mapio.check_same_grid(_grid(), _grid(origin=(0, 0, 0.0005), voxel=(1.00005, 1, 1)))
    with pytest.raises(InputError, match="voxel size") as exc:
        mapio.check_same_grid(_grid(name="half1"), _grid(voxel=(1.05, 1.05, 1.05), name="half2"))
    assert "half1" in str(exc.value) and "1.0500" in str(exc.value)
    with pytest.raises(InputError, match="size"):
        mapio.check_same_grid(_grid(), _grid(shape_xyz=(10, 12, 16)))
    with pytest.raises(InputError, match="origin"):
        mapio.check_same_grid(_grid(), _grid(origin=(0, 0.01, 0)))


def test_check_same_grid_on_files(tmp_path):
    a, b = tmp_path / "a.mrc", tmp_path / "b.mrc"
    mapio.write_map(str(a), np.zeros((8, 8, 8), np.float32), (0, 0, 0), (1.1, 1.1, 1.1))
    mapio.write_map(str(b), np.zeros((8, 8, 8), np.float32), (0, 0, 0), (1.2, 1.2, 1.2))
    with pytest.raises(InputError, match="not on the same grid"):
        mapio.check_same_grid(mapio.read_map(str(a)), mapio.read_map(str(b)))


def test_check_model_inside():
    grid = _grid(shape_xyz=(50, 50, 50), origin=(10, 20, 30), voxel=(1, 1, 1))
    inside = np.array([[12.0, 25.0, 40.0], [59.0, 69.0, 79.0]])
    mapio.check_model_inside(inside, grid)
    with pytest.raises(InputError, match="1 of 2 atoms"):
        mapio.check_model_inside(inside, grid, margin=2.0)
    outside = inside - 100.0  # model in another frame
    with pytest.raises(InputError, match="2 of 2 atoms") as exc:
        mapio.check_model_inside(outside, grid)
    msg = str(exc.value)
    assert "same frame" in msg and "(10.0000, 20.0000, 30.0000)" in msg
