"""Occupancy refinement of alternative conformations against the map, by the density-fit target.

Groups: in every residue whose atoms carry two or more altloc letters, one group per letter (the
atoms with that altloc); a group's atoms share one occupancy. Atoms without altloc (a residue's
backbone when only its side chain is split), residues with a single letter and residues whose
conformers' occupancies sum to 0 keep their occupancies.

Constraint and parametrisation: the occupancies of a residue's conformers sum to that residue's
total at the start, t_r (the sum of its groups' mean occupancies, 1 in a normal file, capped at 1).
Each group g has one free parameter p_g and

    o_g = t_r exp(p_g) / sum_{h in r} exp(p_h)          (a softmax over the residue's conformers)

so every occupancy lies in [0, t_r] within [0, 1] and the sum is t_r up to rounding, whatever p the
optimiser tries: no bounds, clipping or penalty is needed, and L-BFGS runs unconstrained. The
Jacobian gives  dT/dp_h = o_h (G_h - sum_g s_g G_g)  with G_g = dT/do_g and s_g = o_g / t_r. Adding
a constant to all p of a residue changes nothing; that direction has zero gradient, so L-BFGS
(whose steps are combinations of gradients) never moves along it. A start occupancy is floored at
1e-3 t_r (p = log o is finite), so a conformer at 0 can grow back.

Data term: the density fit of core/modelmap.py at fixed coordinates and B: atom a is a Gaussian of
weight amp_a = electrons_a x occupancy_a, T = 1000 sum_mask (rho_obs - k rho_calc)^2 /
sum_mask rho_obs^2 with k fitted at every evaluation (its derivative drops out), and
dT/docc_a = electrons_a sum_v dT/drho_calc(v) rho_a(v) / amp_a (the GRAD_AMP mode of the voxel
loop, which takes the unit-weight Gaussian, so an atom at occupancy 0 has its derivative too).

Parallel: as the ADP step, each worker builds the whole model map, takes the gradient of its share
of the grouped atoms (contiguous equal shares of them, since they are few and anywhere in the
model) and one Allreduce sums the gradients and the target; every worker then pulls the same
reduced gradient back to p and takes the same L-BFGS step.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from ..core.modelmap import _gather_amp, _splat, atom_amplitudes
from .adp import B_FLOOR

log = logging.getLogger(__name__)

START_FLOOR = 1e-3          # smallest start occupancy, relative to the residue's total


class ConformerGroups:
    """The occupancy groups of a model and their softmax parametrisation (module docstring).

    atoms: the grouped atoms (sorted model indices); group_of: each one's group; residue: each
    group's residue (model residue index); altloc: each group's letter; first: (n_res + 1,)
    the groups of grouped residue j are first[j]:first[j + 1]; total: each grouped residue's t_r."""

    point_dim = 1

    def __init__(self, atoms, group_of, residue, altloc, first, total):
        self.atoms = np.asarray(atoms, dtype=np.int64)
        self.group_of = np.asarray(group_of, dtype=np.int64)
        self.residue = np.asarray(residue, dtype=np.int64)
        self.altloc = np.asarray(altloc)
        self.first = np.asarray(first, dtype=np.int64)
        self.total = np.asarray(total, dtype=np.float64)
        self.res_of_group = np.repeat(np.arange(len(self.total)), np.diff(self.first))

    @classmethod
    def of(cls, model, occ=None) -> "ConformerGroups":
        """The groups of a Model (modelio) at occupancies occ (default: the model's)."""
        occ = model.occ if occ is None else np.asarray(occ, dtype=np.float64)
        atoms, group_of, residue, letters, first, total = [], [], [], [], [0], []
        split = np.unique(model.res_index[model.altloc != ""])
        for r in split.tolist():
            span = np.arange(model.res_first_atom[r], model.res_first_atom[r + 1])
            alt = model.altloc[span]
            names = sorted(set(alt.tolist()) - {""})
            members = [span[alt == a] for a in names]
            mean_occ = [float(np.mean(occ[m])) for m in members]
            t = sum(mean_occ)
            if len(names) < 2 or not t > 0:
                continue
            if t > 1.0 + 1e-6:
                log.warning("occupancy: the conformers of %s sum to %.3f; refined with total 1",
                            model.residue_label(r), t)
            for a, m in zip(names, members):
                atoms.append(m)
                group_of.append(np.full(len(m), len(letters)))
                residue.append(r)
                letters.append(a)
            first.append(len(letters))
            total.append(min(t, 1.0))
        if not letters:
            return cls(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, dtype=str), [0], np.zeros(0))
        atoms, group_of = np.concatenate(atoms), np.concatenate(group_of)
        order = np.argsort(atoms, kind="stable")
        return cls(atoms[order], group_of[order], residue, letters, first, total)

    @property
    def n_groups(self) -> int:
        return len(self.residue)

    @property
    def n_residues(self) -> int:
        return len(self.total)

    def _fractions(self, p) -> np.ndarray:
        """s_g = exp(p_g) / sum_{h in r} exp(p_h), shifted by each residue's largest p (stable)."""
        p = np.asarray(p, dtype=np.float64)
        top = np.maximum.reduceat(p, self.first[:-1]) if len(p) else p
        e = np.exp(p - top[self.res_of_group])
        return e / np.add.reduceat(e, self.first[:-1])[self.res_of_group]

    def occupancies(self, p) -> np.ndarray:
        """The groups' occupancies o_g = t_r s_g."""
        return self.total[self.res_of_group] * self._fractions(p)

    def start(self, occ) -> np.ndarray:
        """p reproducing the groups' mean occupancies in occ (scaled to the totals, floored)."""
        occ = np.asarray(occ, dtype=np.float64)
        mean = (np.bincount(self.group_of, weights=occ[self.atoms], minlength=self.n_groups)
                / np.bincount(self.group_of, minlength=self.n_groups))
        return np.log(np.maximum(mean, START_FLOOR * self.total[self.res_of_group]))

    def expand(self, p, occ) -> np.ndarray:
        """Per-atom occupancies: occ with every grouped atom set to its group's occupancy."""
        out = np.array(occ, dtype=np.float64)
        out[self.atoms] = self.occupancies(p)[self.group_of]
        return out

    def pullback(self, p, g_atoms) -> np.ndarray:
        """dT/dp from dT/docc of the grouped atoms (in the order of self.atoms)."""
        G = np.bincount(self.group_of, weights=g_atoms, minlength=self.n_groups)
        s = self._fractions(p)
        mean = np.add.reduceat(s * G, self.first[:-1]) if self.n_groups else G
        return self.occupancies(p) * (G - mean[self.res_of_group])


