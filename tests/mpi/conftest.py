"""MPI test session: the session header names the MPI library and the rank count; a failure on one rank
aborts every rank (instead of leaving the others blocked in a collective); measured numbers are
printed at the end by world rank 0."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mpi4py
import pytest
from mpi4py import MPI

MEASURED: dict = {}


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session):
    # written directly rather than by pytest_report_header, which -q hides
    world = MPI.COMM_WORLD
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"MPI: {' '.join(MPI.Get_library_version().split()[:3])}, "
                            f"mpi4py {mpi4py.__version__}")
        reporter.write_line(f"MPI ranks: {world.Get_size()} (this is rank {world.Get_rank()})")


def pytest_runtest_logreport(report):
    world = MPI.COMM_WORLD
    if report.failed and world.Get_size() > 1:
        sys.stderr.write(f"\nrank {world.Get_rank()} of {world.Get_size()}: {report.nodeid} failed, "
                         f"aborting all ranks\n{report.longreprtext}\n")
        sys.stderr.flush()
        world.Abort(1)


def pytest_terminal_summary(terminalreporter):
    if MPI.COMM_WORLD.Get_rank() == 0 and MEASURED:
        terminalreporter.section(f"measured with {MPI.COMM_WORLD.Get_size()} rank(s)")
        for key, value in MEASURED.items():
            terminalreporter.write_line(f"{key}: {value}")


@pytest.fixture(scope="session")
def measured():
    return MEASURED


def pytest_sessionfinish(session, exitstatus):
    """With HPCREFINE_MPI_RESULTS set, each rank writes its own outcome to a file there: the ranks'
    terminal lines share one stream and can interleave mid-line, so the launcher test reads these."""
    where = os.environ.get("HPCREFINE_MPI_RESULTS")
    if not where:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    stats = reporter.stats if reporter is not None else {}
    outcome = {"exitstatus": int(exitstatus), "size": MPI.COMM_WORLD.Get_size(),
               "passed": len(stats.get("passed", [])), "failed": len(stats.get("failed", [])),
               "errors": len(stats.get("error", []))}
    Path(where, f"rank{MPI.COMM_WORLD.Get_rank()}.json").write_text(json.dumps(outcome))
