"""Model idealisation: L-BFGS on the restraint target alone, without the map.

Bonds, angles, torsions, planes, chirality and non-bonded repulsion, plus the secondary-structure
and Ramachandran restraints when they are on (hpcrefine.lowres adds them to the run's restraints),
bring a model with bad geometry to ideal geometry before it is fitted ("idealise,minimise").
With idealize_anchor_sigma > 0 every atom is also tethered to its start by (d / sigma)^2, so that
atoms move as little as the geometry allows (the `idealize` command's choice); at 0 the restraints
act alone. The minimisation runs on the coordinates as a parametrisation (Coordinates) through
param.ParamRunner: the workers minimise the DistributedTarget together, the master waits, and the
geometry before and after is measured by the workers (parallel.distributed.gather_statistics).
"""
from __future__ import annotations

import logging

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

# geometry figures reported before and after, in this order
STAT_KEYS = ("bond_rmsd", "bond_max_dev", "angle_rmsd", "angle_max_dev", "torsion_rmsd",
             "chiral_rmsd", "chiral_inversions", "planarity_rmsd", "clashes")


class Coordinates:
    """The identity parametrisation: p is the coordinates, flattened."""

    point_dim = 3

    def coords(self, p) -> np.ndarray:
        return np.asarray(p, dtype=np.float64).reshape(-1, 3)

    def pullback(self, p, grad_xyz) -> np.ndarray:
        return np.asarray(grad_xyz, dtype=np.float64).ravel()


class Tether:
    """Harmonic pull of every atom to its start, sum (|x - x0| / sigma)^2 (sigma 0: none), as a
    data term: target(xyz) for one process, local(atoms).accumulate(...) for the workers."""

    def __init__(self, xyz0: np.ndarray, sigma: float, atoms: slice = slice(None)):
        self.xyz0 = np.asarray(xyz0, dtype=np.float64)
        self.k = 1.0 / (sigma * sigma) if sigma > 0 else 0.0
        self.sigma = sigma
        self.atoms = atoms

    def target(self, xyz):
        d = np.asarray(xyz, dtype=np.float64).reshape(-1, 3) - self.xyz0
        return float(self.k * np.sum(d * d)), 2.0 * self.k * d

    def local(self, atoms: slice) -> "Tether":
        return Tether(self.xyz0, self.sigma, atoms)

    def accumulate(self, xyz, grad_out, scale):
        if self.k == 0.0:
            return 0.0
        sl = self.atoms
        d = xyz[sl] - self.xyz0[sl]
        grad_out[sl] += (2.0 * self.k * scale) * d
        return float(scale * self.k * np.sum(d * d))


def _statistics(comm, xyz, tether, geom, res_first_atom, params) -> np.ndarray:
    """STAT_KEYS of xyz (collective over comm; geom.statistics with one process)."""
    if comm is None:
        st = geom.statistics(xyz)
    else:
        from ..parallel.distributed import distributed_target
        st = distributed_target(comm, xyz, tether, geom.r, res_first_atom, 1.0, params).statistics(xyz)
    return np.array([float(st[k]) for k in STAT_KEYS])


def check_idealise_params(params) -> None:
    if params.idealise_iterations < 1:
        raise InputError(f"idealise_iterations must be at least 1, got {params.idealise_iterations}")
    if not params.idealize_anchor_sigma >= 0:
        raise InputError(f"idealize_anchor_sigma must be 0 (no tether) or positive (A), got "
                         f"{params.idealize_anchor_sigma}")


def idealise_step(runner, model, xyz, geom, params, res_first_atom):
    """Minimise the restraints (and the tether, when on) from xyz. Returns (xyz, record) with the
    geometry before and after."""
    from .param import coordinate_objective, minimise_params, param_objective

    check_idealise_params(params)
    xyz = np.ascontiguousarray(xyz, dtype=np.float64)
    n = len(xyz)
    k = len(STAT_KEYS)
    tether = Tether(xyz, params.idealize_anchor_sigma)

    def work(comm):
        before = _statistics(comm, xyz, tether, geom, res_first_atom, params)
        fun = param_objective(Coordinates(), coordinate_objective(comm, xyz, tether, geom,
                                                                  res_first_atom, 1.0, params))
        res = minimise_params(fun, xyz.ravel(), params.idealise_iterations, params.lbfgs_memory,
                              max_step=params.max_step, point_dim=3)
        new = res.p.reshape(n, 3)
        after = _statistics(comm, new, tether, geom, res_first_atom, params)
        return np.concatenate((res.p, before, after, (res.f, res.iterations, res.evaluations, res.seconds)))
    out = runner.run(work, 3 * n + 2 * k + 4, what="idealised coordinates", same=3 * n + 2 * k + 3)
    new = out[:3 * n].reshape(n, 3).copy()
    before, after = out[3 * n:3 * n + k], out[3 * n + k:3 * n + 2 * k]
    f, iterations, evaluations, seconds = out[3 * n + 2 * k:]
    shift = float(np.sqrt(np.mean(np.sum((new - xyz) ** 2, axis=1)))) if n else 0.0

    def figures(values):
        return {key: (int(v) if key in ("clashes", "chiral_inversions") else round(float(v), 4))
                for key, v in zip(STAT_KEYS, values)}
    record = {"step": "idealise", "iterations": int(iterations), "evaluations": int(evaluations),
              "seconds": round(float(seconds), 2), "target": round(float(f), 4),
              "anchor_sigma": params.idealize_anchor_sigma, "rms_shift": round(shift, 3),
              "before": figures(before), "after": figures(after)}
    b, a = record["before"], record["after"]
    log.info("idealise: %d iterations (%.1f s), bonds %.4f -> %.4f A, angles %.2f -> %.2f deg, "
             "chiral inversions %d -> %d, clashes %d -> %d, rms shift %.2f A", int(iterations), seconds,
             b["bond_rmsd"], a["bond_rmsd"], b["angle_rmsd"], a["angle_rmsd"], b["chiral_inversions"],
             a["chiral_inversions"], b["clashes"], a["clashes"], shift)
    return new, record
