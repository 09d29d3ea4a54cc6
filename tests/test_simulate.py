"""Simulated maps of the real adenylate kinase model (adk_closed): box, density, noise, FSC."""
from __future__ import annotations

import json
import logging
import os

import gemmi
import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from hpcrefine import datasets, mapio, modelio, simulate
from hpcrefine.errors import InputError


@pytest.fixture(scope="module")
def adk_path():
    return datasets.fetch(["adk_closed"])["adk_closed"]


@pytest.fixture(scope="module")
def adk(adk_path):
    return modelio.read_structure(adk_path)


@pytest.fixture(scope="module")
def maps35(adk):
    return simulate.simulate_maps(adk, 3.5, seed=11)


def values_at(data_zyx, origin, voxel, xyz):
    """Trilinear interpolation at Angstrom positions."""
    f = (np.asarray(xyz) - origin) / voxel
    return map_coordinates(np.asarray(data_zyx, dtype=np.float64), [f[:, 2], f[:, 1], f[:, 0]],
                           order=1)


def test_box_and_pixel(adk, maps35):
    full, half1, half2, origin, voxel, info = maps35
    assert info["pixel"] == 1.17 and np.all(voxel == 1.17)
    n = info["box"][0]
    assert full.shape == half1.shape == half2.shape == (n, n, n)
    assert full.dtype == half1.dtype == half2.dtype == np.float32
    assert n % 2 == 0 and simulate.fft_friendly_size(n) == n
    xyz = simulate.model_xyz(adk)
    span = (xyz.max(axis=0) - xyz.min(axis=0)).max()
    assert n == simulate.fft_friendly_size(int(np.ceil((span + 20.0) / 1.17)))
    grid = mapio.MapGrid(full, origin, voxel, "simulated")
    mapio.check_model_inside(xyz, grid, margin=10.0 - 1.17)
    assert simulate.default_pixel(5.0) == 1.67


def test_fft_friendly_size():
    assert [simulate.fft_friendly_size(k) for k in (1, 7, 14, 61, 62, 97, 121)] == \
        [2, 8, 16, 64, 64, 100, 128]


