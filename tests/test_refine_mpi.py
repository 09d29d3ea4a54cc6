"""`hpcrefine refine` under mpiexec, as a user runs it: every rank count gives the same model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpcrefine.compare import rmsd
from hpcrefine.modelio import read_model

BIN = Path(sys.executable).parent


def mpirun(n, args, timeout=300):
    cmd = [str(BIN / "mpiexec"), "-n", str(n), str(BIN / "hpcrefine"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def refine_with_params(case, tmp_path, name: str, line: str, ranks: int = 3):
    """A refinement of the adk case under `ranks` ranks with one [refine] parameter line; its
    output folder."""
    params = tmp_path / f"{name}.toml"
    params.write_text(f"[refine]\n{line}\n")
    out = tmp_path / name
    p = mpirun(ranks, ["refine", case["start"], "--half-maps", case["half1"], case["half2"],
                       "--resolution", "3.5", "--params", str(params), "--output", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(adk_case, tmp_path_factory):
    out = tmp_path_factory.mktemp("mpi")
    result = {}
    for n in (1, 3, 5):
        p = mpirun(n, ["refine", adk_case["start"], "--half-maps", adk_case["half1"], adk_case["half2"],
                       "--resolution", "3.5", "--output", str(out / f"n{n}")])
        assert p.returncode == 0, p.stderr[-3000:]
        result[n] = out / f"n{n}"
    return result


def test_three_ranks_refine_like_one(adk_case, runs):
    r1 = rmsd(str(runs[1] / "refined.cif"), adk_case["truth"])
    r3 = rmsd(str(runs[3] / "refined.cif"), adk_case["truth"])
    assert r3["rmsd_all"] < 0.37
    assert abs(r3["rmsd_all"] - r1["rmsd_all"]) < 0.01
    x1 = read_model(str(runs[1] / "refined.cif")).xyz
    x3 = read_model(str(runs[3] / "refined.cif")).xyz
    # hundreds of iterations amplify summation-order differences, but the models stay one model.
    # They also move the half-set FSCs by about 1e-4, and where the free residual is flat the
    # weight chosen from it by several per cent (13.64 and 14.62 measured, final weights 19.3
    # and 20.7); two refinements 7 % apart in weight ended 0.056 A apart. A macro-cycle's trial
    # at the half sets' weight can also land on either side of the bond limit (0.0121 and
    # 0.0118 A measured at 26.35 and 25.62), and the weight ladder then takes one bisection step
    # down (a factor sqrt(2)) in one run and not in the other
    w1 = json.loads((runs[1] / "report.json").read_text())["weight"]
    w3 = json.loads((runs[3] / "report.json").read_text())["weight"]
    assert abs(np.log(w3 / w1)) < 0.6 * np.log(2.0)
    assert np.sqrt(np.mean(np.sum((x1 - x3) ** 2, axis=1))) < (0.05 if abs(w3 / w1 - 1) < 1e-6 else 0.08)
    report = json.loads((runs[3] / "report.json").read_text())
    assert report["ranks"] == 3
    assert report["after"]["bond_rmsd"] <= 0.012
    # without NCS the workers read the half maps' blurred copies: the master wrote them
    keys = report["map_store"]["keys"]
    assert {"final", "half1", "half2", "half1_b40", "half2_b40"} <= set(keys), keys


def test_weights_tried_in_parallel_agree_with_one_process(runs):
    """With 5 ranks each half set has two workers, which try the weights in two groups at once
    (halfset.weight_layout); the half-set statistics are those of one process."""
    h1 = json.loads((runs[1] / "report.json").read_text())["halfset"]
    h5 = json.loads((runs[5] / "report.json").read_text())["halfset"]
    for a, b in zip(h1["weights_tried"], h5["weights_tried"]):
        assert a["weight"] == pytest.approx(b["weight"], rel=1e-9)
        assert a["fsc_free_avg"] == pytest.approx(b["fsc_free_avg"], abs=2e-4)
        assert a["bond_rmsd"] == pytest.approx(b["bond_rmsd"], abs=2e-4)
    # the free residual is flat near its minimum (FSC_free of the two middle weights within 2e-4
    # of each other), so the vertex of the parabola through three tried weights moves by several
    # per cent with FSC differences of 1e-4 (measured: 13.64 with one process, 14.62 with five
    # ranks, where the two middle weights tied and the vertex fell at their geometric mean);
    # within a fifth of the factor-2 spacing of the weights tried is what the FSCs above support
    assert abs(np.log(h5["chosen_weight"] / h1["chosen_weight"])) < 0.2 * np.log(2.0)
    log = (runs[5] / "refine.log").read_text()
    assert "ranks: 5" in log


def test_shared_half_set_layout_agrees_with_one_process(adk_case, runs, tmp_path):
    """halfset_layout = "shared": both workers of 3 ranks refine every half-set task together
    (task after task) instead of one half set each; the half-set statistics are those of one
    process, and each worker holds only its share of a task."""
    out = refine_with_params(adk_case, tmp_path, "shared", 'halfset_layout = "shared"')
    log = (out / "refine.log").read_text()
    assert "every task refined by all 2 workers in turn (shared)" in log
    h1 = json.loads((runs[1] / "report.json").read_text())["halfset"]
    hs = json.loads((out / "report.json").read_text())["halfset"]
    for a, b in zip(h1["weights_tried"], hs["weights_tried"]):
        assert a["weight"] == pytest.approx(b["weight"], rel=1e-9)
        assert a["fsc_free_avg"] == pytest.approx(b["fsc_free_avg"], abs=2e-4)
        assert a["bond_rmsd"] == pytest.approx(b["bond_rmsd"], abs=2e-4)
    assert abs(np.log(hs["chosen_weight"] / h1["chosen_weight"])) < 0.2 * np.log(2.0)
    # the default layout logs its groups: one worker per half set with 3 ranks
    assert "2 group(s) of workers refine the tasks in parallel" in (runs[3] / "refine.log").read_text()


def test_the_master_writes_the_outputs_and_workers_the_validations(runs):
    names = sorted(os.listdir(runs[3]))
    assert [n for n in names if not n.startswith("validation_")] == [
        "checkpoint.h5", "fsc_halfset.png", "refine.log", "refined.cif", "refined.pdb", "report.json"]
    # the workers that validated the start and the final model wrote their files, the same set
    # for both models and as one process writes
    assert sorted(n for n in os.listdir(runs[1]) if n.startswith("validation_")) == \
        sorted(n for n in names if n.startswith("validation_"))
    start = sorted(n for n in names if n.startswith("validation_start"))
    assert [n.replace("start", "final") for n in start] == sorted(n for n in names if n.startswith("validation_final"))
    assert {"validation_start.json", "validation_start_residues.csv", "validation_start_ramachandran.png",
            "validation_final.json"} <= set(names)
    for n in (1, 3):
        saved = json.loads((runs[n] / "validation_start.json").read_text())
        assert saved["geometry"] == json.loads((runs[n] / "report.json").read_text())["validation"]["start"]["geometry"]
    log = (runs[3] / "refine.log").read_text()
    assert log.count("final:") == 1 and "ranks: 3" in log
    # the start model is validated by a worker (and the final one by another, while the master
    # writes the model and makes its statistics): the same figures as one process makes, logged
    # first
    assert log.index("start model:") < log.index("final model:")
    one, three = (json.loads((runs[n] / "report.json").read_text())["validation"]["start"] for n in (1, 3))
    for section in ("geometry", "ramachandran", "rotamers", "cbeta", "clashes"):
        assert three[section] == one[section], section
    for key in ("cc_mask", "cc_box", "fsc_avg", "d_fsc_05"):
        assert three["map"][key] == pytest.approx(one["map"][key], abs=1e-4), key
    assert three["map"]["half_map_fsc"] == one["map"]["half_map_fsc"]
    assert three["map"]["per_chain_cc"] == pytest.approx(one["map"]["per_chain_cc"], abs=1e-4)


def test_statistics_made_by_workers_are_the_models(adk_case, runs):
    """Under 3 ranks the last worker makes the start statistics (while the master prepares the
    half maps), the master the final ones (while the workers validate), but for their CC_mask,
    which the workers that validate the start and the final model make from their model maps:
    the start's are one process's, the final ones those of the written model, recomputed here."""
    from hpcrefine.engine import GeometryTerm
    from hpcrefine.params import RefineParams
    from hpcrefine.refine import load_inputs, model_statistics

    one, three = (json.loads((runs[n] / "report.json").read_text()) for n in (1, 3))
    assert three["before"] == one["before"]
    log = (runs[3] / "refine.log").read_text()
    assert log.count("start: ") == 1 and log.count("final: ") == 1
    params = RefineParams(resolution=3.5)
    inputs = load_inputs(str(runs[3] / "refined.cif"), None, [adk_case["half1"], adk_case["half2"]],
                         None, [], True, params)
    after = model_statistics(inputs.model, inputs.model.xyz, GeometryTerm(inputs.restraints, params),
                             inputs, 3.5)
    # the written model's coordinates are rounded to 0.001 A
    for key in ("bond_rmsd", "angle_rmsd", "planarity_rmsd", "cc_mask"):
        assert three["after"][key] == pytest.approx(after[key], rel=0.02, abs=2e-4), key
    assert abs(three["after"]["clashes"] - after["clashes"]) <= 2
    assert three["after"]["chiral_inversions"] == after["chiral_inversions"]
    # the final geometry is the last minimisation's (the workers' shares): the same figures as
    # the whole model's, on the run's restraints (those of its start), at the refined
    # coordinates the checkpoint keeps
    from hpcrefine.checkpoint import load_state
    from hpcrefine.engine import STATISTICS_KEYS
    run = load_inputs(adk_case["start"], None, [adk_case["half1"], adk_case["half2"]], None, [], True, params)
    state = load_state(str(runs[3] / "checkpoint.h5"), run.model.n_atoms)
    again = model_statistics(run.model, state.xyz, GeometryTerm(run.restraints, params), run, 3.5,
                             with_map=False)
    assert {k: three["after"][k] for k in STATISTICS_KEYS} == again
    # the validator's own files and the report's validation hold only the validation's figures
    assert "refinement_cc_mask" not in (runs[3] / "validation_final.json").read_text()
    assert "refinement_cc_mask" not in json.dumps(three["validation"])


def test_whole_model_figures_on_the_master_change_nothing_else(adk_case, runs, tmp_path):
    """whole_model_on_workers = false: the master makes the start and final statistics and both
    validations itself, so the workers hold only their shares; the refinement is the same run
    (the same coordinates to the last digit), and so are the figures (the workers' validations
    of the default run are the master's)."""
    out = refine_with_params(adk_case, tmp_path, "n3_master", "whole_model_on_workers = false")
    assert (out / "refined.cif").read_text() == (runs[3] / "refined.cif").read_text()
    mine, default = (json.loads((d / "report.json").read_text()) for d in (out, runs[3]))
    assert mine["parameters"]["whole_model_on_workers"] is False
    assert mine["before"] == default["before"] and mine["after"] == default["after"]
    for name in ("start", "final"):
        for section in ("geometry", "ramachandran", "rotamers", "cbeta", "clashes"):
            assert mine["validation"][name][section] == default["validation"][name][section]
        for key in ("cc_mask", "cc_box", "fsc_avg", "d_fsc_05"):
            assert mine["validation"][name]["map"][key] == pytest.approx(
                default["validation"][name]["map"][key], abs=1e-4), (name, key)
    assert sorted(os.listdir(out)) == sorted(os.listdir(runs[3]))


def test_workers_holding_parts_of_the_restraints_refine_the_same_model(adk_case, tmp_path):
    """whole_model_on_workers = false with the shared half-set layout and no rotamer step: each
    worker keeps only its part of the restraints, cut once from the start model by the master,
    which alone holds the whole set (refine.workers_hold_parts, refine._hold_part). This model is
    cut into blocks in file order, the blocks the whole set is cut into at every minimisation,
    so the refined model is the same to the last digit; cut into boxes (decomposition = "boxes"), it ends within summation order of it
    (0.0016 A measured; boxes re-cut at every minimisation: 0.0031 A)."""
    base = 'halfset_layout = "shared"\ncycle_rotamers = false'
    whole = refine_with_params(adk_case, tmp_path, "whole", base)
    parts = refine_with_params(adk_case, tmp_path, "parts", base + "\nwhole_model_on_workers = false")
    boxes = refine_with_params(adk_case, tmp_path, "boxes", base + '\nwhole_model_on_workers = false\n'
                               'decomposition = "boxes"')
    assert "holds the restraints" not in (whole / "refine.log").read_text()
    assert "each holds the restraints of its block of the start model (1/2)" in (parts / "refine.log").read_text()
    assert "each holds the restraints of its box of the start model (1/2)" in (boxes / "refine.log").read_text()
    # the master alone built the restraints and sent each worker its part
    assert "their parts cut by the master and sent" in (boxes / "refine.log").read_text()
    assert "glibc's mmap threshold fixed" in (boxes / "refine.log").read_text()
    assert "mmap threshold" not in (whole / "refine.log").read_text()
    assert (parts / "refined.cif").read_text() == (whole / "refined.cif").read_text()
    x0, x1 = (read_model(str(d / "refined.cif")).xyz for d in (whole, boxes))
    assert np.sqrt(np.mean(np.sum((x0 - x1) ** 2, axis=1))) < 0.01
    w0, w1 = (json.loads((d / "report.json").read_text())["weight"] for d in (whole, boxes))
    assert w1 == pytest.approx(w0, rel=1e-6)


def test_auto_layout_shares_the_tasks_when_a_worker_has_too_little_memory(adk_case, runs, tmp_path):
    """halfset_layout "auto" (the default) keeps the parallel layout while a worker's estimated
    peak fits in its share of the node's memory (the runs above), and with too little
    (worker_memory_gb, else measured) refines as the shared layout with workers holding boxes
    does when asked for: the same model to the last digit."""
    base = 'cycle_rotamers = false\ndecomposition = "boxes"'
    tight = refine_with_params(adk_case, tmp_path, "tight", base + "\nworker_memory_gb = 0.01")
    given = refine_with_params(adk_case, tmp_path, "given", base + '\nhalfset_layout = "shared"\n'
                               "whole_model_on_workers = false")
    log = (tight / "refine.log").read_text()
    assert ("half-set layout: shared, whole_model_on_workers = false (halfset_layout auto: a worker "
            "of the parallel layout would peak near") in log
    assert "each holds the restraints of its box of the start model (1/2)" in log
    assert log.count("even sharing every task a worker may need") == 1      # (10 MB is too little)
    assert (tight / "refined.cif").read_text() == (given / "refined.cif").read_text()
    report = json.loads((tight / "report.json").read_text())
    assert report["parameters"]["halfset_layout"] == "shared"
    assert report["parameters"]["whole_model_on_workers"] is False
    assert report["memory"]["worker_budget_mb"] == 10
    # the default run had room: measured on this node, the parallel layout kept
    default = json.loads((runs[3] / "report.json").read_text())["memory"]
    assert default["halfset_layout"] == "parallel"
    assert default["worker_budget_mb"] > default["estimated_peak_mb"]["parallel"] > 200
    assert "half-set layout: parallel (halfset_layout auto: a worker's estimated peak" in \
        (runs[3] / "refine.log").read_text()


def test_a_slurm_jobs_memory_request_bounds_what_a_worker_may_use(adk_case, tmp_path):
    """Under SLURM the job's memory on the node (SLURM_MEM_PER_NODE, MB) less what its ranks hold
    there bounds the measured budget: 1,200 MB for 3 ranks leaves a worker less than the parallel
    layout's estimate, so "auto" shares the tasks and warns once."""
    out = tmp_path / "slurm"
    cmd = [str(BIN / "mpiexec"), "-n", "3", str(BIN / "hpcrefine"), "refine", adk_case["start"],
           "--half-maps", adk_case["half1"], adk_case["half2"], "--resolution", "3.5", "--output",
           str(out), "--cycles", "1", "--iterations", "20"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "SLURM_MEM_PER_NODE": "1200"})
    assert p.returncode == 0, p.stderr[-3000:]
    memory = json.loads((out / "report.json").read_text())["memory"]
    assert memory["halfset_layout"] == "shared" and memory["whole_model_on_workers"] is False
    # (1,200 MB less the ranks' resident memory, the master's estimate and its map store) / 2
    assert 0 <= memory["worker_budget_mb"] < (1200 - memory["estimated_peak_mb"]["master"]) / 2
    assert (out / "refine.log").read_text().count("even sharing every task") == 1
    # and the command line sets the budget instead of measuring it
    out2 = tmp_path / "given"
    p = subprocess.run(cmd[:-5] + [str(out2), "--cycles", "1", "--iterations", "20", "--worker-memory", "64"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "SLURM_MEM_PER_NODE": "1200"})
    assert p.returncode == 0, p.stderr[-3000:]
    memory = json.loads((out2 / "report.json").read_text())["memory"]
    assert memory["halfset_layout"] == "parallel" and memory["worker_budget_mb"] == 64 * 1024


def test_bad_input_under_mpiexec_one_message(adk_case, tmp_path):
    p = mpirun(3, ["refine", str(tmp_path / "missing.cif"), "--map", adk_case["full"], "--resolution", "3.5",
                   "--output", str(tmp_path / "out")], timeout=120)
    assert p.returncode != 0
    assert p.stderr.count("hpcrefine: error: model file not found") == 1
    assert not (tmp_path / "out").exists()


def test_more_workers_than_residues_is_refused(tmp_path, adk_case):
    """A two-residue model on five ranks (four workers): one clear message before any work."""
    import gemmi

    st = gemmi.read_structure(adk_case["start"])
    chain = st[0][0]
    while len(chain) > 2:
        del chain[2]
    small = tmp_path / "two.cif"
    st.setup_entities()
    st.make_mmcif_document().write_file(str(small))
    p = mpirun(5, ["refine", str(small), "--map", adk_case["full"], "--resolution", "3.5",
                   "--output", str(tmp_path / "out")], timeout=120)
    assert p.returncode != 0
    assert p.stderr.count("hpcrefine: error:") == 1 and "at most 3 ranks" in p.stderr
    assert not (tmp_path / "out").exists()
