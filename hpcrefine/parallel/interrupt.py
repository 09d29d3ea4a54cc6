"""Stopping every rank cleanly on SIGUSR1 or SIGTERM (a SLURM warning signal, a pre-emption).

A signal may reach one rank or all of them. Each rank's handler only sets a flag; at its next
check the rank tells every other rank with a small message, so one rank's signal reaches all. The
ranks that share a step agree at the step's boundary (`agree`, a one-integer Allreduce over their
communicator), so they all stop after the same step; the master learns it while it waits (`poll`,
called from its quiet wait loop) or from the step's result.
"""
from __future__ import annotations

import signal

import numpy as np

TAG_STOP = 91
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Interrupts:
    def __init__(self, world=None):
        self.world = world if world is not None and world.Get_size() > 1 else None
        self.signum = 0
        self.heard = False           # a stop message from another rank
        self._sent = []
        self._previous = {s: signal.signal(s, self._handler) for s in SIGNALS}

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def poll(self) -> bool:
        """True once this rank got a signal or heard of one; tells the other ranks the first time
        it sees its own signal."""
        if self.world is not None:
            from mpi4py import MPI

            buf = np.zeros(1, dtype=np.int32)
            while self.world.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_STOP):
                self.world.Recv([buf, MPI.INT], source=MPI.ANY_SOURCE, tag=TAG_STOP)
                self.heard = True
            if self.signum and not self._sent:
                me = self.world.Get_rank()
                one = np.ones(1, dtype=np.int32)
                self._sent = [self.world.Isend([one, MPI.INT], dest=r, tag=TAG_STOP)
                              for r in range(self.world.Get_size()) if r != me]
        return bool(self.signum) or self.heard

    def agree(self, comm) -> bool:
        """Collective over comm: True on every rank when any of them should stop."""
        stop = self.poll()
        if comm is None or comm.Get_size() == 1:
            return stop
        from mpi4py import MPI

        buf = np.array([1 if stop else 0], dtype=np.int32)
        comm.Allreduce(MPI.IN_PLACE, [buf, MPI.INT], op=MPI.MAX)
        return bool(buf[0])

    def describe(self) -> str:
        if self.signum:
            return f"signal {signal.Signals(self.signum).name}"
        return "a signal on another rank"
