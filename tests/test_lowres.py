"""Low-resolution restraints: kernels against finite differences, secondary-structure detection on
the real 1AKE model, the ranks' shares summing to the whole, and a 6 A refinement end to end."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from hpcrefine import simulate
from hpcrefine.core import geometry as G
from hpcrefine.errors import InputError
from hpcrefine.lowres import (HELIX, ROTAMER_LIMIT, ROTAMER_SIGMA_FLOOR, STRAND, add_lowres_restraints,
                              find_secondary_structure, rama_potential, rama_terms_of,
                              reference_torsions, rotamer_torsions)
from hpcrefine.modelio import read_model
from hpcrefine.monlib import MonomerLibrary
from hpcrefine.parallel.decompose import atom_blocks, owner_of_atoms, restraints_share
from hpcrefine.params import build_params
from hpcrefine.restraints import Restraints
from hpcrefine.topology import build_restraints, geometry_stats
from hpcrefine.protocol.rotamer_fit import current_chis, set_chis, side_chains
from hpcrefine.validation import ramachandran, rotamer
from hpcrefine.validation.residues import residue_table


def numeric_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for i in range(x.shape[0]):
        for k in range(3):
            xp = x.copy()
            xm = x.copy()
            xp[i, k] += h
            xm[i, k] -= h
            g[i, k] = (f(xp) - f(xm)) / (2 * h)
    return g


@pytest.fixture(scope="module")
def chain():
    """A crooked chain of 10 atoms (no three collinear)."""
    rng = np.random.default_rng(7)
    steps = rng.normal(size=(10, 3))
    steps *= 1.5 / np.linalg.norm(steps, axis=1)[:, None]
    return np.cumsum(steps, axis=0)


# ------------------------------------------------------------------------------ kernels

def test_robust_distance_gradient_and_shape(chain):
    idx = np.array([[0, 3], [1, 5], [2, 7], [4, 9]])
    d = G.bond_lengths(chain, idx)
    # inside the flat bottom, on the harmonic flank, at the top-out, harmonic (limit 0)
    target = np.array([d[0] + 0.05, d[1] - 0.4, d[2] - 3.0, d[3] + 0.3])
    sigma = np.full(4, 0.1)
    flat = np.array([0.1, 0.1, 0.1, 0.0])
    limit = np.array([1.0, 1.0, 1.0, 0.0])
    e, g = G.robust_distance_terms(chain, idx, target, sigma, flat, limit)
    gn = numeric_grad(lambda x: G.robust_distance_terms(x, idx, target, sigma, flat, limit)[0], chain)
    assert np.abs(g - gn).max() <= 1e-6 * max(1.0, np.abs(gn).max())
    one = [G.robust_distance_terms(chain, idx[k:k + 1], target[k:k + 1], sigma[k:k + 1],
                                   flat[k:k + 1], limit[k:k + 1])[0] for k in range(4)]
    assert one[0] == 0.0                                     # flat bottom
    assert one[1] == pytest.approx(100 * (1 - np.exp(-0.09)), rel=1e-9)  # (0.3/0.1)^2 topped at L^2 = 100
    assert one[2] == pytest.approx(100 * (1 - np.exp(-(2.9 / 0.1) ** 2 / 100)), rel=1e-9)
    assert one[2] < 100.0                                    # a wrong H-bond costs at most L^2
    assert one[3] == pytest.approx(9.0, rel=1e-9)            # harmonic: (0.3 / 0.1)^2
    assert e == pytest.approx(sum(one))


def test_robust_torsion_gradient_and_top_out(chain):
    idx = np.array([[0, 1, 2, 3], [3, 4, 5, 6], [5, 6, 7, 8]])
    phi = G.torsion_values(chain, idx)
    target = phi + np.array([10.0, -355.0, 60.0])             # the second wraps to 5 degrees
    sigma = np.full(3, 5.0)
    limit = np.array([30.0, 30.0, 0.0])
    e, g = G.robust_torsion_terms(chain, idx, target, sigma, limit)
    gn = numeric_grad(lambda x: G.robust_torsion_terms(x, idx, target, sigma, limit)[0], chain)
    assert np.abs(g - gn).max() <= 1e-6 * np.abs(gn).max()
    e0 = G.robust_torsion_terms(chain, idx[:1], target[:1], sigma[:1], limit[:1])[0]
    assert e0 == pytest.approx(36 * (1 - np.exp(-4 / 36)), rel=1e-9)
    e1 = G.robust_torsion_terms(chain, idx[1:2], target[1:2], sigma[1:2], limit[1:2])[0]
    assert e1 == pytest.approx(36 * (1 - np.exp(-1 / 36)), rel=1e-9)   # 5 deg after wrapping
    e2 = G.robust_torsion_terms(chain, idx[2:], target[2:], sigma[2:], limit[2:])[0]
    assert e2 == pytest.approx(144.0, rel=1e-9)                          # harmonic (60/5)^2


def test_rama_gradient_and_table_interpolation(chain):
    table = rama_potential()
    assert table.shape == (6, 180, 180)
    assert np.allclose(table.min(axis=(1, 2)), 0.0)
    idx = np.array([[0, 1, 2, 3, 4], [2, 3, 4, 5, 6], [4, 5, 6, 7, 8]])
    cls = np.array([0, 1, 4])
    w = np.array([1.0, 2.0, 3.0])
    e, g = G.rama_terms(chain, idx, cls, w, table)
    gn = numeric_grad(lambda x: G.rama_terms(x, idx, cls, w, table)[0], chain)
    assert np.abs(g - gn).max() <= 1e-5 * np.abs(gn).max()
    phi = G.torsion_values(chain, idx[:, :4])
    psi = G.torsion_values(chain, idx[:, 1:])
    assert e == pytest.approx(float(np.sum(w * G.rama_values(table, cls, phi, psi))))
    # at the bin centres the interpolation gives the table; periodic in both angles
    assert G.rama_values(table, [0], [-179.0], [-177.0])[0] == pytest.approx(table[0, 0, 1])
    assert G.rama_values(table, [3], [181.0 - 360.0], [20.0])[0] == pytest.approx(
        G.rama_values(table, [3], [181.0], [20.0 + 360.0])[0])


def test_rama_potential_follows_top8000():
    """Low where Top8000 says favoured, high where it says outlier, for every class."""
    tab, pot = ramachandran.tables(), rama_potential()
    for c in range(6):
        fav = tab[c] >= ramachandran.FAVOURED_CUTOFF
        out = tab[c] < ramachandran.OUTLIER_CUTOFF[c]
        assert np.median(pot[c][fav]) + 3.0 < np.median(pot[c][out])
        assert np.all(np.isfinite(pot[c]))


def test_restraint_energy_carries_the_lowres_terms(chain):
    r = Restraints(dist_idx=np.array([[0, 4]]), dist_target=np.array([2.0]),
                   dist_sigma=np.array([0.1]), dist_flat=np.array([0.0]), dist_limit=np.array([1.0]),
                   dist_kind=np.array([0]), rama_idx=np.array([[1, 2, 3, 4, 5]]),
                   rama_class=np.array([0]), rama_weight=np.array([2.0]), rama_table=rama_potential(),
                   reft_idx=np.array([[5, 6, 7, 8]]), reft_target=np.array([40.0]),
                   reft_sigma=np.array([5.0]), reft_limit=np.array([30.0]))
    total, g, parts = G.restraint_energy(chain, r)
    assert set(parts) >= {"hbonds", "ramachandran", "reference"}
    assert all(parts[k] > 0 for k in ("hbonds", "ramachandran", "reference"))
    assert total == pytest.approx(sum(parts.values()))
    gn = numeric_grad(lambda x: G.restraint_energy(x, r)[0], chain)
    assert np.abs(g - gn).max() <= 1e-5 * np.abs(gn).max()
    t2, _, p2 = G.restraint_energy(chain, r, weights={"ramachandran": 0.0, "hbonds": 0.5})
    assert p2["ramachandran"] == 0.0
    assert t2 == pytest.approx(total - parts["ramachandran"] - 0.5 * parts["hbonds"])
    # a Restraints without low-resolution terms reports the covalent parts only
    assert set(G.restraint_energy(chain, Restraints())[2]) == set(G.TERM_NAMES)
    assert r.counts()["helix_hbonds"] == 1 and "strand_hbonds" not in r.counts()


# ------------------------------------------------------------------------------ on 1AKE

@pytest.fixture(scope="module")
def adk(adk_truth):
    model = read_model(adk_truth)
    return model, build_restraints(model, MonomerLibrary())


def _pairs(ss, kind=None):
    keep = np.ones(len(ss.kind), bool) if kind is None else ss.kind == kind
    return set(zip(ss.o_atom[keep].tolist(), ss.n_atom[keep].tolist()))


def test_secondary_structure_of_1ake(adk):
    model, _ = adk
    truth = find_secondary_structure(model, model.xyz, cutoff=3.5)
    seq = [(int(model.res_seqid[a]), int(model.res_seqid[b])) for a, b in truth.helices]
    # 1AKE: nine helices (including the LID's and the C-terminal one), a five-stranded parallel
    # sheet and a small antiparallel one in the LID
    assert len(truth.helices) == 9
    assert (12, 25) in seq and (201, 214) in seq
    assert 5 <= len(truth.strands) <= 9
    assert np.sum(truth.kind == HELIX) >= 70 and np.sum(truth.kind == STRAND) >= 20
    # every restrained helix H-bond of the crystal structure is a real one
    d = np.linalg.norm(model.xyz[truth.o_atom] - model.xyz[truth.n_atom], axis=1)
    assert np.median(d[truth.kind == HELIX]) < 3.1
    # 3-10 and pi helices on request: outside the alpha helices only, which stay as they are
    ext = find_secondary_structure(model, model.xyz, cutoff=3.5, helix_310_pi=True)
    assert _pairs(truth, HELIX) <= _pairs(ext, HELIX) and len(ext.helices) >= len(truth.helices)
    # from starts shaken by 0.8 A rms the same H-bonds are found (most of them, few others)
    ref = _pairs(truth)
    for seed in (2, 3):
        ss = find_secondary_structure(model, simulate.shake(model.xyz, 0.8, seed))
        found = _pairs(ss)
        assert len(found & ref) >= 0.85 * len(ref), seed
        assert len(found & ref) >= 0.85 * len(found), seed
        assert 8 <= len(ss.helices) <= 10


def test_shares_of_lowres_terms_sum_to_the_whole(adk):
    model, r = adk
    xyz = simulate.shake(model.xyz, 0.3, seed=4)
    params = build_params(6.0)
    full = add_lowres_restraints(model, r, model.xyz, params, reference=model)
    assert full.counts()["ramachandran"] == 212 and full.counts()["reference_torsions"] > 800
    e_all, g_all, parts_all = G.restraint_energy(xyz, full)
    for k in ("hbonds", "ramachandran", "reference"):
        assert parts_all[k] > 0
    for n_parts in (2, 3, 5):
        owner = owner_of_atoms(atom_blocks(model.res_first_atom, n_parts), model.n_atoms)
        e_sum, g_sum = 0.0, np.zeros_like(g_all)
        parts_sum = dict.fromkeys(parts_all, 0.0)
        n_terms = 0
        for p in range(n_parts):
            share = restraints_share(full, owner, p)
            assert np.all(owner[share.dist_idx[:, 0]] == p) and np.all(owner[share.rama_idx[:, 0]] == p)
            n_terms += len(share.dist_idx) + len(share.rama_idx) + len(share.reft_idx)
            e, g, parts = G.restraint_energy(xyz, share)
            e_sum += e
            g_sum += g
            for k, v in parts.items():
                parts_sum[k] += v
        assert n_terms == len(full.dist_idx) + len(full.rama_idx) + len(full.reft_idx)
        assert abs(e_sum - e_all) <= 1e-9 * abs(e_all)
        for k in parts_all:
            assert abs(parts_sum[k] - parts_all[k]) <= 1e-9 * abs(parts_all[k]), k
        assert np.max(np.abs(g_sum - g_all)) <= 1e-9 * np.max(np.abs(g_all))


def test_defaults_by_resolution_and_statistics_untouched(adk):
    model, r = adk
    assert add_lowres_restraints(model, r, model.xyz, build_params(3.5)) is r
    p6 = build_params(6.0)
    assert p6.ss_restraints and p6.rama_restraints
    off = build_params(6.0, overrides={"ss_restraints": False})
    assert "helix_hbonds" not in add_lowres_restraints(model, r, model.xyz, off).counts()
    lr = add_lowres_restraints(model, r, model.xyz, p6)
    assert len(r.dist_idx) == 0                          # the input is not changed
    xyz = simulate.shake(model.xyz, 0.5, seed=9)
    assert geometry_stats(xyz, lr) == geometry_stats(xyz, r)
    assert G.deviations(xyz, lr) == G.deviations(xyz, r)


def test_reference_torsions_match_by_name(adk):
    model, r = adk
    quads, target = reference_torsions(model, model.xyz, r, model)
    rama_idx, _ = rama_terms_of(model, model.xyz)
    assert len(quads) >= 2 * len(rama_idx)               # phi, psi and the side chains
    np.testing.assert_allclose(target, G.torsion_values(model.xyz, quads), atol=1e-9)
    # a reference whose atoms are matched by name, not by position in the file
    other = dataclasses.replace(model, chain=np.where(model.chain == "A", "B", model.chain))
    assert len(reference_torsions(model, model.xyz, r, other)[0]) == 0
    moved = model.xyz + np.array([5.0, -3.0, 1.0])      # torsions do not see a translation
    ref = dataclasses.replace(model, xyz=moved)
    full = add_lowres_restraints(model, r, model.xyz, build_params(3.0), reference=ref)
    assert G.restraint_energy(model.xyz, full)[2]["reference"] == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------ rotamers

def _wrap(d, period=360.0):
    return (np.asarray(d) + period / 2) % period - period / 2


def _posterior_best(res: str, chi: np.ndarray) -> int:
    """The library rotamer of highest posterior at one residue's chi, term by term."""
    lib = rotamer.library()[res]
    best, best_k = -np.inf, -1
    for k in range(len(lib["prob"])):
        lp = np.log(lib["prob"][k])
        for d in range(len(chi)):
            z = _wrap(chi[d] - lib["mean"][k, d], lib["periods"][d]) / lib["sigma"][k, d]
            lp += -0.5 * z * z - np.log(np.sqrt(2 * np.pi) * lib["sigma"][k, d])
        if lp > best:
            best, best_k = lp, k
    return best_k


