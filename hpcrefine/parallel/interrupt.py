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

# a signal that arrived before the run's Interrupts existed (while Python, MPI and the inputs load)
_early = {"signum": 0}


def _set(signum: int, handler) -> object:
    """Install handler for signum with SA_RESTART: a system call that the signal interrupts is
    restarted instead of failing with EINTR. Python's default leaves EINTR to the caller, and C
    libraries do not all retry: a SIGUSR1 during MPI_Init left MPICH's PMI exchange spinning for
    ever under srun --mpi=pmi2."""
    previous = signal.signal(signum, handler)
    signal.siginterrupt(signum, False)
    return previous


def catch_early() -> None:
    """Remember SIGUSR1/SIGTERM from the start of the process (call before mpi4py is imported):
    the run stops at its first step boundary, with a checkpoint, instead of dying or hanging."""
    def early(signum, frame):
        _early["signum"] = signum

    for s in SIGNALS:
        _set(s, early)


class Interrupts:
    def __init__(self, world=None):
        self.world = world if world is not None and world.Get_size() > 1 else None
        self.signum = _early["signum"]
        self.heard = False           # a stop message from another rank
        self._sent = []
        self._previous = {s: _set(s, self._handler) for s in SIGNALS}

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for s, h in self._previous.items():
            _set(s, h)
        self._previous = {}

    def finished(self) -> None:
        """No step is left to stop: from here on SIGUSR1 (a time-limit warning) is ignored, so a
        late warning cannot kill a rank that waits in MPI_Finalize for rank 0 to write the
        outputs (Python resets its own handlers to the default action, which for SIGUSR1 is to
        terminate, when it shuts down). SIGTERM gets its previous handling back."""
        self.restore()
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

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

    def finish(self) -> None:
        """Collective over the world, once every rank has stopped: complete this rank's stop
        messages, take in those still on the way, and wait (quietly) until every rank is here.
        A rank that left before the others had finished talking to it can leave them blocked in
        MPI_Finalize (seen under srun --mpi=pmi2); after this, all leave together."""
        if self.world is None:
            return
        from mpi4py import MPI

        from .distributed import wait_quietly

        for req in self._sent:
            wait_quietly(self.world, req)
        self._sent = []
        wait_quietly(self.world, self.world.Ibarrier())
        buf = np.zeros(1, dtype=np.int32)
        while self.world.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_STOP):
            self.world.Recv([buf, MPI.INT], source=MPI.ANY_SOURCE, tag=TAG_STOP)
        wait_quietly(self.world, self.world.Ibarrier())

    def describe(self) -> str:
        if self.signum:
            return f"signal {signal.Signals(self.signum).name}"
        return "a signal on another rank"
