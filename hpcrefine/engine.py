"""The refinement engine: a weighted sum of a data term and the restraint terms, minimised by L-BFGS.

The engine does not know which data term it drives: anything with `target(xyz) -> (f, grad)` and
`statistics(xyz) -> dict` plugs in. Weight choice follows the geometry limits of the parameters:
the largest data weight whose short minimisation keeps bond and angle rmsd within limits.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from .core import geometry, nonbonded
from .core.density import normalise_map, real_space_target
from .core.lbfgs import lbfgs
from .params import RefineParams
from .restraints import Restraints
from .topology import geometry_stats

log = logging.getLogger(__name__)


class RealSpaceTerm:
    """Fast real-space target: minus the weighted sum of normalised map values at atom centres."""

    def __init__(self, data: np.ndarray, origin: np.ndarray, voxel: np.ndarray, atom_weight: np.ndarray,
                 normalise: bool = True):
        self.data = normalise_map(data) if normalise else data
        self.origin = np.asarray(origin, dtype=np.float64)
        self.voxel = np.asarray(voxel, dtype=np.float64)
        self.atom_weight = np.asarray(atom_weight, dtype=np.float64)

    def target(self, xyz: np.ndarray) -> tuple[float, np.ndarray]:
        return real_space_target(self.data, self.origin, self.voxel, xyz, self.atom_weight)

    def blurred(self, b_extra: float) -> "RealSpaceTerm":
        """The same term on the map blurred by exp(-b s^2/4) (a wider basin of attraction)."""
        if b_extra <= 0:
            return self
        from .core.density import blur_map
        out = RealSpaceTerm(blur_map(self.data, self.voxel, b_extra), self.origin, self.voxel,
                            self.atom_weight, normalise=True)
        out.blur_of = (self, b_extra)       # the term it blurs (ncs.term_average)
        return out


class GeometryTerm:
    """All stereochemical restraints plus non-bonded repulsion, with a neighbour list kept current."""

    def __init__(self, restraints: Restraints, params: RefineParams):
        self.r = restraints
        self.nb_sigma = params.nonbonded_sigma
        self.nb_weight = params.nonbonded_weight
        self.nbl: nonbonded.NeighbourList | None = None
        self.n_nbl_builds = 0

    def _neighbours(self, xyz: np.ndarray) -> nonbonded.NeighbourList:
        if self.nbl is None:
            self.nbl = nonbonded.NeighbourList(xyz, self.r)
            self.n_nbl_builds += 1
        elif self.nbl.refresh(xyz):         # around the atoms that moved far, when needed
            self.n_nbl_builds += 1
        return self.nbl

    def target(self, xyz: np.ndarray) -> tuple[float, np.ndarray]:
        f, g, _ = geometry.restraint_energy(xyz, self.r)
        if self.nb_weight > 0:
            e_nb, g_nb = nonbonded.repulsion(xyz, self._neighbours(xyz), sigma=self.nb_sigma)
            f += self.nb_weight * e_nb
            g += self.nb_weight * g_nb
        return f, g

    def statistics(self, xyz: np.ndarray) -> dict:
        dev = {k: v for k, v in geometry_stats(xyz, self.r).items() if not k.startswith("n_")}
        dev["clashes"] = int(nonbonded.clashes(xyz, self._neighbours(xyz)))
        return dev


@dataclass
class WeightTrial:
    weight: float
    bond_rmsd: float
    angle_rmsd: float
    data_target: float
    accepted: bool


@dataclass
class MinimiseResult:
    xyz: np.ndarray
    f: float
    iterations: int
    evaluations: int
    seconds: float
    # GeometryTerm.statistics of xyz when the minimiser computed them (the workers' shares
    # summed: parallel.distributed_minimise), so no rank makes them again over the whole model
    statistics: dict | None = None


# the keys of a MinimiseResult's statistics (parallel.distributed.gather_statistics)
STATISTICS_KEYS = ("bond_rmsd", "bond_rmsz", "bond_max_dev", "angle_rmsd", "angle_rmsz", "angle_max_dev",
                   "torsion_rmsd", "chiral_rmsd", "chiral_inversions", "planarity_rmsd", "clashes")
_COUNT_KEYS = ("chiral_inversions", "clashes")


def statistics_to_array(st: dict) -> np.ndarray:
    """A MinimiseResult's statistics as STATISTICS_KEYS doubles (to send with a result, or to
    keep in a checkpoint)."""
    return np.array([float(st[k]) for k in STATISTICS_KEYS])


def statistics_from_array(a: np.ndarray) -> dict:
    return {k: (int(v) if k in _COUNT_KEYS else float(v)) for k, v in zip(STATISTICS_KEYS, a)}


def result_buffer(n: int) -> np.ndarray:
    """A buffer for a MinimiseResult of n coordinates (result_to_buffer): the coordinates, f,
    iterations, evaluations, seconds, a flag and the statistics when the minimiser made them."""
    return np.zeros(n + 5 + len(STATISTICS_KEYS))


def result_to_buffer(res: MinimiseResult, buf: np.ndarray) -> np.ndarray:
    """Fill result_buffer(res.xyz.size) with res (for the rank that sends it)."""
    n = res.xyz.size
    buf[:n] = res.xyz.ravel()
    buf[n:n + 4] = (res.f, res.iterations, res.evaluations, res.seconds)
    buf[n + 4] = res.statistics is not None
    if res.statistics is not None:
        buf[n + 5:] = statistics_to_array(res.statistics)
    return buf


def result_from_buffer(buf: np.ndarray, shape) -> MinimiseResult:
    """The MinimiseResult result_to_buffer packed, coordinates of this shape."""
    n = int(np.prod(shape))
    return MinimiseResult(xyz=buf[:n].reshape(shape).copy(), f=float(buf[n]), iterations=int(buf[n + 1]),
                          evaluations=int(buf[n + 2]), seconds=float(buf[n + 3]),
                          statistics=statistics_from_array(buf[n + 5:]) if buf[n + 4] else None)


def geometry_of(res: MinimiseResult, geom: GeometryTerm) -> dict:
    """The geometry statistics of a minimisation's result: the minimiser's own when it made them
    (the same numbers on every rank), else geom.statistics over the whole model."""
    return res.statistics if res.statistics is not None else geom.statistics(res.xyz)


def minimise(xyz0: np.ndarray, data_term, geom: GeometryTerm, weight: float, iterations: int,
             params: RefineParams, callback=None) -> MinimiseResult:
    """L-BFGS on coordinates of T = weight * T_data + T_geometry."""
    shape = xyz0.shape

    def fun(x):
        xyz = x.reshape(shape)
        fd, gd = data_term.target(xyz)
        fg, gg = geom.target(xyz)
        return weight * fd + fg, (weight * gd + gg).ravel()

    t0 = time.perf_counter()
    x, f, state, info = lbfgs(fun, xyz0.ravel().copy(), maxiter=iterations, m=params.lbfgs_memory,
                              max_step=params.max_step, callback=callback)
    return MinimiseResult(xyz=x.reshape(shape), f=f, iterations=state.iteration, evaluations=state.n_evals,
                          seconds=time.perf_counter() - t0)


def of_target(data_term, xyz: np.ndarray, fn) -> float:
    """fn(f, g) of data_term.target(xyz), a number. A term evaluated by one rank for all (a
    parallel map store's: parallel.mapstore.StoredRealSpaceTerm.reduced) applies fn there and
    sends the others the number instead of every atom's gradient."""
    reduced = getattr(data_term, "reduced", None)
    if reduced is not None:
        return reduced(xyz, fn)
    return float(fn(*data_term.target(xyz)))


def _gradient_rms(f, g) -> float:
    g = np.asarray(g, dtype=np.float64)
    return float(np.sqrt(np.mean(np.sum(g * g, axis=1))))


def initial_weight(xyz: np.ndarray, data_term, geom: GeometryTerm) -> float:
    """A first guess: the weight that makes the data gradient comparable with the restraint gradient
    of a model whose bonds deviate by their typical 0.01-0.02 A (about 50 per A per atom)."""
    rms = of_target(data_term, xyz, _gradient_rms)
    return 50.0 / max(rms, 1e-6)


# how far above what the restraint-dominated (loosest) weight reaches the limits are raised when
# even that weight is above them
ANGLE_LIMIT_MARGIN = 0.2      # degrees
BOND_LIMIT_MARGIN = 0.002     # A


@dataclass(frozen=True)
class GeometryLimits:
    bond_rmsd: float
    angle_rmsd: float

    def ok(self, stats: dict) -> bool:
        return stats["bond_rmsd"] <= self.bond_rmsd and stats["angle_rmsd"] <= self.angle_rmsd


def geometry_limits(params: RefineParams, loosest: dict | None = None) -> GeometryLimits:
    """The bond and angle rmsd limits of a weight choice. Given the geometry that the loosest
    (restraint-dominated) weight reaches, a limit that even it misses is raised to what it reached
    plus a margin: then what holds the geometry back is a few residues caught in a wrong local
    minimum (a ring threaded through itself), or too few iterations to undo a distorted start,
    not the data weight, and the choice goes on among the weights that do no worse."""
    bond, angle = params.bond_rmsd_max, params.angle_rmsd_max
    if loosest is not None:
        bond = max(bond, loosest["bond_rmsd"] + BOND_LIMIT_MARGIN)
        angle = max(angle, loosest["angle_rmsd"] + ANGLE_LIMIT_MARGIN)
    return GeometryLimits(bond, angle)


# a predicted weight stays between these fractions of the lowest weight that broke a limit
PREDICTED_MIN = 1.0 / 8.0
PREDICTED_MAX = 0.8


def predicted_weight(floor: WeightTrial, over: WeightTrial, limits: GeometryLimits) -> float:
    """The weight at which the bond and angle rmsd reach their limits, interpolated linearly in
    the weight between the restraint-dominated trial (floor, within the limits) and a trial that
    broke them (over); the lowest over the limits broken, kept within PREDICTED_MIN and
    PREDICTED_MAX of over's weight. On real models the rmsd grows faster than linearly with the
    weight above the restraints' floor, so the prediction errs low, inside the limits (6zu5,
    second macro-cycle: bonds 0.0096 A at weight 3.3, 0.0174 A at 53.5; predicted 0.012 A at
    18.8, where the trial reached 0.0109 A)."""
    w = over.weight
    for got, low, limit in ((over.bond_rmsd, floor.bond_rmsd, limits.bond_rmsd),
                            (over.angle_rmsd, floor.angle_rmsd, limits.angle_rmsd)):
        if got > limit and got > low:
            f = max(limit - low, 0.0) / (got - low)
            w = min(w, floor.weight + f * (over.weight - floor.weight))
    return min(max(w, over.weight * PREDICTED_MIN), over.weight * PREDICTED_MAX)


def trial_iterations(params: RefineParams) -> int:
    """Iterations of one weight trial: params.weight_trial_iterations, at most params.iterations."""
    return max(1, min(params.weight_trial_iterations, params.iterations))


def choose_weight(xyz: np.ndarray, data_term, geom: GeometryTerm, params: RefineParams,
                  w_start: float, minimiser=None, w_max: float | None = None,
                  kept: dict | None = None) -> tuple[float, list[WeightTrial]]:
    """Largest weight whose short minimisation from xyz keeps geometry within limits, and at most
    w_max when given. From w_start within the limits (and no w_max): up a factor-of-2 ladder, then
    one bisection step. From w_start beyond them: down to the weight where the limits are
    predicted to be met (predicted_weight; at most 3 trials, the second and third also at most
    half the weight that last broke the limits, none at or below the restraint-dominated weight,
    which is the weight when they all break them).

    The limits are raised to what a restraint-dominated trial (weight / 16) reaches, plus a
    margin, when that is higher (geometry_limits); that trial runs only once a trial has broken
    the parameters' own limits (its result would not change any decision before).

    A trial runs params.weight_trial_iterations, but never more than the macro-cycle's own
    minimisation (params.iterations): a trial longer than the run it sets the weight for would
    judge geometry the run never reaches, at more than the run's cost.

    kept (a dict, when given) receives the weight and the MinimiseResult of the largest accepted
    trial ("weight", "result"), which is the weight returned: the macro-cycle continues from it
    (continue_trial) instead of repeating its first iterations.
    """
    trials: list[WeightTrial] = []
    minimiser = minimiser or minimise
    iterations = trial_iterations(params)
    if w_max is not None:
        w_start = min(w_start, w_max)
    base = geometry_limits(params)
    raised: dict = {}

    def raised_limits() -> GeometryLimits:
        """The limits raised from the restraint-dominated trial, which runs the first time a
        trial breaks the parameters' own limits (a trial within those is within any raised ones,
        so when every trial is, it never runs)."""
        if not raised:
            floor = trial(w_start / 16, judged=False)
            limit = geometry_limits(params, {"bond_rmsd": floor.bond_rmsd,
                                             "angle_rmsd": floor.angle_rmsd})
            if limit.angle_rmsd > params.angle_rmsd_max:
                log.info("  angle limit raised to %.2f deg (restraint-dominated trial reaches %.2f)",
                         limit.angle_rmsd, floor.angle_rmsd)
            if limit.bond_rmsd > params.bond_rmsd_max:
                log.info("  bond limit raised to %.4f A (restraint-dominated trial reaches %.4f)",
                         limit.bond_rmsd, floor.bond_rmsd)
            raised.update(floor=floor, limit=limit)
        return raised["limit"]

    def trial(w, judged=True):
        """judged False: the restraint-dominated trial, within the limits raised from it."""
        res = minimiser(xyz, data_term, geom, w, iterations, params)
        st = geometry_of(res, geom)
        fd = of_target(data_term, res.xyz, lambda f, g: f)
        ok = not judged or base.ok(st) or raised_limits().ok(st)
        t = WeightTrial(w, st["bond_rmsd"], st["angle_rmsd"], fd, ok)
        trials.append(t)
        # the weight returned is always the largest accepted one (the ladder only raises lo)
        if kept is not None and t.accepted and w >= kept.get("weight", -math.inf):
            kept.update(weight=w, result=res)
        log.info("  weight %9.3f: bonds %.4f A, angles %.2f deg, data %.1f  %s", w, t.bond_rmsd,
                 t.angle_rmsd, fd, "restraint-dominated" if not judged
                 else "ok" if t.accepted else "too loose")
        return t

    t = trial(w_start)
    if t.accepted and w_max is not None and w_start >= w_max:
        return w_start, trials
    if t.accepted:
        lo, hi = w_start, None
        for _ in range(4 if w_max is None else 0):
            t = trial(lo * 2)
            if not t.accepted:
                hi = lo * 2
                break
            lo *= 2
    else:
        # the weight broke a limit (so the restraint-dominated trial has run): the next trial
        # goes where the limits are predicted to be met, between the restraint-dominated trial
        # and the lowest weight that broke them; accepted, it is the weight (it sits near the
        # limit), else it bounds the next prediction, which then also halves the weight at
        # least (geometry that grows faster at low weights than at high ones defeats the linear
        # prediction)
        floor, limit = raised["floor"], raised["limit"]
        for k in range(3):
            w = predicted_weight(floor, t, limit)
            if k:
                w = min(w, t.weight / 2)
            if w <= floor.weight:           # nothing left between the floor and what broke
                break
            t = trial(w)
            if t.accepted:
                return w, trials
        lo = w_start / 16
        log.warning("no weight above the restraint-dominated one kept the geometry within the "
                    "limits; using %.3f", lo)
        return lo, trials
    if hi is not None:
        mid = math.sqrt(lo * hi)
        if trial(mid).accepted:
            lo = mid
    return lo, trials


def continue_trial(minimiser, xyz: np.ndarray, data_term, geom, weight: float, params: RefineParams,
                   kept: dict | None = None) -> MinimiseResult:
    """A macro-cycle's minimisation at `weight` from xyz: params.iterations of L-BFGS. When its
    weight trial (choose_weight's `kept`: same start, same weight) has run the first
    trial_iterations of them, it continues from that trial's end for the rest, so they are not
    run twice (with trials as long as the cycle, the trial is the cycle's minimisation)."""
    if kept is None or kept.get("weight") != weight:
        return minimiser(xyz, data_term, geom, weight, params.iterations, params)
    first = kept["result"]
    rest = params.iterations - trial_iterations(params)
    if rest <= 0:
        return first
    res = minimiser(first.xyz, data_term, geom, weight, rest, params)
    return MinimiseResult(xyz=res.xyz, f=res.f, iterations=first.iterations + res.iterations,
                          evaluations=first.evaluations + res.evaluations,
                          seconds=first.seconds + res.seconds, statistics=res.statistics)