def test_rotamer_targets_are_the_nearest_rotamers_means(adk):
    model, r = adk
    rt = rotamer_torsions(model, model.xyz, r)
    chains = {sc.residue: sc for sc in side_chains(model, r)}
    rot = rotamer.analyse(residue_table(model, model.xyz, rotamer.ATOM_NAMES), model.xyz)
    category = dict(zip(rot["residue"].tolist(), rot["category"].tolist()))
    # every eligible side chain is either restrained (all its chi) or a rotamer outlier left free
    restrained = set(rt.residue.tolist())
    assert restrained | set(rt.outliers.tolist()) == set(chains) and not restrained & set(rt.outliers.tolist())
    assert len(chains) == 165 and 140 <= len(restrained) < 165
    assert all(category[k] == rotamer.OUTLIER for k in rt.outliers.tolist())
    assert all(category[k] != rotamer.OUTLIER for k in restrained)
    assert "PRO" not in {chains[k].res_type for k in restrained}
    by_distance = 0
    for k in sorted(restrained):
        sc = chains[k]
        rows = np.nonzero(rt.residue == k)[0]
        np.testing.assert_array_equal(rt.quads[rows], sc.atoms[sc.quads])
        chi = current_chis(model.xyz, sc)
        lib = rotamer.library()[sc.res_type]
        best = _posterior_best(sc.res_type, chi)
        # the target is that rotamer's mean (modulo each chi's period), the copy nearest the start
        off = _wrap(rt.target[rows] - lib["mean"][best], lib["periods"])
        np.testing.assert_allclose(off, 0.0, atol=1e-9)
        assert np.all(np.abs(_wrap(rt.target[rows] - chi)) <= lib["periods"] / 2 + 1e-9)
        np.testing.assert_allclose(rt.sigma[rows], np.maximum(lib["sigma"][best], ROTAMER_SIGMA_FLOOR))
        dist = np.sqrt(np.sum(_wrap(chi - lib["mean"], lib["periods"]) ** 2, axis=1))
        by_distance += int(np.argmin(dist) == best)
    # the posterior mostly agrees with the smallest wrapped chi distance
    assert by_distance >= 0.9 * len(restrained)
    assert np.all(rt.sigma >= ROTAMER_SIGMA_FLOOR)
    # the crystal structure's side chains sit in their wells
    dev = np.abs(_wrap(G.torsion_values(model.xyz, rt.quads) - rt.target))
    assert np.median(dev) < 12.0


