"""Parametrised minimisation: L-BFGS over a small vector p that generates the coordinates.

A parametrisation maps p to coordinates, xyz = coords(p), and pulls a coordinate gradient back
to p by the chain rule, grad_p = J(p)^T grad_xyz (pullback). Rigid bodies (rigid.py) and smooth
morphing (morph.py) are parametrisations; the coordinate objective they drive is the refinement
target weight * T_data + T_restraints, evaluated by one process or by the workers of a run
together (parallel.distributed.DistributedTarget, whose reduced gradient every worker holds
identically). The optimiser over p therefore takes bitwise the same steps on every worker
(core.lbfgs is a pure function of the values it receives), as the coordinate minimisation does.

ParamRunner runs one such minimisation collectively over the ranks of a run: the workers minimise,
the master waits without spinning a core and receives p from the first worker. The objective is
built on each worker by a callable `build(comm)` (comm: the workers' communicator, or None for one
process), so any objective over p plugs in (the ADP target of adp.py too).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..core.lbfgs import lbfgs

TAG_PARAMS = 23


@dataclass
class ParamResult:
    p: np.ndarray
    f: float
    iterations: int
    evaluations: int
    seconds: float


def param_objective(param, xyz_fun, penalty=None):
    """fun(p) -> (f, grad_p) of xyz_fun(param.coords(p)) plus penalty(p) -> (f, grad_p) if given.

    xyz_fun(xyz) -> (f, grad) with grad of xyz's size (flat or (n, 3))."""
    def fun(p):
        xyz = param.coords(p)
        f, gx = xyz_fun(xyz)
        gp = param.pullback(p, np.asarray(gx, dtype=np.float64).reshape(-1, 3))
        if penalty is not None:
            fp, gpp = penalty(p)
            f = f + fp
            gp = gp + gpp
        return float(f), gp
    return fun


def coordinate_objective(comm, xyz0, data_term, geom, res_first_atom, weight: float, params):
    """xyz -> (f, grad) of weight * T_data + T_restraints (+ repulsion), or weight * T_data alone
    when geom is None.

    comm None: one process (engine.GeometryTerm geom). Else the DistributedTarget of this rank
    over comm (collective: every rank of comm must call it with the same coordinates)."""
    if comm is None:
        def fun(xyz):
            fd, gd = data_term.target(xyz)
            if geom is None:
                return weight * fd, weight * gd
            fg, gg = geom.target(xyz)
            return weight * fd + fg, weight * gd + gg
        return fun
    import dataclasses

    from ..parallel.distributed import distributed_target
    from ..restraints import Restraints
    if geom is None:
        restraints, params = Restraints(), dataclasses.replace(params, nonbonded_weight=0.0)
    else:
        restraints = geom.r
    target = distributed_target(comm, xyz0, data_term, restraints, res_first_atom, weight, params)
    return lambda xyz: target(np.ascontiguousarray(xyz, dtype=np.float64).ravel())


def minimise_params(fun, p0, iterations: int, memory: int = 10, max_step: float | None = None,
                    point_dim: int = 1) -> ParamResult:
    """L-BFGS over p (core.lbfgs; max_step bounds each point of point_dim components)."""
    t0 = time.perf_counter()
    p, f, state, _ = lbfgs(fun, np.asarray(p0, dtype=np.float64).copy(), maxiter=iterations,
                           m=memory, max_step=max_step, point_dim=point_dim,
                           first_step=0.1 if max_step is None else min(0.1, max_step))
    return ParamResult(p=p, f=float(f), iterations=state.iteration, evaluations=state.n_evals,
                       seconds=time.perf_counter() - t0)


class ParamRunner:
    """Runs parametrised minimisations collectively over the ranks of a run (ctx None or one
    rank: in this process). The workers build the objective over their communicator and minimise;
    the master receives the result from the first worker, waiting quietly (interrupts polled)."""

    def __init__(self, ctx=None, interrupts=None):
        self.ctx = ctx
        self.on_poll = interrupts.poll if interrupts is not None else None

    @property
    def parallel(self) -> bool:
        return self.ctx is not None and self.ctx.size > 1

    def minimise(self, build, p0, iterations: int, memory: int = 10, max_step: float | None = None,
                 point_dim: int = 1) -> ParamResult:
        """build(comm) -> fun(p) -> (f, grad_p); comm is the workers' communicator (None with
        one process). Every rank calls this with the same p0; every rank gets the same result."""
        p0 = np.asarray(p0, dtype=np.float64)
        n = p0.size

        def work(comm):
            res = minimise_params(build(comm), p0, iterations, memory, max_step, point_dim)
            return np.concatenate((res.p, (res.f, res.iterations, res.evaluations, res.seconds)))
        out = self.run(work, n + 4, what="parameters", same=n)
        return ParamResult(p=out[:n].copy(), f=float(out[n]), iterations=int(out[n + 1]),
                           evaluations=int(out[n + 2]), seconds=float(out[n + 3]))

    def run(self, work, size: int, what: str = "results", same: int | None = None) -> np.ndarray:
        """Any collective computation of the workers with the same answer on every worker:
        work(comm) -> float64 array of `size` values (comm: the workers' communicator, None with
        one process). The workers' answers (their first `same` values, all by default: timings may
        differ) are checked to be identical; the master waits quietly
        and receives the answer from the first worker. Every rank returns the answer."""
        if not self.parallel:
            return np.asarray(work(None), dtype=np.float64).reshape(size)
        from mpi4py import MPI

        from ..parallel.distributed import same_on_all_ranks, wait_quietly
        ctx = self.ctx
        first_worker = 1
        if ctx.is_worker:
            out = np.ascontiguousarray(work(ctx.workers), dtype=np.float64).reshape(size)
            if not same_on_all_ranks(ctx.workers, out[:size if same is None else same]):
                raise RuntimeError(f"the workers' {what} diverged: the reduced gradient "
                                   "differed between ranks")
            if ctx.rank == first_worker:
                ctx.world.Send([out, MPI.DOUBLE], dest=0, tag=TAG_PARAMS)
            return out
        buf = np.empty(size)
        req = ctx.world.Irecv([buf, MPI.DOUBLE], source=first_worker, tag=TAG_PARAMS)
        wait_quietly(ctx.world, req, on_poll=self.on_poll)
        return buf


def check_gradient(fun, p, h: float = 1e-5, indices=None) -> float:
    """Largest |analytic - central difference| / max(1, |analytic|) over the given components of
    p (all by default): for tests of a parametrisation's pullback."""
    p = np.asarray(p, dtype=np.float64)
    _, g = fun(p.copy())
    worst = 0.0
    for i in (range(p.size) if indices is None else indices):
        e = np.zeros_like(p)
        e[i] = h
        fp, _ = fun(p + e)
        fm, _ = fun(p - e)
        fd = (fp - fm) / (2 * h)
        worst = max(worst, abs(fd - g[i]) / max(1.0, abs(g[i])))
    return worst
