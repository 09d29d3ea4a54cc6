"""Protocol steps (hpcrefine.protocol): the parametrisations' gradients against finite differences,
rigid-body recovery and ADP refinement on the real adk model, the same result with 1 and 2 workers
under mpiexec, and a run interrupted after its prepare stage resuming without redoing it."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from hpcrefine.cli import main
from hpcrefine.errors import InputError
from hpcrefine.modelio import read_model, updated_structure, write_model
from hpcrefine.params import build_params
from hpcrefine.protocol.adp import (ADPDataTerm, ADPRestraints, GroupedB, IndividualB,
                                    adp_objective)
from hpcrefine.protocol.morph import Morph, control_atoms
from hpcrefine.protocol.param import check_gradient, minimise_params, param_objective
from hpcrefine.protocol.rigid import RigidBodies, parse_groups, rotation, rotation_derivatives
from hpcrefine.protocol.steps import parse_protocol, split_protocol

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ADK_DOMAINS = "A:1-29,A:60-121,A:160-214|A:30-59|A:122-159"     # CORE | NMP | LID


def _quadratic_target(rng, n):
    """A coordinate objective with a non-trivial gradient everywhere."""
    target = rng.normal(size=(n, 3)) * 3

    def fun(xyz):
        d = np.asarray(xyz).reshape(-1, 3) - target
        return float(np.sum(np.sin(d) * d + 0.1 * d ** 4)), np.cos(d) * d + np.sin(d) + 0.4 * d ** 3
    return fun


# ------------------------------------------------------------------------------ gradients

def test_rotation_is_orthonormal_and_its_derivative_matches_differences():
    rng = np.random.default_rng(1)
    for w in (np.zeros(3), rng.normal(size=3) * 1e-6, rng.normal(size=3), np.array([0, 0, np.pi - 1e-3])):
        R = rotation(w)
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-12) and np.linalg.det(R) == pytest.approx(1.0)
        dR = rotation_derivatives(w)
        for k in range(3):
            e = np.zeros(3)
            e[k] = 1e-6
            fd = (rotation(w + e) - rotation(w - e)) / 2e-6
            assert np.abs(fd - dR[k]).max() < 1e-7
    assert np.allclose(rotation([0, 0, np.pi / 2]) @ [1, 0, 0], [0, 1, 0])


def test_rigid_body_pullback_matches_finite_differences():
    rng = np.random.default_rng(2)
    xyz = rng.normal(size=(70, 3)) * 8
    bodies = RigidBodies(xyz, [np.arange(0, 30), np.arange(30, 62)])    # atoms 62..69 stay put
    fun = param_objective(bodies, _quadratic_target(rng, 70))
    for p in (bodies.zero(), rng.normal(size=bodies.n_params) * 1e-4, rng.normal(size=bodies.n_params) * 4):
        assert check_gradient(fun, p, h=1e-6) < 1e-6
    x = bodies.coords(rng.normal(size=bodies.n_params))
    assert np.array_equal(x[62:], xyz[62:])
    # a rigid move keeps every distance within a group
    d0 = np.linalg.norm(xyz[:30, None] - xyz[None, :30], axis=-1)
    d1 = np.linalg.norm(x[:30, None] - x[None, :30], axis=-1)
    assert np.abs(d0 - d1).max() < 1e-10


def test_morph_pullback_and_smoothness_match_finite_differences():
    rng = np.random.default_rng(3)
    xyz = rng.normal(size=(80, 3)) * 10
    morph = Morph(xyz, xyz[::7], radius=8.0)
    fun = param_objective(morph, _quadratic_target(rng, 80), morph.smoothness(0.5))
    assert check_gradient(fun, rng.normal(size=morph.n_params), h=1e-5) < 1e-6
    # weights are a partition of unity: equal shifts translate the model
    p = np.tile([1.0, -2.0, 0.5], morph.n_params // 3)
    assert np.allclose(morph.coords(p) - xyz, [1.0, -2.0, 0.5])
    assert morph.smoothness(1.0)(p)[0] == pytest.approx(0.0, abs=1e-20)


def _small_adp_case(rng):
    n = 25
    xyz = rng.uniform(4, 12, size=(n, 3))
    data = rng.normal(size=(16, 16, 16)) + 1.0
    mask = np.ones_like(data)
    bonds = np.array([[i, i + 1] for i in range(n - 1)])
    term = ADPDataTerm(data, np.zeros(3), np.ones(3), mask, xyz, np.array(["C", "N", "O", "S", "C"] * 5), 15.0)
    rest = ADPRestraints(bonds, np.full(n, 30.0), 10.0, 40.0)
    return n, term, rest


def test_adp_gradient_matches_finite_differences_individual_and_grouped():
    rng = np.random.default_rng(4)
    n, term, rest = _small_adp_case(rng)
    b = rng.uniform(10, 80, size=n)
    fun = adp_objective(None, term, rest, IndividualB(), 2.0, np.arange(n + 1))
    assert check_gradient(fun, b, h=1e-4) < 1e-5
    groups = GroupedB(np.repeat(np.arange(5), 5), 5)
    fun = adp_objective(None, term, rest, groups, 2.0, np.arange(0, n + 1, 5))
    assert check_gradient(fun, groups.start(b), h=1e-4) < 1e-5
    # the data gradient of a block of atoms is that block of the whole gradient
    _, g_all = term.target(b)
    _, g_part = term.target(b, slice(5, 12))
    assert np.array_equal(g_part[5:12], g_all[5:12]) and not g_part[:5].any() and not g_part[12:].any()


# ------------------------------------------------------------------------------ parsing

def test_protocol_and_groups_are_parsed_and_bad_ones_refused(adk_truth):
    assert parse_protocol("rigid, morph,minimize,adp") == ["rigid", "morph", "minimise", "adp"]
    assert parse_protocol(["morph", "rigid", "morph", "minimise"]) == ["morph", "rigid", "morph", "minimise"]
    assert split_protocol("rigid,minimise,adp") == (["rigid"], True, ["adp"])
    assert split_protocol("adp") == ([], False, ["adp"])
    for bad in ("rigid,heat", "adp,minimise", "minimise,minimise", "minimise,anneal", ""):
        with pytest.raises(InputError):
            parse_protocol(bad)
    assert build_params(3.5).protocol == "minimise"
    assert build_params(4.5).protocol == "minimise"
    assert "rigid" in build_params(6.0).protocol and "minimise" in build_params(6.0).protocol
    assert build_params(3.0, overrides={"protocol": "rigid,minimise"}).protocol == "rigid,minimise"
    for bad in ({"protocol": "rigid,shake"}, {"prepare_target": "both"}, {"morph_radii": [9.0]},
                {"adp_mode": "tls"}):
        with pytest.raises(InputError):
            build_params(3.0, overrides=bad)
    model = read_model(adk_truth)
    groups = parse_groups(ADK_DOMAINS, model)
    assert [len(np.unique(model.res_index[g])) for g in groups] == [29 + 62 + 55, 30, 38]
    assert len(parse_groups("", model)) == 1
    for bad in ("A:1-30|A:30-59", "Z:1-10", "A:1-x"):
        with pytest.raises(InputError):
            parse_groups(bad, model)
    ctrl = control_atoms(model, 2)
    assert all(model.atom_name[a] == "CA" for a in ctrl) and len(ctrl) == 108     # residues 1, 3, ..., 213 and the last, 214


def test_toml_list_protocol(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('[refine]\nprotocol = ["rigid", "minimise", "adp"]\nrigid_blurs = [200.0, 50.0]\n')
    p = build_params(3.5, str(f))
    assert p.protocol == "rigid,minimise,adp" and p.rigid_blurs == [200.0, 50.0]


# ------------------------------------------------------------------------------ real cases

def _displace_domains(model, groups, seed=5, degrees=4.0, shift=1.5):
    rng = np.random.default_rng(seed)
    xyz = model.xyz.copy()
    for g in groups:
        axis = rng.normal(size=3)
        direction = rng.normal(size=3)
        c = xyz[g].mean(axis=0)
        xyz[g] = (xyz[g] - c) @ rotation(np.radians(degrees) * axis / np.linalg.norm(axis)).T + c \
            + shift * direction / np.linalg.norm(direction)
    return xyz


def _ca_rmsd(a, b, model):
    ca = model.atom_name == "CA"
    return float(np.sqrt(np.mean(np.sum((a[ca] - b[ca]) ** 2, axis=1))))


@pytest.fixture(scope="module")
def displaced(adk_truth, tmp_path_factory):
    """adk with its three domains each rotated 4 degrees and shifted 1.5 A."""
    model = read_model(adk_truth)
    xyz = _displace_domains(model, parse_groups(ADK_DOMAINS, model))
    stem = tmp_path_factory.mktemp("displaced") / "start"
    write_model(updated_structure(model, xyz), str(stem))
    return {"path": f"{stem}.cif", "xyz": xyz, "model": model}


def test_rigid_body_brings_displaced_domains_back(adk_case, displaced, tmp_path):
    model = displaced["model"]
    before = _ca_rmsd(displaced["xyz"], model.xyz, model)
    assert before > 1.4
    out = tmp_path / "rigid"
    rc = main(["refine", displaced["path"], "--map", adk_case["full"], "--resolution", "3.5",
               "--protocol", "rigid", "--rigid-groups", ADK_DOMAINS, "--output", str(out)])
    assert rc == 0
    after = _ca_rmsd(read_model(str(out / "refined.cif")).xyz, model.xyz, model)
    assert after < 0.3, (before, after)
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"][0]["step"] == "rigid" and report["protocol"][0]["groups"] == 3
    assert report["cycles"] == []                      # rigid alone: no macro-cycles


def test_adp_recovers_true_b_factors(adk_case, adk_truth, tmp_path):
    model = read_model(adk_truth)
    start = tmp_path / "meanb"
    write_model(updated_structure(model, model.xyz, np.full(model.n_atoms, model.b.mean())), str(start))
    out = tmp_path / "adp"
    rc = main(["refine", f"{start}.cif", "--map", adk_case["full"], "--resolution", "3.5",
               "--protocol", "adp", "--output", str(out)])
    assert rc == 0
    refined = read_model(str(out / "refined.cif"))
    r = float(np.corrcoef(refined.b, model.b)[0, 1])
    assert r >= 0.8, r
    assert np.array_equal(refined.xyz.round(3), model.xyz.round(3))      # coordinates untouched


def test_parametrised_minimisation_is_direct_too(adk_case, displaced):
    """minimise_params on the rigid parametrisation lowers the target from a displaced start."""
    from hpcrefine.engine import RealSpaceTerm
    from hpcrefine.mapio import read_map

    grid = read_map(adk_case["full"])
    model = displaced["model"]
    term = RealSpaceTerm(np.asarray(grid.data), grid.origin, grid.voxel, np.ones(model.n_atoms)).blurred(100.0)
    bodies = RigidBodies(displaced["xyz"], parse_groups(ADK_DOMAINS, model))
    fun = param_objective(bodies, term.target)
    res = minimise_params(fun, bodies.zero(), 60, max_step=1.0, point_dim=3)
    assert res.f < fun(bodies.zero())[0]
    assert _ca_rmsd(bodies.coords(res.p), model.xyz, model) < 0.6


# ------------------------------------------------------------------------------ MPI

def test_same_result_with_one_and_two_workers(adk_case, displaced, tmp_path, steps_under_mpi):
    """The protocol steps run collectively: 1 process, 1 worker (2 ranks) and 2 workers (3 ranks)
    give the same coordinates and B within summation-order differences."""
    fields = {"resolution": 3.5, "rigid_groups": ADK_DOMAINS, "rigid_blurs": [300.0, 100.0],
              "rigid_iterations": 40, "morph_blurs": [150.0], "morph_radii": [9.0],
              "morph_iterations": 30, "adp_iterations": 30}
    results = {}
    for n in (1, 2, 3):
        results[n], _, _ = steps_under_mpi(n, displaced["path"], adk_case["full"], tmp_path / f"n{n}.npz",
                                           ["rigid", "morph", "adp"], fields, coordinate_term=True)
    model = displaced["model"]
    assert _ca_rmsd(results[1]["xyz"], model.xyz, model) < 0.5          # the steps did their work
    for n in (2, 3):
        assert np.abs(results[n]["xyz"] - results[1]["xyz"]).max() < 1e-4
        assert np.abs(results[n]["b"] - results[1]["b"]).max() < 1e-3


# ------------------------------------------------------------------------------ checkpoint

def test_interrupted_after_prepare_resumes_without_redoing_it(adk_case, displaced, tmp_path, monkeypatch):
    import hpcrefine.protocol.steps as steps_mod

    args = [displaced["path"], "--map", adk_case["full"], "--resolution", "3.5", "--protocol",
            "rigid,minimise", "--rigid-groups", ADK_DOMAINS, "--cycles", "1", "--iterations", "30"]
    plain = tmp_path / "plain"
    assert main(["refine", *args, "--output", str(plain)]) == 0

    original = steps_mod.run_steps
    calls = []

    def run_then_signal(names, *a, **k):
        out = original(names, *a, **k)
        calls.append(list(names))
        os.kill(os.getpid(), signal.SIGUSR1)          # caught: the run stops at the next boundary
        return out
    monkeypatch.setattr(steps_mod, "run_steps", run_then_signal)
    run = tmp_path / "run"
    assert main(["refine", *args, "--output", str(run), "--resume"]) == 75
    assert calls == [["rigid"]]
    import h5py
    with h5py.File(run / "checkpoint.h5") as f:
        assert f["state"].attrs["stage"] in ("halfset", "final")
        assert "prepared" in f["state"]
        infos = [json.loads(s) for s in f["trajectory/info"]]
    assert [i["stage"] for i in infos] == ["start", "prepare"]
    monkeypatch.setattr(steps_mod, "run_steps", original)
    log_before = (run / "refine.log").read_text().count("rigid body (")
    assert main(["refine", *args, "--output", str(run), "--resume"]) == 0
    assert (run / "refine.log").read_text().count("rigid body (") == log_before      # not redone
    a = read_model(str(run / "refined.cif")).xyz
    b = read_model(str(plain / "refined.cif")).xyz
    assert np.array_equal(a, b)
    report = json.loads((run / "report.json").read_text())
    assert report["protocol"][0]["step"] == "rigid" and len(report["cycles"]) == 1
