"""Occupancy refinement of alternative conformations (hpcrefine.protocol.occupancy) on the real adk
model: 12 side chains given a second conformer (the other rotamer) with true occupancies drawn in
0.2-0.8, a simulated 3 A map of that truth, a start at 0.5/0.5. The parametrisation keeps every
residue's sum and [0, 1]; the gradient matches finite differences; the step recovers the
occupancies; a refinement run writes them to refined.cif and the checkpoint; mpiexec -n 3 agrees
with one process; models without alternative conformations keep bitwise the same model maps."""
from __future__ import annotations

import types

import numpy as np
import pytest

from hpcrefine import simulate
from hpcrefine.cli import main
from hpcrefine.core.modelmap import DensityFitTerm
from hpcrefine.errors import InputError
from hpcrefine.mapio import read_map, write_map
from hpcrefine.modelio import read_model, read_structure, updated_structure, write_model
from hpcrefine.monlib import MonomerLibrary
from hpcrefine.params import build_params
from hpcrefine.protocol.adp import ADPDataTerm
from hpcrefine.protocol.occupancy import (ConformerGroups, OccupancyDataTerm, occupancy_objective,
                                          occupancy_step, share)
from hpcrefine.protocol.param import ParamRunner, check_gradient
from hpcrefine.protocol.steps import parse_protocol, run_steps, split_protocol
from hpcrefine.topology import build_restraints

RESOLUTION = 3.0
N_SPLIT = 12


def _conformer_a(groups: ConformerGroups, occ) -> np.ndarray:
    """Each split residue's altloc A occupancy (its group with the first letter)."""
    return groups.occupancies(groups.start(occ))[groups.first[:-1]]


@pytest.fixture(scope="module")
def alt(adk_truth, tmp_path_factory):
    """adk with N_SPLIT side chains in two conformers (the truth), its simulated 3 A map (seed 1,
    written to full.mrc), and the start: the truth with every conformer at 0.5 (start.cif)."""
    d = tmp_path_factory.mktemp("occupancy")
    model = read_model(adk_truth)
    st, picks = simulate.alternative_conformers(model, build_restraints(model, MonomerLibrary()),
                                                N_SPLIT, seed=1)
    write_model(st, str(d / "truth"))
    truth = read_model(str(d / "truth.cif"))
    full, _, _, origin, voxel, _ = simulate.simulate_maps(read_structure(str(d / "truth.cif")),
                                                          RESOLUTION, seed=1)
    write_map(str(d / "full.mrc"), full, origin, voxel)
    occ0 = np.where(truth.altloc != "", 0.5, truth.occ)
    write_model(updated_structure(truth, truth.xyz, occ=occ0), str(d / "start"))
    # the step's inputs as a run reads them from the files
    grid = read_map(str(d / "full.mrc"))
    start = read_model(str(d / "start.cif"))
    inputs = types.SimpleNamespace(model=start, map=grid, data=np.asarray(grid.data, dtype=np.float32),
                                   restraints=None)
    groups = ConformerGroups.of(truth)
    return {"dir": d, "truth": truth, "picks": picks, "occ0": occ0, "inputs": inputs, "groups": groups,
            "true_a": _conformer_a(groups, truth.occ), "map": str(d / "full.mrc"),
            "start": str(d / "start.cif"), "model": model}


@pytest.fixture(scope="module")
def refined(alt):
    """The occupancy step run in this process from the 0.5/0.5 start: (occ, record)."""
    params = build_params(RESOLUTION)
    start = alt["inputs"].model
    _, _, occ, records = run_steps(["occupancy"], ParamRunner(None), alt["inputs"], start.xyz, start.b,
                                   None, None, params)
    return occ, records[0]


# ------------------------------------------------------------------------------ the groups

def test_groups_are_one_per_altloc_letter_of_each_split_residue(alt):
    truth, groups = alt["truth"], alt["groups"]
    assert groups.n_residues == len(alt["picks"]) == N_SPLIT
    assert groups.n_groups == 2 * N_SPLIT
    assert groups.residue.tolist() == [r for r, _ in alt["picks"] for _ in (0, 1)]
    assert groups.altloc.tolist() == ["A", "B"] * N_SPLIT
    assert np.array_equal(groups.atoms, np.nonzero(truth.altloc != "")[0])
    assert np.array_equal(truth.altloc[groups.atoms], groups.altloc[groups.group_of])
    assert np.allclose(groups.total, 1.0)
    assert np.allclose(alt["true_a"], [q for _, q in alt["picks"]])
    assert 0.2 <= alt["true_a"].min() and alt["true_a"].max() <= 0.8


