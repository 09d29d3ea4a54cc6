"""Coordinate minimisation shared by the MPI ranks of one run.

Every rank runs the same driver (the same inputs give the same decisions). The workers minimise
together over their communicator (each evaluates its block of atoms and terms; one buffer
Allreduce per evaluation); the master does no numerics: it waits without spinning a core and
receives the result from the first worker. With one rank, the plain engine.minimise runs.
"""
from __future__ import annotations

import numpy as np

from ..engine import STATISTICS_KEYS, MinimiseResult, minimise, statistics_from_array, statistics_to_array
from .context import Context
from .distributed import distributed_minimise, wait_quietly

TAG_RESULT = 17


class RankMinimiser:
    """Callable with engine.minimise's signature, run collectively by every rank of ctx.world."""

    def __init__(self, ctx: Context, res_first_atom: np.ndarray, interrupts=None):
        self.ctx = ctx
        self.res_first_atom = res_first_atom
        self.first_worker = 1 if ctx.size > 1 else 0
        self.on_poll = interrupts.poll if interrupts is not None else None

    def __call__(self, xyz0, data_term, geom, weight, iterations, params) -> MinimiseResult:
        ctx = self.ctx
        if ctx.size == 1:
            return minimise(xyz0, data_term, geom, weight, iterations, params)
        from mpi4py import MPI

        n = xyz0.size
        # coordinates, f, iterations, evaluations, seconds and the result's geometry statistics
        # (the workers' numbers, so the master decides on the same values as they do)
        buf = np.empty(n + 4 + len(STATISTICS_KEYS))
        if ctx.is_worker:
            res, _ = distributed_minimise(ctx.workers, xyz0, data_term, geom.r, self.res_first_atom,
                                          weight, iterations, params)
            if ctx.rank == self.first_worker:
                buf[:n] = res.xyz.ravel()
                buf[n:n + 4] = (res.f, res.iterations, res.evaluations, res.seconds)
                buf[n + 4:] = statistics_to_array(res.statistics)
                ctx.world.Send([buf, MPI.DOUBLE], dest=0, tag=TAG_RESULT)
            return res
        req = ctx.world.Irecv([buf, MPI.DOUBLE], source=self.first_worker, tag=TAG_RESULT)
        wait_quietly(ctx.world, req, on_poll=self.on_poll)
        return MinimiseResult(xyz=buf[:n].reshape(xyz0.shape).copy(), f=float(buf[n]),
                              iterations=int(buf[n + 1]), evaluations=int(buf[n + 2]),
                              seconds=float(buf[n + 3]), statistics=statistics_from_array(buf[n + 4:]))
