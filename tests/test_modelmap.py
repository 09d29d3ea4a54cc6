"""The density-fit data term: analytic gradient against finite differences, blocks summing to the whole."""
from __future__ import annotations

import numpy as np

from hpcrefine.core.modelmap import DensityFitTerm


def _case(seed=0):
    rng = np.random.default_rng(seed)
    shape = (24, 26, 28)
    voxel = np.array([1.0, 1.1, 0.9])
    origin = np.array([-3.0, 2.0, 1.0])
    centre = origin + np.array([14 * 1.0, 13 * 1.1, 12 * 0.9])
    xyz = centre + rng.normal(scale=3.0, size=(30, 3))
    elements = np.array(["C", "N", "O", "S", "C"] * 6)
    b = rng.uniform(10, 60, size=30)
    truth = DensityFitTerm(np.zeros(shape), origin, voxel, np.ones(shape), elements, b, 20.0)
    calc = np.zeros(shape)
    from hpcrefine.core.modelmap import _splat
    _splat(xyz + rng.normal(scale=0.4, size=xyz.shape), truth.amp, truth.sig2, origin, voxel, calc)
    data = calc + rng.normal(scale=0.01 * calc.max(), size=shape)
    mask = np.zeros(shape)
    mask[2:-2, 2:-2, 2:-2] = 1
    return DensityFitTerm(data, origin, voxel, mask, elements, b, 20.0), xyz


def test_gradient_matches_finite_differences():
    term, xyz = _case()
    f, g = term.target(xyz)
    rng = np.random.default_rng(1)
    h = 1e-5
    for _ in range(4):
        d = rng.normal(size=xyz.shape)
        d /= np.linalg.norm(d)
        fd = (term.target(xyz + h * d)[0] - term.target(xyz - h * d)[0]) / (2 * h)
        assert abs(fd - np.sum(g * d)) < 1e-5 * max(1.0, abs(fd))


def test_blocks_sum_to_the_whole():
    term, xyz = _case(3)
    f, g = term.target(xyz)
    total_f, total_g = 0.0, np.zeros_like(xyz)
    for lo, hi in ((0, 7), (7, 19), (19, 30)):
        total_f += term.local(slice(lo, hi)).accumulate(xyz, total_g, 1.0)
    assert abs(total_f - f) < 1e-12 * abs(f)
    assert np.allclose(total_g, g, rtol=1e-12, atol=1e-14)


def test_fit_is_better_at_the_true_positions():
    term, xyz = _case(5)
    assert term.target(xyz)[0] < term.target(xyz + 0.5)[0]
