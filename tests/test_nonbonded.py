"""Neighbour list against brute force; repulsion energies by hand and by finite differences."""
import numpy as np
import pytest

from hpcrefine.core import nonbonded as NB
from hpcrefine.restraints import Restraints


def brute_pairs(xyz, rad, hb, excl, p14, skin):
    n = len(xyz)
    d = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)
    d0 = rad[:, None] + rad[None]
    don = (hb & 1) != 0
    acc = (hb & 2) != 0
    hbp = (don[:, None] & acc[None]) | (acc[:, None] & don[None])
    d0 = np.where(hbp, np.minimum(d0, 2.7), d0)
    is14 = np.zeros((n, n), bool)
    ex = np.zeros((n, n), bool)
    if len(p14):
        is14[p14.min(1), p14.max(1)] = True
    if len(excl):
        ex[excl.min(1), excl.max(1)] = True
    d0 = d0 - 0.5 * is14
    ok = np.triu(d < d0 + skin, 1) & ~ex
    return {(int(i), int(j)) for i, j in np.argwhere(ok)}, d0


def system(n=400, box=16.0, seed=1):
    """Random atoms at about protein density with bonded-like special pairs: most between
    atoms close in index (the bit-mask path), some far apart (the overflow table)."""
    rng = np.random.default_rng(seed)
    xyz = rng.uniform(0, box, size=(n, 3))
    rad = rng.choice([1.52, 1.55, 1.7, 1.8], n)
    hb = rng.integers(0, 4, n)
    d = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)
    close = np.argwhere(np.triu(d < 3.2, 1))
    near_idx = close[(close[:, 1] - close[:, 0]) <= 64]
    far_idx = close[(close[:, 1] - close[:, 0]) > 64]
    excl = np.concatenate([near_idx[::2], far_idx[::2]])
    p14 = np.concatenate([near_idx[1::3], far_idx[1::3], near_idx[:6:2]])  # some also excluded
    excl = np.concatenate([excl, [[i, i + 64] for i in range(0, 40, 7)]])  # offset exactly 64
    excl = np.concatenate([excl, excl[:5, ::-1]])                          # j < i given
    return xyz, rad, hb, excl, p14


def test_pairs_match_brute_force():
    xyz, rad, hb, excl, p14 = system()
    r = Restraints(vdw_radius=rad, hbond_type=hb, excl_pairs=excl, pair14=p14)
    nbl = NB.NeighbourList(xyz, r, cutoff_extra=1.0)
    want, d0 = brute_pairs(xyz, rad, hb, excl, p14, 1.0)
    got = {(int(i), int(j)) for i, j in nbl.pairs}
    assert len(nbl) == len(got)            # no duplicates
    assert got == want
    assert nbl.i.dtype == np.int32 and nbl.j.dtype == np.int32 and nbl.kind.dtype == np.int8
    assert np.all(nbl.i < nbl.j) and np.all(np.diff(nbl.i) >= 0)
    # excluded pairs never listed; 1-4 pairs flagged with the reduced distance
    ex = {(min(a, b), max(a, b)) for a, b in excl}
    assert not (got & ex)
    np.testing.assert_allclose(nbl.contact_distance(), d0[nbl.i, nbl.j])
    p14set = {(min(a, b), max(a, b)) for a, b in p14} - ex
    flagged = {(int(i), int(j)) for i, j, k in zip(nbl.i, nbl.j, nbl.kind) if k}
    assert flagged == got & p14set and flagged


def test_buffer_growth_and_skin():
    xyz, rad, hb, excl, p14 = system(seed=2)
    nbl = NB.NeighbourList(xyz, None, cutoff_extra=0.3, vdw_radius=rad, hbond_type=hb,
                           excl_pairs=excl, pair14=p14)
    nbl._cap_hint = 1                      # force the pair buffers to grow during the search
    nbl.update(xyz)
    want, _ = brute_pairs(xyz, rad, hb, excl, p14, 0.3)
    assert {(int(i), int(j)) for i, j in nbl.pairs} == want


def test_sparse_elongated_system():
    """Atoms along a 2000 A line: the cells are widened, pairs stay exact."""
    rng = np.random.default_rng(4)
    xyz = np.stack([np.linspace(0, 2000, 3000), rng.normal(size=3000), rng.normal(size=3000)], 1)
    rad = np.full(3000, 1.7)
    nbl = NB.NeighbourList(xyz, None, vdw_radius=rad)
    from scipy.spatial import cKDTree
    cand = cKDTree(xyz).query_pairs(4.4, output_type="ndarray")
    assert {tuple(p) for p in nbl.pairs} == {tuple(sorted(p)) for p in cand.tolist()}