def test_softmax_keeps_sums_exact_and_occupancies_in_range(alt):
    groups, truth = alt["groups"], alt["truth"]
    rng = np.random.default_rng(3)
    assert np.allclose(groups.occupancies(groups.start(truth.occ))[groups.first[:-1]], alt["true_a"])
    for scale in (0.0, 1.0, 10.0, 300.0):          # 300: far beyond what exp can hold unshifted
        p = rng.normal(size=groups.n_groups) * scale
        o = groups.occupancies(p)
        assert np.all(o >= 0.0) and np.all(o <= 1.0) and np.all(np.isfinite(o))
        sums = np.add.reduceat(o, groups.first[:-1])
        assert np.abs(sums - groups.total).max() < 1e-12
        occ = groups.expand(p, truth.occ)
        other = np.ones(truth.n_atoms, dtype=bool)
        other[groups.atoms] = False
        assert np.array_equal(occ[other], truth.occ[other])          # atoms without altloc kept
    # a total below 1 is kept, and a conformer at 0 starts at a finite parameter
    occ = truth.occ.copy()
    a, b = groups.atoms[groups.group_of == 0], groups.atoms[groups.group_of == 1]
    occ[a], occ[b] = 0.0, 0.7
    g = ConformerGroups.of(truth, occ)
    p = g.start(occ)
    assert np.all(np.isfinite(p))
    o = g.occupancies(p)
    assert o[0] + o[1] == pytest.approx(0.7) and 0.0 < o[0] < 1e-3
    assert share(10, 3, 0) == slice(0, 3) and share(10, 3, 2) == slice(6, 10)


def test_model_without_altlocs_has_nothing_to_refine(adk_truth):
    model = read_model(adk_truth)
    assert np.all(model.altloc == "") and ConformerGroups.of(model).n_groups == 0
    occ, record = occupancy_step(ParamRunner(None), model, model.xyz, model.b, model.occ, None,
                                 build_params(3.0))
    assert np.array_equal(occ, model.occ) and record["groups"] == 0 and record["iterations"] == 0


def test_protocol_accepts_occupancy_after_minimise_only():
    assert split_protocol("minimise,adp,occupancy") == ([], True, ["adp", "occupancy"])
    assert split_protocol("occupancy") == ([], False, ["occupancy"])
    assert parse_protocol("rigid,minimise,occupancy,adp") == ["rigid", "minimise", "occupancy", "adp"]
    with pytest.raises(InputError):
        parse_protocol("occupancy,minimise")


# ------------------------------------------------------------------------------ the data term

def test_gradient_matches_finite_differences(alt):
    """dT/dp through the softmax, at the start and at a random point, and dT/docc of single
    atoms including one at occupancy 0 (the unit-weight Gaussian of the GRAD_AMP mode)."""
    inputs, truth, groups = alt["inputs"], alt["truth"], alt["groups"]
    from hpcrefine.core.density import normalise_map
    from hpcrefine.mapstats import atom_mask

    g = inputs.map
    mask = atom_mask(truth.xyz, inputs.data.shape, g.origin, g.voxel, 3.5)
    data = OccupancyDataTerm(normalise_map(inputs.data), g.origin, g.voxel, mask, truth.xyz,
                             truth.element, truth.b, 15.0)
    fun = occupancy_objective(None, data, groups, alt["occ0"])
    rng = np.random.default_rng(5)
    for p in (groups.start(alt["occ0"]), rng.normal(size=groups.n_groups)):
        assert check_gradient(fun, p, h=1e-5) < 1e-6
    occ = alt["occ0"].copy()
    atoms = groups.atoms[:6]
    occ[atoms[0]] = 0.0
    f0, g0 = data.target(occ, atoms)
    for k, a in enumerate(atoms.tolist()):
        e = np.zeros_like(occ)
        e[a] = 1e-5
        fd = (data.target(occ + e, atoms[:1])[0] - data.target(occ - e, atoms[:1])[0]) / 2e-5
        assert abs(fd - g0[k]) < 1e-6 * max(1.0, abs(g0[k])), (k, fd, g0[k])


