"""Runs the MPI tests (tests/mpi) for real under mpiexec with 1, 2, 3 and 5 ranks, and checks that an
uncaught exception on one rank brings the whole job down instead of hanging it.

The ranks may outnumber the cores: the MPI tests are small and the master sleeps while it waits.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
TIMEOUT = 180          # seconds per mpiexec run (each takes about 10 s on 2 cores)


def _mpiexec(n: int, *args: str, timeout: float = TIMEOUT, env: dict | None = None
             ) -> subprocess.CompletedProcess:
    assert MPIEXEC.exists(), f"{MPIEXEC} not found: install the mpich wheel next to this Python"
    return subprocess.run([str(MPIEXEC), "-n", str(n), sys.executable, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


@pytest.mark.parametrize("ranks", [1, 2, 3, 5])
def test_mpi_suite_passes(ranks, tmp_path):
    run = _mpiexec(ranks, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "mpi"),
                   env={"HPCREFINE_MPI_RESULTS": str(tmp_path)})
    out = run.stdout + run.stderr
    print(out)
    assert run.returncode == 0, out
    # every rank ran the whole suite and passed all of it; each rank reports in a file of its own,
    # because the ranks' terminal lines share one stream and can interleave mid-line
    outcomes = {int(p.stem[4:]): json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}
    assert sorted(outcomes) == list(range(ranks)), out
    for rank, outcome in outcomes.items():
        assert outcome["size"] == ranks and outcome["exitstatus"] == 0, (rank, outcome, out)
        assert outcome["failed"] == 0 and outcome["errors"] == 0, (rank, outcome, out)
    passed = {outcome["passed"] for outcome in outcomes.values()}
    assert len(passed) == 1 and passed.pop() >= 7, (outcomes, out)
    assert "max coordinate difference distributed vs single process" in run.stdout


def test_an_uncaught_exception_on_one_rank_aborts_all_ranks():
    script = textwrap.dedent("""
        import time
        from mpi4py import MPI
        from hpcrefine.parallel.distributed import install_abort_on_error
        world = MPI.COMM_WORLD
        install_abort_on_error(world)
        if world.Get_rank() == 1:
            time.sleep(0.5)
            raise RuntimeError("deliberate failure on rank 1")
        world.Barrier()               # the other ranks would wait here forever
        print("barrier passed")
    """)
    t0 = time.perf_counter()
    run = _mpiexec(3, "-c", script, timeout=60)
    assert run.returncode != 0
    assert time.perf_counter() - t0 < 30
    assert "deliberate failure on rank 1" in run.stderr
    assert "rank 1 of 3: uncaught RuntimeError, aborting all ranks" in run.stderr
    assert "barrier passed" not in run.stdout