def test_deterministic_for_seed(adk, maps35):
    again = simulate.simulate_maps(adk, 3.5, seed=11)
    for a, b in zip(maps35[:3], again[:3]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(maps35[3], again[3])
    other = simulate.simulate_maps(adk, 3.5, seed=12)
    assert not np.array_equal(maps35[1], other[1])


def test_fsc_crossing_35(maps35):
    full, half1, half2, origin, voxel, info = maps35
    assert abs(info["fsc_half_0143"] - 3.5) <= 0.3
    assert abs(info["fsc_expected_0143"] - 3.5) <= 0.05
    s, f = simulate.fsc(half1, half2, voxel)
    assert simulate.fsc_crossing(s, f, 0.143) == pytest.approx(info["fsc_half_0143"])
    assert f[1:5].min() > 0.9  # low resolution is well determined
    assert np.all(f[s > 1 / 2.6] < 0.143 + 0.1)  # and the noise dominates well beyond 3.5 A


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fsc_crossing_5(adk, seed):
    # With the model's own B-factors the adk power spectrum rises from ~6 A to ~5 A, so white
    # noise cannot make the FSC fall cleanly at 5 A; a 5 A map has a larger overall B anyway.
    info = simulate.simulate_maps(adk, 5.0, seed=seed, extra_b=150.0)[5]
    assert info["pixel"] == 1.67
    assert abs(info["fsc_half_0143"] - 5.0) <= 0.5


def test_non_decreasing_spectrum_is_reported(adk, caplog):
    with caplog.at_level(logging.WARNING, logger="hpcrefine.simulate"):
        info = simulate.simulate_maps(adk, 5.0, seed=1)[5]
    assert "extra_b" in caplog.text
    assert info["fsc_expected_0143"] > 5.5


def test_density_at_atoms(adk, maps35):
    full, half1, half2, origin, voxel, info = maps35
    xyz = simulate.model_xyz(adk)
    at_atoms = values_at(full, origin, voxel, xyz)
    z = (at_atoms.mean() - full.mean()) / full.std()
    assert z > 3.0
    rng = np.random.default_rng(0)
    random_points = origin + rng.uniform(0, full.shape[0] - 1, size=(2000, 3)) * voxel
    assert at_atoms.mean() > 5 * values_at(full, origin, voxel, random_points).mean()
    # the density is centred on the atoms: moving the model by one pixel along any axis loses it
    for shift in np.vstack([np.eye(3), -np.eye(3)]) * voxel:
        assert values_at(full, origin, voxel, xyz + shift).mean() < 0.85 * at_atoms.mean()


def test_half_maps_have_independent_noise(maps35):
    full, half1, half2, origin, voxel, info = maps35
    assert not np.array_equal(half1, half2)
    np.testing.assert_array_equal(full, 0.5 * (half1 + half2))
    diff = (half1.astype(np.float64) - half2) / np.sqrt(2)
    assert diff.std() == pytest.approx(info["noise_sigma"], rel=0.02)
    assert abs(diff.mean()) < 0.01 * info["noise_sigma"]


def _three_atom_structure(b_iso=20.0):
    st = gemmi.Structure()
    st.add_model(gemmi.Model("1"))
    st[0].add_chain(gemmi.Chain("A"))
    for k, (el, pos) in enumerate((("S", (3.3, -4.1, 7.7)), ("O", (11.2, 2.6, 0.4)),
                                   ("C", (-2.8, 9.9, 3.1)))):
        res = gemmi.Residue()
        res.name, res.seqid = "UNL", gemmi.SeqId(k + 1, " ")
        atom = gemmi.Atom()
        atom.name, atom.element, atom.pos = el, gemmi.Element(el), gemmi.Position(*pos)
        atom.occ, atom.b_iso = 1.0, b_iso
        res.add_atom(atom)
        st[0]["A"].add_residue(res)
    return st


def _peak_near(data, origin, pixel, pos):
    """Position of the density maximum next to pos, refined by a parabola through the log
    density along each axis (exact for a Gaussian blob)."""
    idx = np.rint((np.asarray(pos) - origin) / pixel).astype(int)[::-1]  # (k, j, i)
    lo = idx - 3
    box = data[lo[0]:idx[0] + 4, lo[1]:idx[1] + 4, lo[2]:idx[2] + 4]
    peak = np.array(np.unravel_index(np.argmax(box), box.shape)) + lo
    offset = np.zeros(3)
    for axis in range(3):
        step = np.eye(3, dtype=int)[axis]
        lm, l0, lp = (np.log(data[tuple(peak + d * step)]) for d in (-1, 0, 1))
        offset[axis] = 0.5 * (lm - lp) / (lm - 2 * l0 + lp)
    return origin + (peak + offset)[::-1] * pixel


def test_density_peaks_sit_on_atoms():
    st = _three_atom_structure()
    pixel = 0.4
    xyz = simulate.model_xyz(st)
    n, origin = simulate.simulation_box(xyz, pixel, margin=6.0)
    density = simulate.model_density(st, origin, n, pixel)
    assert density.shape == (n, n, n)
    for pos in xyz:
        assert np.linalg.norm(_peak_near(density, origin, pixel, pos) - pos) < 0.1
    heights = values_at(density, origin, np.full(3, pixel), xyz)
    assert heights[0] > heights[1] > heights[2]  # S > O > C
    assert density[0].max() < 1e-3 * heights.max()  # nothing wraps onto the box faces


def test_b_factors_and_extra_b_are_used():
    pixel = 0.5
    sharp = _three_atom_structure(b_iso=20.0)
    xyz = simulate.model_xyz(sharp)
    n, origin = simulate.simulation_box(xyz, pixel, margin=8.0)
    d20 = simulate.model_density(sharp, origin, n, pixel)
    d60 = simulate.model_density(_three_atom_structure(b_iso=60.0), origin, n, pixel)
    d20_plus_40 = simulate.model_density(sharp, origin, n, pixel, extra_b=40.0)
    assert d60.max() < 0.6 * d20.max()
    np.testing.assert_allclose(d20_plus_40, d60, atol=1e-4 * d60.max())
    np.testing.assert_allclose(d20.sum(), d60.sum(), rtol=1e-3)  # blurring keeps the total


def test_fsc_helpers():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((24, 24, 24)).astype(np.float32)
    s, f = simulate.fsc(a, a, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(f, 1.0, atol=1e-5)
    assert s[0] == 0 and s[-1] == pytest.approx(0.5) and s[1] == pytest.approx(1 / 24)
    s, f = simulate.fsc(a, rng.standard_normal(a.shape), (1.0, 1.0, 1.0))
    assert np.abs(f[3:]).max() < 0.25
    s = np.array([0.0, 0.1, 0.2, 0.3])
    assert simulate.fsc_crossing(s, np.array([1.0, 0.5, 0.1, 0.0]), 0.143) == \
        pytest.approx(1 / (0.1 + 0.1 * (0.5 - 0.143) / 0.4))
    assert simulate.fsc_crossing(s, np.array([1.0, 0.9, 0.8, 0.7]), 0.143) == pytest.approx(1 / 0.3)
    s, f = simulate.fsc(a, a, (1.0, 1.0, 1.0), nbins=10)
    assert len(s) == 10 and s[-1] == pytest.approx(0.5)


def test_write_simulated(adk_path, tmp_path):
    out = tmp_path / "sim"
    info = simulate.write_simulated(adk_path, 4.0, str(out), seed=3)
    grids = {name: mapio.read_map(str(out / f"{name}.mrc")) for name in simulate.MAP_NAMES}
    mapio.check_same_grid(grids["half1"], grids["half2"])
    mapio.check_same_grid(grids["full"], grids["half1"])
    g = grids["full"]
    np.testing.assert_allclose(g.voxel, info["pixel"], atol=1e-5)
    np.testing.assert_allclose(g.origin, info["origin"], atol=1e-4)
    assert list(g.shape_xyz) == info["box"]
    mapio.check_model_inside(modelio.read_model(adk_path).xyz, g)
    saved = json.loads((out / "simulate.json").read_text())
    assert saved["noise_sigma"] == pytest.approx(info["noise_sigma"])
    assert saved["fsc_half_0143"] == pytest.approx(info["fsc_half_0143"])
    assert saved["seed"] == 3 and saved["resolution"] == 4.0
    s, f = simulate.fsc(grids["half1"].data, grids["half2"].data, g.voxel)
    assert simulate.fsc_crossing(s, f) == pytest.approx(info["fsc_half_0143"], rel=1e-4)
    assert not [p for p in os.listdir(out) if p.endswith(".part")]

    with pytest.raises(InputError, match="already exist"):
        simulate.write_simulated(adk_path, 4.0, str(out), seed=4)
    info2 = simulate.write_simulated(adk_path, 4.0, str(out), seed=4, overwrite=True)
    assert info2["seed"] == 4


def test_bad_requests(adk):
    with pytest.raises(InputError, match="Nyquist"):
        simulate.simulate_maps(adk, 2.0, seed=1, pixel=1.2)
    with pytest.raises(InputError, match="positive"):
        simulate.simulate_maps(adk, -3.0, seed=1)


def test_shake():
    rng = np.random.default_rng(1)
    xyz = rng.uniform(-20, 20, size=(500, 3))
    moved = simulate.shake(xyz, 0.7, seed=9)
    rms = np.sqrt(((moved - xyz) ** 2).sum(axis=1).mean())
    assert rms == pytest.approx(0.7, abs=1e-12)
    np.testing.assert_array_equal(moved, simulate.shake(xyz, 0.7, seed=9))
    assert not np.array_equal(moved, simulate.shake(xyz, 0.7, seed=10))
    np.testing.assert_array_equal(simulate.shake(xyz, 0.0, seed=9), xyz)
    with pytest.raises(InputError):
        simulate.shake(xyz, -1.0, seed=9)
