"""Restraint energies and gradients: hand-computed values and central finite differences."""
import math

import numpy as np
import pytest

from hpcrefine.core import geometry as G
from hpcrefine.restraints import Restraints


def numeric_grad(f, xyz, h=1e-6):
    g = np.zeros_like(xyz)
    for a in range(xyz.shape[0]):
        for c in range(3):
            xp = xyz.copy()
            xm = xyz.copy()
            xp[a, c] += h
            xm[a, c] -= h
            g[a, c] = (f(xp) - f(xm)) / (2 * h)
    return g


def assert_grad(fun, xyz, rtol=1e-6):
    e, g = fun(xyz)
    gn = numeric_grad(lambda x: fun(x)[0], xyz)
    scale = max(np.abs(gn).max(), 1e-8)
    assert np.abs(g - gn).max() <= rtol * scale, (np.abs(g - gn).max(), scale)
    return e, g


def place(a, b, c, bond, angle, torsion):
    """Atom d with |cd| = bond, angle bcd, torsion abcd (degrees)."""
    bc = c - b
    bc /= np.linalg.norm(bc)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    th, ph = math.radians(angle), math.radians(torsion)
    d2 = np.array([-bond * math.cos(th), bond * math.sin(th) * math.cos(ph),
                   bond * math.sin(th) * math.sin(ph)])
    return c + d2[0] * bc + d2[1] * m + d2[2] * n


def chain(torsions, bond=1.52, angle=111.0):
    """A zig-zag chain built from internal coordinates (angles well away from 0/180)."""
    xyz = [np.array([0.0, 0.0, 0.0]), np.array([bond, 0.0, 0.0]),
           np.array([bond + bond * math.cos(math.radians(180 - angle)),
                     bond * math.sin(math.radians(180 - angle)), 0.0])]
    for t in torsions:
        xyz.append(place(xyz[-3], xyz[-2], xyz[-1], bond, angle, t))
    return np.array(xyz)


@pytest.fixture
def molecule():
    """A 12-atom chain with torsions covering trans, gauche and the +-180 wrap, jittered."""
    rng = np.random.default_rng(7)
    xyz = chain([178.0, -179.0, 60.0, -65.0, 175.0, 5.0, -120.0, 100.0, -178.5])
    return xyz + rng.normal(scale=0.05, size=xyz.shape)


# ------------------------------------------------------------------ hand-computed energies

def test_bond_energy_by_hand():
    xyz = np.array([[0.0, 0, 0], [1.6, 0, 0]])
    e, g = G.bond_terms(xyz, [[0, 1]], [1.5], [0.02])
    assert e == pytest.approx(25.0)
    # dE/dx1 = 2 (d - t) / s^2 = 500 along +x
    np.testing.assert_allclose(g, [[-500.0, 0, 0], [500.0, 0, 0]])


def test_angle_energy_by_hand():
    xyz = np.array([[1.0, 0, 0], [0.0, 0, 0], [0.0, 2.0, 0]])
    e, _ = G.angle_terms(xyz, [[0, 1, 2]], [100.0], [2.0])
    assert e == pytest.approx(25.0)
    np.testing.assert_allclose(G.angle_values(xyz, [[0, 1, 2]]), [90.0])


def test_torsion_values_and_periodic_energy():
    xyz = chain([60.0, -170.0])
    np.testing.assert_allclose(G.torsion_values(xyz, [[0, 1, 2, 3], [1, 2, 3, 4]]), [60.0, -170.0])
    idx = [[0, 1, 2, 3]]
    # period 3: -60 is equivalent to 60
    assert G.torsion_terms(xyz, idx, [-60.0], [10.0], [3])[0] == pytest.approx(0.0, abs=1e-18)
    # period 1 (and 0): 60 vs -60 differs by 120
    for p in (0, 1):
        assert G.torsion_terms(xyz, idx, [-60.0], [10.0], [p])[0] == pytest.approx(144.0)
    # wrap-around: -170 against 170 is 20 degrees, not 340
    e = G.torsion_terms(xyz, [[1, 2, 3, 4]], [170.0], [10.0], [1])[0]
    assert e == pytest.approx(4.0)
    # period 2: -170 against 0 -> 10 degrees away from 180
    e = G.torsion_terms(xyz, [[1, 2, 3, 4]], [0.0], [5.0], [2])[0]
    assert e == pytest.approx(4.0)


