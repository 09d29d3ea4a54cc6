"""Tricubic interpolation, the real-space target and map normalisation."""
import numpy as np
import pytest

from hpcrefine.core import density as D

ORIGIN = np.array([1.0, -2.0, 3.0])
VOXEL = np.array([0.9, 1.1, 1.0])


@pytest.fixture(scope="module")
def smooth_map():
    """A smooth random map (nz, ny, nx) = (20, 22, 24): random noise low-pass filtered."""
    rng = np.random.default_rng(0)
    shape = (20, 22, 24)
    f = np.fft.rfftn(rng.normal(size=shape))
    kz = np.fft.fftfreq(shape[0])[:, None, None]
    ky = np.fft.fftfreq(shape[1])[None, :, None]
    kx = np.fft.rfftfreq(shape[2])[None, None, :]
    f *= np.exp(-(kx**2 + ky**2 + kz**2) / (2 * 0.08**2))
    m = np.fft.irfftn(f, s=shape, axes=(0, 1, 2))
    return m / m.std()


def positions(rng, shape, n, margin):
    nz, ny, nx = shape
    frac = rng.uniform(-margin, 1 + margin, size=(n, 3)) * [nx - 1, ny - 1, nz - 1]
    return ORIGIN + frac * VOXEL


def numeric_grad(data, xyz, h=1e-6):
    g = np.zeros_like(xyz)
    for c in range(3):
        xp = xyz.copy()
        xm = xyz.copy()
        xp[:, c] += h
        xm[:, c] -= h
        g[:, c] = (D.tricubic(data, ORIGIN, VOXEL, xp)[0] - D.tricubic(data, ORIGIN, VOXEL, xm)[0]) / (2 * h)
    return g


def test_gradient_matches_finite_differences(smooth_map):
    rng = np.random.default_rng(1)
    xyz = positions(rng, smooth_map.shape, 300, 0.15)      # inside, near the edges and outside
    v, g = D.tricubic(smooth_map, ORIGIN, VOXEL, xyz)
    gn = numeric_grad(smooth_map, xyz)
    assert np.abs(g - gn).max() < 1e-6 * np.abs(gn).max()
    assert np.isfinite(v).all()


def test_contiguous_transposed_and_float32_views(smooth_map):
    rng = np.random.default_rng(2)
    xyz = positions(rng, smooth_map.shape, 200, 0.05)
    v, g = D.tricubic(smooth_map, ORIGIN, VOXEL, xyz)
    fortran = np.asfortranarray(smooth_map)                  # same values, transposed layout
    assert not fortran.flags.c_contiguous
    v2, g2 = D.tricubic(fortran, ORIGIN, VOXEL, xyz)
    np.testing.assert_array_equal(v, v2)
    np.testing.assert_array_equal(g, g2)
    strided = np.zeros((40, 22, 48))[::2, :, ::2]            # a strided view
    strided[...] = smooth_map
    np.testing.assert_array_equal(D.tricubic(strided, ORIGIN, VOXEL, xyz)[0], v)
    m32 = smooth_map.astype(np.float32)
    v32, g32 = D.tricubic(m32, ORIGIN, VOXEL, xyz)
    v64, g64 = D.tricubic(m32.astype(np.float64), ORIGIN, VOXEL, xyz)
    np.testing.assert_array_equal(v32, v64)
    np.testing.assert_array_equal(g32, g64)
    f32t = np.asfortranarray(m32)
    np.testing.assert_array_equal(D.tricubic(f32t, ORIGIN, VOXEL, xyz)[0], v32)
    gn = numeric_grad(f32t, xyz)
    assert np.abs(g32 - gn).max() < 1e-6 * np.abs(gn).max()
    big_endian = smooth_map.astype(">f8")
    np.testing.assert_array_equal(D.tricubic(big_endian, ORIGIN, VOXEL, xyz)[0], v)