class OccupancyDataTerm:
    """T_data(occupancy) at fixed coordinates and B, and its gradient with respect to the
    occupancies of chosen atoms."""

    def __init__(self, data, origin, voxel, mask, xyz, elements, b, b_blur: float):
        self.data = np.ascontiguousarray(data, dtype=np.float64)
        self.origin = np.asarray(origin, dtype=np.float64)
        self.voxel = np.asarray(voxel, dtype=np.float64)
        self.mask = np.ascontiguousarray(mask, dtype=np.float64)
        self.xyz = np.ascontiguousarray(xyz, dtype=np.float64)
        self.electrons = atom_amplitudes(elements)
        b = np.maximum(np.asarray(b, dtype=np.float64), B_FLOOR)
        self.sig2 = (b + float(b_blur)) / (8.0 * math.pi ** 2)
        masked = self.data * self.mask
        self.scale = 1000.0 / max(float(np.sum(masked * masked)), 1e-30)

    def target(self, occ, atoms=None) -> tuple[float, np.ndarray]:
        """T_data and dT/docc for the atoms listed in `atoms` (sorted indices; all by default),
        as an array over those atoms."""
        amp = self.electrons * np.asarray(occ, dtype=np.float64)
        calc = np.zeros(self.data.shape)
        _splat(self.xyz, amp, self.sig2, self.origin, self.voxel, calc)
        calc *= self.mask
        k = float(np.sum(self.data * calc) / max(float(np.sum(calc * calc)), 1e-30))
        diff = (self.data - k * calc) * self.mask
        f = float(np.sum(diff * diff)) * self.scale
        atoms = np.arange(len(self.xyz)) if atoms is None else np.asarray(atoms, dtype=np.int64)
        g = np.zeros(len(atoms))
        _gather_amp(np.ascontiguousarray(self.xyz[atoms]), np.ascontiguousarray(amp[atoms]),
                    np.ascontiguousarray(self.sig2[atoms]), self.origin, self.voxel,
                    (-2.0 * k * self.scale) * diff, 0, len(atoms), g)
        return f, g * self.electrons[atoms]


