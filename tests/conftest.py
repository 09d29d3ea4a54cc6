"""Shared fixtures: the real adenylate kinase model, its simulated 3.5 A maps and a shaken start."""
from __future__ import annotations

import numpy as np
import pytest

from hpcrefine import datasets, simulate
from hpcrefine.modelio import read_model, updated_structure, write_model


@pytest.fixture(scope="session")
def adk_truth():
    return datasets.fetch(["adk_closed"])["adk_closed"]


@pytest.fixture(scope="session")
def adk_case(adk_truth, tmp_path_factory):
    """Maps at 3.5 A (seed 1) and a start shaken by 0.8 A rms (seed 2), as in the README demo."""
    d = tmp_path_factory.mktemp("adk35")
    simulate.write_simulated(adk_truth, 3.5, str(d / "maps"), seed=1)
    model = read_model(adk_truth)
    xyz = simulate.shake(model.xyz, 0.8, seed=2)
    write_model(updated_structure(model, xyz), str(d / "start"))
    return {"dir": d, "truth": adk_truth, "start": str(d / "start.cif"),
            "full": str(d / "maps" / "full.mrc"), "half1": str(d / "maps" / "half1.mrc"),
            "half2": str(d / "maps" / "half2.mrc"), "shift": float(np.sqrt(np.mean(np.sum(
                (xyz - model.xyz) ** 2, axis=1))))}


@pytest.fixture(scope="session")
def adk_refined(adk_case, tmp_path_factory):
    """`hpcrefine refine` of the shaken start against the half maps, as the README demo runs it."""
    from hpcrefine.cli import main

    out = tmp_path_factory.mktemp("refined") / "run"
    rc = main(["refine", adk_case["start"], "--half-maps", adk_case["half1"], adk_case["half2"],
               "--resolution", "3.5", "--output", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def steps_under_mpi():
    """run(ranks, model, map, out, steps, fields, coordinate_term=False) -> (rank 0's npz,
    the step records, every rank's xyz): protocol steps run by tests/run_steps_mpi.py under
    mpiexec (ranks 1 runs it as one process)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    mpiexec = Path(sys.executable).parent / "mpiexec"

    def run(ranks, model, map_path, out, steps, fields, coordinate_term=False):
        cmd = [str(mpiexec), "-n", str(ranks), sys.executable, str(repo / "tests" / "run_steps_mpi.py"),
               str(model), str(map_path), str(out), ",".join(steps), json.dumps(fields)]
        if coordinate_term:
            cmd.append("coordinate-term")
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=repo,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert p.returncode == 0, p.stderr[-3000:]
        head, _, records = p.stdout.partition(" records ")
        assert head.strip().endswith(f"ranks {ranks}"), p.stdout
        result = np.load(out)
        every = [result["xyz"]] + [np.load(f"{out}.rank{k}.npz")["xyz"] for k in range(1, ranks)]
        return result, json.loads(records.splitlines()[0]), every
    return run
