"""Simulated annealing: Cartesian molecular dynamics on the refinement target, cooled.

The potential is the refinement target itself, U(x) = weight * T_data + T_restraints + T_repulsion
(param.coordinate_objective; with several workers the DistributedTarget summed over them, whose
reduced gradient every worker holds identically). Atoms move by Newton's equations under the
forces -dU/dx, integrated by velocity Verlet, while a thermostat holds the kinetic temperature at
a schedule that falls from kT_start to kT_end; kinetic energy carries the model over barriers of U
that a minimiser cannot cross, and the cooling settles it into a low basin. Minimisation
("minimise") follows in a protocol such as "rigid,anneal,minimise".

Units. The target is dimensionless: every restraint contributes (deviation / sigma)^2, the data
term is scaled by the data weight. Temperature is measured on the same scale: kT is in target
units, and the Boltzmann distribution sampled at temperature kT is exp(-U / kT). A restraint term
(d / sigma)^2 is one quadratic degree of freedom, so equipartition gives it a mean of kT / 2: at
kT = 2 the restraints fluctuate with rms z = 1 (exp(-U / 2) is the likelihood that the restraint
sigmas describe), at kT = 20 with rms z = 3.2. Lengths are in A, masses in daltons (gemmi's
atomic weights by element), and the time unit tau is the one that makes 1 Da A^2 / tau^2 one target
unit, so that kinetic energy (1/2) m v^2 adds to U directly. Tau has no physical meaning; what
matters is the time step against the fastest motion: a bond (sigma 0.02 A, stiffness
2 / sigma^2 = 5000 per A^2) between C and N vibrates with period 2 pi sqrt(6.5 / 5000) = 0.23 tau,
and the default step of 0.01 tau resolves it in 23 steps (a C-H bond, if a model has hydrogens,
in 9).

Defaults (params.py, measured with scripts/bench_anneal.py): kT 5 -> 0.1 linearly over 1000 steps
(10 tau), Langevin friction 10 per tau, the data weight 3 x engine.initial_weight's. At kT 5 a
restraint fluctuates with rms z 1.6 and an atom's map term (weight x normalised density, some
tens of target units between density and solvent) still holds it, so side chains can turn over
but the chain stays in its density; kT 20 and more melted more than the cooling repaired. A start
far from its minimum (bad geometry) first turns its excess potential into heat, which the
thermostat removes within a few 1 / friction: the record reports the kinetic kT of the first and
last tenth of the run.

Per MD step no atom moves more than anneal_max_shift A: an atom whose step would be longer is
moved that far along it and its velocity scaled down by the same factor (a hot start with a bad
clash or a stretched bond cannot then blow up the integration). The count of capped atom steps is
reported; it is zero in a well-behaved run.

Reproducibility: the initial velocities and the Langevin noise come from one numpy Generator
seeded with anneal_seed. Every worker holds the same forces and draws the same numbers in the same
order, so every worker integrates bitwise the same trajectory (ParamRunner.run checks this), and
the trajectory does not depend on the number of workers beyond the summation order of the forces.

The integration is O(atoms) on every worker, like the L-BFGS update of the coordinate
minimisation, whose state every worker also holds in full; the forces are O(atoms / workers).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

SCHEDULES = ("linear", "plateaus")
THERMOSTATS = ("langevin", "rescale", "none")


def atom_masses(elements) -> np.ndarray:
    """Atomic weights (Da) of the elements (gemmi's table); unknown elements weigh as carbon."""
    import gemmi

    table: dict[str, float] = {}
    out = np.empty(len(elements), dtype=np.float64)
    for i, e in enumerate(elements):
        e = str(e)
        if e not in table:
            w = gemmi.Element(e).weight if e.strip() else 0.0
            table[e] = w if w > 1.5 or e.strip().upper() in ("H", "D") else 12.011
        out[i] = table[e]
    return out


def temperature_schedule(kt_start: float, kt_end: float, steps: int, schedule: str = "linear",
                         plateaus: int = 5) -> np.ndarray:
    """The target kT of each of `steps` MD steps: falling linearly from kt_start to kt_end, or in
    `plateaus` equal plateaus at kT values evenly spaced from kt_start to kt_end."""
    if steps < 1:
        raise InputError(f"anneal_steps must be at least 1, got {steps}")
    if schedule == "linear":
        return np.linspace(kt_start, kt_end, steps)
    if schedule == "plateaus":
        if plateaus < 1:
            raise InputError(f"anneal_plateaus must be at least 1, got {plateaus}")
        levels = np.linspace(kt_start, kt_end, plateaus) if plateaus > 1 else np.array([kt_start])
        which = (np.arange(steps) * plateaus) // steps
        return levels[which]
    raise InputError(f"anneal_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def kinetic_temperature(v: np.ndarray, masses: np.ndarray) -> float:
    """kT from the kinetic energy: sum m v^2 / (3 n) (equipartition, 3 degrees of freedom per atom)."""
    return float(np.sum(masses[:, None] * v * v) / (3 * len(masses))) if len(masses) else 0.0


@dataclass
class MDResult:
    xyz: np.ndarray
    v: np.ndarray
    potential: np.ndarray      # U after each step (index 0: the start)
    kinetic: np.ndarray        # kinetic energy after each step, after the thermostat (index 0: the start)
    kt: np.ndarray             # kinetic temperature after each step, same indexing
    capped: int                # atom steps shortened to max_shift
    seconds: float


def integrate(fun, xyz0: np.ndarray, masses: np.ndarray, kts: np.ndarray, dt: float, rng,
              thermostat: str = "langevin", coupling: float = 10.0, max_shift: float = 0.1,
              v0: np.ndarray | None = None) -> MDResult:
    """Velocity Verlet on fun(x) -> (U, dU/dx) from xyz0 (n, 3) over len(kts) steps of dt.

    The start velocities are v0, or drawn from the Maxwell-Boltzmann distribution at kts[0] with
    rng. After each step the thermostat acts at that step's kT: "langevin" (the velocity part of
    Langevin dynamics with friction `coupling` per tau: v <- c v + sqrt((1 - c^2) kT / m) xi,
    c = exp(-coupling dt)), "rescale" (velocities scaled towards kT by the Berendsen factor with
    coupling time 1 / coupling), or "none" (constant energy). Pure function of its arguments and
    rng's state: no MPI, no I/O."""
    if thermostat not in THERMOSTATS:
        raise InputError(f"anneal_thermostat must be one of {', '.join(THERMOSTATS)}, got {thermostat!r}")
    t0 = time.perf_counter()
    x = np.array(xyz0, dtype=np.float64).reshape(-1, 3)
    n = len(x)
    m = np.asarray(masses, dtype=np.float64)
    if len(m) != n:
        raise ValueError(f"{len(m)} masses for {n} atoms")
    inv_m = (1.0 / m)[:, None]
    kts = np.asarray(kts, dtype=np.float64)
    steps = len(kts)
    if v0 is None:
        v = rng.standard_normal((n, 3)) * np.sqrt(max(kts[0], 0.0) * inv_m)
    else:
        v = np.array(v0, dtype=np.float64).reshape(n, 3)
    f, g = fun(x)
    g = np.asarray(g, dtype=np.float64).reshape(n, 3)
    potential = np.empty(steps + 1)
    kinetic = np.empty(steps + 1)
    potential[0], kinetic[0] = f, 0.5 * float(np.sum(m[:, None] * v * v))
    capped = 0
    c = float(np.exp(-coupling * dt))
    lam_rate = min(1.0, coupling * dt)
    for k in range(steps):
        v -= (0.5 * dt) * g * inv_m
        dx = v * dt
        d2 = np.einsum("ij,ij->i", dx, dx)
        over = d2 > max_shift * max_shift
        if over.any():
            s = (max_shift / np.sqrt(d2[over]))[:, None]
            dx[over] *= s
            v[over] *= s
            capped += int(over.sum())
        x += dx
        f, g = fun(x)
        g = np.asarray(g, dtype=np.float64).reshape(n, 3)
        v -= (0.5 * dt) * g * inv_m
        kt = kts[k]
        if thermostat == "langevin":
            v *= c
            v += rng.standard_normal((n, 3)) * np.sqrt((1.0 - c * c) * kt * inv_m)
        elif thermostat == "rescale":
            now = kinetic_temperature(v, m)
            if now > 0:
                v *= np.sqrt(max(0.0, 1.0 + lam_rate * (kt / now - 1.0)))
        potential[k + 1] = f
        kinetic[k + 1] = 0.5 * float(np.sum(m[:, None] * v * v))
    kt_inst = kinetic * 2.0 / (3 * n) if n else kinetic
    return MDResult(xyz=x, v=v, potential=potential, kinetic=kinetic, kt=kt_inst, capped=capped,
                    seconds=time.perf_counter() - t0)


def check_anneal_params(params) -> None:
    """InputError for anneal parameters that cannot work."""
    p = params
    if not (p.anneal_kt_start >= 0 and p.anneal_kt_end >= 0):
        raise InputError(f"anneal temperatures must not be negative, got kT {p.anneal_kt_start} -> "
                         f"{p.anneal_kt_end}")
    if p.anneal_steps < 1:
        raise InputError(f"anneal_steps must be at least 1, got {p.anneal_steps}")
    if not p.anneal_time_step > 0:
        raise InputError(f"anneal_time_step must be positive, got {p.anneal_time_step}")
    if not p.anneal_max_shift > 0:
        raise InputError(f"anneal_max_shift must be positive (A per MD step), got {p.anneal_max_shift}")
    if p.anneal_thermostat not in THERMOSTATS:
        raise InputError(f"anneal_thermostat must be one of {', '.join(THERMOSTATS)}, "
                         f"got {p.anneal_thermostat!r}")
    if p.anneal_schedule not in SCHEDULES:
        raise InputError(f"anneal_schedule must be one of {', '.join(SCHEDULES)}, got {p.anneal_schedule!r}")
    if p.anneal_plateaus < 1:
        raise InputError(f"anneal_plateaus must be at least 1, got {p.anneal_plateaus}")
    if not p.anneal_coupling > 0 and p.anneal_thermostat != "none":
        raise InputError(f"anneal_coupling must be positive (per tau), got {p.anneal_coupling}")
    if p.anneal_map_blur < 0:
        raise InputError(f"anneal_map_blur must not be negative, got {p.anneal_map_blur}")
    if not p.anneal_weight_scale > 0:
        raise InputError(f"anneal_weight_scale must be positive, got {p.anneal_weight_scale}")


def anneal_data_term(inputs, params):
    """The fast real-space target (engine.RealSpaceTerm) of the run's map, blurred by
    params.anneal_map_blur A^2."""
    from ..engine import RealSpaceTerm

    if inputs.data is None:
        raise InputError("the anneal step needs a map: give --map or --half-maps")
    grid = inputs.map
    term = RealSpaceTerm(inputs.data, grid.origin, grid.voxel, np.ones(inputs.model.n_atoms))
    return term.blurred(params.anneal_map_blur)


N_STATS = 7      # f_start, f_end, kT first 10 %, kT last 10 %, weight, capped, seconds


def anneal_step(runner, model, xyz, inputs, geom, params, res_first_atom):
    """Simulated annealing of xyz on weight * T_data + T_restraints + repulsion, run by the
    workers (runner: param.ParamRunner; the master waits). The weight is params.weight when set,
    else engine.initial_weight's rule (data gradient about 50 per A per atom, like the restraints
    of a model with typical bond deviations) times params.anneal_weight_scale. Returns (xyz, record)."""
    from .param import coordinate_objective

    check_anneal_params(params)
    xyz = np.ascontiguousarray(xyz, dtype=np.float64)
    n = len(xyz)
    kts = temperature_schedule(params.anneal_kt_start, params.anneal_kt_end, params.anneal_steps,
                               params.anneal_schedule, params.anneal_plateaus)
    masses = atom_masses(model.element)

    def work(comm):
        term = anneal_data_term(inputs, params)
        if params.weight is not None:
            weight = float(params.weight)
        else:
            _, gd = coordinate_objective(comm, xyz, term, None, res_first_atom, 1.0, params)(xyz)
            gd = np.asarray(gd).reshape(-1, 3)
            weight = 50.0 / max(float(np.sqrt(np.mean(np.sum(gd * gd, axis=1)))), 1e-6)
            weight *= params.anneal_weight_scale
        fun = coordinate_objective(comm, xyz, term, geom, res_first_atom, weight, params)
        rng = np.random.default_rng(params.anneal_seed)
        res = integrate(fun, xyz, masses, kts, params.anneal_time_step, rng, params.anneal_thermostat,
                        params.anneal_coupling, params.anneal_max_shift)
        tail = max(1, len(kts) // 10)
        stats = (res.potential[0], res.potential[-1], float(np.mean(res.kt[1:tail + 1])),
                 float(np.mean(res.kt[-tail:])), weight, res.capped, res.seconds)
        return np.concatenate((res.xyz.ravel(), stats))
    out = runner.run(work, 3 * n + N_STATS, what="annealed coordinates", same=3 * n + N_STATS - 1)
    new = out[:3 * n].reshape(n, 3).copy()
    f0, f1, kt_first, kt_last, weight, capped, seconds = out[3 * n:]
    shift = float(np.sqrt(np.mean(np.sum((new - xyz) ** 2, axis=1)))) if n else 0.0
    record = {"step": "anneal", "md_steps": int(params.anneal_steps), "iterations": int(params.anneal_steps),
              "seconds": round(float(seconds), 2), "weight": round(float(weight), 4),
              "target_start": round(float(f0), 4), "target": round(float(f1), 4),
              "kt_start": params.anneal_kt_start, "kt_end": params.anneal_kt_end,
              "kt_kinetic_first": round(float(kt_first), 3), "kt_kinetic_last": round(float(kt_last), 3),
              "schedule": params.anneal_schedule, "thermostat": params.anneal_thermostat,
              "time_step": params.anneal_time_step, "seed": int(params.anneal_seed),
              "capped_atom_steps": int(capped), "rms_shift": round(shift, 3)}
    log.info("anneal: %d MD steps (%.1f s), kT %.3g -> %.3g (kinetic %.3g -> %.3g), weight %.3g, "
             "target %.1f -> %.1f, rms shift %.2f A, %d capped atom steps", params.anneal_steps,
             seconds, params.anneal_kt_start, params.anneal_kt_end, kt_first, kt_last, weight, f0, f1,
             shift, int(capped))
    return new, record