def test_repulsion_by_hand():
    # 0-1 plain pair at 2.8 (d0 3.0); 2-3 donor/acceptor at 2.6 (d0 2.7);
    # 4-5 1-4 pair at 2.4 (d0 2.5); 6-7 excluded at 1.5; 8-9 beyond contact (3.2 vs 3.0)
    pos = [(0, 0), (2.8, 0), (0, 20), (2.6, 20), (0, 40), (2.4, 40), (0, 60), (1.5, 60),
           (0, 80), (3.2, 80)]
    xyz = np.array([[x, y, 0.0] for x, y in pos])
    r = Restraints(vdw_radius=np.array([1.5, 1.5, 1.55, 1.52, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5]),
                   hbond_type=np.array([0, 0, 1, 2, 0, 0, 0, 0, 0, 0]),
                   excl_pairs=np.array([[6, 7]]), pair14=np.array([[4, 5]]))
    nbl = NB.NeighbourList(xyz, r)
    assert {tuple(p) for p in nbl.pairs} == {(0, 1), (2, 3), (4, 5), (8, 9)}
    e, g = NB.repulsion(xyz, nbl, sigma=0.2)
    assert e == pytest.approx(1.0 + 0.25 + 0.25)
    # pair 0-1: dE/dd = -2 (d0 - d) / s^2 = -10, pushing the atoms apart
    np.testing.assert_allclose(g[0], [10.0, 0, 0])
    np.testing.assert_allclose(g[1], [-10.0, 0, 0])
    assert not g[8:].any()
    assert NB.clashes(xyz, nbl, overlap=0.15) == 1      # only 0-1 overlaps by more than 0.15
    assert NB.clashes(xyz, nbl, overlap=0.05) == 3
    # weight and accumulation into a given array
    gout = np.ones_like(xyz)
    e2, g2 = NB.repulsion(xyz, nbl, sigma=0.2, grad_out=gout, weight=2.0)
    assert g2 is gout and e2 == pytest.approx(2 * e)
    np.testing.assert_allclose(gout, 1 + 2 * g)


def test_repulsion_gradient_finite_differences():
    xyz, rad, hb, excl, p14 = system(n=150, box=11.0, seed=3)
    nbl = NB.NeighbourList(xyz, None, vdw_radius=rad, hbond_type=hb, excl_pairs=excl, pair14=p14)
    d = np.linalg.norm(xyz[nbl.i] - xyz[nbl.j], axis=1)
    d0 = nbl.contact_distance()
    inside = d < d0
    assert inside.sum() > 20 and (~inside).sum() > 20
    # keep pairs away from the kink of the second derivative at d = d0 and from d = 0
    assert np.abs(d - d0).min() > 1e-4 and d.min() > 0.1
    e, g = NB.repulsion(xyz, nbl)
    assert e == pytest.approx(np.sum(((d0 - d)[inside] / 0.2) ** 2))
    h = 1e-6
    gn = np.zeros_like(xyz)
    for a in range(len(xyz)):
        for c in range(3):
            xp = xyz.copy()
            xm = xyz.copy()
            xp[a, c] += h
            xm[a, c] -= h
            gn[a, c] = (NB.repulsion(xp, nbl)[0] - NB.repulsion(xm, nbl)[0]) / (2 * h)
    assert np.abs(g - gn).max() <= 1e-6 * np.abs(gn).max()


def test_needs_update():
    """Rebuild when the two largest displacements add up to more than the skin: no pair can
    have come within its contact distance unlisted before that."""
    xyz, rad, hb, excl, p14 = system(n=100, seed=5)
    nbl = NB.NeighbourList(xyz, None, cutoff_extra=1.0, vdw_radius=rad)
    moved = xyz.copy()
    moved[17] += [0.99, 0, 0]
    assert not nbl.needs_update(moved)
    moved[3] += [0, 0.02, 0]
    assert nbl.needs_update(moved)
    assert nbl.needs_update(xyz[:50])
    nbl.update(moved)
    assert not nbl.needs_update(moved) and nbl.n_builds == 2
    # random moves that do not trigger a rebuild never lose a pair in contact
    rng = np.random.default_rng(3)
    for _ in range(20):
        trial = xyz + rng.normal(scale=0.12, size=xyz.shape)
        fresh = NB.NeighbourList(xyz, None, cutoff_extra=1.0, vdw_radius=rad)
        if fresh.needs_update(trial):
            continue
        now = NB.NeighbourList(trial, None, cutoff_extra=0.0, vdw_radius=rad)
        listed = {tuple(p) for p in fresh.pairs.tolist()}
        assert all(tuple(p) in listed for p in now.pairs.tolist())


