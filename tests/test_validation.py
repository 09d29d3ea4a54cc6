"""Validation metrics: hand-built cases with known answers, map-fit figures on simulated adk maps,
the `validate` command, and the Ramachandran cross-check against cctbx's ramalyze (run in a
subprocess: importing cctbx's iotbx after gemmi in one process crashes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hpcrefine import datasets
from hpcrefine.cli import main
from hpcrefine.modelio import read_model, updated_structure, write_model
from hpcrefine.monlib import MonomerLibrary, resolve_monlib_dir
from hpcrefine.simulate import shake
from hpcrefine.topology import build_restraints
from hpcrefine.validation import cbeta, clash, ramachandran, rotamer, validate_model
from hpcrefine.validation.residues import residue_table

RAMALYZE = r"""
import json, sys
import iotbx.pdb
from mmtbx.validation.ramalyze import ramalyze
h = iotbx.pdb.input(file_name=sys.argv[1]).construct_hierarchy()
r = ramalyze(pdb_hierarchy=h, outliers_only=False)
out = [[x.chain_id.strip(), x.resseq.strip() + x.icode.strip(), x.altloc, x.res_type, x.rama_type,
        x.score / 100.0] for x in r.results]
json.dump({"n_total": r.n_total, "n_outliers": r.n_outliers, "n_favored": r.n_favored,
           "results": out}, sys.stdout)