def share(n: int, n_parts: int, part: int) -> slice:
    """Part `part` of n items cut into n_parts contiguous shares of sizes differing by at most 1."""
    return slice(n * part // n_parts, n * (part + 1) // n_parts)


def occupancy_objective(comm, data: OccupancyDataTerm, groups: ConformerGroups, occ0):
    """fun(p) -> (f, grad_p) of T_data over the groups' parameters, the other atoms at occ0;
    collective over comm (each rank its share of the grouped atoms, one Allreduce) when given."""
    m = len(groups.atoms)
    mine = slice(0, m) if comm is None else share(m, comm.Get_size(), comm.Get_rank())
    counts_target = comm is None or comm.Get_rank() == 0
    buf = np.zeros(m + 1)

    def fun(p):
        occ = groups.expand(p, occ0)
        f, g = data.target(occ, groups.atoms[mine])
        buf[:] = 0.0
        buf[mine] = g
        buf[m] = f if counts_target else 0.0
        if comm is not None:
            from mpi4py import MPI
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return float(buf[m]), groups.pullback(p, buf[:m])
    return fun


def occupancy_step(runner, model, xyz, b, occ, inputs, params):
    """Occupancies of the alternative conformations at fixed coordinates and B against the map.
    Returns (occ, record); occ unchanged when the model has no alternative conformations."""
    from ..core.density import normalise_map
    from ..mapstats import atom_mask

    occ = np.asarray(occ, dtype=np.float64)
    groups = ConformerGroups.of(model, occ)
    record = {"step": "occupancy", "residues": groups.n_residues, "groups": groups.n_groups,
              "iterations": 0, "seconds": 0.0}
    if groups.n_groups == 0:
        log.info("occupancy: the model has no residue with alternative conformations; nothing to refine")
        return occ, record

    def build(comm):
        # only the ranks that evaluate build the term (the master of a parallel run waits)
        grid = inputs.map
        mask = atom_mask(xyz, inputs.data.shape, grid.origin, grid.voxel, params.fit_mask_radius)
        data = OccupancyDataTerm(normalise_map(inputs.data), grid.origin, grid.voxel, mask, xyz,
                                 model.element, b, params.fit_b_blur)
        return occupancy_objective(comm, data, groups, occ)
    p0 = groups.start(occ)
    res = runner.minimise(build, p0, params.occupancy_iterations, params.lbfgs_memory,
                          max_step=params.occupancy_max_step, point_dim=1)
    new = groups.expand(res.p, occ)
    before, after = groups.occupancies(p0), groups.occupancies(res.p)
    record.update({"iterations": res.iterations, "seconds": round(res.seconds, 2),
                   "target": round(float(res.f), 4),
                   "mean_change": round(float(np.mean(np.abs(after - before))), 4),
                   "min": round(float(after.min()), 3), "max": round(float(after.max()), 3)})
    log.info("occupancy (%d conformers of %d residues): %d iterations (%.1f s), mean change %.3f, "
             "range %.2f-%.2f", groups.n_groups, groups.n_residues, res.iterations, res.seconds,
             record["mean_change"], record["min"], record["max"])
    return new, record
