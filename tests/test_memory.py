"""The program's memory settings: numpy's arrays without transparent huge pages unless
$HPCREFINE_HUGE_PAGES=1 (parallel.context.small_pages, set by the command-line entry point), and,
in a run asked to hold little (whole_model_on_workers off), glibc's mmap threshold fixed so that
freed arrays go back to the system (fixed_mmap_threshold)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from hpcrefine import cli
from hpcrefine.parallel.context import HUGE_PAGES_ENV, MMAP_THRESHOLD_ENV, small_pages

_STATE = np._core.multiarray._set_madvise_hugepage     # returns the setting it replaces


def test_small_pages_turns_numpys_huge_page_advice_off_unless_asked_to_keep_it():
    before = _STATE(True)
    try:
        env = {}
        assert small_pages(env) is True
        assert _STATE(True) is False                     # it was off
        assert env["NUMPY_MADVISE_HUGEPAGE"] == "0"      # and stays off in processes started from here
        env = {HUGE_PAGES_ENV: "1"}
        assert small_pages(env) is False
        assert _STATE(True) is True and "NUMPY_MADVISE_HUGEPAGE" not in env
    finally:
        _STATE(before)


def test_the_program_runs_without_huge_pages(tmp_path):
    """Every command goes through main(), which turns the advice off before it runs (here a
    status query of a missing checkpoint, which fails after that); a new process started by the
    program inherits the setting."""
    before = _STATE(True)
    try:
        assert cli.main(["status", str(tmp_path / "nothing.h5")]) != 0
        assert _STATE(True) is False
    finally:
        _STATE(before)
    code = ("import numpy as np; print(np._core.multiarray._set_madvise_hugepage(True))")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMPY_MADVISE_HUGEPAGE", HUGE_PAGES_ENV)}
    small_pages(env)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# A 32 MB array made and freed (glibc's dynamic threshold then rises to its size), then a 16 MB
# array with a small one made after it, so that the 16 MB lie below the heap's top when freed:
# prints the resident kilobytes that freeing the 16 MB gave back.
_FREED_KB = """
import sys
import numpy as np
from hpcrefine.parallel.context import fixed_mmap_threshold
if sys.argv[1] == "fixed":
    assert fixed_mmap_threshold()
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
a = np.ones(4_000_000)
del a
b = np.ones(2_000_000)
pins = [np.ones(1000) for _ in range(50)]
before = rss()
del b
print(before - rss())
"""


def _freed_kb(how: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != MMAP_THRESHOLD_ENV}
    out = subprocess.run([sys.executable, "-c", _FREED_KB, how], env=env, capture_output=True,
                         text=True, check=True)
    return int(out.stdout.split()[-1])


def test_a_fixed_mmap_threshold_gives_a_freed_array_back_to_the_system_at_once():
    """Under glibc's default (the threshold follows the freed blocks), the 16 MB stay in the
    process; with the threshold fixed they go back when the array is freed. (A run with
    whole_model_on_workers off fixes it: tests/test_refine_mpi.py reads its log line.)"""
    assert _freed_kb("plain") < 1_000
    assert _freed_kb("fixed") > 15_000
