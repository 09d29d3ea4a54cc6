"""Decomposition helpers: blocks of whole residues, ownership, and shares that count every term once."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hpcrefine import datasets, simulate
from hpcrefine.core import geometry, nonbonded
from hpcrefine.modelio import read_model
from hpcrefine.monlib import MonomerLibrary
from hpcrefine.core.common import sorted_members
from hpcrefine.parallel.decompose import (PartRestraints, atom_blocks, owner_of_atoms, pairs_share,
                                          plane_owner, restraint_atoms, restraints_share,
                                          spatial_parts, term_owner)
from hpcrefine.parallel.halo import near_atoms
from hpcrefine.topology import build_restraints

PARTS = (1, 2, 3, 4, 5, 7, 16)


@pytest.fixture(scope="module")
def adk():
    model = read_model(datasets.fetch(["adk_closed"])["adk_closed"])
    r = build_restraints(model, MonomerLibrary())
    xyz = simulate.shake(model.xyz, 0.8, seed=2)       # distorted: every term kind has energy
    return model, r, xyz


def test_blocks_are_whole_residues_covering_all_atoms():
    sizes = np.array([5, 9, 1, 12, 7, 7, 3, 11, 8, 2, 10, 6])
    first = np.concatenate(([0], np.cumsum(sizes)))
    for n_parts in (1, 2, 3, 4, 5, 12):
        b = atom_blocks(first, n_parts)
        assert b.shape == (n_parts + 1,)
        assert b[0] == 0 and b[-1] == first[-1]
        assert np.all(np.diff(b) >= 0)
        assert set(b.tolist()) <= set(first.tolist())       # cuts only between residues
        # each cut is the residue boundary nearest to the ideal cut
        ideal = np.arange(1, n_parts) * first[-1] / n_parts
        for cut, want in zip(b[1:-1], ideal):
            assert abs(cut - want) == np.min(np.abs(first - want))


def test_blocks_balanced_on_a_real_model(adk):
    model, _, _ = adk
    first = model.res_first_atom
    largest = int(np.diff(first).max())
    for n_parts in PARTS:
        b = atom_blocks(first, n_parts)
        ideal = model.n_atoms / n_parts
        assert np.all(np.abs(np.diff(b) - ideal) <= largest), (n_parts, np.diff(b))


def test_blocks_with_more_parts_than_residues():
    first = np.array([0, 4, 10])
    b = atom_blocks(first, 5)
    assert b[0] == 0 and b[-1] == 10 and np.all(np.diff(b) >= 0)
    assert np.count_nonzero(np.diff(b)) == 2            # two residues, two non-empty blocks
    owner = owner_of_atoms(b, 10)
    assert len(set(owner[:4].tolist())) == 1 and len(set(owner[4:].tolist())) == 1
    assert owner[0] != owner[4]
    assert all(b[p] <= a < b[p + 1] for a, p in enumerate(owner))


def test_blocks_reject_bad_input():
    with pytest.raises(ValueError):
        atom_blocks([0, 5, 3], 2)
    with pytest.raises(ValueError):
        atom_blocks([1, 5], 2)
    with pytest.raises(ValueError):
        atom_blocks([0, 5], 0)
    with pytest.raises(ValueError):
        owner_of_atoms([0, 4, 9], 10)
    with pytest.raises(ValueError):
        owner_of_atoms([0, 6, 4, 10], 10)


def test_owner_of_atoms_matches_the_blocks():
    b = np.array([0, 0, 3, 3, 3, 8, 10])                 # empty parts 0, 2 and 3
    owner = owner_of_atoms(b, 10)
    assert owner.tolist() == [1, 1, 1, 4, 4, 4, 4, 4, 5, 5]
    assert term_owner(np.array([9, 0, 3]), owner).tolist() == [5, 1, 4]


def test_plane_owner_uses_the_first_atom_and_part_0_for_an_empty_plane():
    owner = np.array([0, 0, 1, 1, 2, 2])
    atoms = np.array([2, 0, 1, 5, 4, 3])
    start = np.array([0, 3, 3, 6])                       # plane 1 is empty
    assert plane_owner(atoms, start, owner).tolist() == [1, 0, 2]


def _rows(a):
    return sorted(map(tuple, np.asarray(a).reshape(len(a), -1).tolist()))


@pytest.mark.parametrize("n_parts", PARTS)
def test_every_term_is_in_exactly_one_share(adk, n_parts):
    model, r, _ = adk
    owner = owner_of_atoms(atom_blocks(model.res_first_atom, n_parts), model.n_atoms)
    shares = [restraints_share(r, owner, p) for p in range(n_parts)]
    for name in ("bond_idx", "angle_idx", "tors_idx", "chir_idx"):
        merged = np.concatenate([getattr(s, name) for s in shares])
        assert _rows(merged) == _rows(getattr(r, name)), name
    assert sum(s.n_planes for s in shares) == r.n_planes
    planes = sorted(tuple(s.plane_atoms[s.plane_start[k]:s.plane_start[k + 1]].tolist())
                    for s in shares for k in range(s.n_planes))
    assert planes == sorted(tuple(r.plane_atoms[r.plane_start[k]:r.plane_start[k + 1]].tolist())
                            for k in range(r.n_planes))
    for p, s in enumerate(shares):
        for name in ("bond_idx", "angle_idx", "tors_idx", "chir_idx"):
            assert np.all(owner[getattr(s, name)[:, 0]] == p)
        assert np.all(owner[s.plane_atoms[s.plane_start[:-1]]] == p)
        # values travel with their rows
        assert len(s.tors_period) == len(s.tors_idx) == len(s.tors_target) == len(s.tors_sigma)
        assert len(s.plane_sigma) == len(s.plane_atoms) == s.plane_start[-1]


@pytest.mark.parametrize("n_parts", PARTS)
def test_shares_sum_to_the_whole_energy_and_gradient(adk, n_parts):
    model, r, xyz = adk
    owner = owner_of_atoms(atom_blocks(model.res_first_atom, n_parts), model.n_atoms)
    e_all, g_all, parts_all = geometry.restraint_energy(xyz, r)
    e_sum = 0.0
    g_sum = np.zeros_like(g_all)
    parts_sum = dict.fromkeys(parts_all, 0.0)
    for p in range(n_parts):
        e, g, parts = geometry.restraint_energy(xyz, restraints_share(r, owner, p))
        e_sum += e
        g_sum += g
        for k, v in parts.items():
            parts_sum[k] += v
    assert all(v > 0 for v in parts_all.values())
    assert abs(e_sum - e_all) <= 1e-9 * abs(e_all)
    for k in parts_all:
        assert abs(parts_sum[k] - parts_all[k]) <= 1e-9 * abs(parts_all[k]), k
    assert np.max(np.abs(g_sum - g_all)) <= 1e-9 * np.max(np.abs(g_all))


@pytest.mark.parametrize("n_parts", PARTS)
def test_pair_shares_sum_to_the_whole_repulsion(adk, n_parts):
    model, r, xyz = adk
    owner = owner_of_atoms(atom_blocks(model.res_first_atom, n_parts), model.n_atoms)
    nbl = nonbonded.NeighbourList(xyz, r)
    e_all, g_all = nonbonded.repulsion(xyz, nbl)
    assert e_all > 0
    shares = [pairs_share(nbl, owner, p) for p in range(n_parts)]
    assert sum(len(s) for s in shares) == len(nbl)
    e_sum, g_sum = 0.0, np.zeros_like(g_all)
    for s in shares:
        e, g = nonbonded.repulsion(xyz, s)
        e_sum += e
        g_sum += g
    assert abs(e_sum - e_all) <= 1e-9 * e_all
    assert np.max(np.abs(g_sum - g_all)) <= 1e-9 * np.max(np.abs(g_all))
    assert sum(nonbonded.clashes(xyz, s) for s in shares) == nonbonded.clashes(xyz, nbl)


def test_share_keeps_both_chirality_flags_with_their_rows(adk):
    model, r, xyz = adk
    r2 = dataclasses.replace(r)
    r2.chir_both = np.arange(len(r.chir_idx)) % 3 == 0
    owner = owner_of_atoms(atom_blocks(model.res_first_atom, 3), model.n_atoms)
    shares = [restraints_share(r2, owner, p) for p in range(3)]
    for s in shares:
        rows = [np.flatnonzero((r.chir_idx == row).all(axis=1))[0] for row in s.chir_idx]
        assert np.array_equal(s.chir_both, r2.chir_both[rows])
    e_all = geometry.restraint_energy(xyz, r2)[2]["chirals"]
    e_sum = sum(geometry.restraint_energy(xyz, s)[2]["chirals"] for s in shares)
    assert abs(e_sum - e_all) <= 1e-9 * e_all


@pytest.mark.parametrize("n_parts", PARTS)
def test_boxes_are_whole_residues_balanced_and_compact(adk, n_parts):
    """spatial_parts: whole residues, every part within one largest residue of its share of
    the atoms (for few parts), and each part more compact than a block of the same size."""
    model, _, xyz = adk
    first = model.res_first_atom
    owner = spatial_parts(xyz, first, n_parts)
    assert owner.shape == (model.n_atoms,) and owner.min() == 0 and owner.max() == n_parts - 1
    for r in range(model.n_residues):                     # whole residues
        assert len(set(owner[first[r]:first[r + 1]])) == 1
    counts = np.bincount(owner, minlength=n_parts)
    largest = int(np.max(np.diff(first)))
    ideal = model.n_atoms / n_parts
    assert np.all(np.abs(counts - ideal) <= largest * np.ceil(np.log2(n_parts) + 1))
    assert np.array_equal(owner, spatial_parts(xyz.copy(), first, n_parts))   # a pure function
    if n_parts > 1:
        def spread(own):
            return np.mean([np.sqrt(np.mean(np.sum((xyz[own == p] - xyz[own == p].mean(0)) ** 2, 1)))
                            for p in range(n_parts)])
        blocks = owner_of_atoms(atom_blocks(first, n_parts), model.n_atoms)
        assert spread(owner) < spread(blocks)


def test_near_atoms_finds_every_atom_within_the_radius(adk):
    """The halo of a box holds every other atom within the radius (a superset: grid cells)."""
    model, _, xyz = adk
    owner = spatial_parts(xyz, model.res_first_atom, 3)
    own = np.flatnonzero(owner == 1)
    for radius in (3.0, 7.0):
        near = near_atoms(xyz, own, radius)
        d = np.sqrt(((xyz[:, None, :] - xyz[None, own, :]) ** 2).sum(-1)).min(axis=1)
        within = np.flatnonzero((d <= radius) & (owner != 1))
        assert np.all(np.isin(within, near))
        assert not np.any(np.isin(near, own))
        assert np.max(d[near]) <= 2.0 * np.sqrt(3) * radius     # two cells of radius / 2, per axis
        assert len(near) < model.n_atoms - len(own)
    with pytest.raises(ValueError, match="non-finite"):
        bad = xyz.copy()
        bad[5, 0] = np.nan
        near_atoms(bad, own, 7.0)


def test_restraint_atoms_are_every_atom_a_share_reads(adk):
    model, r, xyz = adk
    owner = spatial_parts(xyz, model.res_first_atom, 4)
    share = restraints_share(r, owner, 2)
    atoms = restraint_atoms(share)
    assert np.all(np.isin(share.bond_idx.ravel(), atoms)) and np.all(np.isin(share.plane_atoms, atoms))
    assert np.all(np.isin(share.tors_idx.ravel(), atoms))
    assert np.all(np.diff(atoms) > 0)
    # the atoms a box's terms read beyond it are a thin layer: bonded partners across the cut
    beyond = atoms[owner[atoms] != 2]
    assert 0 < len(beyond) < 0.2 * np.count_nonzero(owner == 2)


def test_the_share_of_a_part_that_owns_everything_is_the_terms_themselves(adk):
    """One part owning every atom (a group of one worker) gets r's own arrays, not copies of
    every term, with its chirality flags; a part of two still gets copies of its rows."""
    model, r, xyz = adk
    r2 = dataclasses.replace(r)
    r2.chir_both = np.arange(len(r.chir_idx)) % 3 == 0
    whole = restraints_share(r2, np.zeros(model.n_atoms, dtype=np.int64), 0)
    assert whole is not r2
    for name in ("bond_idx", "bond_target", "angle_idx", "tors_idx", "chir_idx", "plane_atoms", "plane_start"):
        assert getattr(whole, name) is getattr(r2, name), name
    assert whole.chir_both is r2.chir_both
    assert geometry.restraint_energy(xyz, whole)[0] == geometry.restraint_energy(xyz, r2)[0]
    owner = owner_of_atoms(atom_blocks(model.res_first_atom, 2), model.n_atoms)
    half = restraints_share(r2, owner, 0)
    assert len(half.bond_idx) < len(r.bond_idx) and not np.shares_memory(half.bond_idx, r.bond_idx)


def test_a_box_numbered_on_its_own_gives_the_same_terms_and_pairs_bit_for_bit(adk):
    """A part's terms and non-bonded pairs in a numbering of its box and halo alone
    (PartRestraints.numbered: rows of the sorted global indices) give the energies and gradients
    of the model's numbering exactly, in the same order, with arrays sized to the box; numbered
    again and back, in place, they are the terms they were. The part's per-atom arrays are
    compact and give the same values."""
    model, r, xyz = adk
    owner = spatial_parts(xyz, model.res_first_atom, 4)
    for p in range(4):
        part = PartRestraints(r, owner, p, 4)
        own = np.flatnonzero(owner == p)
        share = restraints_share(r, owner, p)
        local = np.union1d(np.union1d(own, part.reads), near_atoms(xyz, own, 6.0))
        assert len(local) < model.n_atoms and np.array_equal(part.reads, restraint_atoms(share))
        e, g, parts = geometry.restraint_energy(xyz, share)
        terms = part.numbered(local)
        assert terms is part.numbered(local.copy())        # the same numbering: as it is
        rows = xyz[local]
        e_l, g_l, parts_l = geometry.restraint_energy(rows, terms)
        assert e_l == e and parts_l == parts
        assert np.array_equal(g_l, g[local]) and not np.any(np.delete(g, local, axis=0))
        # the pairs whose lower atom the box owns, listed in the box's numbering
        is_own = np.zeros(model.n_atoms, dtype=bool)
        is_own[own] = True
        whole = nonbonded.NeighbourList(xyz, r, owned=is_own)
        boxed = nonbonded.NeighbourList(rows, terms, owned=is_own[local])
        assert len(terms.vdw_radius) == len(local) and len(boxed.xyz_ref) == len(local)
        assert np.array_equal(local[boxed.i], whole.i) and np.array_equal(local[boxed.j], whole.j)
        assert np.array_equal(boxed.kind, whole.kind)
        e_w, g_w = nonbonded.repulsion(xyz, whole)
        e_b, g_b = nonbonded.repulsion(rows, boxed)
        assert e_w > 0 and e_b == e_w and np.array_equal(g_b, g_w[local])
        assert np.all(sorted_members(own, local[terms.excl_pairs.min(axis=1)]))
        # another numbering, then the model's: the same terms
        wider = np.union1d(local, near_atoms(xyz, own, 8.0))
        assert geometry.restraint_energy(xyz[wider], part.numbered(wider))[0] == e
        back = part.share
        for name in ("bond_idx", "angle_idx", "tors_idx", "chir_idx", "plane_atoms"):
            assert np.array_equal(getattr(back, name), getattr(share, name)), name
        assert np.array_equal(back.vdw_radius, r.vdw_radius) and np.array_equal(back.hbond_type, r.hbond_type)
        assert geometry.restraint_energy(xyz, back)[0] == e
        # held per atom in 5 bytes: part, bond count, radius (an index) and H-bond type
        per_atom = [part.owner, part.bonded, part._radius_of, part.hbond_type]
        assert sum(a.itemsize for a in per_atom) == 5 and all(len(a) == model.n_atoms for a in per_atom)
        assert np.array_equal(part.bonded, np.bincount(r.bond_idx.ravel(), minlength=model.n_atoms))
    with pytest.raises(ValueError, match="miss atoms"):
        part.numbered(own)
    assert geometry.restraint_energy(xyz, part.share)[0] == e     # (left as it was)


def test_every_part_cut_in_one_pass_is_the_part_cut_alone_bit_for_bit(adk):
    """cut_parts (the master cuts every worker's part at once, in one pass over the
    terms) gives each part the terms, exclusions and 1-4 pairs that PartRestraints cuts from the
    whole set for that part alone, in the same order, low-resolution terms included; received
    with the shared AtomTables, the part is the same part."""
    from hpcrefine.lowres import add_lowres_restraints
    from hpcrefine.params import build_params
    from hpcrefine.parallel.decompose import AtomTables, cut_parts

    model, r, xyz = adk
    full = add_lowres_restraints(model, r, model.xyz, build_params(6.0), reference=model)
    assert full.counts()["ramachandran"] > 0 and full.counts()["reference_torsions"] > 0
    for n_parts, owner in ((4, owner_of_atoms(atom_blocks(model.res_first_atom, 4), model.n_atoms)),
                           (5, spatial_parts(xyz, model.res_first_atom, 5)),
                           (1, np.zeros(model.n_atoms, dtype=np.int64))):
        tables = AtomTables.of(full, owner, n_parts)
        seen = 0
        for p, terms in cut_parts(full, owner, n_parts):
            assert p == seen
            seen += 1
            alone = PartRestraints(full, owner, p, n_parts)
            got = PartRestraints.received(terms, tables, p, n_parts)
            for f in dataclasses.fields(full):
                a, b = getattr(alone.share, f.name), getattr(got.share, f.name)
                assert a.dtype == b.dtype and np.array_equal(a, b), (n_parts, p, f.name)
            assert np.array_equal(alone.reads, got.reads) and alone.blocks == got.blocks
            assert np.array_equal(alone.vdw_radius, got.vdw_radius)
            assert np.array_equal(alone.bonded, got.bonded) and np.array_equal(alone.owner, got.owner)
            e, g, parts = geometry.restraint_energy(xyz, alone.share)
            e2, g2, parts2 = geometry.restraint_energy(xyz, got.share)
            assert e == e2 and parts == parts2 and np.array_equal(g, g2)
        assert seen == n_parts
