"""Runs the MPI tests (tests/mpi) for real under mpiexec with 1, 2, 3 and 5 ranks, and checks that an
uncaught exception on one rank brings the whole job down instead of hanging it.

The ranks may outnumber the cores: the MPI tests are small and the master sleeps while it waits.
"""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
TIMEOUT = 180          # seconds per mpiexec run (each takes about 10 s on 2 cores)


def _mpiexec(n: int, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    assert MPIEXEC.exists(), f"{MPIEXEC} not found: install the mpich wheel next to this Python"
    return subprocess.run([str(MPIEXEC), "-n", str(n), sys.executable, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("ranks", [1, 2, 3, 5])
def test_mpi_suite_passes(ranks):
    run = _mpiexec(ranks, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "mpi"))
    out = run.stdout + run.stderr
    print(out)
    assert run.returncode == 0, out
    # every rank ran the whole suite and passed all of it (the ranks' lines may interleave)
    seen = re.findall(rf"MPI ranks: {ranks} \(this is rank (\d+)\)", run.stdout)
    assert sorted(map(int, seen)) == list(range(ranks)), out
    counts = re.findall(r"(\d+) passed in ", run.stdout)
    assert len(counts) == ranks and len(set(counts)) == 1 and int(counts[0]) >= 7, out
    assert "failed" not in out
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