def test_occupancy_one_keeps_model_maps_bitwise_and_zero_is_harmless(alt):
    """Occupancy 1 everywhere: the density-fit and ADP terms are bitwise those without
    occupancies; occupancy 0: the atom drops out of the model map without a fault."""
    inputs, model = alt["inputs"], alt["model"]
    g = inputs.map
    data = np.asarray(inputs.data, dtype=np.float64)
    mask = np.ones(data.shape)
    ones = np.ones(model.n_atoms)
    assert np.array_equal(model.occ, ones)
    plain = DensityFitTerm(data, g.origin, g.voxel, mask, model.element, model.b, 15.0)
    with_occ = DensityFitTerm(data, g.origin, g.voxel, mask, model.element, model.b, 15.0, occ=model.occ)
    fa, ga = plain.target(model.xyz)
    fb, gb = with_occ.target(model.xyz)
    assert fa == fb and np.array_equal(ga, gb)
    assert np.array_equal(plain.blurred(50.0).target(model.xyz)[1],
                          with_occ.blurred(50.0).target(model.xyz)[1])
    fa, ga = ADPDataTerm(data, g.origin, g.voxel, mask, model.xyz, model.element, 15.0).target(model.b)
    fb, gb = ADPDataTerm(data, g.origin, g.voxel, mask, model.xyz, model.element, 15.0,
                         occ=model.occ).target(model.b)
    assert fa == fb and np.array_equal(ga, gb)
    zero = ones.copy()
    zero[:10] = 0.0
    term = DensityFitTerm(data, g.origin, g.voxel, mask, model.element, model.b, 15.0, occ=zero)
    f, grad = term.target(model.xyz)
    assert np.isfinite(f) and np.all(np.isfinite(grad)) and not grad[:10].any()


# ------------------------------------------------------------------------------ recovery

def test_step_recovers_true_occupancies(alt, refined):
    occ, record = refined
    got = _conformer_a(alt["groups"], occ)
    true = alt["true_a"]
    mae = float(np.abs(got - true).mean())
    r = float(np.corrcoef(got, true)[0, 1])
    # measured: MAE 0.051, r 0.95 (scripts/bench_occupancy.py); the start (all 0.5) has MAE 0.16
    assert mae < 0.1 and r > 0.85, (mae, r)
    groups = ConformerGroups.of(alt["inputs"].model)          # the start's: totals exactly 1
    per_group = [np.unique(occ[groups.atoms[groups.group_of == k]]) for k in range(groups.n_groups)]
    assert all(len(u) == 1 for u in per_group)                  # one occupancy per conformer
    sums = np.add.reduceat(np.concatenate(per_group), groups.first[:-1])
    assert np.abs(sums - 1.0).max() < 1e-12
    assert record["step"] == "occupancy" and record["groups"] == 2 * N_SPLIT and record["iterations"] > 0
    other = alt["truth"].altloc == ""
    assert np.array_equal(occ[other], alt["truth"].occ[other])


def test_refine_run_writes_refined_occupancies(alt, refined, tmp_path):
    """`hpcrefine refine --protocol occupancy`: refined.cif and checkpoint.h5 (/state/occ) hold
    the occupancies the step refined (those of the in-process run), the coordinates untouched."""
    import h5py

    out = tmp_path / "run"
    rc = main(["refine", alt["start"], "--map", alt["map"], "--resolution", str(RESOLUTION),
               "--protocol", "occupancy", "--output", str(out)])
    assert rc == 0
    written = read_model(str(out / "refined.cif"))
    occ, _ = refined
    assert np.abs(written.occ - occ).max() < 1e-4              # as written (mmCIF keeps 4 digits)
    assert np.array_equal(written.altloc, alt["truth"].altloc)
    assert np.array_equal(written.xyz.round(3), alt["truth"].xyz.round(3))
    with h5py.File(out / "checkpoint.h5") as f:
        assert np.abs(f["state/occ"][()] - occ).max() < 1e-12


# ------------------------------------------------------------------------------ MPI

def test_three_ranks_agree_with_one_process(alt, refined, tmp_path, steps_under_mpi):
    """mpiexec -n 3 (a master and 2 workers, each with its share of the grouped atoms): the same
    occupancies as the in-process run within summation-order differences, on every rank."""
    fields = {"resolution": RESOLUTION}
    result, records, every = steps_under_mpi(3, alt["start"], alt["map"], tmp_path / "n3.npz",
                                             ["occupancy"], fields)
    occ, _ = refined
    assert records[0]["groups"] == 2 * N_SPLIT
    # each grouped atom's gradient comes from one worker, zeros from the others: the sums are exact
    # (measured: identical), so only a different summation of the map terms could show here
    assert np.abs(result["occ"] - occ).max() < 1e-12
    assert all(np.array_equal(x, every[0]) for x in every)