def test_torsion_sign_convention():
    xyz = np.array([[1.0, 0, 0], [0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(G.torsion_values(xyz, [[0, 1, 2, 3]]), [-45.0])
    xyz[3] = [-1.0, 1.0, 0.0]
    np.testing.assert_allclose(np.abs(G.torsion_values(xyz, [[0, 1, 2, 3]])), [180.0])


def test_chiral_energy_by_hand():
    xyz = np.array([[0.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    idx = [[0, 1, 2, 3]]
    np.testing.assert_allclose(G.chiral_volumes(xyz, idx), [1.0])
    assert G.chiral_terms(xyz, idx, [-2.0], [0.5])[0] == pytest.approx(36.0)
    assert G.chiral_terms(xyz, idx, [-2.0], [0.5], both=[True])[0] == pytest.approx(4.0)
    assert G.chiral_terms(xyz, idx, [1.0], [0.5])[0] == pytest.approx(0.0)


def test_plane_energy_by_hand():
    d = 0.05
    xyz = np.array([[1.0, 0, d], [-1.0, 0, d], [0, 1.0, -d], [0, -1.0, -d]])
    e, _ = G.plane_terms(xyz, [0, 1, 2, 3], [0, 4], [0.02] * 4)
    assert e == pytest.approx(4 * d * d / 0.02**2)
    np.testing.assert_allclose(np.abs(G.plane_distances(xyz, [0, 1, 2, 3], [0, 4], [0.02] * 4)), d)
    flat = xyz.copy()
    flat[:, 2] = 0
    assert G.plane_terms(flat, [0, 1, 2, 3], [0, 4], [0.02] * 4)[0] == pytest.approx(0, abs=1e-20)


def test_plane_energy_is_smallest_eigenvalue():
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(7, 3)) * [2.0, 1.5, 0.1]
    sig = rng.uniform(0.01, 0.05, 7)
    w = 1 / sig**2
    c = (w[:, None] * pts).sum(0) / w.sum()
    A = (w[:, None, None] * np.einsum("ai,aj->aij", pts - c, pts - c)).sum(0)
    e, _ = G.plane_terms(pts, np.arange(7), [0, 7], sig)
    assert e == pytest.approx(np.linalg.eigvalsh(A)[0], rel=1e-10)


# ------------------------------------------------------------------ finite differences

def test_bond_gradient(molecule):
    n = len(molecule)
    idx = np.array([[i, i + 1] for i in range(n - 1)] + [[0, 5], [3, 9]])
    rng = np.random.default_rng(1)
    tgt = rng.uniform(1.3, 1.6, len(idx))
    tgt[-2:] = [4.0, 6.0]
    sig = rng.uniform(0.01, 0.03, len(idx))
    assert_grad(lambda x: G.bond_terms(x, idx, tgt, sig), molecule)


def test_angle_gradient(molecule):
    n = len(molecule)
    idx = np.array([[i, i + 1, i + 2] for i in range(n - 2)] + [[0, 4, 8]])
    vals = G.angle_values(molecule, idx)
    assert vals.min() > 20 and vals.max() < 160
    rng = np.random.default_rng(2)
    tgt = vals + rng.normal(scale=4.0, size=len(idx))
    assert_grad(lambda x: G.angle_terms(x, idx, tgt, np.full(len(idx), 2.5)), molecule)


def test_torsion_gradient_with_wrap_and_periods(molecule):
    n = len(molecule)
    idx = np.array([[i, i + 1, i + 2, i + 3] for i in range(n - 3)])
    phi = G.torsion_values(molecule, idx)
    periods = np.array([1, 0, 3, 2, 1, 3, 1, 2, 1])
    # targets on the far side of +-180 from the current value for the trans torsions
    tgt = np.where(np.abs(phi) > 170, -np.sign(phi) * 178.0, phi + 25.0)
    devs = G.torsion_deviations(molecule, idx, tgt, periods)
    width = np.where(periods <= 1, 360.0, 360.0 / np.maximum(periods, 1))
    assert np.all(devs >= -width / 2) and np.all(devs < width / 2)
    # no deviation sits at the discontinuity of the wrap (where the energy jumps)
    assert np.all(np.abs(np.abs(devs) - width / 2) > 1.0)
    sig = np.full(len(idx), 15.0)
    e, _ = assert_grad(lambda x: G.torsion_terms(x, idx, tgt, sig, periods), molecule)
    assert e == pytest.approx(np.sum((devs / sig) ** 2))


def test_chiral_gradient_both_signs(molecule):
    idx = np.array([[2, 1, 3, 7], [5, 4, 6, 0], [8, 7, 9, 2], [6, 5, 7, 10]])
    v = G.chiral_volumes(molecule, idx)
    tgt = np.array([2.5, -2.5, 2.5, -2.5]) * np.sign(v)
    tgt[0] = -tgt[0]          # one term with the wrong hand
    both = np.array([False, False, True, True])
    sig = np.full(4, 0.2)
    assert_grad(lambda x: G.chiral_terms(x, idx, tgt, sig, both=both), molecule)


def test_plane_gradient():
    rng = np.random.default_rng(5)
    groups = []
    pts = []
    start = [0]
    for size in (4, 5, 6, 8, 10):
        ang = np.sort(rng.uniform(0, 2 * np.pi, size))
        p = np.stack([1.4 * np.cos(ang), 1.4 * np.sin(ang), rng.normal(scale=0.08, size=size)], 1)
        R, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        pts.append(p @ R.T + rng.normal(size=3) * 5)
        groups.append(np.arange(size) + start[-1])
        start.append(start[-1] + size)
    xyz = np.concatenate(pts)
    atoms = np.concatenate(groups)
    # atoms shared between planes and a permuted membership order
    atoms = np.concatenate([atoms, [0, 5, 12, 20]])
    start.append(start[-1] + 4)
    sig = rng.uniform(0.015, 0.03, len(atoms))
    assert_grad(lambda x: G.plane_terms(x, atoms, start, sig), xyz)


def test_regular_ring_plane():
    """A regular hexagon has two equal in-plane eigenvalues; the normal must still be right."""
    ang = np.arange(6) * np.pi / 3
    xyz = np.stack([1.39 * np.cos(ang), 1.39 * np.sin(ang), np.zeros(6)], 1)
    xyz[0, 2] = 0.01
    e, g = assert_grad(lambda x: G.plane_terms(x, np.arange(6), [0, 6], np.full(6, 0.02)), xyz)
    c = xyz - xyz.mean(0)
    assert e == pytest.approx(np.linalg.eigvalsh(c.T @ c)[0] / 0.02**2, rel=1e-9)
    flat = xyz.copy()
    flat[0, 2] = 0.0
    e0, g0 = G.plane_terms(flat, np.arange(6), [0, 6], np.full(6, 0.02))
    assert e0 < 1e-25 and np.abs(g0).max() < 1e-10


# ------------------------------------------------------------------ whole restraint sets

def small_restraints(xyz):
    n = len(xyz)
    r = Restraints()
    r.bond_idx = np.array([[i, i + 1] for i in range(n - 1)])
    r.bond_target = G.bond_lengths(xyz, r.bond_idx) + 0.02
    r.bond_sigma = np.full(n - 1, 0.02)
    r.angle_idx = np.array([[i, i + 1, i + 2] for i in range(n - 2)])
    r.angle_target = G.angle_values(xyz, r.angle_idx) - 2.0
    r.angle_sigma = np.full(n - 2, 2.0)
    r.tors_idx = np.array([[i, i + 1, i + 2, i + 3] for i in range(n - 3)])
    r.tors_target = np.full(n - 3, 180.0)
    r.tors_sigma = np.full(n - 3, 20.0)
    r.tors_period = np.array([3, 1, 2, 0, 3, 1, 3, 3, 1])[: n - 3]
    r.chir_idx = np.array([[2, 1, 3, 7], [5, 4, 6, 0]])
    r.chir_target = np.array([2.5, -2.5])
    r.chir_sigma = np.array([0.2, 0.2])
    r.plane_atoms = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    r.plane_start = np.array([0, 4, 10])
    r.plane_sigma = np.full(10, 0.02)
    return r


def test_restraint_energy_sums_parts_and_matches_terms(molecule):
    r = small_restraints(molecule)
    total, g, parts = G.restraint_energy(molecule, r)
    assert total == pytest.approx(sum(parts.values()))
    assert parts["bonds"] == G.bond_terms(molecule, r.bond_idx, r.bond_target, r.bond_sigma)[0]
    assert all(v > 0 for v in parts.values())
    gn = numeric_grad(lambda x: G.restraint_energy(x, r)[0], molecule)
    assert np.abs(g - gn).max() <= 1e-6 * np.abs(gn).max()
    # weights scale the parts and the gradient; zero skips a term
    w = {"torsions": 0.5, "planes": 0.0}
    t2, g2, p2 = G.restraint_energy(molecule, r, weights=w)
    assert p2["torsions"] == pytest.approx(0.5 * parts["torsions"])
    assert p2["planes"] == 0.0
    assert t2 == pytest.approx(total - 0.5 * parts["torsions"] - parts["planes"])
    gt = G.torsion_terms(molecule, r.tors_idx, r.tors_target, r.tors_sigma, r.tors_period)[1]
    gp = G.plane_terms(molecule, r.plane_atoms, r.plane_start, r.plane_sigma)[1]
    np.testing.assert_allclose(g2, g - 0.5 * gt - gp, atol=1e-9 * np.abs(g).max())
    with pytest.raises(ValueError):
        G.restraint_energy(molecule, r, weights={"bond": 1.0})


def test_terms_split_over_subsets_add_up(molecule):
    """A rank owning part of the terms: the parts' energies and gradients add to the whole."""
    r = small_restraints(molecule)
    e_all, g_all = G.angle_terms(molecule, r.angle_idx, r.angle_target, r.angle_sigma)
    g = np.zeros_like(molecule)
    e1, _ = G.angle_terms(molecule, r.angle_idx[:4], r.angle_target[:4], r.angle_sigma[:4], g)
    e2, g_ret = G.angle_terms(molecule, r.angle_idx[4:], r.angle_target[4:], r.angle_sigma[4:], g)
    assert g_ret is g
    assert e1 + e2 == pytest.approx(e_all)
    np.testing.assert_allclose(g, g_all, rtol=1e-12, atol=1e-12)
    # planes: a subset of planes, with plane_start rebased
    ps = r.plane_start
    e_p, _ = G.plane_terms(molecule, r.plane_atoms, ps, r.plane_sigma)
    e_a = G.plane_terms(molecule, r.plane_atoms[ps[0]:ps[1]], [0, ps[1] - ps[0]], r.plane_sigma[:ps[1]])[0]
    e_b = G.plane_terms(molecule, r.plane_atoms[ps[1]:], [0, ps[2] - ps[1]], r.plane_sigma[ps[1]:])[0]
    assert e_a + e_b == pytest.approx(e_p)


def test_chir_both_attribute_is_used(molecule):
    r = small_restraints(molecule)
    r.chir_target = -r.chir_target
    e_signed = G.restraint_energy(molecule, r)[2]["chirals"]
    r.chir_both = np.array([True, True])
    e_both = G.restraint_energy(molecule, r)[2]["chirals"]
    assert e_both < e_signed


def test_deviations(molecule):
    r = small_restraints(molecule)
    dev = G.deviations(molecule, r)
    assert dev["bond_rmsd"] == pytest.approx(0.02)
    assert dev["angle_rmsd"] == pytest.approx(2.0)
    assert dev["n_planes"] == 2 and dev["n_bonds"] == len(r.bond_idx)
    for k in ("torsion_rmsd", "chiral_rmsd", "planarity_rmsd", "planarity_max"):
        assert dev[k] > 0
    empty = G.deviations(molecule, Restraints())
    assert empty["bond_rmsd"] == 0.0 and empty["n_planes"] == 0
    total, g, parts = G.restraint_energy(molecule, Restraints())
    assert total == 0.0 and not g.any()


def test_int32_indices_and_grad_out_checks(molecule):
    idx = np.array([[0, 1], [1, 2]], dtype=np.int32)
    e64 = G.bond_terms(molecule, idx.astype(np.int64), [1.5, 1.5], [0.02, 0.02])[0]
    assert G.bond_terms(molecule, idx, [1.5, 1.5], [0.02, 0.02])[0] == e64
    with pytest.raises(ValueError):
        G.bond_terms(molecule, idx, [1.5, 1.5], [0.02, 0.02], grad_out=np.zeros((3, 3)))


def test_eigenvector_solvers_agree_with_lapack():
    rng = np.random.default_rng(11)
    mats = [q @ np.diag(ev) @ q.T for q, ev in
            ((np.linalg.qr(rng.normal(size=(3, 3)))[0], ev) for ev in
             ([0.01, 3.0, 5.0], [1e-6, 2.0, 2.0], [1.0, 1.0 + 1e-9, 4.0], [2.0, 2.0, 2.0],
              [0.5, 1.5, 9.0]))]
    for a in mats:
        w, v = np.linalg.eigh(a)
        n_jac = np.array(G._smallest_eigvec(a.copy(), np.empty((3, 3))))
        nx, ny, nz, ok = G._smallest_eigvec_closed(a[0, 0], a[0, 1], a[0, 2], a[1, 1], a[1, 2], a[2, 2])
        for n in ([nx, ny, nz] if ok else None, n_jac):
            if n is None:
                continue
            # a valid eigenvector of the smallest eigenvalue (any vector in a degenerate space)
            assert float(np.asarray(n) @ a @ np.asarray(n)) == pytest.approx(w[0], abs=1e-12 * w[-1])
    # a regular tetrahedron as a 'plane': isotropic scatter, the iterative solver takes over
    tet = np.array([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])
    e, g = G.plane_terms(tet, np.arange(4), [0, 4], np.full(4, 0.1))
    assert e == pytest.approx(4.0 / 0.01) and np.isfinite(g).all()