def test_rotamer_outlier_start_gets_no_restraint(adk):
    model, r = adk
    chains = side_chains(model, r)
    leu = next(sc for sc in chains if sc.res_type == "LEU")
    xyz = model.xyz.copy()
    # chi1 = 0 (eclipsed) and chi2 = 0: no rotamer of the library there
    xyz[leu.atoms] = set_chis(xyz[leu.atoms], leu, np.array([[0.0, 0.0]]))[0]
    lib = rotamer.library()["LEU"]
    assert rotamer.log_density("LEU", np.array([[0.0, 0.0]]))[0] < lib["outlier"]
    before, after = rotamer_torsions(model, model.xyz, r), rotamer_torsions(model, xyz, r)
    assert leu.residue not in after.residue and leu.residue in after.outliers
    assert leu.residue in before.residue
    assert set(after.residue.tolist()) == set(before.residue.tolist()) - {leu.residue}


def test_rotamer_restraints_switch_and_defaults(adk):
    model, r = adk
    assert build_params(6.0).rotamer_restraints and build_params(4.5).rotamer_restraints
    assert not build_params(4.0).rotamer_restraints and not build_params(3.0).rotamer_restraints
    n_rot = len(rotamer_torsions(model, model.xyz, r).quads)
    only = build_params(3.0, overrides={"rotamer_restraints": True})
    on = add_lowres_restraints(model, r, model.xyz, only)
    assert on.counts()["reference_torsions"] == n_rot and len(on.reft_limit) == n_rot
    assert np.all(on.reft_limit == ROTAMER_LIMIT)
    off = build_params(6.0, overrides={"rotamer_restraints": False})
    assert "reference_torsions" not in add_lowres_restraints(model, r, model.xyz, off).counts()
    assert add_lowres_restraints(model, r, model.xyz, build_params(6.0)).counts()["reference_torsions"] == n_rot
    # with a reference model, its torsions win on the chi bonds it restrains
    ref_only = add_lowres_restraints(model, r, model.xyz, build_params(3.0), reference=model)
    both = add_lowres_restraints(model, r, model.xyz, build_params(6.0), reference=model)
    assert both.counts()["reference_torsions"] == ref_only.counts()["reference_torsions"]
    with pytest.raises(InputError, match="rotamer_restraints"):
        build_params(6.0, overrides={"rotamer_restraints": "yes"})


