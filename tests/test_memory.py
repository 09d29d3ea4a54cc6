"""The program's memory settings: numpy's arrays without transparent huge pages unless
$HPCREFINE_HUGE_PAGES=1 (parallel.context.small_pages), set by the command-line entry point."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from hpcrefine import cli
from hpcrefine.parallel.context import HUGE_PAGES_ENV, small_pages

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
