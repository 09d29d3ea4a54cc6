"""Logging set-up: one readable log per run, a run header, and one timer helper."""
from __future__ import annotations

import logging
import os
import platform
import socket
import sys
import time
from contextlib import contextmanager

from . import __version__

FORMAT = "%(asctime)s %(levelname)-7s %(message)s"
DATEFMT = "%H:%M:%S"


def setup_logging(rank: int = 0, logfile: str | None = None, verbose: bool = False) -> None:
    """Rank 0 logs at INFO (DEBUG with verbose), other ranks at WARNING; rank 0 also to logfile."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    level = (logging.DEBUG if verbose else logging.INFO) if rank == 0 else logging.WARNING
    root.setLevel(level)
    fmt = logging.Formatter(FORMAT if rank == 0 else f"[rank {rank}] " + FORMAT, DATEFMT)
    stream = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if logfile and rank == 0:
        fh = logging.FileHandler(logfile, mode="a")
        fh.setFormatter(logging.Formatter(FORMAT, "%Y-%m-%d %H:%M:%S"))
        root.addHandler(fh)
    for noisy in ("numba", "matplotlib", "h5py", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_header(command: str, n_ranks: int = 1, mpi_library: str = "") -> list[str]:
    """Lines that open every log: versions, host, command line, ranks."""
    import gemmi
    import numpy

    lines = [
        f"hpcrefine {__version__}  (python {platform.python_version()}, numpy {numpy.__version__}, "
        f"gemmi {gemmi.__version__})",
        f"host {socket.gethostname()}  pid {os.getpid()}  ranks {n_ranks}"
        + (f"  MPI: {mpi_library}" if mpi_library else ""),
        f"command: {command}",
    ]
    return lines


class Timer:
    """Accumulates wall time per named stage: `with timer('stage'): ...`."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.totals[name] = self.totals.get(name, 0.0) + dt
            self.counts[name] = self.counts.get(name, 0) + 1

    def as_dict(self) -> dict:
        return {k: {"seconds": round(v, 4), "calls": self.counts[k]} for k, v in self.totals.items()}