def test_input_checks():
    xyz = np.zeros((3, 3))
    with pytest.raises(ValueError):
        NB.NeighbourList(xyz, None, vdw_radius=np.ones(2))
    with pytest.raises(ValueError):
        NB.NeighbourList(xyz, None, vdw_radius=np.ones(3), excl_pairs=np.array([[0, 3]]))
    with pytest.raises(ValueError):
        NB.NeighbourList(np.full((3, 3), np.nan), None, vdw_radius=np.ones(3))
    tiny = NB.NeighbourList(np.zeros((1, 3)), None, vdw_radius=np.ones(1))
    assert len(tiny) == 0 and NB.repulsion(np.zeros((1, 3)), tiny)[0] == 0.0


def test_owned_lists_partition_the_full_list(adk_truth):
    """Lists restricted to the atoms each rank owns hold exactly the full list's pairs, once."""
    from hpcrefine.modelio import read_model
    from hpcrefine.monlib import MonomerLibrary, resolve_monlib_dir
    from hpcrefine.parallel.decompose import atom_blocks, owner_of_atoms
    from hpcrefine.topology import build_restraints

    model = read_model(adk_truth)
    r = build_restraints(model, MonomerLibrary(resolve_monlib_dir(None)))
    full = NB.NeighbourList(model.xyz, r)
    bounds = atom_blocks(model.res_first_atom, 3)
    owner = owner_of_atoms(bounds, model.n_atoms)
    parts = [NB.NeighbourList(model.xyz, r, owned=owner == p) for p in range(3)]
    got = np.concatenate([pl.pairs for pl in parts])
    assert len(got) == len(full) > 1000
    assert {tuple(x) for x in got.tolist()} == {tuple(x) for x in full.pairs.tolist()}
    for p, pl in enumerate(parts):
        assert np.all(owner[pl.i] == p)
        kind = dict(zip(map(tuple, full.pairs.tolist()), full.kind.tolist()))
        assert all(kind[tuple(x)] == k for x, k in zip(pl.pairs.tolist(), pl.kind.tolist()))


def test_grouped_list_holds_exactly_the_pairs_between_groups():
    """With a group per atom (NCS copies), a list holds exactly the pairs of the ungrouped list
    whose atoms lie in different groups, in the same order and with the same kinds; refreshed
    around movers it keeps every such contact, with the repulsion bitwise that of a grouped list
    built afresh. Atoms of a group of their own meet everyone."""
    xyz, rad, hb, excl, p14 = system(n=600, box=19.0, seed=5)
    group = (xyz[:, 0] > 9.5).astype(np.int64) + 2 * (xyz[:, 1] > 9.5)
    group[::37] = -100 - np.arange(len(group))[::37]          # a group each
    kw = dict(cutoff_extra=1.0, vdw_radius=rad, hbond_type=hb, excl_pairs=excl, pair14=p14)
    rng = np.random.default_rng(3)
    x = xyz.copy()
    grouped = NB.NeighbourList(x, None, group=group, **kw)
    full = NB.NeighbourList(x, None, **kw)
    keep = group[full.i] != group[full.j]
    assert 0 < keep.sum() < len(full)
    assert np.array_equal(grouped.i, full.i[keep]) and np.array_equal(grouped.j, full.j[keep])
    assert np.array_equal(grouped.kind, full.kind[keep])
    for step in range(12):
        x = x + rng.normal(scale=0.05, size=x.shape)
        x[rng.choice(len(x), 5, replace=False)] += 0.5
        grouped.refresh(x)
        full = NB.NeighbourList(x, None, **kw)
        between = {(i, j, k) for i, j, k in _contacts(x, full) if group[i] != group[j]}
        assert _contacts(x, grouped) == between and len(between) > 0, step
        fresh = NB.NeighbourList(x, None, group=group, **kw)
        e1, g1 = NB.repulsion(x, grouped, sigma=0.2)
        e2, g2 = NB.repulsion(x, fresh, sigma=0.2)
        assert e1 == e2 and np.array_equal(g1, g2), step
    assert grouped.n_partial > 5
    with pytest.raises(ValueError):
        NB.NeighbourList(x, None, group=group[:10], **kw)