def test_rotamer_restraints_cli_flag(adk_truth, tmp_path):
    from hpcrefine.cli import main

    simulate.write_simulated(adk_truth, 6.0, str(tmp_path / "maps"), seed=1)
    counts = {}
    for flag in ("on", "off"):
        out = tmp_path / flag
        rc = main(["refine", adk_truth, "--map", str(tmp_path / "maps" / "full.mrc"), "--resolution", "6",
                   "--output", str(out), "--protocol", "minimise", "--cycles", "1", "--iterations", "5",
                   "--rotamer-restraints", flag])
        assert rc == 0
        report = json.loads((out / "report.json").read_text())
        assert report["parameters"]["rotamer_restraints"] == (flag == "on")
        counts[flag] = report["restraints"].get("reference_torsions", 0)
    assert counts["off"] == 0 and counts["on"] >= 300


def test_rotamer_energy_zero_at_target_and_pull_back(adk):
    model, r = adk
    only = build_params(3.0, overrides={"rotamer_restraints": True})
    rr = add_lowres_restraints(model, r, model.xyz, only)
    rt = rotamer_torsions(model, model.xyz, r)
    chains = {sc.residue: sc for sc in side_chains(model, r)}
    xyz = model.xyz.copy()
    for k in np.unique(rt.residue).tolist():
        sc = chains[k]
        xyz[sc.atoms] = set_chis(xyz[sc.atoms], sc, rt.target[rt.residue == k][None])[0]

    def rot_energy(x):
        return G.robust_torsion_terms(x, rr.reft_idx, rr.reft_target, rr.reft_sigma, rr.reft_limit)[0]

    assert rot_energy(xyz) == pytest.approx(0.0, abs=1e-12)
    sc = chains[int(rt.residue[0])]
    row = int(np.nonzero(rt.residue == sc.residue)[0][0])
    turned = xyz.copy()
    chi = current_chis(xyz, sc)
    chi[0] += 20.0
    turned[sc.atoms] = set_chis(xyz[sc.atoms], sc, chi[None])[0]
    L, s = ROTAMER_LIMIT / rt.sigma[row], 20.0 / rt.sigma[row]
    assert rot_energy(turned) == pytest.approx(L * L * (1 - np.exp(-s * s / (L * L))), rel=1e-6)
    # the same total through restraint_energy, as the "reference" part
    assert G.restraint_energy(turned, rr)[2]["reference"] == pytest.approx(rot_energy(turned))