"""


def ramalyze(path: str) -> dict:
    """cctbx's ramalyze on a model file, in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-c", RAMALYZE, path], capture_output=True, text=True)
    assert proc.returncode == 0, ("cctbx's ramalyze failed (cctbx-base is in the test extra: "
                                  f"pip install -e .[test]): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def _restraints(model):
    lib = MonomerLibrary(resolve_monlib_dir(None))
    lib.load(set(model.res_names.tolist()), [])
    return build_restraints(model, lib)


def _ours(model, xyz=None):
    xyz = model.xyz if xyz is None else xyz
    a = ramachandran.analyse(residue_table(model, xyz, ramachandran.BACKBONE), xyz)
    return {(model.res_chain[r], model.res_seqid[r]): (int(c), int(k), float(s))
            for r, c, k, s in zip(a["residue"], a["cls"], a["category"], a["score"])}


def _theirs(ref):
    out = {}
    for chain, seqid, alt, cls, cat, score in ref["results"]:
        if alt in ("", "A"):
            out.setdefault((chain, seqid), (cls, cat, score))
    return out


@pytest.fixture(scope="module")
def structures():
    return datasets.fetch(["adk_closed", "adk_open", "7cth", "6zu5"])


@pytest.fixture(scope="module")
def adk(structures):
    model = read_model(structures["adk_closed"])
    return model, _restraints(model)


# --------------------------------------------------------------------- cross-check with cctbx

@pytest.mark.parametrize("name", ["adk_closed", "adk_open", "7cth", "6zu5"])
def test_ramachandran_agrees_with_ramalyze(structures, name):
    ref = ramalyze(structures[name])
    ours = _ours(read_model(structures[name]))
    theirs = _theirs(ref)
    assert set(ours) == set(theirs)
    assert len(ours) == ref["n_total"] > 200
    # the same class and category for every residue, and the same score
    for key, (cls, cat, score) in theirs.items():
        assert ours[key][:2] == (cls, cat), key
        assert ours[key][2] == pytest.approx(score, abs=1e-6)
    assert sum(v[1] == ramachandran.OUTLIER for v in ours.values()) == ref["n_outliers"]
    assert sum(v[1] == ramachandran.FAVOURED for v in ours.values()) == ref["n_favored"]


def test_ramachandran_agrees_on_a_poor_model(adk, tmp_path):
    """A shaken model has outliers in every class; residues whose stretched peptide bonds
    ramalyze skips (C-N > 2 A) are still evaluated here, all others agree."""
    model, _ = adk
    xyz = shake(model.xyz, 0.8, seed=2)
    write_model(updated_structure(model, xyz), str(tmp_path / "shaken"))
    theirs = _theirs(ramalyze(str(tmp_path / "shaken.cif")))
    ours = _ours(model, xyz)
    assert set(theirs) < set(ours)
    assert sum(v[1] == ramachandran.OUTLIER for v in theirs.values()) > 20
    for key, (cls, cat, score) in theirs.items():
        assert ours[key][:2] == (cls, cat), key


# ------------------------------------------------------------------------ hand-built cases

def _atom(model, chain, seqid, name):
    hit = np.nonzero((model.chain == chain) & (model.atom_name == name)
                     & (model.res_seqid[model.res_index] == str(seqid)))[0]
    assert len(hit) == 1
    return int(hit[0])


def _rotate(xyz, axis_a, axis_b, moving, degrees):
    """Rotate atoms `moving` about the axis through xyz[axis_a] -> xyz[axis_b]."""
    out = xyz.copy()
    k = xyz[axis_b] - xyz[axis_a]
    k /= np.linalg.norm(k)
    th = np.radians(degrees)
    v = out[moving] - xyz[axis_b]
    v = (v * np.cos(th) + np.cross(k, v) * np.sin(th) + np.outer(v @ k, k) * (1 - np.cos(th)))
    out[moving] = v + xyz[axis_b]
    return out


def test_clash_placed_on_purpose(adk):
    model, r = adk
    base = clash.analyse(model, model.xyz, r)
    assert len(base["i"]) == 0                      # the deposited 1AKE has no heavy-atom clash
    a = _atom(model, "A", 100, "CA")
    # put a side-chain end 2.2 A from a distant residue's CA: overlap 1.70 + 1.55 - 2.2 = 1.05 A
    b = _atom(model, "A", 13, "NZ")
    assert model.res_names[model.res_index[b]] == "LYS"
    xyz = model.xyz.copy()
    d = xyz[b] - xyz[a]
    xyz[b] = xyz[a] + d / np.linalg.norm(d) * 2.2
    cl = clash.analyse(model, xyz, r)
    pairs = {tuple(sorted((int(i), int(j)))) for i, j in zip(cl["i"], cl["j"])}
    assert tuple(sorted((a, b))) in pairs
    k = [tuple(sorted((int(i), int(j)))) for i, j in zip(cl["i"], cl["j"])].index(tuple(sorted((a, b))))
    assert cl["overlap"][k] == pytest.approx(1.70 + 1.55 - 2.2, abs=1e-6)
    assert cl["clashscore"] == pytest.approx(1000.0 * len(cl["i"]) / model.n_atoms)


def test_flipped_cbeta(adk):
    """Mirroring CB through the N-CA-C plane makes an L residue D: a C-beta outlier and a
    chirality inversion."""
    model, r = adk
    n, ca, c, cb = (_atom(model, "A", 58, x) for x in ("N", "CA", "C", "CB"))
    xyz = model.xyz.copy()
    normal = np.cross(xyz[n] - xyz[ca], xyz[c] - xyz[ca])
    normal /= np.linalg.norm(normal)
    xyz[cb] -= 2 * np.dot(xyz[cb] - xyz[ca], normal) * normal
    table = residue_table(model, xyz, cbeta.ATOM_NAMES)
    before = cbeta.analyse(residue_table(model, model.xyz, cbeta.ATOM_NAMES), model.xyz)
    after = cbeta.analyse(table, xyz)
    res = model.res_index[ca]
    k = list(after["residue"]).index(res)
    assert before["deviation"][k] < 0.25
    assert after["deviation"][k] > 1.5
    assert cbeta.summary(after)["outliers"] == cbeta.summary(before)["outliers"] + 1
    result = validate_model(model, xyz, r)
    assert result["geometry"]["chiral_inversions"] == 1
    assert "A/LEU58" in result["cbeta"]["outlier_residues"]


def test_residue_forced_into_disallowed_region(adk, tmp_path):
    """Turning phi and psi of ALA 55 to (120, -60), a region no general residue occupies."""
    model, _ = adk
    res = model.res_index[_atom(model, "A", 55, "CA")]
    assert model.res_names[res] == "ALA"
    t = residue_table(model, model.xyz, ramachandran.BACKBONE)
    a = ramachandran.analyse(t, model.xyz)
    k = list(a["residue"]).index(res)
    after_res = np.arange(model.res_first_atom[res + 1], model.n_atoms)
    n, ca, c = (_atom(model, "A", 55, x) for x in ("N", "CA", "C"))
    own = np.arange(model.res_first_atom[res], model.res_first_atom[res + 1])
    xyz = _rotate(model.xyz, n, ca, np.concatenate([own[(own != n) & (own != ca)], after_res]), 120 - a["phi"][k])
    o = _atom(model, "A", 55, "O")
    xyz = _rotate(xyz, ca, c, np.concatenate([[o], after_res]), -60 - a["psi"][k])
    b = ramachandran.analyse(residue_table(model, xyz, ramachandran.BACKBONE), xyz)
    j = list(b["residue"]).index(res)
    assert b["phi"][j] == pytest.approx(120, abs=1e-6) and b["psi"][j] == pytest.approx(-60, abs=1e-6)
    assert b["cls"][j] == ramachandran.GENERAL
    assert b["score"][j] < 0.0005 and b["category"][j] == ramachandran.OUTLIER
    assert a["category"][k] == ramachandran.FAVOURED
    write_model(updated_structure(model, xyz), str(tmp_path / "forced"))
    theirs = _theirs(ramalyze(str(tmp_path / "forced.cif")))
    assert theirs[("A", "55")][1] == 0                        # ramalyze: OUTLIER


def test_rotamer_forced_to_eclipsed_chi(adk):
    """LEU 58 chi1 turned to 120 degrees (eclipsed, between the staggered rotamers)."""
    model, _ = adk
    ca, cb = (_atom(model, "A", 58, x) for x in ("CA", "CB"))
    res = model.res_index[ca]
    assert model.res_names[res] == "LEU"
    names = rotamer.ATOM_NAMES
    before = rotamer.analyse(residue_table(model, model.xyz, names), model.xyz)
    k = list(before["residue"]).index(res)
    assert before["category"][k] == rotamer.FAVOURED
    side = [_atom(model, "A", 58, x) for x in ("CG", "CD1", "CD2")]
    xyz = _rotate(model.xyz, ca, cb, np.array(side), 120.0 - before["chi"][k, 0])
    after = rotamer.analyse(residue_table(model, xyz, names), xyz)
    assert after["chi"][k, 0] == pytest.approx(120.0, abs=1e-6)
    assert after["category"][k] == rotamer.OUTLIER
    assert np.array_equal(np.delete(after["category"], k), np.delete(before["category"], k))


def test_rotamer_library_centres_are_favoured():
    lib = rotamer.library()
    assert set(lib) == set(rotamer.CHI_ATOMS)
    for res, e in lib.items():
        common = e["prob"] > 0.05
        assert common.any()
        assert np.all(rotamer.log_density(res, e["mean"][common]) >= e["allowed"]), res
        assert abs(e["prob"].sum() - 1) < 1e-3


# ------------------------------------------------------------------------------ map fit

def test_map_fit_on_simulated_adk(adk_case):
    from hpcrefine.mapio import read_map

    truth = read_model(adk_case["truth"])
    r = _restraints(truth)
    grid = read_map(adk_case["full"])
    good = validate_model(truth, truth.xyz, r, map_grid=grid, resolution=3.5)["map"]
    start = read_model(adk_case["start"])
    poor = validate_model(start, start.xyz, r, map_grid=grid, resolution=3.5)["map"]
    # the true model explains its own simulated map: FSC=0.5 near the map's resolution
    assert good["cc_mask"] > 0.75 and good["cc_volume"] > 0.75
    assert 3.0 < good["d_fsc_05"] < 4.2
    assert good["fsc_avg"] > 0.65
    assert good["cc_box"] < good["cc_mask"]
    for key in ("cc_mask", "cc_volume", "cc_peaks", "fsc_avg"):
        assert good[key] > poor[key] + 0.04, key
    assert poor["d_fsc_05"] > good["d_fsc_05"]
    assert good["per_chain_cc"]["A"] > poor["per_chain_cc"]["A"]


def test_validation_reuses_the_map_transform_and_half_map_fsc(adk_case, tmp_path):
    """refine validates its start and final models against one map: the map's transform and the
    half maps' FSC (from weighting the full map) passed in give the same figures as computed."""
    from hpcrefine.params import build_params
    from hpcrefine.refine import _validate, load_inputs

    inputs = load_inputs(adk_case["start"], None, [adk_case["half1"], adk_case["half2"]], None, [],
                         need_map=True, params=build_params(3.5))
    assert inputs.half_map_fsc is not None
    xyz = inputs.model.xyz
    own = validate_model(inputs.model, xyz, inputs.restraints, inputs.map, inputs.data, inputs.half_maps, 3.5)
    reused = _validate(inputs.model, {"start": (xyz, None, None), "again": (xyz + 0.0, None, None)},
                       inputs, 3.5, str(tmp_path))
    for name in ("start", "again"):
        got = reused[name]["map"]
        for key in ("cc_mask", "cc_box", "cc_volume", "cc_peaks", "fsc_avg", "d_fsc_05", "fsc_curve",
                    "half_map_fsc", "per_chain_cc"):
            assert got[key] == own["map"][key], key


def test_correlations_match_numpy(adk_case):
    """The one-pass kernels against plain numpy on the same arrays."""
    from hpcrefine.mapio import read_map
    from hpcrefine.validation import mapfit

    model = read_model(adk_case["start"])
    grid = read_map(adk_case["full"])
    exp = np.asarray(grid.data, dtype=np.float32)
    calc, info = mapfit.model_map_and_fsc(model, model.xyz, exp, grid.origin, grid.voxel, 3.5)
    mask = mapfit.molecular_mask(model.xyz, model.element, exp.shape, grid.origin, grid.voxel)
    cc = mapfit.correlations(exp, calc, mask)
    assert cc["cc_box"] == pytest.approx(np.corrcoef(exp.ravel(), calc.ravel())[0, 1], abs=1e-6)
    m = mask.astype(bool)
    assert cc["cc_mask"] == pytest.approx(np.corrcoef(exp[m], calc[m])[0, 1], abs=1e-6)
    n = int(m.sum())
    top = calc.ravel() >= np.sort(calc.ravel())[-n]
    assert cc["cc_volume"] == pytest.approx(np.corrcoef(exp.ravel()[top], calc.ravel()[top])[0, 1], abs=1e-6)
    both = top | (exp.ravel() >= np.sort(exp.ravel())[-n])
    assert cc["cc_peaks"] == pytest.approx(np.corrcoef(exp.ravel()[both], calc.ravel()[both])[0, 1], abs=1e-6)
    # the FSC against simulate.fsc on the unfiltered model density
    from hpcrefine.mapstats import atom_density
    from hpcrefine.simulate import fsc
    s, f = fsc(exp, atom_density(model.xyz, model.element, model.b, model.occ, exp.shape, grid.origin,
                                 grid.voxel, 3.5), grid.voxel)
    assert np.allclose(info["fsc"], f, atol=1e-4)
    # per-residue sums: every voxel within the radius of an atom is owned exactly once
    sums = mapfit.residue_sums(exp, calc, model.xyz, model.res_index, model.n_residues, grid.origin,
                               grid.voxel, 2.8)
    from hpcrefine.mapstats import atom_mask
    assert sums[:, 0].sum() == atom_mask(model.xyz, exp.shape, grid.origin, grid.voxel, 2.8).sum()


def test_model_map_matches_gemmi_density(adk_case):
    """The compiled model map (one fitted Gaussian per element, mapstats.atom_density) against
    gemmi's DensityCalculatorE (five Gaussians per atom), both low-passed at 3.5 A: the same map
    to a correlation of 0.9999 over the box and the same CC_mask against the map to 1e-3; and
    the fitted form factors within 1 % of the tables up to 1 / 3.5 A."""
    import gemmi

    from hpcrefine.mapio import read_map
    from hpcrefine.mapstats import (atom_mask, correlation, electron_gaussian, lowpass, model_density,
                                    model_map_at)

    model = read_model(adk_case["start"])
    grid = read_map(adk_case["full"])
    exp = np.asarray(grid.data, dtype=np.float32)
    ours = model_map_at(model, model.xyz, exp.shape, grid.origin, grid.voxel, 3.5)
    ref = lowpass(model_density(updated_structure(model, model.xyz), exp.shape, grid.origin, grid.voxel),
                  np.asarray(grid.voxel), 3.5)
    mask = atom_mask(model.xyz, exp.shape, grid.origin, grid.voxel, 2.8)
    assert correlation(ours, ref) > 0.9999
    assert abs(correlation(exp, ours, mask) - correlation(exp, ref, mask)) < 1e-3
    s = np.linspace(0.0, 1.0 / 3.5, 50)
    for el in ("C", "N", "O", "S"):
        amp, bf = electron_gaussian(el, 1.0 / 3.5)
        e = gemmi.Element(el).c4322
        table = np.sum(np.array(e.a)[None] * np.exp(-0.25 * np.array(e.b)[None] * s[:, None] ** 2), axis=1)
        assert np.max(np.abs(amp * np.exp(-0.25 * bf * s * s) - table) / table) < 0.01


# ----------------------------------------------------------------------------- the command

def test_validate_command(adk_case, tmp_path, capsys):
    out = tmp_path / "val"
    rc = main(["validate", adk_case["start"], "--half-maps", adk_case["half1"], adk_case["half2"],
               "--resolution", "3.5", "--output", str(out)])
    assert rc == 0
    names = sorted(os.listdir(out))
    assert names == ["validation.json", "validation.log", "validation_fsc.png", "validation_ramachandran.png",
                     "validation_residue_cc.png", "validation_residues.csv"]
    doc = json.loads((out / "validation.json").read_text())
    assert set(doc) == {"schema_version", "model", "resolution", "geometry", "ramachandran", "rotamers",
                        "cbeta", "clashes", "map", "timings", "inputs"}
    assert doc["ramachandran"]["outlier"] > 20                  # a 0.8 A shake leaves many
    assert doc["clashes"]["clashscore"] > 50
    assert 3.0 < doc["map"]["half_map_fsc"]["d_fsc_0143"] < 4.0
    assert doc["geometry"]["bond_rmsd"] > 0.3
    lines = (out / "validation_residues.csv").read_text().splitlines()
    assert len(lines) == 1 + 214
    # the results are kept unless --overwrite
    capsys.readouterr()
    rc = main(["validate", adk_case["start"], "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "already holds validation results" in err and err.count("\n") == 1
    assert main(["validate", adk_case["start"], "--output", str(out), "--overwrite"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--map", "missing.mrc", "--resolution", "3.5"], "map file not found"),
    (["--map", "FULL", "--resolution", "-2"], "--resolution must be a positive number"),
    (["--map", "FULL"], "needs its resolution"),
])
def test_validate_bad_input(adk_case, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    args = [adk_case["full"] if a == "FULL" else a for a in args]
    rc = main(["validate", adk_case["start"], "--output", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1
    assert not out.exists() or not os.listdir(out)


def test_masked_correlation_matches_numpy():
    """mapstats.correlation (CC_mask of the refinement's statistics), one compiled pass, against
    numpy's on the masked voxels, with and without a mask."""
    from hpcrefine.mapstats import correlation

    rng = np.random.default_rng(7)
    a = rng.normal(2.0, 1.0, (30, 31, 32)).astype(np.float32)
    b = (0.6 * a + rng.normal(0.0, 0.5, a.shape)).astype(np.float32)
    mask = rng.uniform(size=a.shape) < 0.3
    assert correlation(a, b, mask) == pytest.approx(np.corrcoef(a[mask], b[mask])[0, 1], abs=1e-9)
    assert correlation(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-9)
    assert correlation(a, np.ones_like(a), mask) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        correlation(a, b[:-1], mask)