def _contacts(xyz, nbl):
    """The listed pairs within their contact distance at xyz, with their 1-4 flag."""
    d = np.linalg.norm(xyz[nbl.i] - xyz[nbl.j], axis=1)
    keep = d < nbl.contact_distance()
    return {(int(i), int(j), int(k)) for i, j, k in zip(nbl.i[keep], nbl.j[keep], nbl.kind[keep])}


def test_refresh_around_the_movers_keeps_every_contact_and_the_fresh_energies():
    """A trajectory where a few atoms move far and the rest a little: the list refreshed around
    the movers holds the same contacts as one built afresh (against brute force too), with
    bitwise the same repulsion energy and gradient, at a fraction of the full builds."""
    xyz, rad, hb, excl, p14 = system(n=600, box=19.0, seed=7)
    rng = np.random.default_rng(11)
    nbl = NB.NeighbourList(xyz, None, cutoff_extra=1.0, vdw_radius=rad, hbond_type=hb,
                           excl_pairs=excl, pair14=p14)
    x = xyz.copy()
    changed = 0
    for step in range(40):
        x = x + rng.normal(scale=0.03, size=x.shape)
        far = rng.choice(len(x), size=4, replace=False)
        x[far] += rng.normal(scale=0.4, size=(4, 3))
        changed += nbl.refresh(x)
        fresh = NB.NeighbourList(x, None, cutoff_extra=1.0, vdw_radius=rad, hbond_type=hb,
                                 excl_pairs=excl, pair14=p14)
        assert _contacts(x, nbl) == _contacts(x, fresh), step
        e1, g1 = NB.repulsion(x, nbl, sigma=0.2)
        e2, g2 = NB.repulsion(x, fresh, sigma=0.2)
        assert e1 == e2 and np.array_equal(g1, g2), step
        assert np.all(np.diff(nbl.i) >= 0)
        if step % 10 == 9:
            brute, d0 = brute_pairs(x, rad, hb, excl, p14, 0.0)
            assert {(i, j) for i, j, _ in _contacts(x, nbl)} == brute
    assert changed > 20 and nbl.n_partial == changed and nbl.n_builds == 1


def test_refresh_rebuilds_when_many_atoms_move_and_respects_ownership(adk_truth):
    from hpcrefine.modelio import read_model
    from hpcrefine.monlib import MonomerLibrary, resolve_monlib_dir
    from hpcrefine.parallel.decompose import atom_blocks, owner_of_atoms
    from hpcrefine.topology import build_restraints

    model = read_model(adk_truth)
    r = build_restraints(model, MonomerLibrary(resolve_monlib_dir(None)))
    owner = owner_of_atoms(atom_blocks(model.res_first_atom, 2), model.n_atoms)
    rng = np.random.default_rng(4)
    x = model.xyz + rng.normal(scale=0.3, size=model.xyz.shape)
    part = NB.NeighbourList(x, r, owned=owner == 1)
    assert not part.refresh(x)
    moved = x.copy()
    moved[rng.choice(len(x), 30, replace=False)] += 0.8
    assert part.refresh(moved) and part.n_partial == 1 and part.n_builds == 1
    fresh = NB.NeighbourList(moved, r, owned=owner == 1)
    assert _contacts(moved, part) == _contacts(moved, fresh) and np.all(owner[part.i] == 1)
    everywhere = moved + rng.normal(scale=0.6, size=x.shape)
    assert part.refresh(everywhere) and part.n_builds == 2 and part.n_partial == 1


def test_unique_sorted_is_numpys_unique():
    """core.common.unique_sorted (a sort and one pass) gives np.unique's answer: the sorted
    distinct values, for many distinct keys, many repeats, one value and none."""
    from hpcrefine.core.common import unique_sorted

    rng = np.random.default_rng(5)
    for a in (rng.integers(0, 10**10, 50_000), rng.integers(0, 30, 5000), np.array([7]),
              np.zeros(0, dtype=np.int64), rng.integers(-5, 5, (40, 3))):
        got = unique_sorted(a)
        assert got.dtype == a.dtype and np.array_equal(got, np.unique(a))
