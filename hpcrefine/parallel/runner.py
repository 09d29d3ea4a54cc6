"""Coordinate minimisation shared by the MPI ranks of one run.

Every rank runs the same driver (the same inputs give the same decisions). The workers minimise
together over their communicator (each evaluates its block of atoms and terms; one buffer
Allreduce per evaluation); the master does no numerics: it waits without spinning a core and
receives the result from the first worker. With one rank, the plain engine.minimise runs.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..engine import MinimiseResult, minimise, result_buffer, result_from_buffer, result_to_buffer
from .context import Context
from .decompose import held_in_boxes
from .distributed import distributed_minimise, wait_quietly

TAG_RESULT = 17


class RankMinimiser:
    """Callable with engine.minimise's signature, run collectively by every rank of ctx.world.
    On the workers, when they hold the restraints in boxes, the start may be and the result is
    the workers' parts (distributed.BoxedCoordinates); the master gets the whole model."""

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

        # the result with its geometry statistics (the workers' numbers, so the master decides
        # on the same values as they do), in a buffer only the first worker and the master hold
        # (the whole model's coordinates: 24 MB at a million atoms)
        n = 3 * len(xyz0)
        if ctx.is_worker:
            # workers holding the restraints in boxes keep the result as their parts
            # (distributed.BoxedCoordinates), gathered on the first worker alone, for the master
            parts = held_in_boxes(geom.r)
            res, _ = distributed_minimise(ctx.workers, xyz0, data_term, geom.r, self.res_first_atom,
                                          weight, iterations, params, keep_parts=parts)
            whole = res.xyz.gather_to(0) if parts else res.xyz
            if ctx.rank == self.first_worker:
                ctx.world.Send([result_to_buffer(replace(res, xyz=whole), result_buffer(n)), MPI.DOUBLE],
                               dest=0, tag=TAG_RESULT)
            return res
        buf = result_buffer(n)
        req = ctx.world.Irecv([buf, MPI.DOUBLE], source=self.first_worker, tag=TAG_RESULT)
        wait_quietly(ctx.world, req, on_poll=self.on_poll)
        return result_from_buffer(buf, (len(xyz0), 3))