def test_rotamer_restraints_hold_side_chains_against_a_wrong_pull(adk):
    """A spring pulling a side chain's atoms to where chi 1 + 60 degrees would put them (a
    stand-in for density that misleads at low resolution), minimised with the covalent
    restraints: the rotamer restraints keep chi 1 much nearer its rotamer's well. (The pull is
    topped out, so a spring strong enough still wins: Lys 22 crosses to the next well either way.)"""
    from scipy.optimize import minimize

    model, r = adk
    rr = add_lowres_restraints(model, r, model.xyz, build_params(3.0, overrides={"rotamer_restraints": True}))
    rt = rotamer_torsions(model, model.xyz, r)
    chains = [sc for sc in side_chains(model, r) if sc.res_type == "LEU"
              and sc.residue in set(rt.residue.tolist())][:3]
    for sc in chains:
        chi0 = current_chis(model.xyz, sc)
        goal = chi0.copy()
        goal[0] += 60.0
        moving = sc.atoms[sc.beyond_cb]
        spring = set_chis(model.xyz[sc.atoms], sc, goal[None])[0][sc.beyond_cb]
        drift = {}
        for name, restraints in (("off", r), ("on", rr)):
            def f(x):
                xyz = model.xyz.copy()
                xyz[moving] = x.reshape(-1, 3)
                e, g, _ = G.restraint_energy(xyz, restraints)
                d = xyz[moving] - spring
                return e + 2.0 * np.sum(d * d), (g[moving] + 4.0 * d).ravel()

            x = minimize(f, model.xyz[moving].ravel(), jac=True, method="L-BFGS-B",
                         options={"maxiter": 500}).x
            xyz = model.xyz.copy()
            xyz[moving] = x.reshape(-1, 3)
            drift[name] = abs(float(_wrap(current_chis(xyz, sc)[0] - chi0[0])))
        assert drift["off"] >= 25.0, (sc.residue, drift)
        assert drift["on"] <= 0.75 * drift["off"], (sc.residue, drift)