def test_memory_mapped_map(smooth_map, tmp_path):
    path = tmp_path / "map.f32"
    smooth_map.astype(np.float32).tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=smooth_map.shape)
    xyz = positions(np.random.default_rng(3), smooth_map.shape, 50, 0.0)
    np.testing.assert_array_equal(D.tricubic(mm, ORIGIN, VOXEL, xyz)[0],
                                  D.tricubic(smooth_map.astype(np.float32), ORIGIN, VOXEL, xyz)[0])
    norm = D.normalise_map(mm)
    assert norm.dtype == np.float32 and norm.flags.c_contiguous
    np.testing.assert_array_equal(norm, D.normalise_map(smooth_map.astype(np.float32)))
    own = smooth_map.astype(np.float32)             # in place: the same values
    assert D.normalise_map(own, out=own) is own
    np.testing.assert_array_equal(own, norm)
    with pytest.raises(ValueError, match="out must be"):
        D.normalise_map(mm, out=np.empty(smooth_map.shape, dtype=np.float64))


def test_grid_points_and_quadratics_reproduced():
    nz, ny, nx = 12, 13, 14
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    x = ORIGIN[0] + i * VOXEL[0]
    y = ORIGIN[1] + j * VOXEL[1]
    z = ORIGIN[2] + k * VOXEL[2]
    # Catmull-Rom reproduces polynomials up to degree 2 where the 4x4x4 stencil fits
    quad = 0.3 * x * x - 0.2 * x * y + 0.5 * z * z + y - 2.0 * z + 1.0
    rng = np.random.default_rng(4)
    frac = rng.uniform(1, [nx - 2, ny - 2, nz - 2], size=(100, 3))
    p = ORIGIN + frac * VOXEL
    v, g = D.tricubic(quad, ORIGIN, VOXEL, p)
    px, py, pz = p.T
    np.testing.assert_allclose(v, 0.3 * px * px - 0.2 * px * py + 0.5 * pz * pz + py - 2 * pz + 1,
                               rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(g[:, 0], 0.6 * px - 0.2 * py, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(g[:, 1], -0.2 * px + 1.0, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(g[:, 2], pz - 2.0, rtol=1e-10, atol=1e-10)
    # exact values at grid points, including corners
    ijk = np.array([[0, 0, 0], [3, 4, 5], [nx - 1, ny - 1, nz - 1], [nx - 1, 0, 2]])
    vg, _ = D.tricubic(quad, ORIGIN, VOXEL, ORIGIN + ijk * VOXEL)
    np.testing.assert_allclose(vg, quad[ijk[:, 2], ijk[:, 1], ijk[:, 0]], rtol=1e-14)


def test_outside_clamps_to_edge(smooth_map):
    nz, ny, nx = smooth_map.shape
    far = np.array([[-100.0, -100.0, -100.0], [1e6, 1e6, 1e6], [np.nan, 0, 0]])
    v, g = D.tricubic(smooth_map, ORIGIN, VOXEL, far)
    assert v[0] == pytest.approx(smooth_map[0, 0, 0])
    assert v[1] == pytest.approx(smooth_map[-1, -1, -1])
    assert not g[:2].any()
    assert np.isnan(v[2]) and np.isnan(g[2]).all()
    # 5 voxels beyond the x edge: value of the edge column, no gradient along x
    p = ORIGIN + np.array([[nx - 1 + 5, 7.3, 6.6]]) * VOXEL
    v, g = D.tricubic(smooth_map, ORIGIN, VOXEL, p)
    q = ORIGIN + np.array([[nx - 1, 7.3, 6.6]]) * VOXEL
    np.testing.assert_allclose(v, D.tricubic(smooth_map, ORIGIN, VOXEL, q)[0], rtol=1e-12)
    assert g[0, 0] == 0.0 and g[0, 1] != 0.0


def test_real_space_target(smooth_map):
    rng = np.random.default_rng(5)
    xyz = positions(rng, smooth_map.shape, 120, 0.0)
    w = rng.uniform(0.5, 2.0, len(xyz))
    v, g = D.tricubic(smooth_map, ORIGIN, VOXEL, xyz)
    t, gt = D.real_space_target(smooth_map, ORIGIN, VOXEL, xyz, w)
    assert t == pytest.approx(-np.sum(w * v))
    np.testing.assert_allclose(gt, -w[:, None] * g, rtol=1e-14)
    gout = np.ones_like(xyz)
    t2, g2 = D.real_space_target(smooth_map, ORIGIN, VOXEL, xyz, w, grad_out=gout, scale=3.0)
    assert g2 is gout and t2 == pytest.approx(3 * t)
    np.testing.assert_allclose(gout, 1 + 3 * gt, rtol=1e-13)


def test_normalise_map(smooth_map):
    data = (smooth_map * 3.0 + 7.0).astype(np.float32)
    n = D.normalise_map(data)
    assert n.dtype == np.float32
    assert abs(float(n.mean(dtype=np.float64))) < 1e-6
    assert float(n.std(dtype=np.float64)) == pytest.approx(1.0, rel=1e-6)
    # read in place, any strides: a transposed view gives the transposed map
    np.testing.assert_array_equal(D.normalise_map(data.transpose(2, 0, 1)), n.transpose(2, 0, 1))
    d64 = data.astype(np.float64)
    np.testing.assert_allclose(n, (d64 - d64.mean()) / d64.std(), rtol=0, atol=1e-6)
    mask = np.zeros(data.shape, bool)
    mask[5:15, 5:15, 5:15] = True
    nm = D.normalise_map(data, mask=mask)
    assert abs(float(nm[mask].mean(dtype=np.float64))) < 1e-6
    assert float(nm[mask].std(dtype=np.float64)) == pytest.approx(1.0, rel=1e-6)
    sel = d64[mask]
    np.testing.assert_allclose(nm, (d64 - sel.mean()) / sel.std(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        D.normalise_map(np.ones((4, 4, 4)))
    with pytest.raises(ValueError):
        D.normalise_map(data, mask=np.zeros(data.shape, bool))


def test_normalise_map_float64_leaves_input_alone(smooth_map):
    data = smooth_map.astype(np.float64) * 3.0 + 7.0
    before = data.copy()
    mean, std = D.map_mean_std(data)
    np.testing.assert_array_equal(data, before)
    assert (mean, std) == pytest.approx((float(before.mean()), float(before.std())), rel=1e-9)
    n = D.normalise_map(data)
    np.testing.assert_array_equal(data, before)
    np.testing.assert_allclose(n, D.normalise_map(before.astype(np.float32)), atol=1e-5)


def test_blur_map_keeps_mean_and_smooths(smooth_map):
    rng = np.random.default_rng(7)
    noisy = rng.normal(size=(16, 16, 16)).astype(np.float32)
    b = D.blur_map(noisy, np.ones(3), 50.0)
    assert b.shape == noisy.shape and b.dtype == np.float32
    assert float(b.mean()) == pytest.approx(float(noisy.mean()), abs=1e-5)
    assert b.std() < 0.5 * noisy.std()


def test_sum_over_operators_matches_interpolating_each_operator(smooth_map):
    """The compiled sum over operators (ncs.AveragedMap's grid) equals tricubic() at the
    transformed points, operator by operator."""
    data, origin, voxel = smooth_map, ORIGIN, VOXEL
    rng = np.random.default_rng(4)
    rot = []
    for _ in range(3):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        rot.append(q * np.sign(np.linalg.det(q)))
    rot = np.array(rot)
    centre = origin + voxel * np.array(data.shape[::-1]) / 2
    trans = np.array([centre - r @ centre + rng.normal(0, 1.0, 3) for r in rot])
    lo = centre - 3.0
    shape = (5, 6, 7)
    got = D.summed_over_operators(data, origin, voxel, rot, trans, lo, shape)
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    pts = lo + np.stack([xx.ravel(), yy.ravel(), zz.ravel()], axis=1) * voxel
    want = sum(D.tricubic(data, origin, voxel, pts @ r.T + t)[0] for r, t in zip(rot, trans))
    assert got.shape == shape
    assert np.abs(got.ravel() - want).max() < 1e-12 * np.abs(want).max()
    # with a mask only its points are summed, to the same values; the others stay 0
    mask = rng.random(shape) < 0.4
    part = D.summed_over_operators(data, origin, voxel, rot, trans, lo, shape, mask)
    assert np.array_equal(part[mask], got[mask]) and not part[~mask].any()
    with pytest.raises(ValueError, match="mask has shape"):
        D.summed_over_operators(data, origin, voxel, rot, trans, lo, shape, mask[:2])