# ------------------------------------------------------------------------------ end to end

def test_6a_refinement_keeps_rama_and_helices(adk_truth, tmp_path):
    """`hpcrefine refine` at 6 A from a start shaken by 0.8 A: with the default restraints the
    Ramachandran outliers fall below what covalent restraints alone leave, helix H-bonds stay."""
    from hpcrefine.cli import main
    from hpcrefine.compare import rmsd
    from hpcrefine.modelio import updated_structure, write_model

    simulate.write_simulated(adk_truth, 6.0, str(tmp_path / "maps"), seed=1)
    truth = read_model(adk_truth)
    write_model(updated_structure(truth, simulate.shake(truth.xyz, 0.8, seed=2)), str(tmp_path / "start"))
    ss = find_secondary_structure(truth, truth.xyz, cutoff=3.5)
    helix = ss.kind == HELIX
    o, n = ss.o_atom[helix], ss.n_atom[helix]
    out = {}
    for name, extra in (("covalent", ["--ss-restraints", "off", "--rama-restraints", "off",
                                      "--rotamer-restraints", "off"]),
                        ("lowres", [])):
        rc = main(["refine", str(tmp_path / "start.cif"), "--map", str(tmp_path / "maps" / "full.mrc"),
                   "--resolution", "6", "--output", str(tmp_path / name), "--protocol", "minimise",
                   "--cycles", "2", *extra])
        assert rc == 0
        report = json.loads((tmp_path / name / "report.json").read_text())
        model = read_model(str(tmp_path / name / "refined.cif"))
        d = np.linalg.norm(model.xyz[o] - model.xyz[n], axis=1)
        out[name] = {"rama": report["validation"]["final"]["ramachandran"]["outlier_pct"],
                     "broken": int(np.sum(d > 3.5)), "after": report["after"],
                     "restraints": report["restraints"],
                     "rmsd": rmsd(str(tmp_path / name / "refined.cif"), adk_truth)["rmsd_all"]}
    cov, low = out["covalent"], out["lowres"]
    assert "ramachandran" not in cov["restraints"] and low["restraints"]["ramachandran"] == 212
    assert low["restraints"]["helix_hbonds"] >= 60
    assert cov["rama"] >= 2.0                     # covalent restraints alone leave outliers (3.3%)
    assert low["rama"] <= 1.0 and low["rama"] < cov["rama"] / 3
    assert low["broken"] <= 3 < cov["broken"]
    assert low["after"]["bond_rmsd"] <= 0.012 and low["after"]["angle_rmsd"] <= 1.5
    assert low["rmsd"] < cov["rmsd"] + 0.02


def test_missing_reference_model_is_bad_input(adk_truth, tmp_path, capsys):
    from hpcrefine.cli import main

    simulate.write_simulated(adk_truth, 6.0, str(tmp_path / "maps"), seed=1)
    out = tmp_path / "run"
    rc = main(["refine", adk_truth, "--map", str(tmp_path / "maps" / "full.mrc"), "--resolution", "6",
               "--output", str(out), "--reference", str(tmp_path / "missing.cif")])
    assert rc == 2
    assert "missing.cif" in capsys.readouterr().err
    assert not out.exists()
